#!/usr/bin/env python
"""The analysis' host memory: the dry run's estimate against the measured peak.

    python scripts/bench_analysis_memory.py                       # N x U = 300/1,200 x 1,024/4,096
    python scripts/bench_analysis_memory.py --sizes 1200x4096 --out /tmp/b.md

For each size, random counts of N instructions (six categories in turn, pairs of records of
one category sharing a group key, half "human" sources, float32 activation sums) over U
units (4 layers) are analysed as the pipeline's evaluate stage does (`analyze_model` with
the experiment config's identify defaults: bootstrap, permutation tests, the N x N overlap),
after one small untraced analysis (first-call imports). The peak is tracemalloc's: numpy's
allocations above what was held before the call (the counts are the caller's). The estimate
is `sparcom_jax.analysis.memory.analysis_bytes`, which `sparcom --dry-run` prints.

Writes the section <!-- analysis-memory:MACHINE --> of --out.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import device_name, replace_section, stamp  # noqa: E402

LAYERS = 4


def random_counts(n: int, layers: int, width: int, seed: int = 0):
    """Counts of n records over [layers, width] dense neurons, with categories, sources and groups."""
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.stats.counts import Counts

    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, 64, n).astype(np.int32)
    labels = np.arange(n) % 6
    # Each category fires its own units more, each record at its own overall rate.
    p = rng.random((6, layers * width))[labels] * rng.random((n, 1))
    act = rng.binomial(tokens[:, None], p).astype(np.int32).reshape(n, layers, width)
    return Counts(tokens=tokens, neuron_active=act,
                  neuron_act_sum=act.astype(np.float32) * rng.random(act.shape, dtype=np.float32),
                  categories=[CATEGORIES[c] for c in labels], ids=[f"r{i}" for i in range(n)],
                  sources=["human" if i % 2 else "generated" for i in range(n)],
                  groups=[f"g{i // 12}-{i % 6}" for i in range(n)])  # records i, i+6 share a key


def estimate(n: int, u: int) -> dict:
    """The dry run's estimate of the evaluate stage's analysis of N x U units (`analysis_bytes`)."""
    from sparcom_jax.config import IdentifySpec

    return IdentifySpec().analysis_memory(n, {"neuron_active": (LAYERS, u // LAYERS)}, full=True)


def measure(n: int, u: int) -> dict:
    """Measured peak, the estimate (with its largest step) and seconds of one analysis."""
    from sparcom_jax.analysis import analyze_model
    from sparcom_jax.config import IdentifySpec

    s = IdentifySpec()
    kw = s.analysis_options(full=True)  # as the evaluate stage runs it
    counts = random_counts(n, LAYERS, u // LAYERS)
    analyze_model(random_counts(24, LAYERS, 16), s.to_rule(), **{**kw, "n_boot": 2, "n_perm": 2})
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        analyze_model(counts, s.to_rule(), **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = estimate(n, u)
    steps = {k: v for k, v in est["fields"]["neuron_active"].items() if k not in ("held", "peak", "kept")}
    return {"n": n, "u": u, "peak": peak, "estimate": est["peak"], "step": max(steps, key=steps.get),
            "seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    lines = ["| N | U | measured peak (MB) | dry-run estimate (MB) | estimate / measured | largest step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['u']:,} | {r['peak'] / 1e6:.1f} | {r['estimate'] / 1e6:.1f} | "
                     f"{r['estimate'] / r['peak']:.2f} | {r['step']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="300x1024,1200x1024,300x4096,1200x4096", help="NxU, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        n, u = (int(x) for x in size.lower().split("x"))
        rows.append(measure(n, u))
        print(table(rows[-1:]).splitlines()[-1], f"{rows[-1]['seconds']:.0f}s", flush=True)
    body = [stamp(), "", "Host memory of the analysis (`analyze_model` as the evaluate stage runs it: 100 bootstrap "
            "replicates, 999 permutations, the N x N instruction overlap; U = 4 layers of dense neurons), "
            "measured with tracemalloc, against the estimate `sparcom --dry-run` prints "
            "(`sparcom_jax.analysis.memory`). Written by `scripts/bench_analysis_memory.py`.", "", table(rows)]
    replace_section(Path(args.out), f"analysis-memory:{device_name()}", "\n".join(body),
                    title=f"Analysis host memory — {device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
