"""The `fast` embedded build: layout, loadability, the teacher/student gap, and the cache."""
import json

import pytest

from build.embedded.build import VARIANTS, build, is_built, settings_hash

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def report(embedded_fast):
    return json.loads((embedded_fast / "build_report.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(embedded_fast):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_fast / "tokenizer")


def test_layout(embedded_fast):
    for name in ("build_report.json", "manifest.json", "tokenizer/tokenizer.json",
                 *(f"data/{split}.jsonl" for split in SPLITS)):
        assert (embedded_fast / name).is_file(), name
    for model in ("teacher", "student"):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (embedded_fast / model / name).is_file(), f"{model}/{name}"


def test_datasets_loads_all_splits(embedded_fast, report):
    import datasets

    data = datasets.load_dataset("json", data_files={s: str(embedded_fast / "data" / f"{s}.jsonl") for s in SPLITS})
    for split in SPLITS:
        assert data[split].num_rows == report["examples"][split] > 0
        assert set(data[split].column_names) == {"id", "task", "prompt", "response", "answer"}


def test_tokenizer_round_trips_text(tokenizer):
    for text in ("37 + 58 = 95\n95 - 12 = 83\nAnswer: 83",
                 "  leading spaces,\ttabs\n\n\nand  double  spaces \n",
                 "Summarize this record.\nname: Ava\nage: 34\n", "{[(x)]}; 'q' \"r\" ~!@#$%^&*_-=+|<>?/"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert digits == list("12345")


def test_chat_template(tokenizer):
    from orchestrator.text import encode_prompt

    messages = [{"role": "user", "content": "Compute 1 + 2."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nCompute 1 + 2.\n<|assistant|>\n"
    ids = encode_prompt(tokenizer, "Compute 1 + 2.")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # a finished conversation renders the assistant turn as response + EOS
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Answer: 3"}], tokenize=False)
    assert full == text + "Answer: 3" + tokenizer.eos_token
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"


def test_models_load_and_share_the_vocabulary(embedded_fast, tokenizer, report):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(embedded_fast / "teacher")
    student = AutoModelForCausalLM.from_pretrained(embedded_fast / "student")
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert teacher.config.eos_token_id == student.config.eos_token_id == tokenizer.eos_token_id
    assert teacher.config.pad_token_id == tokenizer.pad_token_id
    for model in ("teacher", "student"):
        assert AutoTokenizer.from_pretrained(embedded_fast / model).get_vocab() == tokenizer.get_vocab()
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_teacher == report["parameters"]["teacher"] > n_student == report["parameters"]["student"]


def test_batched_greedy_matches_one_at_a_time(embedded_fast, tokenizer):
    from transformers import AutoModelForCausalLM

    from trainer.reference import greedy_generate
    from build.embedded.task import read_jsonl
    from orchestrator.text import encode_prompt

    teacher = AutoModelForCausalLM.from_pretrained(embedded_fast / "teacher")
    rows = read_jsonl(embedded_fast / "data" / "validation.jsonl")[:6]
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    batched = greedy_generate(teacher, tokenizer, prompts, max_new_tokens=48, batch_size=6)
    single = [greedy_generate(teacher, tokenizer, [p], max_new_tokens=48)[0] for p in prompts]
    assert batched == single


def test_teacher_beats_student(report):
    teacher, student = report["test"]["teacher"], report["test"]["student"]
    assert teacher["n"] == student["n"] == report["examples"]["test"]
    assert teacher["exact_match"] > student["exact_match"]
    assert teacher["rouge_l"] > student["rouge_l"]


def test_report_contents(report):
    assert report["variant"] == "fast" and report["seed"] == 0
    assert report["student_warmup_steps"] == VARIANTS["fast"].student_warmup.steps
    for stage in ("data", "tokenizer", "teacher", "student", "evaluate", "total"):
        assert report["seconds"][stage] >= 0
    stats = report["response_tokens"]["test"]
    assert stats["min"] < stats["median"] < stats["max"]


def test_second_build_is_cached(embedded_fast):
    manifest = embedded_fast / "manifest.json"
    weights = embedded_fast / "teacher" / "model.safetensors"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    again = build(embedded_fast.parent, variant="fast", seed=0)
    assert again == embedded_fast
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before


def test_incomplete_or_different_builds_are_not_reused(embedded_fast, tmp_path):
    expected = settings_hash(VARIANTS["fast"], 0)
    assert is_built(embedded_fast, expected)
    assert not is_built(tmp_path, expected)  # a crashed build leaves no manifest
    assert settings_hash(VARIANTS["fast"], 1) != expected != settings_hash(VARIANTS["full"], 0)


def test_packed_rows_compute_each_example_as_if_alone(tokenizer):
    import random

    import torch

    from build.embedded.models import ModelSize, collate_packed, encode_examples, make_model, packed_batches
    from build.embedded.task import make_splits

    encoded = encode_examples(tokenizer, make_splits(1, 40, 1, 1)["train"])
    rows = next(packed_batches(encoded, rows=3, row_tokens=256, rng=random.Random(0)))
    assert any(len(row) > 1 for row in rows)
    model = make_model(ModelSize(hidden=64, heads=1, layers=2, intermediate=128), tokenizer, seed=0).eval()
    input_ids, position_ids, attention_mask, labels = collate_packed(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                       use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for prompt, response in row:
                n = len(prompt) + len(response)
                alone = model(input_ids=torch.tensor([prompt + response])).logits[0]
                torch.testing.assert_close(packed[r, at:at + n], alone, atol=1e-5, rtol=1e-4)
                assert labels[r, at:at + len(prompt)].eq(-100).all()
                assert labels[r, at + len(prompt):at + n].tolist() == response
                at += n
