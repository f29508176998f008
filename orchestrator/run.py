"""The switchkd command: build the configured models if asked, then run the recipe ``method`` names.

    python -m orchestrator.run --config deploy/configs/embedded.yaml policy.name=adaswitch

Recipes: ``distill`` (orchestrator/distill.py: rollout with a switching policy -> train -> push)
and ``sft`` (orchestrator/sft.py: fixed text, plain SFT or teacher-attribution rationales).
Under ``ray job submit`` a run joins the job's cluster (RAY_ADDRESS); run directly it starts a
local Ray on 127.0.0.1. With ``resume: true`` (the default) a run directory that holds a
checkpoint continues from it: the learner, the data cursor and the student's weight version are
restored.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from build.ensure import ensure_models
from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.data import DataError
from orchestrator.distill import distill
from orchestrator.launcher import ClusterError
from orchestrator.models import ModelError
from orchestrator.sft import sft

# What a user can fix (the config, the data, the models, the cluster's size): one line, no traceback.
INPUT_ERRORS = (ConfigError, DataError, ModelError, ClusterError)


def run(cfg: RunConfig, services: tuple | None = None) -> Path:
    """Build the models (cached) before anything of the run starts, then run the recipe.
    ``services`` (teacher pool, student pool) reuses engines a caller started (bench/)."""
    ensure_models(cfg)
    if cfg.method == "sft":
        return sft(cfg, student=None if services is None else services[1])
    return distill(cfg, services)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchkd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded.yaml", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. policy.name=adaswitch")
    parser.add_argument("--traceback", action="store_true", default=bool(os.environ.get("SWITCHKD_TRACEBACK")),
                        help="show the traceback of a config, data, model or cluster error (or SWITCHKD_TRACEBACK=1)")
    args = parser.parse_args(argv)
    try:
        run(load_config(args.config, args.overrides))
    except INPUT_ERRORS as err:
        if args.traceback:
            raise
        print(f"switchkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
