"""Progress lines on stderr, stamped with the time since the process started using sparcom_jax.

The pipeline's stages and the library's long waits (hashing a model's weights the first
time) share one format, ``[sparcom m:ss.s] message``; stdout stays for results. The byte and
count formats live here too, so every layer (stats, pipeline, scripts) can print sizes alike.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr (stdout stays for results), stamped with the elapsed time."""
    el = time.perf_counter() - _T0
    print(f"[sparcom {int(el // 60):d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def interrupt_held():
    """Hold Ctrl-C until the block ends, then raise it (KeyboardInterrupt).

    For work that an interrupt would leave torn: jax's native start-up (an interrupt there
    aborted the process with a C++ terminate and a core dump) and orbax's start of a
    checkpoint save (interrupted there, the save's writer threads went on without the
    thread that completes the checkpoint, so it was never completed, and failed as the
    interpreter shut down). A Ctrl-C that Python ignores (a background job) stays ignored;
    off the main thread, where no handler can be set, nothing is held.
    """
    got: list[int] = []
    old = signal.getsignal(signal.SIGINT)
    hold = old not in (signal.SIG_IGN, None) and threading.current_thread() is threading.main_thread()
    if hold:
        signal.signal(signal.SIGINT, lambda *_: got.append(1))
    try:
        yield
    finally:
        if hold:
            signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def fmt_count(n: float) -> str:
    """Parameter counts as 6.74B / 124.4M / 12.3K."""
    for div, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{s}"
    return str(int(n))
