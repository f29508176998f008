"""The project-built defaults: build (or find cached) the models and task data before a run."""
from __future__ import annotations

from pathlib import Path

from orchestrator.config import RunConfig


def ensure_embedded(cfg: RunConfig) -> Path | None:
    """Build the configured embedded variant if asked to; cached, so cheap when already built."""
    if cfg.models.build_embedded is None:
        return None
    if cfg.models.build_embedded == "smollm2":
        from orchestrator.smollm2 import build as build_smollm2

        return build_smollm2(cfg.models.embedded_dir)
    from trainer.embedded.build import build

    return build(cfg.models.embedded_dir, variant=cfg.models.build_embedded, seed=0)
