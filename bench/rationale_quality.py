"""Quality of the rationale method on the embedded task: rationale formats vs plain SFT on the same
rows, same budget (steps x examples per step, learner settings), several seeds.

    python bench/rationale_quality.py                       # the table: test split, seeds 0 1 2
    python bench/rationale_quality.py --split validation --formats multitask --top-words 4 6 10 --seeds 0
                                                            # choosing K on the validation split

Every configuration is a real run (orchestrator.run.run: attribution stage, DeepSpeed learner,
vLLM student service for the evaluation) in one Ray session; rationales are cached, so the
attribution stage runs once per K and split. Prints a markdown table: exact match and Rouge-L of
the final student (mean ± std over seeds), wall time per run, plus the teacher and the untrained
student on the same split as reference rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.metrics import read_records
from orchestrator.launcher import connect_ray
from orchestrator.run import run

CONFIG = "deploy/configs/embedded-rationale.yaml"
FORMATS = ["answer_only", "multitask", "single_sequence", "input_augmentation"]


def run_once(overrides: list[str], out_dir: Path, split: str, eval_examples: int) -> dict:
    """One run with the evaluation on ``split`` at the start and the end only; its scores and wall time."""
    cfg = load_config(CONFIG, [*overrides, f"output_dir={out_dir}", "resume=false", f"data.eval_split={split}",
                               f"schedule.eval_examples={eval_examples}", "schedule.eval_every=1000000",
                               "schedule.checkpoint_every=1000000", "ray.dashboard=false"])
    connect_ray(cfg)
    started = time.perf_counter()
    run(cfg)
    evals = [r for r in read_records(out_dir) if r.get("eval_exact_match") is not None]
    ready = next((r for r in read_records(out_dir) if r.get("event") == "rationales_ready"), {})
    return {"start_em": evals[0]["eval_exact_match"], "start_rl": evals[0]["eval_rouge_l"],
            "em": evals[-1]["eval_exact_match"], "rl": evals[-1]["eval_rouge_l"], "n": evals[-1]["eval_n"],
            "seconds": time.perf_counter() - started, "answer_overlap": ready.get("rationale_answer_overlap")}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--top-words", nargs="+", type=int, default=[10])
    parser.add_argument("--split", default="test")
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--out", default="runs/bench-rationale")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args()

    results: dict[tuple, list[dict]] = {}
    for fmt in args.formats:
        for k in args.top_words if fmt != "answer_only" else args.top_words[:1]:
            for seed in args.seeds:
                name = f"{fmt}-k{k}-seed{seed}-{args.split}"
                result = run_once([*args.overrides, f"sft.format={fmt}", f"sft.top_words={k}",
                                   f"seed={seed}"], Path(args.out) / name, args.split, args.eval_examples)
                print(json.dumps({"run": name, **result}), flush=True)
                results.setdefault((fmt, k), []).append(result)

    build = json.loads(Path("artifacts/embedded/full/build_report.json").read_text())
    first = next(iter(results.values()))[0]
    print(f"\n{args.split} split, n = {first['n']}; seeds {args.seeds}; {load_config(CONFIG).schedule.steps} steps "
          f"x {load_config(CONFIG).rollout.prompts_per_step} examples per step\n")
    print("| method | K | exact match | Rouge-L | wall time per run (s) | answer overlap |")
    print("|---|---|---|---|---|---|")
    if args.split == "test":
        teacher = build["test"]["teacher"]
        print(f"| teacher (reference) | – | {teacher['exact_match']:.3f} | {teacher['rouge_l']:.3f} | – | – |")
    print(f"| student before training | – | {first['start_em']:.3f} | {first['start_rl']:.3f} | – | – |")
    for (fmt, k), runs in results.items():
        overlap = runs[0]["answer_overlap"]
        print(f"| {'SFT (answer_only)' if fmt == 'answer_only' else 'rationale: ' + fmt} | {k if fmt != 'answer_only' else '–'} "
              f"| {mean_std([r['em'] for r in runs])} | {mean_std([r['rl'] for r in runs])} "
              f"| {statistics.mean(r['seconds'] for r in runs):.0f} | {'–' if overlap is None else f'{overlap:.3f}'} |")


if __name__ == "__main__":
    main()
