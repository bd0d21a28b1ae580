"""Shared helpers for the benchmark scripts: machine label, matmul peak, docs table sections."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from sparcom_jax.fileio import atomic_write

HEADER = ("# Benchmarks\n\nWritten by the scripts in `scripts/bench_*.py`; each section is replaced when its "
          "script runs again on the same kind of machine. Numbers are from one run on the machine named.\n")


def device_name() -> str:
    """A readable name for the machine the benchmark runs on (accelerator or CPU model)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform})"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """Achievable FLOP/s of one large jitted n x n x n matmul (the machine's practical ceiling).

    `dtype` defaults to float32.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype or jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def replace_section(path: Path, key: str, body: str, title: str | None = None) -> None:
    """Replace (or append) the section between <!-- key:start --> and <!-- key:end --> atomically.

    With `title`, the section starts with a "## title" heading; otherwise `body` brings its own.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    heading = f"## {title}\n\n" if title else ""
    block = f"{start}\n{heading}{body.rstrip()}\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write(path, text)
