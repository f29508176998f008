"""Writing a file so that a crash never leaves half of it: every writer of run state uses this."""
from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file that is flushed, fsynced and renamed
    into place, so a reader sees the old file or the new one, never a part of it."""
    path = Path(path)
    # per process and thread: two writers never share one
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    with open(temp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)  # the rename itself reaches the disk
    return path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
