"""Distillation losses: the student's full logits against the teacher's top-k plus a tail bucket.

The teacher is known only through its top-k (ids, logprobs) per position, so both distributions
are compared on k + 1 buckets: the teacher's k listed ids, and "everything else". The student's
bucket probabilities are exact (gathered from its full softmax; its tail is a masked logsumexp,
not 1 − sum, so it stays accurate when the top-k holds almost all the mass). Gradients flow only
through the student.

Per response token, then averaged over the response tokens of the batch (prompt and padding
masked out):

    forward_kl       KL(p ‖ q)
    reverse_kl       KL(q ‖ p)
    jsd              β·KL(p ‖ m) + (1−β)·KL(q ‖ m),  m = β·p + (1−β)·q      (GKD)
    skew_kl          KL(p ‖ α·p + (1−α)·q)                                  (DistiLLM)
    skew_reverse_kl  KL(q ‖ (1−α)·p + α·q)                                  (DistiLLM)
    tvd              ½·Σ|p − q|
    cross_entropy    −log q(y_t): no teacher term (SFT, the rationale method)

    sampled_reverse_kl   KL(q ‖ p) from the student's own sampled token y alone (the on-policy
                     distillation loss of verl, TRL, Tinker...): it needs only the teacher's logprob
                     of y, no list. With log r = log p(y) − log q(y):
                         k1 = −log r          k3 = (r − 1) − log r
                     both unbiased for KL(q ‖ p) when y ~ q (k3 never negative, lower variance).
                     Only student-written tokens count (a teacher-written token was not drawn from
                     q); plus forward_kl_weight · the top-k forward KL at every response token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.config import LossConfig

# log(0) is replaced by this: exp(-100) is ~4e-44, nothing next to real probabilities, yet every
# term stays finite (a teacher that gives a token zero mass cannot make reverse KL infinite).
LOG_FLOOR = -100.0


def bucket_logprobs(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on the k + 1 buckets, each [..., k + 1].

    ``student_logits`` [..., V]; ``teacher_ids``/``teacher_logprobs`` [..., k], an empty slot
    has logprob -inf (k may exceed V).
    """
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = teacher_logprobs.detach().float()
    listed = torch.isfinite(teacher_logp)
    ids = torch.where(listed, teacher_ids, torch.zeros_like(teacher_ids))

    student_listed = student_logp.gather(-1, ids).masked_fill(~listed, -math.inf)
    # scatter_add, not scatter: an empty slot and a real slot may both point at id 0.
    is_listed = torch.zeros_like(student_logp).scatter_add_(-1, ids, listed.to(student_logp.dtype)) > 0
    # Fill with the most negative finite float, not -inf: when every id is listed (k >= V) the
    # tail is empty and logsumexp over all -inf would give NaN gradients.
    unlisted = student_logp.masked_fill(is_listed, torch.finfo(student_logp.dtype).min)
    student_tail = torch.logsumexp(unlisted, dim=-1, keepdim=True)

    # float64: the tail is 1 minus a sum close to 1.
    teacher_mass = teacher_logp.double().exp().sum(-1, keepdim=True)
    teacher_tail = torch.log((1.0 - teacher_mass).clamp(min=0.0)).to(teacher_logp.dtype)

    teacher = torch.cat([teacher_logp, teacher_tail], dim=-1).clamp(min=LOG_FLOOR)
    student = torch.cat([student_listed, student_tail], dim=-1).clamp(min=LOG_FLOOR)
    return teacher, student


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1.0 - weight_a))


def token_divergence(teacher: torch.Tensor, student: torch.Tensor, loss: LossConfig) -> torch.Tensor:
    """The configured divergence per position, from bucket log-probabilities [..., k + 1]."""
    kind = loss.kind
    if kind == "forward_kl":
        return _kl(teacher, student)
    if kind == "reverse_kl":
        return _kl(student, teacher)
    if kind == "jsd":
        mix = _log_mix(teacher, student, loss.beta)
        return loss.beta * _kl(teacher, mix) + (1.0 - loss.beta) * _kl(student, mix)
    if kind == "skew_kl":
        return _kl(teacher, _log_mix(teacher, student, loss.alpha))
    if kind == "skew_reverse_kl":
        return _kl(student, _log_mix(teacher, student, 1.0 - loss.alpha))
    if kind == "tvd":
        return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)
    raise ValueError(f"unknown loss kind {kind!r}")


def sampled_reverse_kl(
    student_logits: torch.Tensor, tokens: torch.Tensor, teacher_token_logprob: torch.Tensor,
    sampled: torch.Tensor, estimator: str,
) -> torch.Tensor:
    """Per position [...]: the k1 or k3 estimate of KL(q ‖ p) at the sampled token, 0 where
    ``sampled`` is False.

    Its value is the estimate; its gradient is the exact gradient of the estimate's expectation
    under q (the score-function term included, as DiCE writes it):
        ∇ E_q[k(y)] = E_q[∇k + k ∇log q(y)]
    With ∇k1 = ∇log q and ∇k3 = (1 − r) ∇log q this is w·∇log q, w = k1 + 1 (k1) or k1 (k3):
    both unbiased for ∇KL(q ‖ p); k1's extra term has mean zero and only adds variance. (A
    pathwise-only k3, as a KL penalty is often written, would follow the forward KL instead.)
    The estimate assumes y was drawn from the student being trained at temperature 1.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # where, not multiply: a teacher-written position may hold NaN, and NaN * 0 is NaN.
    log_p = torch.where(sampled, teacher_token_logprob.float(), torch.zeros_like(log_q)).clamp(min=LOG_FLOOR)
    log_r = log_p - log_q.detach()
    k1 = -log_r
    if estimator == "k1":
        value, weight = k1, k1 + 1.0
    elif estimator == "k3":
        value, weight = torch.expm1(log_r) - log_r, k1
    else:
        raise ValueError(f"loss.estimator: unknown estimator {estimator!r} (k1 or k3)")
    per_token = value + weight * (log_q - log_q.detach())  # = value; gradient weight · ∇log q
    return torch.where(sampled, per_token, torch.zeros_like(per_token))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    loss: LossConfig,
    target_tokens: torch.Tensor | None = None,
    teacher_token_logprob: torch.Tensor | None = None,
    sampled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over masked positions of the divergence (plus ce_weight · cross-entropy; only the
    cross-entropy for kind ``cross_entropy``).

    All arguments are aligned per response position: ``student_logits[..., t, :]`` is the
    student's prediction of the token at position t, ``target_tokens[..., t]`` that token;
    kind ``sampled_reverse_kl`` also reads the teacher's logprob of that token and ``sampled``
    (the student wrote it).
    """
    ce_weight = 1.0 if loss.kind == "cross_entropy" else loss.ce_weight
    per_token = torch.zeros_like(mask, dtype=torch.float32)
    if loss.kind == "sampled_reverse_kl":
        if target_tokens is None or teacher_token_logprob is None or sampled is None:
            raise ValueError("sampled_reverse_kl needs target_tokens, teacher_token_logprob and sampled")
        per_token = sampled_reverse_kl(student_logits, target_tokens, teacher_token_logprob, sampled & mask,
                                       loss.estimator)
        if loss.forward_kl_weight > 0:
            teacher, student = bucket_logprobs(student_logits, teacher_ids, teacher_logprobs)
            per_token = per_token + loss.forward_kl_weight * _kl(teacher, student)
    elif loss.kind != "cross_entropy":
        teacher, student = bucket_logprobs(student_logits, teacher_ids, teacher_logprobs)
        per_token = token_divergence(teacher, student, loss)
    if ce_weight > 0:
        if target_tokens is None:
            raise ValueError("cross-entropy needs target_tokens")
        per_token = per_token + ce_weight * F.cross_entropy(
            student_logits.float().flatten(0, -2), target_tokens.flatten(), reduction="none"
        ).view_as(per_token)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
