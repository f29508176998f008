"""Does it distil? Every method on the embedded task, the same training budget, several seeds.

    python bench/methods.py                              # each method with its paper's loss, seeds 0 1 2, test split
    python bench/methods.py --eval-every 5               # ... and the learning curve (<out>/learning_curve.png)
    python bench/methods.py --cold                       # the old protocol: every method from the cold student
    python bench/methods.py --common-loss forward_kl     # the extra rows: every method with one loss
    python bench/methods.py --grid                       # SWITCH tau0 x decay, AdaSwitch window x factor (validation)
    python bench/methods.py --config deploy/configs/smollm2.yaml --methods ground_truth on_policy adaswitch skd \
        --seeds 0 1 --tokens 3000 --warmup-tokens 3000 --prompts 8 --out runs/bench-methods-smollm2 \
        schedule.eval_examples=48 learner.lr=5e-5                                # the SmolLM2 table

The protocol of GKD, MiniLLM and DistiLLM (which the switching papers follow): one SFT warm-up of
the student on the train split (--warmup-tokens, run once and kept in <out>/warmup-*), and every
method starts from that warm student; the ground_truth row (cross-entropy on the references) is
then "SFT continued for the same budget". --cold starts every method from the cold student.

One teacher and one student vLLM service serve every run (orchestrator.run.run(cfg, services=...)
pushes the base student weights back before each run); each run has its own DeepSpeed learner.
Every run trains until the learner has seen ``--tokens`` response tokens (schedule.max_train_tokens),
with the same learner settings, and is evaluated (greedy) before and after on the chosen split.
Prints markdown tables: exact match and Rouge-L (mean ± std over seeds), split by the reference's
length; wall seconds per run (evaluations included) and runtime (rollout + train + push seconds)
relative to on_policy; the switch statistics of switch and adaswitch split by response length.
Writes every number to <out>/results.json, and each finished run's to <out>/<run>/result.json: a
bench run again with the same settings (after a crash, say) keeps those runs and does the rest
(--fresh redoes them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from orchestrator.config import load_config
from orchestrator.metrics import read_records, step_records
from build.ensure import ensure_models
from orchestrator.launcher import connect_ray, start_service
from orchestrator.run import run

# The loss each method's paper trains with (a method is a policy, except the last two).
PAPER_LOSS = {
    "ground_truth": "cross_entropy",  # SFT on the references
    "teacher": "cross_entropy",  # sequence-level KD (Kim & Rush 2016): NLL of the teacher's outputs
    "mixed": "jsd",  # GKD with a λ-mix of student and reference sequences: generalized JSD(β = 0.5)
    "on_policy": "jsd",  # GKD (Agarwal et al. 2306.13649)
    "skd": "forward_kl",  # SKD (Xu et al. 2410.11325)
    "switch": "skew_reverse_kl",  # SWITCH (Koo et al. 2410.19503)
    "adaswitch": "forward_kl",  # AdaSwitch (Peng et al. 2510.07842): KL
    # The sft recipe (plain SFT, or rationales: Ballout et al. 2409.12586): not in the default list;
    # run it with a format, e.g. `--methods sft sft.format=multitask` (answer_only: plain SFT).
    "sft": "cross_entropy",
    # On-policy distillation as verl, TRL, Tinker and slime now train it: the student's own samples,
    # the reverse KL estimated from the teacher's logprob of each sampled token (k3).
    "sampled_kl": "sampled_reverse_kl",
}
POLICY_OF = {"sft": None, "sampled_kl": "on_policy"}  # the others are their own policy
DEFAULT_METHODS = [m for m in PAPER_LOSS if m != "sft"]
LONG = 64  # tokens: a reference (or response) at least this long counts as long (the test split's median is 48)
# A 2 x 2 grid around each default, plus the default itself (SWITCH tau0 0.2, decay 0.005; AdaSwitch L 8, K 3).
GRID = ([("switch", [f"policy.switch.tau0={t}", f"policy.switch.decay={d}"])
         for t, d in ((0.2, 0.005), (0.1, 0.0), (0.1, 0.02), (0.4, 0.0), (0.4, 0.02))]
        + [("adaswitch", [f"policy.adaswitch.window={w}", f"policy.adaswitch.factor={f}"])
           for w, f in ((8, 3.0), (4, 2.0), (4, 5.0), (16, 2.0), (16, 5.0))])


def eval_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Per-row eval results before training and after (eval/step-*.jsonl, first and last)."""
    files = sorted((run_dir / "eval").glob("step-*.jsonl"))
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    return read(files[0]), read(files[-1])


def scores(rows: list[dict]) -> dict:
    out = {}
    for name, keep in (("all", lambda r: True), ("short", lambda r: r["reference_tokens"] < LONG),
                       ("long", lambda r: r["reference_tokens"] >= LONG)):
        part = [r for r in rows if keep(r)]
        out[name] = {"exact_match": float(np.mean([r["exact_match"] for r in part])),
                     "rouge_l": float(np.mean([r["rouge_l"] for r in part])), "n": len(part)}
        if part and "rouge_l_whitespace" in part[0]:  # eval rows written before rouge-score have only one
            out[name]["rouge_l_whitespace"] = float(np.mean([r["rouge_l_whitespace"] for r in part]))
    return out


def learning_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(training tokens seen, held-out Rouge-L) at every evaluation of a run."""
    steps = step_records(records)
    tokens_at = dict(zip([r["step"] for r in steps], np.cumsum([r["rollout_tokens"] for r in steps]).tolist()))
    evals = {r["step"]: r["eval_rouge_l"] for r in records if "eval_rouge_l" in r}  # the last one per step
    return [(0 if step == 0 else int(tokens_at[step]), rouge) for step, rouge in sorted(evals.items())]


def plot_learning_curves(results: dict[str, list[dict]], path: Path, title: str) -> None:
    """One line per method (mean over seeds), the seeds' min-max as a band; each seed's curve is
    interpolated onto a common token grid (seeds evaluate at slightly different token counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, runs in results.items():
        curves = [np.array(r["curve"], dtype=float) for r in runs if len(r.get("curve", [])) > 1]
        if not curves:
            continue
        grid = np.linspace(0, min(c[-1, 0] for c in curves), 50)
        ys = np.stack([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
        ax.plot(grid, ys.mean(0), label=f"{key} ({len(curves)} seeds)")
        ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2)
    ax.set_xlabel("training tokens (response tokens the learner has seen)")
    ax.set_ylabel("held-out Rouge-L F (rouge-score, stemmed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def switch_stats(steps: list[dict]) -> dict:
    """Teacher-token fraction and first-switch position over all rollouts, by response length."""
    lengths = np.concatenate([r["row_response_lengths"] for r in steps])
    fractions = np.concatenate([r["row_teacher_fractions"] for r in steps])
    first = np.concatenate([r["row_first_switch"] for r in steps])
    out = {}
    for name, keep in (("all", lengths >= 0), ("short", lengths < LONG), ("long", lengths >= LONG)):
        switched = keep & (first >= 0)
        out[name] = {"teacher_fraction": float((fractions * lengths)[keep].sum() / max(lengths[keep].sum(), 1)),
                     "switched_share": float(switched.sum() / max(keep.sum(), 1)),
                     "first_switch_mean": float(first[switched].mean()) if switched.any() else None,
                     "rows": int(keep.sum())}
    return out


def stopped_last_time(records: list[dict]) -> bool:
    """Whether the latest start of the run ended in a stop (SIGTERM/SIGINT) rather than its budget
    (a resumed run appends to metrics.jsonl, after the stop of its earlier start)."""
    events = [r["event"] for r in records if r.get("event") in ("started", "stopped")]
    return bool(events) and events[-1] == "stopped"


def run_one(config: str, name: str, overrides: list[str], services, out: Path) -> dict:
    run_dir = out / name
    cfg = load_config(config, [*overrides, f"output_dir={run_dir}"])
    started = time.perf_counter()
    run(cfg, services=services)
    return record_result(run_dir, name, config, overrides, time.perf_counter() - started)


def record_result(run_dir: Path, name: str, config: str, overrides: list[str], wall_seconds: float) -> dict:
    """A finished run's scores, steps and timings, also saved as <run_dir>/result.json."""
    records = read_records(run_dir)
    if stopped_last_time(records):  # SIGTERM/SIGINT: the run checkpointed and returned
        raise SystemExit(f"{name}: stopped before its budget; not recorded (run the bench again to redo it)")
    steps = step_records(records)
    before, after = eval_rows(run_dir)
    result = {"name": name, "config": config, "overrides": overrides,
              "wall_seconds": wall_seconds, "steps": len(steps),
              "train_tokens": int(sum(r["rollout_tokens"] for r in steps)),
              "work_seconds": float(sum(r["rollout_seconds"] + r["train_seconds"] + r.get("push_seconds", 0) for r in steps)),
              "rollout_seconds": float(sum(r["rollout_seconds"] for r in steps)),
              "before": scores(before), "after": scores(after), "switch": switch_stats(steps),
              "curve": learning_curve(records),
              "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]]}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def fmt(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_tables(results: dict[str, list[dict]], split: str, teacher_dir: str) -> None:
    first = next(iter(results.values()))[0]
    print(f"\n{split} split: {first['after']['all']['n']} rows ({first['after']['long']['n']} with a reference "
          f">= {LONG} tokens); training budget {first['train_tokens']}+ response tokens per run\n")
    print("| method (loss) | EM | Rouge-L | EM long | Rouge-L long | EM short | Rouge-L short | steps | wall s per run | runtime vs on_policy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if split == "test":
        # The build's own test scores of the teacher (embedded and smollm2 builds write them).
        report = Path(teacher_dir).parent / "build_report.json"
        if report.exists():
            build = json.loads(report.read_text())["test"]["teacher"]
            print(f"| teacher (reference, {build.get('n', 'all')} rows) | {build['exact_match']:.3f} | "
                  f"{build['rouge_l']:.3f} | | | | | | | |")
    b = first["before"]
    print(f"| student before training | {b['all']['exact_match']:.3f} | {b['all']['rouge_l']:.3f} | "
          f"{b['long']['exact_match']:.3f} | {b['long']['rouge_l']:.3f} | {b['short']['exact_match']:.3f} | "
          f"{b['short']['rouge_l']:.3f} | | | |")
    base = [r["work_seconds"] for key, runs in results.items() if key.startswith("on_policy") for r in runs]
    for key, runs in results.items():
        cells = [fmt([r["after"][part][metric] for r in runs]) for part in ("all", "long", "short")
                 for metric in ("exact_match", "rouge_l")]
        ratio = statistics.mean(r["work_seconds"] for r in runs) / statistics.mean(base) if base else float("nan")
        print(f"| {key} | {' | '.join(cells)} | {statistics.mean(r['steps'] for r in runs):.1f} | "
              f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} | {ratio:.2f}x |")
    if "rouge_l_whitespace" in first["after"]["all"]:
        print("\nThe same outputs under two Rouge-L definitions (all rows):\n")
        print("| method | Rouge-L F (rouge-score, stemmed; the tables') | Rouge-L F (whitespace tokens, before) |")
        print("|---|---|---|")
        print(f"| student before training | {b['all']['rouge_l']:.3f} | {b['all']['rouge_l_whitespace']:.3f} |")
        for key, runs in results.items():
            print(f"| {key} | {fmt([r['after']['all']['rouge_l'] for r in runs])} | "
                  f"{fmt([r['after']['all']['rouge_l_whitespace'] for r in runs])} |")
    print("\n| method | response length | rows | teacher-token fraction | sequences switched | mean first-switch position |")
    print("|---|---|---|---|---|---|")
    for key, runs in results.items():
        if not key.startswith(("switch", "adaswitch")):
            continue
        for part in ("short", "long", "all"):
            s = [r["switch"][part] for r in runs]
            first_pos = [x["first_switch_mean"] for x in s if x["first_switch_mean"] is not None]
            print(f"| {key} | {part if part == 'all' else ('< ' if part == 'short' else '>= ') + str(LONG)} "
                  f"| {sum(x['rows'] for x in s)} | {fmt([x['teacher_fraction'] for x in s])} "
                  f"| {fmt([x['switched_share'] for x in s])} | {fmt(first_pos) if first_pos else '–'} |")


def method_overrides(method: str, common_loss: str | None) -> tuple[str, list[str]]:
    """A method's table key and its overrides."""
    loss = common_loss or PAPER_LOSS[method]
    policy = POLICY_OF.get(method, method)
    extra = ["method=sft"] if policy is None else [f"policy.name={policy}"]
    return f"{method} ({loss})", [*extra, f"loss.kind={loss}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded.yaml")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(PAPER_LOSS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--common-loss", default=None, help="every method with this loss instead of its paper's")
    parser.add_argument("--grid", action="store_true", help="the sensitivity grid on the validation split")
    parser.add_argument("--split", choices=["validation", "test"], default=None,
                        help="evaluate on this split (default: test; validation with --grid)")
    parser.add_argument("--tokens", type=int, default=6000, help="response tokens each run trains on")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--cold", action="store_true", help="start every method from the cold student (no SFT warm-up)")
    parser.add_argument("--warmup-tokens", type=int, default=20000, help="response tokens of the SFT warm-up")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate every N steps (the learning curve); 0: before and after only")
    parser.add_argument("--out", default="runs/bench-methods")
    parser.add_argument("--fresh", action="store_true", help="run everything again (default: keep finished runs with the same settings)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args()
    split = args.split or ("validation" if args.grid else "test")
    base = ["resume=false", "schedule.steps=1000", f"rollout.prompts_per_step={args.prompts}",
            "schedule.checkpoint_every=1000000", "schedule.eval_examples=400", "ray.dashboard=false"]
    # k = 25 for every method: SKD's rule needs the teacher's top-25 (its paper's K).
    common = [*base, "rollout.top_k=25", f"schedule.eval_every={args.eval_every or 1000000}",
              f"data.eval_split={split}", *args.overrides]

    cfg = load_config(args.config, common)
    connect_ray(cfg)
    from orchestrator.models import check_pair

    ensure_models(cfg)
    eos = check_pair(cfg.models.teacher, cfg.models.student).eos_token_id
    services = (start_service("teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed, wait=False),
                start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed, wait=False))
    for pool in services:  # the two engines load side by side
        pool.wait_ready()

    if args.grid:
        plan = [(f"{policy} {' '.join(o.split('.', 2)[-1] for o in extra)}", [f"policy.name={policy}",
                 f"loss.kind={PAPER_LOSS[policy]}", *extra], seed) for policy, extra in GRID for seed in args.seeds[:1]]
    else:
        methods = [m for m in args.methods if not (args.common_loss and m == "sampled_kl")]  # a loss, not a policy
        plan = [(*method_overrides(m, args.common_loss), seed) for m in methods for seed in args.seeds]
    start = "cold" if args.cold else f"warm{args.warmup_tokens}"
    out = Path(args.out) / start / ("grid" if args.grid else f"loss-{args.common_loss or 'paper'}-{split}")
    results: dict[str, list[dict]] = {}
    try:
        if not args.cold:
            # The SFT warm-up, once (kept like any finished run); every method then starts from it.
            # Its settings do not depend on the split or the curve: one warm-up serves every bench.
            warm_overrides = [*base, *args.overrides, "method=sft", "loss.kind=cross_entropy", "sft.format=answer_only",
                              f"schedule.max_train_tokens={args.warmup_tokens}", "schedule.eval_every=1000000",
                              "data.eval_split=validation", "seed=0"]
            warm = run_or_keep(args, f"warmup-sft-{args.warmup_tokens}", warm_overrides, services, Path(args.out))
            print(f"warm start: {warm['after']['all']} after {warm['train_tokens']} SFT tokens", flush=True)
            common = [*common, f"models.student={Path(args.out).resolve() / warm['name'] / 'student'}"]
        common.append(f"schedule.max_train_tokens={args.tokens}")
        run_plan(plan, common, args, services, out, results)
    finally:  # also on a stop: the engines' processes must not outlive the bench
        for pool in services:
            pool.shutdown()
    print("\nstart: " + ("the cold student" if args.cold else
                         f"the SFT warm-up ({args.warmup_tokens} tokens); ground_truth = SFT continued"))
    print_tables(results, split, cfg.models.teacher)
    if args.eval_every:
        plot_learning_curves(results, out / "learning_curve.png",
                             f"{Path(args.config).stem}, {split} split, start: {start}")
        print(f"learning curve: {out / 'learning_curve.png'}")


def run_plan(plan, common: list[str], args, services, out: Path, results: dict[str, list[dict]]) -> None:
    for key, extra, seed in plan:
        name = f"{key.replace(' ', '_').replace('(', '').replace(')', '').replace('=', '')}-seed{seed}"
        results.setdefault(key, []).append(run_or_keep(args, name, [*common, *extra, f"seed={seed}"], services, out))
        (out / "results.json").write_text(json.dumps(results, indent=1))


def run_or_keep(args, name: str, overrides: list[str], services, out: Path) -> dict:
    """Run ``name``, or keep its result from an interrupted bench if it ran with these very settings."""
    saved = out / name / "result.json"
    kept = json.loads(saved.read_text()) if saved.exists() and not args.fresh else {}
    if (kept.get("config"), kept.get("overrides")) == (args.config, overrides):
        print(f"{name}: kept from {saved}", flush=True)
        return kept
    result = run_one(args.config, name, overrides, services, out)
    print(json.dumps({k: result[k] for k in ("name", "steps", "train_tokens", "work_seconds", "wall_seconds")}
                     | {"after": result["after"]["all"]}), flush=True)
    return result


if __name__ == "__main__":
    main()
