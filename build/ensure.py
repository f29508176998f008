"""The project-built models and data a config asks for (``models.build_embedded``), built once and
cached: called before a run starts (orchestrator.run), never from inside one."""
from __future__ import annotations

from pathlib import Path

from build.embedded.build import build as build_embedded
from build.smollm2 import build as build_smollm2
from orchestrator.config import RunConfig


def ensure_models(cfg: RunConfig) -> Path | None:
    """Build the configured variant if asked to; cached, so cheap when already built."""
    if cfg.models.build_embedded is None:
        return None
    if cfg.models.build_embedded == "smollm2":
        return build_smollm2(cfg.models.embedded_dir)
    return build_embedded(cfg.models.embedded_dir, variant=cfg.models.build_embedded, seed=0)
