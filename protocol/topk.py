"""A model's top-k (ids, logprobs) at every position: what the services return per position.

vLLM hands back one Python dict per generated or prompt position; those dicts are slow, so the
services turn them into these arrays once, at their boundary, and nothing past it sees a dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# An empty top-k slot (k larger than the vocabulary, or a position with fewer entries) has this
# id and a logprob of -inf, so it carries no probability mass anywhere.
PAD_ID = 0


@dataclass
class TopK:
    """A model's top-k at every position of a batch of sequences.

    Shapes: ``ids`` and ``logprobs`` are [..., T, k], ``token_logprob`` and ``mask`` are [..., T].
    ``logprobs`` are sorted in descending order along the last axis; ``token_logprob`` is the
    model's logprob of the token that actually stands at the position (listed or not), and
    ``mask`` marks the positions that hold data (the rest is padding).
    """

    ids: np.ndarray  # int64
    logprobs: np.ndarray  # float32, -inf in empty slots
    token_logprob: np.ndarray  # float32
    mask: np.ndarray  # bool

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(f"TopK: ids {self.ids.shape} and logprobs {self.logprobs.shape} differ in shape")
        if self.ids.shape[:-1] != self.token_logprob.shape or self.mask.shape != self.token_logprob.shape:
            raise ValueError(
                f"TopK: token_logprob {self.token_logprob.shape} and mask {self.mask.shape} "
                f"must be ids.shape[:-1] = {self.ids.shape[:-1]}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @staticmethod
    def empty(shape: tuple[int, ...], k: int) -> "TopK":
        """All-padding arrays of batch shape ``shape`` (e.g. (B, T)), to be filled in place."""
        return TopK(
            ids=np.full((*shape, k), PAD_ID, dtype=np.int64),
            logprobs=np.full((*shape, k), -np.inf, dtype=np.float32),
            token_logprob=np.full(shape, -np.inf, dtype=np.float32),
            mask=np.zeros(shape, dtype=bool),
        )

    def __getitem__(self, index) -> "TopK":
        """Index the batch/position axes, e.g. ``topk[:, t]`` or ``topk[rows]``."""
        return TopK(self.ids[index], self.logprobs[index], self.token_logprob[index], self.mask[index])

    def put(self, index, other: "TopK") -> None:
        """Write ``other`` into the positions ``index`` selects (``self[index] = other``, all four arrays)."""
        for name in ("ids", "logprobs", "token_logprob", "mask"):
            getattr(self, name)[index] = getattr(other, name)

    def first(self, k: int) -> "TopK":
        """The top ``k`` entries of each list (lists are sorted: the first k are the k largest)."""
        return TopK(self.ids[..., :k], self.logprobs[..., :k], self.token_logprob, self.mask)

    def fitted(self, width: int) -> "TopK":
        """This [N, T, k] TopK cut or padded (with empty slots) to T = ``width``."""
        have = self.ids.shape[1]
        if have >= width:
            return self[:, :width]
        out = TopK.empty((self.ids.shape[0], width), self.k)
        out.put((slice(None), slice(0, have)), self)
        return out


def topk_from_logprobs(logprobs: np.ndarray, tokens: np.ndarray, k: int) -> TopK:
    """Top-k of full-vocabulary log-probabilities [..., T, V] (the exact reference, tests, transformers).

    ``tokens`` [..., T] are the actual tokens at each position. k may exceed V: the extra slots are
    padding.
    """
    vocab = logprobs.shape[-1]
    kk = min(k, vocab)
    order = np.argsort(-logprobs, axis=-1, kind="stable")[..., :kk]
    out = TopK.empty(logprobs.shape[:-1], k)
    out.ids[..., :kk] = order
    out.logprobs[..., :kk] = np.take_along_axis(logprobs, order, axis=-1)
    out.token_logprob[...] = np.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    out.mask[...] = True
    return out
