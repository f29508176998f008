"""Distillation losses against a straightforward reference, plus properties (pure math)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.config import LossConfig
from trainer.losses import distillation_loss

KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def reference_loss(student_logits, teacher_ids, teacher_logprobs, mask, cfg, targets=None):
    """One position at a time, in float64, straight from the definitions."""
    total, count = 0.0, 0
    B, T, V = student_logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            q_full = torch.softmax(student_logits[b, t].double(), -1)
            p, q = [], []
            listed = set()
            for i, lp in zip(teacher_ids[b, t].tolist(), teacher_logprobs[b, t].tolist()):
                if lp == -math.inf:
                    continue
                p.append(math.exp(lp))
                q.append(q_full[i].item())
                listed.add(i)
            p.append(max(1.0 - sum(p), 0.0))
            q.append(sum(q_full[i].item() for i in range(V) if i not in listed))
            p = np.maximum(np.array(p), math.exp(-100))
            q = np.maximum(np.array(q), math.exp(-100))

            def kl(a, c):
                return float(np.sum(a * np.log(a / c)))

            a, be = cfg.alpha, cfg.beta
            value = {
                "forward_kl": lambda: kl(p, q),
                "reverse_kl": lambda: kl(q, p),
                "jsd": lambda: be * kl(p, be * p + (1 - be) * q) + (1 - be) * kl(q, be * p + (1 - be) * q),
                "skew_kl": lambda: kl(p, a * p + (1 - a) * q),
                "skew_reverse_kl": lambda: kl(q, (1 - a) * p + a * q),
                "tvd": lambda: 0.5 * float(np.abs(p - q).sum()),
            }[cfg.kind]()
            if cfg.ce_weight:
                value += cfg.ce_weight * -math.log(q_full[targets[b, t]].item())
            total += value
            count += 1
    return total / max(count, 1)


def _batch(seed, B=2, T=5, V=30, k=6):
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, T, V, generator=g) * 2
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    top = teacher_logp.topk(min(k, V), -1)
    ids, lps = top.indices, top.values
    if k > V:  # padded slots, as the services send them
        ids = torch.cat([ids, torch.zeros(B, T, k - V, dtype=torch.long)], -1)
        lps = torch.cat([lps, torch.full((B, T, k - V), -math.inf)], -1)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    targets = torch.randint(0, V, (B, T), generator=g)
    return student_logits, ids, lps, mask, targets


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_matches_reference(kind, ce_weight):
    cfg = LossConfig(kind=kind, ce_weight=ce_weight, alpha=0.1, beta=0.3)
    logits, ids, lps, mask, targets = _batch(seed=KINDS.index(kind))  # not hash(): str hashes change every process
    got = distillation_loss(logits, ids, lps, mask, cfg, targets).item()
    want = reference_loss(logits, ids, lps, mask, cfg, targets)
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_full_teacher_distribution_gives_the_exact_forward_kl():
    logits, _, _, mask, _ = _batch(seed=3, V=12)
    teacher_logp = torch.log_softmax(torch.randn(2, 5, 12), -1)
    ids = torch.arange(12).expand(2, 5, 12)
    got = distillation_loss(logits, ids, teacher_logp, mask, LossConfig(kind="forward_kl"))
    exact = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(logits, -1))).sum(-1)
    assert got.item() == pytest.approx(exact[mask].mean().item(), abs=1e-5)


def test_only_masked_positions_count():
    logits, ids, lps, mask, _ = _batch(seed=4)
    cfg = LossConfig(kind="forward_kl")
    base = distillation_loss(logits, ids, lps, mask, cfg)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    assert distillation_loss(changed, ids, lps, mask, cfg).item() == pytest.approx(base.item(), abs=1e-6)


def test_gradients_flow_only_through_the_student():
    logits, ids, lps, mask, _ = _batch(seed=5)
    logits.requires_grad_(True)
    lps.requires_grad_(True)
    distillation_loss(logits, ids, lps, mask, LossConfig(kind="jsd")).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert lps.grad is None


def test_matching_student_has_zero_loss():
    teacher_logp = torch.log_softmax(torch.randn(1, 3, 10), -1)
    ids = torch.arange(10).expand(1, 3, 10)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for kind in KINDS:
        loss = distillation_loss(teacher_logp.clone(), ids, teacher_logp, mask, LossConfig(kind=kind))
        assert abs(loss.item()) < 1e-5, kind  # float32 top-k sums to 1 ± 1e-7


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    vocab=st.integers(2, 20),
    k=st.integers(1, 30),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 10_000),
    zero_prob_tokens=st.booleans(),
)
def test_finite_loss_and_gradients(kind, vocab, k, scale, seed, zero_prob_tokens):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 4, vocab, generator=g) * scale).requires_grad_(True)
    teacher_logits = torch.randn(2, 4, vocab, generator=g) * scale
    if zero_prob_tokens:  # the teacher gives some listed tokens exactly zero probability
        teacher_logits[..., 1::2] = -math.inf
        teacher_logits[..., 0] = 0.0
    teacher_logp = torch.log_softmax(teacher_logits, -1)
    top = teacher_logp.topk(min(k, vocab), -1)
    ids, lps = top.indices, top.values
    if k > vocab:
        ids = torch.cat([ids, torch.zeros(2, 4, k - vocab, dtype=torch.long)], -1)
        lps = torch.cat([lps, torch.full((2, 4, k - vocab), -math.inf)], -1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss = distillation_loss(logits, ids, lps, mask, LossConfig(kind=kind), torch.zeros(2, 4, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() >= -1e-6
    assert torch.isfinite(logits.grad).all()
