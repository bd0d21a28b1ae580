"""Shared helpers for the benchmark scripts: machine label, matmul peak, docs table sections."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

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


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achievable float32 FLOP/s of one large jitted matmul (the machine's practical ceiling)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def replace_section(path: Path, key: str, body: str, title: str) -> None:
    """Replace (or append) the section between <!-- key:start --> and <!-- key:end --> atomically."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title}\n\n{body}\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
