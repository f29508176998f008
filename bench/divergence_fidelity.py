"""Do SWITCH and AdaSwitch decide as their papers define them on a real vocabulary?

On the SmolLM2 pair (49,152 tokens), for the cold pruned student and the warmed-up one:

1. The exact rule: greedy rollouts by the independent reference (tests/reference_rollout.py:
   transformers, one token at a time, full-vocabulary JSD / KL) for SWITCH, AdaSwitch and SKD.
2. Per position, along the exact rule's own rollouts: each estimator's JSD and KL against the
   exact values, and whether it makes the same decision there (SWITCH: JSD > tau_t; AdaSwitch: the
   trigger over the KL series, per position and the first switch per sequence; SKD: the student's
   token in the teacher's top-25).
3. Closed loop: the same rollouts with each estimator deciding; the teacher-token fraction
   against the exact rule's, and the share of sequences whose first teacher token is where
   the exact rule puts it.
4. ``--cost``: greedy draft-verify rollouts on real vLLM engines in Ray actors, per mode
   (rollout.divergence_k = 20 ... 500, rollout.divergence=exact): seconds side by side, bytes of
   top-k arrays per position, and the teacher fraction against the exact rule's.

Estimators: ``topk@k`` (both top-k lists, union plus one shared tail bucket: what
rollout.divergence=topk with divergence_k=k computes) and ``disjoint@k`` (the same, with JSD's
tail bucket counted as two disjoint tails: the upper end of what the lists allow), k = 20 ... 500.

    python bench/divergence_fidelity.py [--prompts 24] [--max-new-tokens 128] [--closed-loop topk@20 ...] [--cost]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reference_rollout import Rule, load_model, reference_rollout  # noqa: E402

KS = (20, 50, 100, 500)


def topk_estimator(k: int):
    """switchkd's estimate from the two top-k lists (what rollout.divergence=topk computes)."""
    from orchestrator.divergence import topk_divergence

    def divergence(kind, logp, logq):
        p, q = logp.topk(k, -1), logq.topk(k, -1)
        return torch.from_numpy(topk_divergence(kind, p.indices.numpy(), p.values.numpy(), q.indices.numpy(),
                                                q.values.numpy()))
    return divergence


def disjoint_tail_estimator(k: int):
    """As topk, but JSD's tail bucket counted as if the two tails did not overlap (½(p_R + q_R)·ln 2,
    the largest it can be) instead of as one shared id (the smallest)."""
    from orchestrator.divergence import jsd, shared_support, topk_divergence

    def divergence(kind, logp, logq):
        p, q = logp.topk(k, -1), logq.topk(k, -1)
        args = (p.indices.numpy(), p.values.numpy(), q.indices.numpy(), q.values.numpy())
        if kind != "jsd":
            return torch.from_numpy(topk_divergence(kind, *args))
        s = shared_support(*args)
        tail_p, tail_q = s.p[..., -1:], s.q[..., -1:]
        return torch.from_numpy(jsd(s.p, s.q) - _bucket_jsd(tail_p[..., 0], tail_q[..., 0])
                                + 0.5 * (tail_p[..., 0] + tail_q[..., 0]) * np.log(2))
    return divergence


def _bucket_jsd(a, b):
    """One slot's share of JSD: ½a·log(2a/(a+b)) + ½b·log(2b/(a+b))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m = 0.5 * (a + b)
        return 0.5 * np.where(a > 0, a * np.log(a / np.where(m > 0, m, 1)), 0) + \
            0.5 * np.where(b > 0, b * np.log(b / np.where(m > 0, m, 1)), 0)


ESTIMATORS = {**{f"topk@{k}": (lambda k=k: topk_estimator(k)) for k in KS},
              **{f"disjoint@{k}": (lambda k=k: disjoint_tail_estimator(k)) for k in KS}}


def adaswitch_trigger(kl: np.ndarray, rule: Rule) -> np.ndarray:
    """The AdaSwitch rule over one sequence's KL series (as in the reference)."""
    out = np.zeros(len(kl), dtype=bool)
    switched = False
    for t in range(len(kl)):
        if t >= rule.window and kl[t] > rule.factor * kl[t - rule.window:t].mean():
            switched = True
        out[t] = switched
    return out


def first_true(a: np.ndarray) -> int:
    return int(np.argmax(a)) if a.any() else -1


def open_loop(runs: dict, rules: dict, estimators: dict) -> dict:
    """Per-position errors and decision agreement along the exact rule's rollouts."""
    out = {}
    sw, ada = runs["switch"], runs["adaswitch"]
    for name, make in estimators.items():
        divergence = make()
        row = {}
        est_jsd, exact_jsd, agree, first = [], [], [], []
        for logp, logq, jsd in zip(sw.teacher_logprobs, sw.student_logprobs, sw.exact_jsd):
            est = divergence("jsd", torch.from_numpy(logp), torch.from_numpy(logq)).numpy()
            tau = rules["switch"].tau0 * np.exp(-rules["switch"].decay * np.arange(len(jsd)))
            est_jsd.append(est)
            exact_jsd.append(jsd)
            agree.append((est > tau) == (jsd > tau))
            first.append(first_true(est > tau) == first_true(jsd > tau))
        err = np.abs(np.concatenate(est_jsd) - np.concatenate(exact_jsd))
        row["jsd_mean_abs_error"], row["jsd_p99_abs_error"] = float(err.mean()), float(np.percentile(err, 99))
        row["switch_position_agreement"] = float(np.concatenate(agree).mean())
        row["switch_first_switch_agreement"] = float(np.mean(first))
        kl_err, ada_agree, ada_first = [], [], []
        for logp, logq, kl in zip(ada.teacher_logprobs, ada.student_logprobs, ada.exact_kl):
            est = divergence("kl", torch.from_numpy(logp), torch.from_numpy(logq)).numpy()
            kl_err.append(np.abs(est - kl))
            a, b = adaswitch_trigger(est, rules["adaswitch"]), adaswitch_trigger(kl, rules["adaswitch"])
            ada_agree.append(a == b)
            ada_first.append(first_true(a) == first_true(b))
        kl_err = np.concatenate(kl_err)
        row["kl_mean_abs_error"], row["kl_p99_abs_error"] = float(kl_err.mean()), float(np.percentile(kl_err, 99))
        row["adaswitch_position_agreement"] = float(np.concatenate(ada_agree).mean())
        row["adaswitch_first_switch_agreement"] = float(np.mean(ada_first))
        row.update(skd_agreement(runs["skd"], rules["skd"], int(name.split("@")[1])))
        out[name] = row
    return out


def skd_agreement(run, rule: Rule, k: int) -> dict:
    """SKD keeps the student's token iff the teacher lists it in its top-K; from a top-k list
    that is min(k, K) entries (switchkd refuses skd.top_k > top_k, so this is the k < K case)."""
    agree, first = [], []
    for logp, logq in zip(run.teacher_logprobs, run.student_logprobs):
        token = logq.argmax(-1)[:, None]
        rank = (logp > np.take_along_axis(logp, token, -1)).sum(-1)  # the teacher's rank of the student's token
        exact, listed = rank < rule.skd_top_k, rank < min(k, rule.skd_top_k)
        agree.append(exact == listed)
        first.append(first_true(~exact) == first_true(~listed))
    return {"skd_position_agreement": float(np.concatenate(agree).mean()),
            "skd_first_switch_agreement": float(np.mean(first))}


def closed_loop(teacher, student, prompts, rules, estimators, exact_runs, max_new_tokens, eos) -> dict:
    out = {}
    for name, make in estimators.items():
        row = {}
        for policy in ("switch", "adaswitch"):
            started = time.perf_counter()
            run = reference_rollout(teacher, student, prompts, rules[policy], max_new_tokens, eos, divergence=make())
            exact = exact_runs[policy]
            row[policy] = {
                "teacher_fraction": run.teacher_fraction(),
                "teacher_fraction_exact": exact.teacher_fraction(),
                "first_teacher_agreement": float((run.first_teacher_position() == exact.first_teacher_position()).mean()),
                "same_sequences": float(np.mean([a == b for a, b in zip(run.tokens, exact.tokens)])),
                "seconds": round(time.perf_counter() - started, 1),
            }
        out[name] = row
        print(f"[fidelity] closed loop {name}: {json.dumps(row)}", flush=True)
    return out


def measure(teacher_dir, student_dir, prompts, max_new_tokens, eos, estimators=None, closed=None) -> dict:
    """Open-loop figures for every estimator; closed-loop rollouts for those named in ``closed``."""
    estimators = estimators or ESTIMATORS
    rules = {name: Rule(name) for name in ("switch", "adaswitch", "skd")}
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    runs = {}
    for name in ("switch", "adaswitch"):
        runs[name] = reference_rollout(teacher, student, prompts, rules[name], max_new_tokens, eos, keep_distributions=True)
    runs["skd"] = reference_rollout(teacher, student, prompts, rules["skd"], max_new_tokens, eos, keep_distributions=True)
    result = {"positions": {n: int(sum(len(w) for w in r.writer)) for n, r in runs.items()},
              "exact": {n: {"teacher_fraction": r.teacher_fraction(),
                            "jsd_mean": float(np.concatenate(r.exact_jsd).mean()),
                            "kl_mean": float(np.concatenate(r.exact_kl).mean())} for n, r in runs.items()},
              "open_loop": open_loop(runs, rules, estimators)}
    if closed:
        chosen = {name: estimators[name] for name in closed}
        result["closed_loop"] = closed_loop(teacher, student, prompts, rules, chosen, runs, max_new_tokens, eos)
    return result


def measure_cost(config: str, prompts, modes: dict, reference: dict, max_new_tokens: int, repeats: int = 1,
                 policies=("adaswitch", "switch")) -> dict:
    """Greedy draft-verify rollouts of SWITCH and AdaSwitch on real vLLM engines (Ray actors), one
    per divergence mode, side by side on the same prompts: wall seconds (best of ``repeats``), bytes
    of top-k arrays per exchanged position, and the teacher fraction against the exact rule's
    (``reference``: the independent reference's exact runs on the same prompts)."""
    from orchestrator.config import load_config
    from orchestrator.launcher import connect_ray, start_service
    from orchestrator.models import check_pair
    from orchestrator.rollout import Rollout, exchange_k, run_rollout

    base = ["rollout.student_temperature=0", "rollout.teacher_temperature=0", f"rollout.max_new_tokens={max_new_tokens}",
            "ray.dashboard=false", "rollout.divergence=exact"]  # exact: engines accept any k
    cfg = load_config(config, base)
    eos = check_pair(cfg.models.teacher, cfg.models.student).eos_token_id
    connect_ray(cfg)
    teacher = start_service("teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed, wait=False)
    student = start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed, wait=False)
    teacher.wait_ready(), student.wait_ready()
    max_model_len = min(cfg.services.teacher.max_model_len, cfg.services.student.max_model_len)
    rows = np.arange(len(prompts))
    out = {}
    for mode, overrides in modes.items():
        for policy in policies:
            run_cfg = load_config(config, [*base[:-1], f"policy.name={policy}", *overrides])
            ro = Rollout(run_cfg.policy, run_cfg.rollout, teacher, student, eos, max_model_len, teacher.vocab_size)
            if not out:  # the first timed mode must not pay the engines' warm-up
                run_rollout(ro, prompts, None, rows, 0, 0)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                batch = run_rollout(ro, prompts, None, rows, 0, 0)
                times.append(time.perf_counter() - started)
            written = batch.writer[batch.response_mask]
            k = exchange_k(ro)
            out.setdefault(mode, {})[policy] = {
                "seconds": round(min(times), 2), "exchanged_k": k, "bytes_per_position": 2 * k * (8 + 4),
                "teacher_fraction": float((written == 1).mean()),
                "teacher_fraction_exact": reference[policy].teacher_fraction(),
                "round_trips_per_row": float((batch.stats["teacher_calls"] + batch.stats["student_calls"]).mean()),
            }
            print(f"[fidelity] cost {mode} {policy}: {out[mode][policy]}", flush=True)
    teacher.shutdown(), student.shutdown()
    for mode in out:
        for policy in out[mode]:
            out[mode][policy]["seconds_vs_today"] = round(out[mode][policy]["seconds"] / out["topk@20"][policy]["seconds"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="artifacts/smollm2")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--students", nargs="*", default=["student-pruned", "student"])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--closed-loop", nargs="*", default=["topk@20", "topk@500"],
                        help="estimators also run closed loop (a full rollout each, per policy)")
    parser.add_argument("--cost", action="store_true", help="also time each mode's rollouts on real vLLM engines")
    parser.add_argument("--config", default="deploy/configs/smollm2.yaml", help="engine settings for --cost")
    parser.add_argument("--cost-ks", type=int, nargs="+", default=[20, 100, 500], help="divergence_k values for --cost")
    parser.add_argument("--cost-policies", nargs="+", default=["adaswitch", "switch"], choices=["adaswitch", "switch"])
    parser.add_argument("--cost-repeats", type=int, default=2, help="timed rollouts per mode (the best is kept)")
    parser.add_argument("--out", default="runs/bench-divergence-fidelity.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from orchestrator.text import encode_prompt

    root = Path(args.dir)
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    rows = [json.loads(line) for line in (root / "data" / "validation.jsonl").read_text().splitlines()][: args.prompts]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    estimators = {name: ESTIMATORS[name] for name in args.estimators}
    result = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "vocab": len(tok), "students": {}}
    for student in args.students:
        started = time.perf_counter()
        result["students"][student] = measure(root / "teacher", root / student, prompts, args.max_new_tokens,
                                              tok.eos_token_id, estimators, closed=args.closed_loop)
        result["students"][student]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[fidelity] {student}: {json.dumps(result['students'][student], indent=1)}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # each student's figures as soon as they exist
    if args.cost:
        teacher, student = load_model(root / "teacher"), load_model(root / "student")
        reference = {name: reference_rollout(teacher, student, prompts, Rule(name), args.max_new_tokens, tok.eos_token_id)
                     for name in args.cost_policies}
        del teacher, student
        modes = {f"topk@{k}": [f"rollout.divergence_k={k}"] for k in args.cost_ks}
        result["cost"] = measure_cost(args.config, prompts, modes, reference, args.max_new_tokens,
                                      repeats=args.cost_repeats, policies=args.cost_policies)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"[fidelity] wrote {args.out}")


if __name__ == "__main__":
    main()
