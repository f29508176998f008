"""Deterministic task examples for the embedded default.

Four families of instruction-style prompts whose responses are worked traces, so an early
mistake propagates to the final line `Answer: <answer>`:

- arithmetic: numbered additions and subtractions of one digit, one line per step,
- sort: a selection-sort trace, one line per picked minimum,
- count: a running count over a labeled list of digits, one line per item,
- record: a one-sentence summary of a small record (short responses).

The number of steps is drawn per example, so response lengths range from a few tokens to
about two hundred. Everything comes from one `random.Random(seed)`, so the same seed gives
byte-identical files.
"""

import json
import random
from pathlib import Path

FAMILIES = ("arithmetic", "sort", "count", "record")

NAMES = ("Ava", "Ben", "Cora", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jill", "Kai",
         "Lea", "Max", "Nia", "Otto", "Pia", "Raj", "Sue", "Tom", "Uma", "Vic", "Wes", "Yara", "Zoe")
CITIES = ("Lima", "Oslo", "Rome", "Kyiv", "Lagos", "Quito", "Perth", "Dakar", "Hanoi", "Cairo",
          "Delhi", "Porto", "Seoul", "Tunis", "Bern", "Riga")
JOBS = ("baker", "nurse", "pilot", "farmer", "painter", "teacher", "plumber", "lawyer", "chef",
        "tailor", "miner", "singer", "doctor", "driver")
LABELS = "abcdefghijkl"


def make_arithmetic(rng):
    n_steps = rng.randint(1, 8)
    total = rng.randint(10, 99)
    start = total
    steps, lines = [], []
    while len(lines) < n_steps:
        op, operand = rng.choice("+-"), rng.randint(1, 9)
        new_total = total + operand if op == "+" else total - operand
        # Running totals stay in 0..99, so each step is a one-digit add or subtract.
        if not 0 <= new_total <= 99:
            continue
        # Steps are numbered in the prompt and in the trace, so the model finds the next
        # operation by its number rather than by counting terms.
        k = len(lines) + 1
        steps.append(f"Step {k}: {'add' if op == '+' else 'subtract'} {operand}")
        lines.append(f"Step {k}: {total} {op} {operand} = {new_total}")
        total = new_total
    opening, closing = rng.choice((("Start with {}.", "What is the result?"),
                                   ("Begin at {}.", "Give the final number."),
                                   ("Take {}.", "Show each step.")))
    # One step per line, so "Step k:" is the same tokens in the prompt and in the trace.
    prompt = "\n".join([opening.format(start)] + steps + [closing])
    return prompt, lines, str(total)


def make_sort(rng):
    values = rng.sample(range(10), rng.randint(2, 9))  # distinct digits
    template = rng.choice(("Sort these numbers in ascending order: {}.",
                           "Put {} in increasing order.",
                           "Sort {} from smallest to largest."))
    rest = list(values)
    lines = []
    # Selection sort: each line picks the minimum of what is left and shows the remainder.
    while rest:
        smallest = min(rest)
        rest.remove(smallest)
        remainder = " ".join(map(str, rest)) if rest else "none"
        lines.append(f"pick {smallest}, rest {remainder}")
    answer = " ".join(map(str, sorted(values)))
    return template.format(" ".join(map(str, values))), lines, answer


def make_count(rng):
    target = rng.randint(0, 9)
    # Bias towards the target so counts are not almost always zero or one.
    items = [target if rng.random() < 0.35 else rng.randint(0, 9) for _ in range(rng.randint(3, 12))]
    # Items carry letter labels so each trace line can find its item by label, not by position.
    labeled = [f"{label}={item}" for label, item in zip(LABELS, items)]
    # The target sits just before the list in every template, so it is easy to find; one
    # item per line, so an item is the same tokens in the prompt and in the trace.
    template = rng.choice(("Count the {t}s in this list:\n{s}",
                           "How many {t}s are in this list?\n{s}",
                           "Count how often {t} occurs in this list:\n{s}"))
    lines = []
    count = 0
    for entry, item in zip(labeled, items):
        count += item == target
        lines.append(f"{entry} {'yes' if item == target else 'no'} {count}")
    return template.format(t=target, s="\n".join(labeled)), lines, str(count)


def make_record(rng):
    name, city, job = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS)
    age = rng.randint(18, 90)
    fields = [("name", name), ("age", str(age)), ("city", city), ("job", job)]
    rng.shuffle(fields)
    record = "\n".join(f"{key}: {value}" for key, value in fields)
    prompt = f"Summarize this record in one sentence, then give the name and age.\n{record}"
    lines = [f"{name} is a {age} year old {job} from {city}."]
    return prompt, lines, f"{name}, {age}"


MAKERS = {"arithmetic": make_arithmetic, "sort": make_sort, "count": make_count, "record": make_record}


def make_example(rng, family, example_id):
    prompt, lines, answer = MAKERS[family](rng)
    response = "\n".join(lines + [f"Answer: {answer}"])
    return {"id": example_id, "task": family, "prompt": prompt, "response": response, "answer": answer}


def make_split(rng, split, n, exclude_prompts=frozenset()):
    """n examples, families in equal rotation; prompts in `exclude_prompts` are redrawn."""
    examples = []
    seen = set(exclude_prompts)
    while len(examples) < n:
        family = FAMILIES[len(examples) % len(FAMILIES)]
        example = make_example(rng, family, f"{split}-{len(examples)}")
        if example["prompt"] in seen:
            continue
        seen.add(example["prompt"])
        examples.append(example)
    return examples


def make_splits(seed, n_train, n_validation, n_test):
    """The three splits, disjoint by prompt. Held-out splits are drawn first so a larger
    train split never changes them."""
    rng = random.Random(seed)
    test = make_split(rng, "test", n_test)
    validation = make_split(rng, "validation", n_validation, {e["prompt"] for e in test})
    held_out = {e["prompt"] for e in test + validation}
    train = make_split(rng, "train", n_train, held_out)
    return {"train": train, "validation": validation, "test": test}


def write_jsonl(examples, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=True) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
