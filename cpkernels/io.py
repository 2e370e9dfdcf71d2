"""File helpers: every file a crash must not corrupt is written through `atomic_write`.

Adapters, heads, the trainer's checkpoint state, configs, results and figures all go through here.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix.

    Temp file in the same directory (os.replace is atomic only within one file system), fsync,
    os.replace, then fsync of the directory so that the rename itself survives a power cut.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Make the rename itself durable (POSIX; Windows cannot open directories).
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
