"""Benchmark seconds to first result: a fresh process until its first counted batch, cold and warm.

    python scripts/bench_startup.py                 # the small models of bench_collect.py
    python scripts/bench_startup.py --models large --repeats 1 --no-write

For each model, a checkpoint directory is written once; then fresh Python processes
each run ``load_model`` and ``collect_counts`` on exactly one batch (so the end of the
call is the first counted batch), timed from just before the process is spawned:

- "cache off": ``SPARCOM_JAX_CACHE=off``, what every run paid before the cache;
- "cold": an empty persistent compilation cache (compiles, and writes the cache);
- "warm": a second process on the same model, data and cache (loads the programs).

Each child reports its phases (import of jax and sparcom_jax, load_model, the first
batch) and `sparcom_jax.runtime.compile_stats()`. The persistent cache keeps XLA
programs only: tracing and lowering still run in every process, as do the Python and
JAX imports and reading the weights, so "warm" is the floor this mechanism reaches.
Best of `--repeats` (each repeat with a new empty cache).

Writes (or replaces) the section ``<!-- startup:<machine>:start -->`` ...
``<!-- startup:<machine>:end -->`` in docs/benchmarks.md; other sections are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_collect import MODELS, make_sequences  # noqa: E402
from bench_common import device_name, replace_section  # noqa: E402

CHILD = textwrap.dedent("""
    import json, os, sys, time
    t_spawn = float(os.environ["BENCH_T_SPAWN"])
    t0 = time.time()
    import numpy as np
    import jax
    import sparcom_jax as sj
    from sparcom_jax.runtime import compile_stats
    t1 = time.time()
    model = sj.load_model(sys.argv[1], dtype=sys.argv[2], with_tokenizer=False)
    t2 = time.time()
    seqs = list(np.load(sys.argv[3], allow_pickle=True)["seqs"])
    c = sj.collect_counts(model, seqs, batch_size=len(seqs), progress=False)
    assert int(c.tokens.sum()) == sum(len(s) for s in seqs)
    t3 = time.time()
    print("RESULT", json.dumps({"total_s": t3 - t_spawn, "start_s": t0 - t_spawn, "import_s": t1 - t0,
                                "load_s": t2 - t1, "first_batch_s": t3 - t2, **compile_stats()}))
""")


def run_child(script: Path, ckpt: Path, dtype: str, seqs_path: Path, cache: str) -> dict:
    env = dict(os.environ, SPARCOM_JAX_CACHE=cache, BENCH_T_SPAWN=repr(time.time()),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the user's own cache would take precedence
    r = subprocess.run([sys.executable, str(script), str(ckpt), dtype, str(seqs_path)], env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"child failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["total_s"])


def bench_model(name: str, hf: dict, args, tmp: Path) -> dict:
    import numpy as np

    import sparcom_jax as sj

    cfg = sj.ModelConfig.from_hf_config(hf)
    ckpt = tmp / "ckpt"
    sj.save_model(sj.init_model(cfg, seed=0, dtype=args.dtype), ckpt)
    seqs = make_sequences(args.batch, args.min_len, args.max_len, cfg.vocab_size)
    arr = np.empty(len(seqs), object)
    arr[:] = seqs
    np.savez(tmp / "seqs.npz", seqs=arr)
    script = tmp / "child.py"
    script.write_text(CHILD)
    off, cold, warm = [], [], []
    for k in range(args.repeats):
        cache = tmp / f"cache{k}"
        off.append(run_child(script, ckpt, args.dtype, tmp / "seqs.npz", "off"))
        cold.append(run_child(script, ckpt, args.dtype, tmp / "seqs.npz", str(cache)))
        warm.append(run_child(script, ckpt, args.dtype, tmp / "seqs.npz", str(cache)))
        print(f"{name}: off {off[-1]['total_s']:.1f} s, cold {cold[-1]['total_s']:.1f} s, "
              f"warm {warm[-1]['total_s']:.1f} s", flush=True)
    return {"name": name, "tokens": sum(len(s) for s in seqs), "off": best(off), "cold": best(cold),
            "warm": best(warm)}


def fmt_row(r: dict) -> str:
    def cell(m):
        return (f"**{m['total_s']:.1f}** ({m['start_s'] + m['import_s']:.1f} + {m['load_s']:.1f} + "
                f"{m['first_batch_s']:.1f})")

    o, c, w = r["off"], r["cold"], r["warm"]
    return (f"| {r['name']} | {cell(o)} | {cell(c)} | {cell(w)} | {c['compilations']} / {w['compilations']} | "
            f"{w['cache_hits']} | {c['compile_seconds']:.1f} / {w['compile_seconds']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=sorted(MODELS), default="small")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, float32 on CPU")
    ap.add_argument("--batch", type=int, default=8, help="sequences in the one counted batch")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import jax

    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    machine = device_name()
    rows = []
    for name, hf in MODELS[args.models]:
        with tempfile.TemporaryDirectory() as d:
            rows.append(bench_model(name, hf, args, Path(d)))
    body = "\n".join([
        f"Machine: {machine}; jax {jax.__version__} ({jax.default_backend()}); compute {args.dtype}; run "
        f"{time.strftime('%Y-%m-%d')}; one batch of {args.batch} random sequences of {args.min_len}-{args.max_len} "
        f"tokens; each cell is a fresh process, timed from its spawn to the end of `collect_counts` (its first "
        f"counted batch), best of {args.repeats}; 1-minute load average {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine).",
        "",
        "| model | cache off: s (start+import + load_model + first batch) | cold: empty cache | warm: second "
        "process, same cache | XLA compilations cold / warm | cache hits warm | compile or load s cold / warm |",
        "|---|---|---|---|---|---|---|",
        *[fmt_row(r) for r in rows],
        "",
        "The persistent cache (`sparcom_jax.runtime`, on by default) stores XLA programs: a warm process "
        "skips XLA compilation, not Python start-up, imports, tracing and lowering, or reading the weights. "
        "Re-run with `python scripts/bench_startup.py` (`--models large` on an accelerator).",
    ])
    print(body)
    if not args.no_write:
        replace_section(Path(args.doc), f"startup:{machine}", body,
                        title=f"Seconds to first result (`scripts/bench_startup.py`) — {machine}")
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
