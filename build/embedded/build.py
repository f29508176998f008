"""Build the embedded default: task data, tokenizer, teacher and warmed-up student.

    python -m build.embedded.build --out artifacts/embedded --variant full|fast [--seed 0] [--force]

Layout of <out>/<variant>/: tokenizer/, data/{train,validation,test}.jsonl, teacher/, student/,
build_report.json, manifest.json. The manifest (a hash of settings, seed and CODE_VERSION) is
written last, so a build that crashed half-way is never mistaken for a finished one; the
whole directory is built next to the target and renamed into place at the end.
"""

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from build.embedded import task
from build.embedded.models import ModelSize, SFTSettings, count_parameters, encode_examples, make_model, sft
from build.embedded.tokenizer import train_tokenizer, training_texts
from orchestrator.scoring import score_batch
from trainer.reference import greedy_generate

# Bump when a change to the code changes what gets built, so cached builds are redone.
CODE_VERSION = "embedded-3"


@dataclass(frozen=True)
class BuildSettings:
    n_train: int
    n_validation: int
    n_test: int
    vocab_size: int
    teacher: ModelSize
    student: ModelSize
    teacher_sft: SFTSettings
    student_warmup: SFTSettings  # a short SFT so the student writes the format, badly
    max_new_tokens: int = 256
    eval_batch_size: int = 64


TEACHER = ModelSize(hidden=256, heads=4, layers=4, intermediate=688)
STUDENT = ModelSize(hidden=128, heads=2, layers=2, intermediate=344)

VARIANTS = {
    "full": BuildSettings(
        n_train=20000, n_validation=200, n_test=400, vocab_size=512,
        teacher=TEACHER, student=STUDENT,
        teacher_sft=SFTSettings(steps=700, lr=2e-3, log_every=50),
        student_warmup=SFTSettings(steps=60, lr=2e-3, warmup_steps=10, log_every=20),
    ),
    "fast": BuildSettings(
        n_train=4000, n_validation=40, n_test=80, vocab_size=512,
        teacher=TEACHER, student=STUDENT,
        teacher_sft=SFTSettings(steps=120, lr=2e-3, warmup_steps=20, log_every=20),
        student_warmup=SFTSettings(steps=20, lr=2e-3, warmup_steps=5, log_every=10),
        max_new_tokens=200,
    ),
}


def settings_hash(settings, seed):
    payload = json.dumps({"settings": asdict(settings), "seed": seed, "code_version": CODE_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(variant_dir):
    try:
        return json.loads((Path(variant_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def is_built(variant_dir, expected_hash):
    manifest = read_manifest(variant_dir)
    return manifest is not None and manifest.get("settings_hash") == expected_hash


def length_stats(lengths):
    ordered = sorted(lengths)
    return {"min": ordered[0], "max": ordered[-1], "mean": round(statistics.fmean(ordered), 2),
            "median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))]}


def save_model(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)  # every model dir is self-contained, as on a hub


def evaluate(model, tokenizer, examples, encoded, settings):
    """Greedy responses on `examples`, scored overall and per task family."""
    predictions = greedy_generate(model, tokenizer, [prompt for prompt, _ in encoded],
                                  max_new_tokens=settings.max_new_tokens,
                                  batch_size=settings.eval_batch_size)

    def score(indices):
        return score_batch([predictions[i] for i in indices], [examples[i]["answer"] for i in indices],
                           [examples[i]["response"] for i in indices])

    result = score(range(len(examples)))
    result["by_task"] = {family: score([i for i, e in enumerate(examples) if e["task"] == family])
                         for family in task.FAMILIES}
    return result, predictions


class Stages:
    """Wall-clock seconds per build stage, printed as each one finishes."""

    def __init__(self):
        self.seconds, self.start = {}, time.time()

    def done(self, name, since):
        self.seconds[name] = round(time.time() - since, 2)
        print(f"[build] {name} done in {self.seconds[name]:.1f}s", flush=True)
        return time.time()


def build_into(work_dir, settings, variant, seed):
    """Every artifact except the manifest, written into `work_dir`; returns the report."""
    stages = Stages()
    t = time.time()
    print(f"[build] variant={variant} seed={seed} into {work_dir}", flush=True)

    splits = task.make_splits(seed, settings.n_train, settings.n_validation, settings.n_test)
    for name, examples in splits.items():
        task.write_jsonl(examples, work_dir / "data" / f"{name}.jsonl")
    t = stages.done("data", t)

    tokenizer = train_tokenizer(training_texts(splits["train"]), settings.vocab_size)
    tokenizer.save_pretrained(work_dir / "tokenizer")
    encoded = {name: encode_examples(tokenizer, examples) for name, examples in splits.items()}
    t = stages.done("tokenizer", t)

    torch.manual_seed(seed)
    teacher = make_model(settings.teacher, tokenizer, seed)
    teacher_log = sft(teacher, encoded["train"], settings.teacher_sft, tokenizer.pad_token_id, seed, "teacher")
    save_model(teacher, tokenizer, work_dir / "teacher")
    t = stages.done("teacher", t)

    student = make_model(settings.student, tokenizer, seed + 1)
    student_log = sft(student, encoded["train"], settings.student_warmup, tokenizer.pad_token_id, seed + 1,
                      "student")
    save_model(student, tokenizer, work_dir / "student")
    t = stages.done("student", t)

    teacher_eval, _ = evaluate(teacher, tokenizer, splits["test"], encoded["test"], settings)
    student_eval, _ = evaluate(student, tokenizer, splits["test"], encoded["test"], settings)
    t = stages.done("evaluate", t)
    print(f"[build] test exact_match teacher {teacher_eval['exact_match']:.3f} "
          f"student {student_eval['exact_match']:.3f}; rouge_l teacher {teacher_eval['rouge_l']:.3f} "
          f"student {student_eval['rouge_l']:.3f}", flush=True)

    return {
        "seed": seed,
        "variant": variant,
        "code_version": CODE_VERSION,
        "settings": asdict(settings),
        "vocab_size": len(tokenizer),
        "parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
        "student_warmup_steps": settings.student_warmup.steps,
        "examples": {name: len(examples) for name, examples in splits.items()},
        "response_tokens": {name: length_stats([len(r) for _, r in enc]) for name, enc in encoded.items()},
        "prompt_tokens": {name: length_stats([len(p) for p, _ in enc]) for name, enc in encoded.items()},
        "test": {"teacher": teacher_eval, "student": student_eval},
        "train_loss": {"teacher": teacher_log, "student": student_log},
        "seconds": {**stages.seconds, "total": round(time.time() - stages.start, 2)},
    }


def build(out_dir, variant="full", seed=0, force=False):
    """Build (or reuse) the variant under `out_dir` and return its directory."""
    settings = VARIANTS[variant]
    out_dir = Path(out_dir)
    target = out_dir / variant
    expected = settings_hash(settings, seed)
    if not force and is_built(target, expected):
        print(f"[build] {target} is up to date", flush=True)
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{variant}-building-", dir=out_dir))
    work_dir.chmod(0o755)  # mkdtemp makes it owner-only; the result should read like any dir
    try:
        report = build_into(work_dir, settings, variant, seed)
        (work_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        manifest = {"settings_hash": expected, "seed": seed, "variant": variant, "code_version": CODE_VERSION}
        (work_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        install(work_dir, target, expected, replace_same=force)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"[build] {target} ready", flush=True)
    return target


def install(work_dir, target, expected_hash, replace_same=False):
    """Move the finished build into place. If a concurrent build already put the same one
    there, keep it (unless forced); otherwise move the old one aside, then delete it."""
    if not replace_same and is_built(target, expected_hash):
        return
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(old / target.name)
    work_dir.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/embedded")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    args = parser.parse_args()
    print(build(args.out, args.variant, args.seed, args.force))


if __name__ == "__main__":
    main()
