import re

import pytest

from build.embedded import task
from orchestrator.scoring import extract_answer


@pytest.fixture(scope="module")
def splits():
    return task.make_splits(seed=7, n_train=400, n_validation=40, n_test=80)


def all_examples(splits):
    return [e for examples in splits.values() for e in examples]


def test_same_seed_gives_byte_identical_files(tmp_path):
    for run in ("a", "b"):
        for name, examples in task.make_splits(3, 200, 20, 20).items():
            task.write_jsonl(examples, tmp_path / run / f"{name}.jsonl")
    for name in ("train", "validation", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert task.read_jsonl(tmp_path / "a" / "test.jsonl") == task.make_splits(3, 200, 20, 20)["test"]


def test_different_seed_gives_different_data():
    assert task.make_splits(1, 50, 10, 10) != task.make_splits(2, 50, 10, 10)


def test_held_out_splits_do_not_depend_on_train_size():
    small, large = task.make_splits(5, 10, 20, 20), task.make_splits(5, 500, 20, 20)
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


def test_shape_ids_and_disjoint_splits(splits):
    examples = all_examples(splits)
    assert all(list(e) == ["id", "task", "prompt", "response", "answer"] for e in examples)
    assert len({e["id"] for e in examples}) == len(examples)
    prompts = {name: {e["prompt"] for e in ex} for name, ex in splits.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert {e["task"] for e in splits["test"]} == set(task.FAMILIES)


def test_every_response_ends_with_its_answer(splits):
    for e in all_examples(splits):
        assert e["response"].splitlines()[-1] == f"Answer: {e['answer']}"
        assert extract_answer(e["response"]) == e["answer"]


def expected_answer(example):
    """The answer recomputed from the prompt alone, independently of the generator."""
    prompt = example["prompt"]
    if example["task"] == "arithmetic":
        total = int(re.match(r"(?:Start with|Begin at|Take) (\d+)\.", prompt).group(1))
        steps = re.findall(r"^Step (\d+): (add|subtract) (\d+)$", prompt, flags=re.M)
        assert [int(k) for k, _, _ in steps] == list(range(1, len(steps) + 1))
        for _, op, operand in steps:
            total = total + int(operand) if op == "add" else total - int(operand)
        return str(total)
    if example["task"] == "sort":
        return " ".join(map(str, sorted(int(v) for v in re.findall(r"\d+", prompt))))
    if example["task"] == "count":
        items = re.findall(r"^[a-z]=(\d)$", prompt, flags=re.M)
        target = re.search(r"(\d)s? (?:in|are in|occurs in) this list", prompt).group(1)
        return str(items.count(target))
    if example["task"] == "record":
        fields = dict(re.findall(r"^(\w+): (.+)$", prompt, flags=re.M))
        return f"{fields['name']}, {fields['age']}"
    raise AssertionError(example["task"])


def test_answers_are_correct(splits):
    for e in all_examples(splits):
        assert e["answer"] == expected_answer(e), e


def test_arithmetic_trace_steps_are_correct_and_chained(splits):
    for e in all_examples(splits):
        if e["task"] != "arithmetic":
            continue
        previous = None
        for k, line in enumerate(e["response"].splitlines()[:-1], start=1):
            step, number, left, op, right, _, result = line.split()
            assert (step, number) == ("Step", f"{k}:")
            assert int(result) == (int(left) + int(right) if op == "+" else int(left) - int(right))
            assert previous is None or int(left) == previous
            previous = int(result)
        assert str(previous) == e["answer"]


def test_sort_trace_picks_in_order(splits):
    for e in all_examples(splits):
        if e["task"] != "sort":
            continue
        picks = [int(re.match(r"pick (\d+),", line).group(1)) for line in e["response"].splitlines()[:-1]]
        assert picks == sorted(picks)
        assert " ".join(map(str, picks)) == e["answer"]


def test_response_lengths_vary(splits):
    examples = all_examples(splits)
    line_counts = {len(e["response"].splitlines()) for e in examples}
    chars = [len(e["response"]) for e in examples]
    assert len(line_counts) >= 8
    assert min(chars) < 60 and max(chars) > 200
    for family in task.FAMILIES[:3]:  # the trace families vary in length within themselves
        assert len({len(e["response"].splitlines()) for e in examples if e["task"] == family}) >= 4
