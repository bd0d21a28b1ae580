"""Atomic file writes: a reader never sees a half-written output file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write(path: str | os.PathLike, data: bytes | str) -> str:
    """Write `data` to a temporary file in the same directory, then rename it.

    os.replace within one directory (one filesystem) is atomic on POSIX and
    Windows, so `path` holds either the old or the complete new content.

    Returns:
      The path written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Atomically write JSON (strict: NaN is rejected, convert it to None first)."""
    return atomic_write(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
