"""One check, shared by the engine, weight-push and rollout tests: a top-k list that vLLM returned
against the full softmax of the same model in transformers (fp32).

Logprobs must agree within ``atol`` at every rank; ids wherever the ranking is not a near-tie
(both neighbours more than ``atol`` away): two tokens within ``atol`` of each other may come out
in either order from kernels that sum in a different order.
"""
from __future__ import annotations

import numpy as np
import torch


def clear_ranks(top_logprobs: np.ndarray, atol: float) -> np.ndarray:
    """[..., k] bool: the ranks whose id is determined, both neighbours more than ``atol`` away."""
    gaps = np.abs(np.diff(top_logprobs, axis=-1)) > atol
    edge = np.ones(top_logprobs.shape[:-1] + (1,), bool)
    return np.concatenate([gaps, edge], -1) & np.concatenate([edge, gaps], -1)


def assert_topk_equals_full_softmax(ids: np.ndarray, logprobs: np.ndarray, full_logprobs: np.ndarray,
                                    atol: float = 1e-4, what: str = "") -> None:
    """``ids`` / ``logprobs`` [T, k] against the top k of ``full_logprobs`` [T, V]."""
    k = ids.shape[-1]
    top = torch.from_numpy(np.ascontiguousarray(full_logprobs)).topk(k, -1)
    want_lp, want_ids = top.values.numpy(), top.indices.numpy()
    np.testing.assert_allclose(logprobs, want_lp, rtol=0, atol=atol, err_msg=what)
    clear = clear_ranks(want_lp, atol)
    np.testing.assert_array_equal(ids[clear], want_ids[clear], err_msg=what)


@torch.no_grad()
def full_logprobs(model, sequence: list[int], start: int) -> np.ndarray:
    """[len - start, V] transformers' log-softmax for positions ``start:`` of one sequence (position
    j's distribution comes from the logits at j - 1)."""
    logits = model(torch.tensor([sequence])).logits[0, start - 1: len(sequence) - 1]
    return torch.log_softmax(logits.float(), -1).numpy()


def assert_topk_matches_model(topk, sequences: list[list[int]], starts: list[int], model, atol: float = 1e-4) -> None:
    """A TopK reply for positions ``starts[i]:`` of each sequence against ``model``: the top-k lists
    and the sequence token's own logprob, and the mask covering exactly those positions."""
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        rows = full_logprobs(model, seq, start)
        n = len(rows)
        assert_topk_equals_full_softmax(topk.ids[i, :n], topk.logprobs[i, :n], rows, atol, what=f"sequence {i}")
        np.testing.assert_allclose(topk.token_logprob[i, :n], rows[np.arange(n), seq[start:]], rtol=0, atol=atol,
                                   err_msg=f"sequence {i}: the sequence token's own logprob")
        assert topk.mask[i, :n].all() and not topk.mask[i, n:].any()
