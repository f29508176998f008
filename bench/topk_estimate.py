"""How good are top-k divergence estimates? Exact full-vocabulary JSD and KL between the embedded
teacher and student vs the estimates from their top-k lists, at k = 5, 20, 50, on the same
prefixes, and how often the switching decisions made from each agree (SWITCH per position;
AdaSwitch per position and per sequence's first switch).

    python bench/topk_estimate.py [--variant full] [--examples 64]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def adaswitch_agreement(estimated_kl: np.ndarray, exact_kl: np.ndarray, lengths: np.ndarray) -> dict:
    """AdaSwitch's rule (default window and factor) run over each sequence's KL series, once on the
    estimates and once on the exact values: agreement per position (teacher or not) and per
    sequence (the same first switch position, or neither switches)."""
    from orchestrator.config import PolicyConfig
    from orchestrator.policies import adaswitch_trigger, init_state

    policy = PolicyConfig(name="adaswitch")
    valid = np.arange(lengths.max())[None, :] < lengths[:, None]

    def trigger(values):
        padded = np.zeros(valid.shape)
        padded[valid] = values  # positions after a sequence's end cannot change earlier decisions
        return adaswitch_trigger(policy, padded, init_state(policy, len(lengths), np.random.default_rng(0)))

    est, ref = trigger(estimated_kl), trigger(exact_kl)
    first = lambda t: np.where(t.any(1), t.argmax(1), -1)  # noqa: E731
    return {"adaswitch_position_agreement": float((est == ref)[valid].mean()),
            "adaswitch_first_switch_agreement": float((first(est & valid) == first(ref & valid)).mean()),
            "adaswitch_switched_share_exact": float((ref & valid).any(1).mean())}


def measure(variant_dir: Path, examples: int, ks=(5, 20, 50)) -> dict:
    from transformers import AutoTokenizer

    from orchestrator.config import PolicyConfig
    from orchestrator.divergence import jsd, kl, topk_divergences
    from orchestrator.policies import switch_threshold
    from protocol.topk import topk_from_logprobs
    from trainer.reference import response_logprobs
    from orchestrator.text import encode_prompt, encode_response

    tok = AutoTokenizer.from_pretrained(variant_dir / "teacher")
    rows = [json.loads(line) for line in (variant_dir / "data" / "validation.jsonl").read_text().splitlines()][:examples]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    sequences = [p + encode_response(tok, r["response"]) for p, r in zip(prompts, rows)]
    starts = [len(p) for p in prompts]
    teacher = np.concatenate(response_logprobs(variant_dir / "teacher", sequences, starts))
    student = np.concatenate(response_logprobs(variant_dir / "student", sequences, starts))
    lengths = np.array([len(s) - st for s, st in zip(sequences, starts)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    p, q = np.exp(teacher.astype(np.float64)), np.exp(student.astype(np.float64))
    exact = {"jsd": jsd(p, q), "kl": kl(p, q), "reverse_kl": kl(q, p)}
    policy = PolicyConfig()
    tau = switch_threshold(policy, positions)
    tokens = np.zeros(len(positions), dtype=np.int64)
    out = {"positions": int(len(positions)), "vocab": int(teacher.shape[1]), "by_k": {}}
    for k in ks:
        t, s = topk_from_logprobs(teacher, tokens, k), topk_from_logprobs(student, tokens, k)
        est = topk_divergences(t.ids, t.logprobs, s.ids, s.logprobs)
        row = {}
        for name in exact:
            err = np.abs(est[name] - exact[name])
            row[name] = {"mean_abs_error": float(err.mean()), "p99_abs_error": float(np.percentile(err, 99)),
                         "max_abs_error": float(err.max()), "exact_mean": float(exact[name].mean())}
        row["switch_decision_agreement"] = float(((est["jsd"] > tau) == (exact["jsd"] > tau)).mean())
        row.update(adaswitch_agreement(est["kl"], exact["kl"], lengths))
        out["by_k"][k] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="full", choices=["full", "fast"])
    parser.add_argument("--embedded-dir", default="artifacts/embedded")
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    from build.embedded.build import build

    result = measure(build(args.embedded_dir, variant=args.variant), args.examples)
    print(f"{result['positions']} response positions, vocabulary {result['vocab']}; |estimate - exact| in nats")
    print(f"{'k':>3} {'divergence':>11} {'exact mean':>11} {'mean err':>9} {'p99 err':>9} {'max err':>9}")
    for k, row in result["by_k"].items():
        for name in ("jsd", "kl", "reverse_kl"):
            r = row[name]
            print(f"{k:>3} {name:>11} {r['exact_mean']:11.4f} {r['mean_abs_error']:9.5f} {r['p99_abs_error']:9.5f} {r['max_abs_error']:9.5f}")
        print(f"{k:>3} SWITCH decisions (default tau0, decay) agree with exact: {row['switch_decision_agreement']:.4f}")
        print(f"{k:>3} AdaSwitch (default window, factor) per position: {row['adaswitch_position_agreement']:.4f}, "
              f"same first switch per sequence: {row['adaswitch_first_switch_agreement']:.4f} "
              f"(sequences switching, exact: {row['adaswitch_switched_share_exact']:.3f})")


if __name__ == "__main__":
    main()
