"""Atomic file writes (a reader never sees a half-written output file) and the output directory check."""

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


def prepare_out_dir(path: str | os.PathLike) -> str:
    """Create the output directory, or fail at once with one clear line (naming the path
    and the fix) rather than with a traceback once the work has started.

    Args:
      path: the output directory (--out); created with its parents.

    Returns:
      `path` as a string.

    Raises:
      ValueError: when `path` or a parent is a file, or the directory cannot be
        created or written.
    """
    path = os.fspath(path)
    probe = os.path.abspath(path)
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"is under {probe}, which is a file"
        raise ValueError(f"output directory {path} {where}; choose another --out")
    # access() also answers False for a read-only file system, which mode bits do not show.
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {path}: {probe} is not writable; "
                         "choose another --out or fix its permissions")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"output directory {path} cannot be created ({err.strerror}); "
                         "choose another --out or fix its permissions") from None
    return path
