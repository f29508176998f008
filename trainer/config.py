"""Settings of the distillation loss and of the DeepSpeed learner group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# cross_entropy: no teacher term, the sequence's own tokens only (SFT; the rationale method).
# sampled_reverse_kl: reverse KL estimated from the student's own sampled token alone (k1 or k3).
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "cross_entropy",
                   "sampled_reverse_kl"]


@dataclass
class LossConfig:
    kind: LossKind = "skew_reverse_kl"
    alpha: float = 0.1  # skew of skew_kl / skew_reverse_kl (DistiLLM's default)
    beta: float = 0.5  # weight of the teacher in generalized JSD(β) (GKD)
    ce_weight: float = 0.0  # adds ce_weight · cross-entropy on the sequence's own tokens
    # sampled_reverse_kl: which estimate of log(q/p) at the sampled token (k1 = -log r, k3 = r - 1 - log r),
    # and the weight of the top-k forward KL added at every response token (0: none).
    estimator: Literal["k1", "k3"] = "k3"
    forward_kl_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: must be in (0, 1), got {self.alpha}")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta: must be in (0, 1), got {self.beta}")
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight: must be >= 0, got {self.ce_weight}")
        if self.forward_kl_weight < 0:
            raise ValueError(f"forward_kl_weight: must be >= 0, got {self.forward_kl_weight}")
        if self.forward_kl_weight > 0 and self.kind != "sampled_reverse_kl":
            raise ValueError(f"forward_kl_weight: only read by kind sampled_reverse_kl (the other kinds are "
                             f"divergences on the top-k already), got kind {self.kind!r}")


@dataclass
class LearnerConfig:
    world_size: int = 1
    zero_stage: Literal[1, 2, 3] = 2
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    # linear/cosine reach 0 at this optimizer step (warmup included); null = the run's total steps.
    decay_steps: int | None = None
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    max_grad_norm: float = 1.0
    keep_checkpoints: int = 2  # the newest N checkpoints stay on disk
    # A rank that dies (process killed, node lost) takes the group down: the run starts a new
    # group from the last checkpoint, at most this many times.
    max_restarts: int = 3
    # The weight push streams the student's weights to the rollout engines in buckets of at most
    # this many MiB (one larger tensor alone): a push needs a few buckets of extra memory on the
    # learner's rank 0 and in each engine, whatever the model's size.
    push_bucket_mb: float = 256.0
    # Ray resources per rank, custom ones included (e.g. {learner_node: 1}: ranks only on nodes
    # started with that resource). The ranks are one placement group, a bundle per rank: PACK
    # fills as few nodes as it can, SPREAD spreads them, STRICT_* refuse to do otherwise.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        for name in ("world_size", "micro_batch_size", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.push_bucket_mb <= 0:
            raise ValueError(f"push_bucket_mb: must be > 0, got {self.push_bucket_mb}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("warmup_steps / weight_decay: must be >= 0; max_grad_norm: must be > 0")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"decay_steps: must be > warmup_steps ({self.warmup_steps}) or null, got {self.decay_steps}"
            )
