"""Rolled-out batches kept on disk until a checkpoint covers them.

Rollout is most of a step's time. Each step's MixedBatch is written before the learner sees it
(``<run_dir>/rollouts/step-000007.npz``), so a learner that dies, or a job that is stopped,
replays those batches after restoring its checkpoint instead of rolling them out again: the
replayed steps train on the very same tokens, so the loss trajectory is the uninterrupted one.
Files at or below the newest checkpoint's step are dropped.

Each file also records how many optimizer steps the weights that rolled it out had trained
(``weights_step``), so the policy lag of a replayed batch is known in any later job.

Plain arrays in an .npz, read with ``allow_pickle=False``: nothing in the file can run code.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from protocol.batch import MixedBatch
from protocol.files import write_atomic
from protocol.topk import TopK

_FILE = re.compile(r"^step-(\d+)\.npz$")


def rollouts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "rollouts"


def save_rollout(run_dir: str | Path, step: int, batch: MixedBatch, rollout_seconds: float, weights_step: int) -> Path:
    """Write ``batch`` for ``step`` atomically; ``weights_step``: optimizer steps in the weights
    that rolled it out."""
    arrays = {
        "tokens": batch.tokens, "prompt_lengths": batch.prompt_lengths, "response_lengths": batch.response_lengths,
        "writer": batch.writer, "policy_version": batch.policy_version,
        "teacher_ids": batch.teacher.ids, "teacher_logprobs": batch.teacher.logprobs,
        "teacher_token_logprob": batch.teacher.token_logprob, "teacher_mask": batch.teacher.mask,
        "rollout_seconds": np.float64(rollout_seconds), "weights_step": np.int64(weights_step),
        **{f"stats.{name}": value for name, value in batch.stats.items()},
    }
    folder = rollouts_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_atomic(folder / f"step-{step:06d}.npz", buffer.getvalue())


def load_rollout(run_dir: str | Path, step: int) -> tuple[MixedBatch, float, int | None] | None:
    """The batch saved for ``step``, its rollout seconds and its weights_step (None in a file
    written before it was recorded), or None if there is none."""
    path = rollouts_dir(run_dir) / f"step-{step:06d}.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        teacher = TopK(f["teacher_ids"], f["teacher_logprobs"], f["teacher_token_logprob"], f["teacher_mask"])
        stats = {name.removeprefix("stats."): f[name] for name in f.files if name.startswith("stats.")}
        batch = MixedBatch(f["tokens"], f["prompt_lengths"], f["response_lengths"], f["writer"], teacher,
                           f["policy_version"], stats)
        weights_step = int(f["weights_step"]) if "weights_step" in f.files else None
        return batch, float(f["rollout_seconds"]), weights_step


def drop_rollout(run_dir: str | Path, step: int) -> None:
    """Delete the batch saved for ``step`` (too stale to train on)."""
    (rollouts_dir(run_dir) / f"step-{step:06d}.npz").unlink(missing_ok=True)


def drop_rollouts(run_dir: str | Path, up_to_step: int) -> None:
    """Delete the batches a checkpoint at ``up_to_step`` covers."""
    folder = rollouts_dir(run_dir)
    if not folder.exists():
        return
    for path in folder.iterdir():
        match = _FILE.match(path.name)
        if match and int(match.group(1)) <= up_to_step:
            path.unlink(missing_ok=True)
