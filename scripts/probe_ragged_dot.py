#!/usr/bin/env python
"""How does this backend lower `jax.lax.ragged_dot` (the MoE path on GPU/TPU)?

Times one grouped matmul of an MoE layer's shape against the plain matmul doing the
same useful work, and reports whether the optimized HLO still holds a ragged dot or
a library call (a grouped GEMM, e.g. cuDNN's on recent NVIDIA stacks) or was
rewritten into a dense dot over every group (E times the work). Run it when MoE
counting is slow on a new machine.

Usage: python scripts/probe_ragged_dot.py [--rows 11776] [--d 2048] [--f 2816] [--experts 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def best_time(f, *args, repeats=10):
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=11776)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--f", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dtype", default=None, help="default bfloat16 off CPU, float32 on CPU")
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.rows, a.d)), dtype)
    w = jnp.asarray(rng.standard_normal((a.experts, a.d, a.f)) * 0.02, dtype)
    sizes = rng.multinomial(a.rows, np.ones(a.experts) / a.experts).astype(np.int32)
    gs = jnp.asarray(sizes)
    ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
    dense = jax.jit(lambda x, w: x @ w[0])
    hlo = ragged.lower(x, w, gs).compile().as_text()
    kinds = sorted({tok for tok in ("ragged-dot", "cudnn", "groupedMatmul", "custom-call", "dot(") if tok in hlo})
    t_r = best_time(ragged, x, w, gs)
    t_d = best_time(dense, x, w)
    flops = 2.0 * a.rows * a.d * a.f
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, {dtype.name}")
    print(f"optimized HLO mentions: {', '.join(kinds) or 'none of the known markers'}")
    print(f"ragged_dot  {t_r * 1e3:8.3f} ms  {flops / t_r / 1e12:7.1f} TFLOP/s (useful work)")
    print(f"plain dot   {t_d * 1e3:8.3f} ms  {flops / t_d / 1e12:7.1f} TFLOP/s  (same rows x one expert)")
    print(f"ratio ragged/plain: {t_r / t_d:.2f} (about {a.experts} means a dense rewrite over all experts)")
    try:
        from jax._src.lib import cuda_versions  # noqa: PLC0415  (private; informative only)

        print("cuDNN", cuda_versions.cudnn_get_version() if cuda_versions else "n/a")
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
