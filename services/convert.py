"""vLLM's flat logprob lists -> TopK arrays, once, at the service boundary.

With ``SamplingParams(flat_logprobs=True)`` vLLM keeps, per request, one flat list of token ids
and one of logprobs, and per position a start/end index. Every scored position holds k + 1
entries: first the token that stands there (sampled or given), then the top-k in rank order.
So a request's positions reshape to [positions, k + 1] with no per-position Python loop.
"""
from __future__ import annotations

import numpy as np

from protocol.topk import TopK


def flat_to_arrays(flat, first_position: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``first_position``.. of one request's FlatLogprobs as [T, k + 1] ids and logprobs."""
    start = flat.start_indices[first_position] if first_position < len(flat.start_indices) else len(flat.token_ids)
    ids = np.asarray(flat.token_ids[start:], dtype=np.int64)
    logprobs = np.asarray(flat.logprobs[start:], dtype=np.float32)
    positions = len(flat.start_indices) - first_position
    if ids.size != positions * (k + 1):
        raise RuntimeError(
            f"vLLM returned {ids.size} logprob entries for {positions} positions; expected k + 1 = {k + 1} "
            "each (is max_logprobs at least k?)"
        )
    return ids.reshape(positions, k + 1), logprobs.reshape(positions, k + 1)


def fill_topk(out: TopK, row: int, ids: np.ndarray, logprobs: np.ndarray, offset: int = 0) -> None:
    """Write one request's [T, k + 1] arrays into row ``row`` of a padded TopK, from ``offset``."""
    span = slice(offset, offset + ids.shape[0])
    out.put((row, span), TopK(ids[:, 1:], logprobs[:, 1:], logprobs[:, 0], np.ones(ids.shape[0], dtype=bool)))
