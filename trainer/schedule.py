"""The learning-rate schedule, as a multiplier of the base lr (torch's LambdaLR applies it)."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, schedule: str, warmup_steps: int, decay_steps: int | None, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warmup, then the schedule.

    ``linear`` and ``cosine`` decay to ``min_ratio`` at ``decay_steps`` (counted from step 0,
    warmup included) and stay there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if not decay_steps:
        raise ValueError(f"lr_schedule {schedule!r} needs learner.decay_steps or the run's total steps")
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"learner.lr_schedule: unknown schedule {schedule!r}")


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, decay_steps: int | None, min_ratio: float = 0.0):
    """A torch LambdaLR that follows ``lr_factor``; fails here, not at step N, on a bad setting."""
    lr_factor(warmup_steps, schedule, warmup_steps, decay_steps, min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup_steps, decay_steps, min_ratio))
