"""Divergences between two models' next-token distributions, estimated from their top-k lists.

vLLM gives each model's own top-k (ids, logprobs) per position and cannot score another model's
ids, so the full distributions p (teacher) and q (student) are never both known. We compare them
on a shared support of 2k + 1 slots:

    slots [0, k)      the teacher's listed ids
    slots [k, 2k)     the student's listed ids that the teacher did not list
    slot  2k          one tail bucket: all the vocabulary outside both lists

Rule for an id that one side did not list (documented in README, tested against exact values):
that side's probability for it is unknown but at most its smallest listed probability, and all
such ids share its tail mass (1 - sum of its listed probabilities) with the tail bucket. We give
each unlisted id

    min(smallest listed probability, tail mass / (number of unlisted ids in the union + 1))

and whatever tail mass is left goes to the tail bucket, so both sides still sum to 1.

Everything here is a plain function over numpy arrays shaped [..., k]; no loops over positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Stands in for log(0) where a probability the rule says is zero meets a log (KL to a side that
# puts no mass on an id): keeps KL finite (at most ~27.6 nats per unit of mass) instead of inf.
PROB_FLOOR = 1e-12


@dataclass
class SharedSupport:
    """Both distributions on the 2k + 1 shared slots; ``p`` and ``q`` are [..., 2k + 1] and sum to 1."""

    p: np.ndarray
    q: np.ndarray


def shared_support(p_ids, p_logprobs, q_ids, q_logprobs) -> SharedSupport:
    """Place two top-k lists ([..., k] ids and logprobs, -inf = empty slot) on one support."""
    p_prob = _probs(p_logprobs)
    q_prob = _probs(q_logprobs)
    p_listed = p_prob > 0
    q_listed = q_prob > 0

    # same[..., i, j]: teacher slot i and student slot j hold the same id.
    same = (p_ids[..., :, None] == q_ids[..., None, :]) & p_listed[..., :, None] & q_listed[..., None, :]
    p_id_in_q = same.any(-1)
    q_id_in_p = same.any(-2)
    q_at_p_ids = (same * q_prob[..., None, :]).sum(-1)

    p_tail = np.clip(1.0 - p_prob.sum(-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - q_prob.sum(-1), 0.0, 1.0)
    # Ids each side must impute: the other side's listed ids that it did not list itself.
    p_missing = (q_listed & ~q_id_in_p).sum(-1)
    q_missing = (p_listed & ~p_id_in_q).sum(-1)
    p_unlisted = _unlisted_prob(p_prob, p_listed, p_tail, p_missing)
    q_unlisted = _unlisted_prob(q_prob, q_listed, q_tail, q_missing)

    teacher_slots_q = np.where(p_id_in_q, q_at_p_ids, q_unlisted[..., None]) * p_listed
    student_only = q_listed & ~q_id_in_p
    p = np.concatenate(
        [p_prob, student_only * p_unlisted[..., None], (p_tail - p_unlisted * p_missing)[..., None]], axis=-1
    )
    q = np.concatenate(
        [teacher_slots_q, q_prob * student_only, (q_tail - q_unlisted * q_missing)[..., None]], axis=-1
    )
    return SharedSupport(p=np.clip(p, 0.0, 1.0), q=np.clip(q, 0.0, 1.0))


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis, 0·log 0 = 0."""
    terms = np.where(p > 0, p * (np.log(np.maximum(p, PROB_FLOOR)) - np.log(np.maximum(q, PROB_FLOOR))), 0.0)
    return np.maximum(terms.sum(-1), 0.0)


def jsd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) over the last axis."""
    m = 0.5 * (p + q)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def topk_divergences(p_ids, p_logprobs, q_ids, q_logprobs) -> dict[str, np.ndarray]:
    """JSD, KL(p||q) and KL(q||p) estimated from two top-k lists, each shaped [...]."""
    s = shared_support(p_ids, p_logprobs, q_ids, q_logprobs)
    return {"jsd": jsd(s.p, s.q), "kl": kl(s.p, s.q), "reverse_kl": kl(s.q, s.p)}


def topk_divergence(kind: str, p_ids, p_logprobs, q_ids, q_logprobs) -> np.ndarray:
    """One divergence: ``kind`` is "jsd", "kl" (teacher‖student) or "reverse_kl"."""
    s = shared_support(p_ids, p_logprobs, q_ids, q_logprobs)
    if kind == "jsd":
        return jsd(s.p, s.q)
    if kind == "kl":
        return kl(s.p, s.q)
    if kind == "reverse_kl":
        return kl(s.q, s.p)
    raise ValueError(f"unknown divergence {kind!r}; expected one of jsd, kl, reverse_kl")


def _probs(logprobs: np.ndarray) -> np.ndarray:
    # float64: tail masses are differences of sums near 1.
    return np.exp(np.asarray(logprobs, dtype=np.float64))


def _unlisted_prob(prob, listed, tail, n_missing):
    smallest_listed = np.where(listed, prob, np.inf).min(-1)
    smallest_listed = np.where(np.isfinite(smallest_listed), smallest_listed, 0.0)
    return np.minimum(smallest_listed, tail / (n_missing + 1))
