#!/usr/bin/env python
"""Is this tree slower than an earlier revision? collect_counts tok/s of both, measured together.

A table measured on one day cannot be compared with one measured days earlier on a shared
machine: whole runs drift by 10-20% here (the same code, hours apart). This script takes the
drift out of the question by timing the working tree and `--ref` (any git revision, unpacked
with `git archive` into a temporary folder) in the same session, alternating fresh processes
round by round (ref, tree, tree, ref, ...), each process best-of-`--repeats` after a warm-up,
with the persistent compilation cache off. It reports each tree's median and range over the
rounds and the ratio of medians, and writes them into docs/benchmarks.md (section
`collect-ab:<machine>`).

Usage: python scripts/bench_ab.py --ref d3e9f0b [--models small|KEY,KEY] [--rounds 5]
       [--repeats 5] [--n 64] [--batch 8] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import PRESETS, device_name, replace_section, shape, stamp  # noqa: E402

# Runs inside the tree under test: only API both revisions share (ModelConfig, init_model, collect_counts).
CHILD = r"""
import json, sys, time
import numpy as np
import sparcom_jax as sj
a = json.loads(sys.argv[1])
model = sj.init_model(sj.ModelConfig.from_hf_config(a["hf"]), seed=0)
rng = np.random.default_rng(0)
seqs = [rng.integers(3, a["hf"]["vocab_size"], int(rng.integers(a["lo"], a["hi"] + 1))).astype(np.int32)
        for _ in range(a["n"])]
sj.collect_counts(model, seqs, batch_size=a["batch"], progress=False)
best = float("inf")
for _ in range(a["repeats"]):
    t = time.perf_counter()
    sj.collect_counts(model, seqs, batch_size=a["batch"], progress=False)
    best = min(best, time.perf_counter() - t)
print("RESULT", json.dumps(sum(len(s) for s in seqs) / best))
"""


def run_child(tree: Path, job: dict) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), SPARCOM_JAX_CACHE="off")
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], env=env, cwd=tree, capture_output=True,
                       text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"bench_ab: the run in {tree} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return float(line.split(" ", 1)[1])


def unpack(rev: str, dest: Path) -> str:
    """`git archive rev` into dest; returns the full commit id (a bad revision is a clear error)."""
    full = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                          text=True)
    if full.returncode:
        raise SystemExit(f"bench_ab: --ref {rev!r} is not a commit of {ROOT}: {full.stderr.strip()}")
    arch = subprocess.Popen(["git", "archive", full.stdout.strip()], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=arch.stdout, check=True)
    if arch.wait():
        raise SystemExit(f"bench_ab: git archive {rev} failed")
    return full.stdout.strip()


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def overlaps(a: list[float], b: list[float]) -> bool:
    """Whether the ranges [min, max] of a and b share a point."""
    return min(max(a), max(b)) >= max(min(a), min(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--models", default="small", help="preset or comma-separated shape keys of bench_common")
    ap.add_argument("--rounds", type=int, default=5, help="processes per tree, alternated")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per process after a warm-up")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="toy-size shapes (a dry run of the script)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    keys = PRESETS.get(args.models) or args.models.split(",")
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "working tree"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        ref_tree = Path(tmp)
        ref = unpack(args.ref, ref_tree)[:9]
        trees = {"ref": ref_tree, "tree": ROOT}
        for key in keys:
            label, hf = shape(key, args.tiny)
            job = dict(hf=hf, n=args.n, lo=args.min_len, hi=args.max_len, batch=args.batch, repeats=args.repeats)
            got: dict[str, list[float]] = {"ref": [], "tree": []}
            for r in range(args.rounds):
                for name in (("ref", "tree") if r % 2 == 0 else ("tree", "ref")):
                    got[name].append(run_child(trees[name], job))
                    print(f"{label}: round {r + 1} {name} {got[name][-1]:,.0f} tok/s", flush=True)
            ratio = statistics.median(got["tree"]) / statistics.median(got["ref"])
            rows.append(f"| {label} | {summary(got['ref'])} | {summary(got['tree'])} | {ratio:.3f} | "
                        f"{'yes' if overlaps(got['ref'], got['tree']) else 'no'} |")
    body = "\n".join([
        f"{stamp()}; `scripts/bench_ab.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
        f"collect_counts on {args.n} random sequences of {args.min_len}-{args.max_len} tokens, batch {args.batch}, "
        f"float32; {args.rounds} fresh processes per tree, alternated, each best of {args.repeats} after a warm-up; "
        "persistent compilation cache off.", "",
        f"| model | {ref} (ref) tok/s: median (range) | {head} tok/s: median (range) | ratio of medians | "
        "ranges overlap |", "|---|---|---|---|---|", *rows, "",
        "Reading the table: the two trees ran interleaved in one session, so drift of the machine between days "
        "(which moves whole tables by 10-20% on this shared CPU) affects both alike. Where the two trees' ranges "
        "overlap, the difference of the medians is within this machine's run-to-run spread."])
    replace_section(Path(args.out), f"collect-ab:{device_name()}", body,
                    title=f"Statistics engine, this tree vs {ref} (same session)")
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
