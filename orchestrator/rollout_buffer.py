"""The growing responses of one rollout batch, as arrays, and the MixedBatch they become.

Both rollout strategies write into the same buffer through ``write``: a run of tokens per row,
who wrote each, the teacher's top-k at each (the learner's target) and the policy's divergence.
Keeping one buffer is what makes "same prefix, same rule" literal between the two strategies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.batch import STUDENT, TEACHER, MixedBatch
from protocol.topk import PAD_ID, TopK


@dataclass
class RolloutBuffer:
    prompts: list[list[int]]
    prompt_lengths: np.ndarray  # int64 [B]
    budget: np.ndarray  # int64 [B]: most response tokens this row may get
    response: np.ndarray  # int64 [B, R]
    length: np.ndarray  # int64 [B]: response tokens written so far
    writer: np.ndarray  # int8 [B, R]
    teacher: TopK  # [B, R, k]
    divergence: np.ndarray  # float64 [B, R]: what the policy compared (NaN where nothing)
    done: np.ndarray  # bool [B]
    pen: np.ndarray  # int8 [B]: who drafts next (draft-verify)
    teacher_calls: np.ndarray  # int64 [B]: round trips to the teacher service
    student_calls: np.ndarray  # int64 [B]

    @staticmethod
    def start(prompts: list[list[int]], max_new_tokens: int, max_model_len: int, k: int) -> "RolloutBuffer":
        n = len(prompts)
        prompt_lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        # Room for the response and the one extra position a scoring prefill asks for.
        budget = np.minimum(max_new_tokens, max_model_len - prompt_lengths - 1)
        if (budget < 1).any():
            bad = int(np.flatnonzero(budget < 1)[0])
            raise ValueError(
                f"prompt {bad} has {prompt_lengths[bad]} tokens: no room for a response within max_model_len {max_model_len}"
            )
        width = int(budget.max())
        return RolloutBuffer(
            prompts=prompts,
            prompt_lengths=prompt_lengths,
            budget=budget,
            response=np.full((n, width), PAD_ID, dtype=np.int64),
            length=np.zeros(n, dtype=np.int64),
            writer=np.zeros((n, width), dtype=np.int8),
            teacher=TopK.empty((n, width), k),
            divergence=np.full((n, width), np.nan),
            done=np.zeros(n, dtype=bool),
            pen=np.full(n, STUDENT, dtype=np.int8),
            teacher_calls=np.zeros(n, dtype=np.int64),
            student_calls=np.zeros(n, dtype=np.int64),
        )

    def prefixes(self, rows: np.ndarray) -> list[list[int]]:
        """Prompt + response so far for each row (the token lists the services take)."""
        return [self.prompts[r] + self.response[r, : self.length[r]].tolist() for r in rows]

    def remaining(self, rows: np.ndarray) -> np.ndarray:
        return self.budget[rows] - self.length[rows]

    def write(
        self,
        rows: np.ndarray,
        tokens: np.ndarray,
        count: np.ndarray,
        writer: np.ndarray,
        teacher: TopK,
        divergence: np.ndarray,
        eos_token_id: int,
    ) -> None:
        """Append the first ``count[i]`` of ``tokens[i]`` ([n, T]) to row ``rows[i]``, then mark
        rows finished that wrote EOS or filled their budget."""
        width = tokens.shape[1]
        take = np.arange(width)[None, :] < count[:, None]
        r, j = np.nonzero(take)
        row, col = rows[r], self.length[rows][r] + j
        self.response[row, col] = tokens[r, j]
        self.writer[row, col] = writer[r, j]
        # The services may list more than the learner's k (wider lists for the switching rule).
        self.teacher.put((row, col), teacher[r, j].first(self.teacher.k))
        self.teacher.mask[row, col] = True
        self.divergence[row, col] = divergence[r, j]
        wrote_eos = (take & (tokens == eos_token_id)).any(1)
        self.length[rows] += count
        self.done[rows] |= wrote_eos | (self.length[rows] >= self.budget[rows])

    def to_batch(self, policy_version: int) -> MixedBatch:
        n, width = self.response.shape
        total = self.prompt_lengths + self.length
        tokens = np.full((n, int(total.max())), PAD_ID, dtype=np.int64)
        flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in self.prompts])
        prompt_rows = np.repeat(np.arange(n), self.prompt_lengths)
        starts = np.repeat(np.cumsum(self.prompt_lengths) - self.prompt_lengths, self.prompt_lengths)
        tokens[prompt_rows, np.arange(flat.size) - starts] = flat
        cols = self.prompt_lengths[:, None] + np.arange(width)[None, :]
        written = np.arange(width)[None, :] < self.length[:, None]
        tokens[np.nonzero(written)[0], cols[written]] = self.response[written]
        return MixedBatch(
            tokens=tokens,
            prompt_lengths=self.prompt_lengths.copy(),
            response_lengths=self.length.copy(),
            # Both cut to the longest response: writer and teacher are [B, R] alike.
            writer=np.where(written, self.writer, STUDENT).astype(np.int8)[:, : int(self.length.max())],
            teacher=self.teacher[:, : int(self.length.max())],
            policy_version=np.full(n, policy_version, dtype=np.int64),
            stats=self.stats(),
        )

    def stats(self) -> dict[str, np.ndarray]:
        """Per-row statistics for metrics and the learner's logs."""
        written = np.arange(self.response.shape[1])[None, :] < self.length[:, None]
        by_teacher = written & (self.writer == TEACHER)
        switched = by_teacher.any(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            divergence_sum = np.where(written & np.isfinite(self.divergence), self.divergence, 0.0).sum(1)
            divergence_count = (written & np.isfinite(self.divergence)).sum(1)
            return {
                "response_length": self.length.copy(),
                "teacher_fraction": by_teacher.sum(1) / np.maximum(self.length, 1),
                "switched": switched,
                "first_switch": np.where(switched, by_teacher.argmax(1), -1),
                "divergence_mean": np.where(divergence_count > 0, divergence_sum / np.maximum(divergence_count, 1), np.nan),
                "teacher_calls": self.teacher_calls.copy(),
                "student_calls": self.student_calls.copy(),
            }
