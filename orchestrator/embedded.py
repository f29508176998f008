"""The embedded default: build (or find cached) the tiny models and task before a run."""
from __future__ import annotations

from pathlib import Path

from orchestrator.config import RunConfig


def ensure_embedded(cfg: RunConfig) -> Path | None:
    """Build the configured embedded variant if asked to; cached, so cheap when already built."""
    if cfg.models.build_embedded is None:
        return None
    from trainer.embedded.build import build

    return build(cfg.models.embedded_dir, variant=cfg.models.build_embedded, seed=0)
