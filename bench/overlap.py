"""Rollout/train overlap: the same run with schedule.max_policy_lag=0 and =1, side by side.

    python -m bench.overlap                                           # embedded default (SWITCH), seeds 0 1
    python -m bench.overlap --config deploy/configs/smollm2.yaml --seeds 0 1 --tokens 4000 \
        --out runs/bench-overlap-smollm2 rollout.max_new_tokens=128 rollout.prompts_per_step=16

Every run of a seed shares one teacher and one student engine (each run pushes the base student
weights back first), has its own learner, rolls out the same prompts in the same order and trains
until the same token budget (schedule.max_train_tokens). Prints, per seed and mode: steps, trained
tokens, loop seconds (the steps' wall time, step_seconds, less their evaluations and checkpoints:
start-up and export are the same in both), steps/s, trained tokens/s, the mean seconds per step of
rollout, train and push, the lag-1/lag-0 ratio of trained tokens/s, and the ratio the lag-0 run's
stage times predict when every role has its own devices: the sum over steps of
rollout + train + push against the sum of max(rollout, train) + push (lag 1 overlaps the next
rollout with the train step; the push waits for that rollout). Then the held-out scores after
each run (greedy, exact match and Rouge-L). Every number goes to <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.methods import run_one
from build.ensure import ensure_models
from orchestrator.config import load_config
from orchestrator.launcher import connect_ray, start_service
from orchestrator.metrics import read_records, step_records
from orchestrator.models import check_pair


def stage_seconds(steps: list[dict]) -> dict[str, np.ndarray]:
    """Each step's seconds per stage, and "loop": the step's wall time less its evaluation and
    checkpoint (start-up and export are outside the steps)."""
    stage = {name: np.array([r.get(f"{name}_seconds") or 0.0 for r in steps])
             for name in ("step", "rollout", "train", "push", "eval", "checkpoint")}
    stage["loop"] = stage["step"] - stage["eval"] - stage["checkpoint"]
    return stage


def timings(run_dir: Path) -> dict:
    """Loop seconds, steps and tokens of a finished run, and its per-step stage seconds."""
    steps = step_records(read_records(run_dir))
    stage = stage_seconds(steps)
    loop = float(stage["loop"].sum())
    tokens = int(sum(r["rollout_tokens"] for r in steps))
    return {"steps": len(steps), "tokens": tokens, "loop_seconds": loop,
            "steps_per_second": len(steps) / loop, "tokens_per_second": tokens / loop,
            **{f"{name}_per_step": float(stage[name].mean()) for name in ("rollout", "train", "push")},
            "serial_seconds": float((stage["rollout"] + stage["train"] + stage["push"]).sum()),
            "overlapped_seconds": float((np.maximum(stage["rollout"], stage["train"]) + stage["push"]).sum()),
            "policy_lag": [r["policy_lag"] for r in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--tokens", type=int, default=12000, help="response tokens each run trains on")
    parser.add_argument("--out", default="runs/bench-overlap")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args()
    common = ["resume=false", "schedule.steps=1000", f"schedule.max_train_tokens={args.tokens}",
              "schedule.checkpoint_every=1000000", "schedule.eval_every=1000000", "ray.dashboard=false", *args.overrides]
    cfg = load_config(args.config, common)
    connect_ray(cfg)
    ensure_models(cfg)
    eos = check_pair(cfg.models.teacher, cfg.models.student).eos_token_id
    services = (start_service("teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed, wait=False),
                start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed, wait=False))
    results = []
    try:
        for pool in services:
            pool.wait_ready()
        for seed in args.seeds:
            for lag in (0, 1):
                name = f"lag{lag}-seed{seed}"
                result = run_one(args.config, name, [*common, f"seed={seed}", f"schedule.max_policy_lag={lag}"],
                                 services, Path(args.out))
                results.append({"seed": seed, "lag": lag, **timings(Path(args.out) / name),
                                "after": result["after"]["all"]})
                print(json.dumps(results[-1]), flush=True)
                (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        for pool in services:
            pool.shutdown()

    print(f"\n{args.config} {' '.join(args.overrides)}: {cfg.policy.name}, {cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.max_new_tokens} new tokens per step, {args.tokens} trained tokens per run\n")
    print("| seed | max_policy_lag | steps | trained tokens | loop s | steps/s | trained tok/s | rollout s/step "
          "| train s/step | push s/step | lag | exact match | Rouge-L |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['lag']} | {r['steps']} | {r['tokens']} | {r['loop_seconds']:.1f} | "
              f"{r['steps_per_second']:.3f} | {r['tokens_per_second']:.0f} | {r['rollout_per_step']:.2f} | "
              f"{r['train_per_step']:.2f} | {r['push_per_step']:.2f} | {min(r['policy_lag'])}-{max(r['policy_lag'])} | "
              f"{r['after']['exact_match']:.3f} | {r['after']['rouge_l']:.3f} |")
    print("\n| seed | trained tok/s, lag 1 / lag 0 (measured, shared cores) | predicted with own devices "
          "(lag-0 stage times) | train + push share of the lag-0 step |")
    print("|---|---|---|---|")
    for seed in args.seeds:
        sync, overlapped = (next(r for r in results if r["seed"] == seed and r["lag"] == lag) for lag in (0, 1))
        share = (sync["train_per_step"] + sync["push_per_step"]) / (sync["loop_seconds"] / sync["steps"])
        print(f"| {seed} | {overlapped['tokens_per_second'] / sync['tokens_per_second']:.2f}x | "
              f"{sync['serial_seconds'] / sync['overlapped_seconds']:.2f}x | {share:.0%} |")


if __name__ == "__main__":
    main()
