"""The end-of-run report: PNG plots and a short markdown summary in the run directory."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.metrics import STAGES, read_records, step_records


def write_report(run_dir: Path, title: str, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    steps = step_records(records)
    evals = list({r["step"]: r for r in records if r.get("eval_exact_match") is not None}.values())
    first_switch = [p for r in steps for p in r.get("first_switch_positions", [])]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    x = [r["step"] for r in steps]
    axes[0, 0].plot(x, [r["loss"] for r in steps], marker=".")
    axes[0, 0].set(title="learner loss", xlabel="step")
    axes[0, 1].plot(x, [r["teacher_fraction"] for r in steps], marker=".", label="teacher-token fraction")
    axes[0, 1].plot(x, [r["switched_fraction"] for r in steps], marker=".", label="sequences that switched")
    axes[0, 1].set(title="switch rate", xlabel="step", ylim=(-0.02, 1.02))
    axes[0, 1].legend()
    axes[1, 0].hist(first_switch, bins=30)
    axes[1, 0].set(title="first-switch position", xlabel="response position")
    ex = [r["step"] for r in evals]
    axes[1, 1].plot(ex, [r["eval_exact_match"] for r in evals], marker="o", label="exact match")
    axes[1, 1].plot(ex, [r["eval_rouge_l"] for r in evals], marker="o", label="Rouge-L")
    axes[1, 1].set(title="held-out eval (student, greedy)", xlabel="step", ylim=(-0.02, 1.02))
    axes[1, 1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=100)
    plt.close(fig)

    stage_totals = {s: sum(r.get(f"{s}_seconds", 0.0) or 0.0 for r in records) for s in STAGES}
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in summary.items()]
    if steps:
        lines += ["", "| | first step | last step |", "|---|---|---|"]
        for key in ("loss", "teacher_fraction", "switched_fraction", "round_trips_per_sequence",
                    "rollout_tokens_per_second", "response_length_mean"):
            a, b = steps[0].get(key), steps[-1].get(key)
            lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} |")
    if evals:
        lines += ["", "| eval at step | exact match | Rouge-L |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['eval_exact_match']:.3f} | {r['eval_rouge_l']:.3f} |" for r in evals]
    total = sum(stage_totals.values())
    lines += ["", "| stage | seconds | share |", "|---|---|---|"]
    lines += [f"| {s} | {t:.1f} | {t / max(total, 1e-9):.1%} |" for s, t in stage_totals.items()]
    if first_switch:
        lines += ["", f"First-switch position: median {np.median(first_switch):.0f}, "
                      f"mean {np.mean(first_switch):.1f} over {len(first_switch)} sequences that switched."]
    lines += ["", "![report](report.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
