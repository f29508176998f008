"""Checkpoint directories: atomic commit, a `latest` pointer, pruning, JSON run state.

Layout::

    <run_dir>/checkpoints/step-000010/     DeepSpeed's files (every rank's shards) + run_state.json
    <run_dir>/checkpoints/step-000010.tmp/ being written; never read
    <run_dir>/checkpoints/latest           "step-000010" (DeepSpeed's own `latest` format)

Every rank writes its shards into the `.tmp` directory; rank 0 then adds run_state.json,
fsyncs, renames it into place and swaps the `latest` pointer (write temp, rename). A crash at
any point leaves the previous checkpoint complete and pointed to. The checkpoint directory must
be on storage every rank sees (one machine, or a shared filesystem on a cluster).

The run state is JSON (no pickle): whatever the caller passes (step, data cursor, weight
version, config) must be JSON-able.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from protocol.files import fsync_dir, write_atomic

RUN_STATE_FILE = "run_state.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{step_tag(step)}.tmp"


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def commit(run_dir: str | Path, step: int, run_state: dict, keep: int = 2) -> Path:
    """Rank 0, after every rank has written into ``staging_dir``: make the checkpoint visible.

    Adds run_state.json, fsyncs, renames ``step-N.tmp`` to ``step-N``, points ``latest`` at it
    and deletes all but the newest ``keep`` complete checkpoints.
    """
    if keep < 1:
        raise ValueError(f"keep: must be >= 1, got {keep}")
    staged = staging_dir(run_dir, step)
    if not staged.is_dir():
        raise FileNotFoundError(f"checkpoint staging directory {staged} does not exist; nothing to commit")
    try:
        text = json.dumps(run_state, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"run_state for step {step} is not plain JSON (no pickle in checkpoints): {err}") from None
    (staged / RUN_STATE_FILE).write_text(text)
    fsync_tree(staged)

    final = checkpoints_dir(run_dir) / step_tag(step)
    if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside first
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    fsync_dir(final.parent)
    write_atomic(final.parent / LATEST_FILE, step_tag(step))
    prune(run_dir, keep)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (`.tmp` / `.old` leftovers are not listed)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / RUN_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to; if the pointer is missing or stale, the newest complete one."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if _STEP_DIR.match(path.name) and (path / RUN_STATE_FILE).is_file():
            return path
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any stale `.tmp`/`.old` dirs."""
    complete = complete_checkpoints(run_dir)
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1].name if complete else None
    for path in checkpoints_dir(run_dir).glob("step-*.old"):
        shutil.rmtree(path, ignore_errors=True)
    # A .tmp older than the newest commit is a crashed write; a newer one may be in progress.
    for path in checkpoints_dir(run_dir).glob("step-*.tmp"):
        if path.is_dir() and newest is not None and path.name[: -len(".tmp")] < newest:
            shutil.rmtree(path, ignore_errors=True)


def read_run_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / RUN_STATE_FILE).read_text())
