"""Saliency of prompt tokens for a teacher's answer: one forward and one backward per batch.

The target is the summed log-probability of an answer (the teacher's greedy one, or the
dataset's reference) given the prompt. A prompt token's score is a norm of that target's
gradient with respect to the token's input embedding:

    grad_l1       ‖∂T/∂e_i‖₁            (default; Ballout et al. 2409.12586 use saliency maps)
    grad_l2       ‖∂T/∂e_i‖₂
    grad_x_input  |⟨∂T/∂e_i, e_i⟩|      (gradient × input)

Rows are right-padded, so every row keeps the positions (and position ids) it has alone and
a causal model's row never sees another row's tokens: batched scores equal one-row scores.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

ScoreKind = Literal["grad_l1", "grad_l2", "grad_x_input"]


def pad_right(prompts: list[list[int]], targets: list[list[int]], pad_id: int):
    """Prompt + target per row, right-padded: tokens [B, L], prompt lengths [B], lengths [B]."""
    rows = [torch.tensor(p + t, dtype=torch.long) for p, t in zip(prompts, targets)]
    tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
    return tokens, torch.tensor([len(p) for p in prompts]), torch.tensor([len(r) for r in rows])


def target_logprob_sum(model, embeds: torch.Tensor, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
    """Σ over rows and target tokens of log p(token | everything before it), from input embeddings."""
    positions = torch.arange(tokens.shape[1])
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, :-1].float()
    following = tokens[:, 1:]
    # log p = logit − logsumexp: no second [B, L, V] tensor for a log_softmax.
    logprobs = logits.gather(-1, following[..., None])[..., 0] - logits.logsumexp(-1)
    predicted = positions[None, 1:]  # position i + 1 is the token predicted at i
    is_target = (predicted >= prompt_lengths[:, None]) & (predicted < lengths[:, None])
    return (logprobs * is_target).sum()


def attribution_scores(model, prompts: list[list[int]], targets: list[list[int]], score: ScoreKind = "grad_l1",
                       pad_id: int = 0) -> list[np.ndarray]:
    """One score per prompt token of each row (float32 arrays of the prompts' lengths)."""
    if len(prompts) != len(targets):
        raise ValueError(f"attribution_scores: {len(prompts)} prompts but {len(targets)} targets")
    if any(len(t) == 0 for t in targets):
        raise ValueError("attribution_scores: every row needs at least one target token")
    tokens, prompt_lengths, lengths = pad_right(prompts, targets, pad_id)
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    total = target_logprob_sum(model, embeds, tokens, prompt_lengths, lengths)
    # Only the embeddings' gradient: autograd skips every weight gradient.
    (grad,) = torch.autograd.grad(total, embeds)
    if score == "grad_l1":
        per_token = grad.abs().sum(-1)
    elif score == "grad_l2":
        per_token = grad.norm(dim=-1)
    elif score == "grad_x_input":
        per_token = (grad * embeds.detach()).sum(-1).abs()
    else:
        raise ValueError(f"sft.score: unknown score {score!r} (grad_l1, grad_l2, grad_x_input)")
    per_token = per_token.float().numpy()
    return [per_token[b, : int(p)] for b, p in enumerate(prompt_lengths)]
