"""Bad input fails early with an error that names the thing at fault: dataset rows, prompt
length, model directories, tokenizer pairs, resuming an incompatible checkpoint."""
import json
import shutil

import pytest

from orchestrator.config import ConfigError, DataConfig, load_config, resume_conflicts, to_dict
from orchestrator.data import DataError, tokenize_rows
from orchestrator.models import ModelError, check_causal_lm, check_pair
from orchestrator.steps import check_resumable


@pytest.fixture(scope="module")
def tokenizer(embedded_fast):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_fast / "teacher")


def _rows(items):
    import datasets

    return datasets.Dataset.from_list(items)


@pytest.mark.parametrize(
    "items, message",
    [
        ([{"prompt": "Sort: 3 1 2", "answer": "1 2 3"}], "train.jsonl: no field 'response' in the rows (fields: answer, prompt)"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "   ", "response": "c"}], "train.jsonl: row 1: field 'prompt' is empty"),
        ([{"prompt": "a", "response": 7}], "train.jsonl: row 0: field 'response' must be text, got int 7"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}], "train.jsonl: row 1: field 'response' is missing (null)"),
    ],
)
def test_bad_rows_name_file_row_and_field(tokenizer, items, message):
    with pytest.raises(DataError) as err:
        tokenize_rows(_rows(items), DataConfig(), tokenizer, "train.jsonl")
    assert message in str(err.value)


def test_long_prompts_are_skipped_and_counted_or_truncated(tokenizer):
    rows = _rows([{"prompt": "Sort the list: " + " ".join(["9"] * 60), "response": "x"},
                  {"prompt": "Add 2 and 3.", "response": "5"}])
    skipped = tokenize_rows(rows, DataConfig(max_prompt_tokens=30), tokenizer, "t")
    assert len(skipped) == 1 and skipped.skipped_long == 1 and skipped.prompts == ["Add 2 and 3."]
    cut = tokenize_rows(rows, DataConfig(max_prompt_tokens=30, long_prompt="truncate"), tokenizer, "t")
    assert len(cut) == 2 and cut.skipped_long == 0 and max(len(p) for p in cut.prompt_ids) == 30


def test_prompt_budget_must_leave_room_in_the_context():
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens: 600 leaves no room for a response within "
                                          r"services.\*.max_model_len=512"):
        load_config(None, ["data.max_prompt_tokens=600"])


def test_model_directories_are_checked(embedded_fast, tmp_path):
    with pytest.raises(ModelError, match=r"models.teacher: directory not found: .*no_such_dir"):
        check_causal_lm(str(tmp_path / "no_such_dir"), "teacher")
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelError, match=r"models.student: .*encoder holds BertForMaskedLM, not a causal LM"):
        check_causal_lm(str(encoder), "student")
    (encoder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelError, match=r"models.student: .*encoder is a 't5' model, not a causal LM"):
        check_causal_lm(str(encoder), "student")
    assert check_causal_lm(str(embedded_fast / "student"), "student").model_type == "llama"


def test_teacher_and_student_with_different_tokenizers_are_refused(embedded_fast, tokenizer, tmp_path):
    other = tmp_path / "student"
    shutil.copytree(embedded_fast / "student", other)
    changed = tokenizer.__class__.from_pretrained(embedded_fast / "student")
    changed.add_tokens(["<extra_token>"])
    changed.save_pretrained(other)
    with pytest.raises(ModelError, match=r"different tokenizers \(448 vs 449 tokens; first differences: .*<extra_token>"):
        check_pair(str(embedded_fast / "teacher"), str(other))


def test_resume_refuses_a_checkpoint_of_an_incompatible_run(tmp_path):
    saved = to_dict(load_config(None, ["policy.name=switch", "learner.world_size=2"]))
    current = load_config(None, ["policy.name=adaswitch", "learner.world_size=2", f"output_dir={tmp_path}",
                                 "schedule.steps=500"])
    assert resume_conflicts(saved, to_dict(current)) == ["policy.name was 'switch', is now 'adaswitch'"]

    step_dir = tmp_path / "checkpoints" / "step-000004"
    step_dir.mkdir(parents=True)
    (step_dir / "run_state.json").write_text(json.dumps({"step": 4, "config": saved}))
    (tmp_path / "checkpoints" / "latest").write_text("step-000004")
    with pytest.raises(ConfigError, match=r"step-000004: this run cannot resume the checkpoint: policy.name was "
                                          r"'switch', is now 'adaswitch'. Use another output_dir, or resume=false"):
        check_resumable(current, tmp_path)
    current.resume = False
    check_resumable(current, tmp_path)  # starting over is the user's call
    current.resume, current.policy.name = True, "switch"
    check_resumable(current, tmp_path)  # only schedule.steps changed: resumable


def test_a_jsonl_line_that_is_not_json_is_named_by_file_and_line(tokenizer, tmp_path):
    from orchestrator.data import load_split

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"\n')
    with pytest.raises(DataError, match=r"train.jsonl:3: not valid JSON \(Expecting ',' delimiter at column \d+\): '\{\"prompt\": \"c\""):
        load_split(DataConfig(data_files={"train": str(data)}), "train", tokenizer)


def test_a_response_budget_beyond_the_context_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens: 100000 does not fit services.\*.max_model_len=512"):
        load_config(None, ["rollout.max_new_tokens=100000"])


def test_the_command_prints_one_line_for_bad_input_and_the_traceback_on_request(tmp_path, capsys, monkeypatch):
    from orchestrator.run import main

    monkeypatch.delenv("SWITCHKD_TRACEBACK", raising=False)
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"switchkd: error: {tmp_path / 'missing.yaml'}: config file not found"
    with pytest.raises(ConfigError, match="config file not found"):
        main(["--config", str(tmp_path / "missing.yaml"), "--traceback"])
