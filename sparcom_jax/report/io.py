"""Atomic file writes: a reader never sees a half-written report file."""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Iterable, Sequence

from sparcom_jax.fileio import atomic_write, write_json

__all__ = ["atomic_write", "write_csv", "write_json"]


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]],
    comments: Sequence[str] = (),
) -> str:
    """Atomically write a CSV table.

    Args:
      path: destination.
      header: column names.
      rows: table rows; None is written as an empty cell.
      comments: provenance lines written first as "# ..." (read with
        pandas.read_csv(path, comment="#")).
    """
    buf = io.StringIO()
    for line in comments:
        buf.write(f"# {line}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows)
    return atomic_write(path, buf.getvalue())
