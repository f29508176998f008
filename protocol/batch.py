"""A rolled-out batch: what the coordinator makes, what the learner trains on, what metrics read.

``MixedBatch`` is the rollout's output: the sequences, who wrote each response token, the
teacher's top-k at every response position and per-row statistics. The learner reads only its
``TrainBatch`` (tokens, lengths, the teacher's top-k and mask); the metrics read the per-row
record (``writer``, ``policy_version``, ``stats``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.topk import TopK

# Who wrote a response token: stored per token in MixedBatch.writer.
STUDENT, TEACHER, REFERENCE = 0, 1, 2


@dataclass
class TrainBatch:
    """What the loss needs. Response token j of row b stands at ``tokens[b, prompt_lengths[b] + j]``;
    ``teacher[b, j]`` is the teacher's top-k for that position given everything before it (the
    learner's target), whoever wrote the token; ``teacher.mask`` marks real response tokens."""

    tokens: np.ndarray  # int64 [B, L]: prompt + response, right-padded with PAD_ID
    prompt_lengths: np.ndarray  # int64 [B]
    response_lengths: np.ndarray  # int64 [B]
    teacher: TopK  # [B, R, k]
    # int8 [B, R]: who wrote each response token; read by loss.kind=sampled_reverse_kl, which
    # trains on the student's own tokens only (None: fixed text, nobody sampled).
    writer: np.ndarray | None = None

    @property
    def response_mask(self) -> np.ndarray:
        return self.teacher.mask

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index) -> "TrainBatch":
        """A subset of rows (e.g. one learner rank's micro-batch)."""
        return TrainBatch(self.tokens[index], self.prompt_lengths[index], self.response_lengths[index],
                          self.teacher[index], None if self.writer is None else self.writer[index])


@dataclass
class MixedBatch:
    """A batch of finished rollouts: the TrainBatch's arrays plus the per-row rollout record."""

    tokens: np.ndarray  # int64 [B, L]
    prompt_lengths: np.ndarray  # int64 [B]
    response_lengths: np.ndarray  # int64 [B]
    writer: np.ndarray  # int8 [B, R]: STUDENT, TEACHER or REFERENCE per response token
    teacher: TopK  # [B, R, k]
    policy_version: np.ndarray  # int64 [B]: the student weight version that rolled this row out
    stats: dict[str, np.ndarray]  # per-row statistics ([B] arrays), e.g. teacher_fraction

    @property
    def response_mask(self) -> np.ndarray:
        return self.teacher.mask

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def for_learner(self) -> TrainBatch:
        """The arrays the learner reads (no copy)."""
        return TrainBatch(self.tokens, self.prompt_lengths, self.response_lengths, self.teacher, self.writer)
