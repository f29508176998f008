"""An independent rollout reference: the switching policies written from their definitions in
DESIGN.md, on full-vocabulary distributions, one token at a time, with plain transformers.

It imports nothing of switchkd (no orchestrator, services, trainer or protocol): a wrong rule in
switchkd cannot be wrong here the same way. Greedy only: every token is the argmax of the model
that writes it, so a run is a function of the models and the prompts.

    on_policy   the student writes every token
    teacher     the teacher writes every token
    skd         the student's token stands if it is in the teacher's top-K, else the teacher's
    switch      the teacher writes t iff JSD(p_t, q_t) > tau0 * exp(-decay * t)
    adaswitch   the student writes until KL(p_t || q_t) > factor * mean(KL over the previous
                `window` positions); from there on the teacher writes, for good

p_t is the teacher's next-token distribution and q_t the student's, on the same prefix. The
divergences are computed over the whole vocabulary (float64). A caller may pass its own
``divergence`` function (the fidelity bench passes switchkd's top-k estimate) to run the same
loop with another estimate of d_t.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

TEACHER, STUDENT = 1, 0


@dataclass
class Rule:
    name: str
    skd_top_k: int = 25
    tau0: float = 0.2
    decay: float = 0.005
    window: int = 8
    factor: float = 3.0


@dataclass
class ReferenceRollout:
    tokens: list[list[int]]  # each row's response, EOS included when it was written
    writer: list[np.ndarray]  # per response token: TEACHER (1) or STUDENT (0)
    divergence: list[np.ndarray]  # what the rule compared at each position (NaN where nothing)
    exact_jsd: list[np.ndarray]  # full-vocabulary JSD(p_t, q_t) at each position
    exact_kl: list[np.ndarray]  # full-vocabulary KL(p_t || q_t) at each position
    # Per position [T, V] log-probabilities of both models (only with keep_distributions=True).
    teacher_logprobs: list[np.ndarray] = field(default_factory=list)
    student_logprobs: list[np.ndarray] = field(default_factory=list)

    def teacher_fraction(self) -> float:
        writers = np.concatenate(self.writer)
        return float((writers == TEACHER).mean())

    def first_teacher_position(self) -> np.ndarray:
        """Per row, the first position the teacher wrote (-1: never)."""
        return np.array([int(np.argmax(w == TEACHER)) if (w == TEACHER).any() else -1 for w in self.writer])


def exact_jsd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD(p, q) in nats over the last axis, from log-probabilities."""
    p, q = logp.double().exp(), logq.double().exp()
    logm = torch.log(0.5 * (p + q))
    kl_pm = torch.where(p > 0, p * (logp.double() - logm), 0.0).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq.double() - logm), 0.0).sum(-1)
    return (0.5 * kl_pm + 0.5 * kl_qm).clamp_min(0.0)


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats over the last axis, from log-probabilities."""
    p = logp.double().exp()
    return torch.where(p > 0, p * (logp.double() - logq.double()), 0.0).sum(-1).clamp_min(0.0)


def exact_divergence(kind: str, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return exact_jsd(logp, logq) if kind == "jsd" else exact_kl(logp, logq)


class _Decoder:
    """A causal LM decoding a left-padded batch one token at a time with its KV cache."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int = 0):
        self.model = model
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
        self.mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        positions = (self.mask.cumsum(1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = positions[:, -1] + 1
        self.logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)

    def append(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=torch.long)], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = self.next_position + 1
        self.logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)


@torch.no_grad()
def reference_rollout(teacher, student, prompts: list[list[int]], rule: Rule, max_new_tokens: int, eos_id: int,
                      divergence=exact_divergence, keep_distributions: bool = False) -> ReferenceRollout:
    """Greedy responses to ``prompts`` under ``rule``; ``teacher`` and ``student`` are transformers
    causal LMs sharing a vocabulary. ``divergence(kind, logp, logq)`` gives d_t per row
    (kind "jsd" for switch, "kl" for adaswitch) from [B, V] log-probabilities."""
    n = len(prompts)
    t_dec, s_dec = _Decoder(teacher, prompts), _Decoder(student, prompts)
    done = torch.zeros(n, dtype=torch.bool)
    switched = torch.zeros(n, dtype=torch.bool)
    history: list[torch.Tensor] = []  # adaswitch's d_t per step, [B] each
    steps = {"tokens": [], "writer": [], "divergence": [], "jsd": [], "kl": [], "p": [], "q": [], "live": []}
    for t in range(max_new_tokens):
        logp, logq = t_dec.logprobs, s_dec.logprobs
        teacher_token, student_token = logp.argmax(-1), logq.argmax(-1)
        d = torch.full((n,), float("nan"), dtype=torch.float64)
        if rule.name == "on_policy":
            use_teacher = torch.zeros(n, dtype=torch.bool)
        elif rule.name == "teacher":
            use_teacher = torch.ones(n, dtype=torch.bool)
        elif rule.name == "skd":
            top = logp.topk(rule.skd_top_k, -1).indices
            use_teacher = ~(top == student_token[:, None]).any(-1)
        elif rule.name == "switch":
            d = divergence("jsd", logp, logq).double()
            use_teacher = d > rule.tau0 * np.exp(-rule.decay * t)
        elif rule.name == "adaswitch":
            d = divergence("kl", logp, logq).double()
            if len(history) >= rule.window:
                mean = torch.stack(history[-rule.window:]).mean(0)
                switched = switched | (d > rule.factor * mean)
            use_teacher = switched.clone()
            history.append(d)
        else:
            raise ValueError(f"unknown rule {rule.name!r}")
        token = torch.where(use_teacher, teacher_token, student_token)
        token = torch.where(done, torch.full_like(token, eos_id), token)  # finished rows idle on EOS
        steps["tokens"].append(token)
        steps["writer"].append(use_teacher.long())
        steps["divergence"].append(d)
        steps["jsd"].append(exact_jsd(logp, logq))
        steps["kl"].append(exact_kl(logp, logq))
        steps["live"].append(~done)
        if keep_distributions:
            steps["p"].append(logp.clone())
            steps["q"].append(logq.clone())
        done = done | (token == eos_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        t_dec.append(token)
        s_dec.append(token)

    live = torch.stack(steps["live"], 1).numpy()
    lengths = live.sum(1)
    stacked = {name: torch.stack(v, 1).numpy() for name, v in steps.items() if v and name not in ("p", "q", "live")}
    rows = lambda a: [a[i, : lengths[i]] for i in range(n)]  # noqa: E731
    out = ReferenceRollout(
        tokens=[r.tolist() for r in rows(stacked["tokens"])],
        writer=rows(stacked["writer"]),
        divergence=rows(stacked["divergence"]),
        exact_jsd=rows(stacked["jsd"]),
        exact_kl=rows(stacked["kl"]),
    )
    if keep_distributions:
        p, q = torch.stack(steps["p"], 1).numpy(), torch.stack(steps["q"], 1).numpy()
        out.teacher_logprobs, out.student_logprobs = rows(p), rows(q)
    return out


def load_model(path):
    """A transformers causal LM in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
