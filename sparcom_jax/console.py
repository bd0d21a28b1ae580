"""Progress lines on stderr, stamped with the time since the process started using sparcom_jax.

The pipeline's stages and the library's long waits (hashing a model's weights the first
time) share one format, ``[sparcom m:ss.s] message``; stdout stays for results.
"""

from __future__ import annotations

import sys
import time

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr (stdout stays for results), stamped with the elapsed time."""
    el = time.perf_counter() - _T0
    print(f"[sparcom {int(el // 60):d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)
