"""Pick SWITCH and AdaSwitch thresholds for a teacher/student pair, from the validation split.

    python bench/calibrate_thresholds.py [--variant full] [--examples 64]

The papers' thresholds are for full-vocabulary divergences on their models; ours are top-k
estimates on other models, so the numbers do not transfer. This samples the student's own
responses to validation prompts (the prefixes the rules will see), computes the top-k JSD and
KL(teacher || student) at every position, and prints:
  - JSD quantiles by response position, and the teacher-token fraction SWITCH would give for
    a grid of (tau0, decay), with the rule applied to these fixed student prefixes;
  - for AdaSwitch, the share of sequences that would switch and the mean first-switch position
    for a grid of (window, factor).
These are switch rates on student prefixes, before any hand-over changes the prefix.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def sample_student(variant_dir: Path, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(variant_dir / "student")
    model = AutoModelForCausalLM.from_pretrained(variant_dir / "student", dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out = []
    for first in range(0, len(prompts), 32):
        batch = prompts[first : first + 32]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = (ids != tok.pad_token_id).long()
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        for row in gen[:, width:].tolist():
            end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            out.append(row[:end])
    return out


def divergences(variant_dir: Path, examples: int, k: int, seed: int = 0):
    """Per sequence: arrays of top-k JSD and KL at each response position of a student sample."""
    from transformers import AutoTokenizer

    from orchestrator.divergence import topk_divergences
    from protocol.topk import topk_from_logprobs
    from trainer.reference import response_logprobs
    from orchestrator.text import encode_prompt

    tok = AutoTokenizer.from_pretrained(variant_dir / "teacher")
    rows = [json.loads(line) for line in (variant_dir / "data" / "validation.jsonl").read_text().splitlines()][:examples]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    responses = sample_student(variant_dir, prompts, 256, seed)
    sequences = [p + r for p, r in zip(prompts, responses)]
    starts = [len(p) for p in prompts]
    teacher = response_logprobs(variant_dir / "teacher", sequences, starts)
    student = response_logprobs(variant_dir / "student", sequences, starts)
    jsd, kl = [], []
    for t, s in zip(teacher, student):
        tokens = np.zeros(len(t), dtype=np.int64)
        tk, sk = topk_from_logprobs(t, tokens, k), topk_from_logprobs(s, tokens, k)
        d = topk_divergences(tk.ids, tk.logprobs, sk.ids, sk.logprobs)
        jsd.append(d["jsd"])
        kl.append(d["kl"])
    return jsd, kl


def switch_fraction(jsd: list[np.ndarray], tau0: float, decay: float) -> float:
    flat = np.concatenate(jsd)
    positions = np.concatenate([np.arange(len(j)) for j in jsd])
    return float((flat > tau0 * np.exp(-decay * positions)).mean())


def adaswitch_stats(kl: list[np.ndarray], window: int, factor: float) -> tuple[float, float]:
    from orchestrator.config import AdaSwitchPolicy, PolicyConfig
    from orchestrator.policies import adaswitch_trigger, init_state

    policy = PolicyConfig(name="adaswitch", adaswitch=AdaSwitchPolicy(window=window, factor=factor))
    width = max(len(x) for x in kl)
    d = np.zeros((len(kl), width))
    valid = np.arange(width)[None, :] < np.array([len(x) for x in kl])[:, None]
    d[valid] = np.concatenate(kl)
    fired = adaswitch_trigger(policy, d, init_state(policy, len(kl), np.random.default_rng(0))) & valid
    switched = fired.any(1)
    first = fired.argmax(1)[switched]
    return float(switched.mean()), float(first.mean()) if first.size else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="full", choices=["full", "fast"])
    parser.add_argument("--embedded-dir", default="artifacts/embedded")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    from build.embedded.build import build

    jsd, kl = divergences(build(args.embedded_dir, variant=args.variant), args.examples, args.k)
    lengths = np.array([len(j) for j in jsd])
    print(f"{len(jsd)} student samples, response length mean {lengths.mean():.0f}, median {np.median(lengths):.0f}; k={args.k}")
    flat = np.concatenate(jsd)
    positions = np.concatenate([np.arange(len(j)) for j in jsd])
    print("JSD quantiles (50/75/90/95) by response position:")
    for lo, hi in ((0, 16), (16, 64), (64, 128), (128, 256)):
        sel = (positions >= lo) & (positions < hi)
        if sel.any():
            q = np.percentile(flat[sel], [50, 75, 90, 95])
            print(f"  t in [{lo:3d}, {hi:3d}): " + " ".join(f"{v:.3f}" for v in q))
    print("SWITCH teacher-token fraction on student prefixes (rows tau0, columns decay):")
    decays = (0.0, 0.002, 0.005, 0.01)
    print("  tau0  " + " ".join(f"{d:>7}" for d in decays))
    for tau0 in (0.05, 0.1, 0.15, 0.2, 0.3):
        print(f"  {tau0:4.2f}  " + " ".join(f"{switch_fraction(jsd, tau0, d):7.3f}" for d in decays))
    print("AdaSwitch: share of sequences that switch / mean first-switch position (rows window, columns factor):")
    factors = (2.0, 3.0, 4.0, 6.0)
    print("  L   " + " ".join(f"{f:>13}" for f in factors))
    for window in (4, 8, 16):
        cells = [adaswitch_stats(kl, window, f) for f in factors]
        print(f"  {window:<3} " + " ".join(f"{s:5.2f} / {p:5.1f}" for s, p in cells))


if __name__ == "__main__":
    main()
