"""Benchmark the record preparation a run does before any model: load and validate an
instruction file, cut it into near-duplicate-grouped splits, digest the train part's ids,
and summarise the identify part's grouping (what the report's data section computes).

    PYTHONPATH=. python scripts/bench_prep.py --records 100000 1000000 --formats jsonl csv parquet --md docs/benchmarks.md
    PYTHONPATH=. python scripts/bench_prep.py --rows 100000:jsonl 100000:csv 100000:parquet 1000000:jsonl

The records are `bench_groups.templated` (Zipf words, 40% filled templates), six categories,
written once per size and format under `--dir` (kept for the next run). Each file is measured
in a fresh process: CPU seconds (they vary less than wall seconds on a shared machine) and the
process's peak resident memory after each step, and the number of near groups of the identify
part (the same for every format of one size).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("load", "split", "digest", "summary")


def write(path: Path, n: int) -> None:
    from bench_groups import templated

    rows = [{"id": r.id, "category": r.category, "instruction": r.instruction, "input": "",
             "output": "An answer of a few words."} for r in templated(n // 6)]
    tmp = path.with_suffix(".partial")
    if path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        import csv

        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(path)


def measure(path: Path) -> None:
    """The steps on one file, in this (fresh) process; prints one JSON line."""
    from sparcom_jax.data import load_instructions
    from sparcom_jax.data.splits import grouping_summary, split_records
    from sparcom_jax.fingerprint import digest

    out = {}

    def step(name, fn):
        cpu = time.process_time()
        got = fn()
        out[name] = [time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
        return got

    records = step("load", lambda: load_instructions(path))
    parts = step("split", lambda: split_records(records, {"train": 0.5, "identify": 0.3, "ablate": 0.2}, 0, by="near"))
    step("digest", lambda: digest([r.id for r in parts["train"]]))
    g = step("summary", lambda: grouping_summary(parts["identify"], "near"))
    print(json.dumps({**out, "records": len(records), "groups": g["near_groups"]["total"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000])
    ap.add_argument("--formats", nargs="+", default=["jsonl", "csv", "parquet"], choices=["jsonl", "csv", "parquet"])
    ap.add_argument("--rows", nargs="+", metavar="RECORDS:FORMAT", help="files to run instead of --records x --formats")
    ap.add_argument("--dir", default="/tmp/sparcom_bench_prep", help="where the record files are written and kept")
    ap.add_argument("--md", metavar="PATH", help="write the table into this file's 'prep' section")
    ap.add_argument("--one", metavar="FILE", help=argparse.SUPPRESS)  # a child's file
    args = ap.parse_args()
    if args.one:
        measure(Path(args.one))
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    head = ["records", "format", *(f"{s} (CPU s, peak MB)" for s in STEPS), "identify near groups"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(" | ".join(head))
    rows = ([(int(r.split(":")[0]), r.split(":")[1]) for r in args.rows] if args.rows else
            [(n, fmt) for n in args.records for fmt in args.formats])
    for n, fmt in rows:
        path = Path(args.dir) / f"records{n}.{fmt}"
        if not path.exists():
            write(path, n)
        child = subprocess.run([sys.executable, __file__, "--one", str(path)], stdout=subprocess.PIPE,
                               text=True, check=True)  # its traceback shows
        m = json.loads(child.stdout.splitlines()[-1])
        cells = [f"{m['records']:,}", fmt, *(f"{m[s][0]:.2f}, {m[s][1]:,.0f}" for s in STEPS), f"{m['groups']:,}"]
        print(" | ".join(cells), flush=True)
        lines.append("| " + " | ".join(cells) + " |")
    if args.md:
        from bench_common import device_name, replace_section

        body = (f"{device_name()}, one run of `scripts/bench_prep.py`: per file, in one fresh process, CPU seconds of "
                "each step and the peak resident memory after it (imports included: `datasets` for JSON lines). "
                "load: `load_instructions` (parse and validate); split: `split_records` train/identify/ablate "
                "0.5/0.3/0.2 grouped `near` (the near groups of every record); digest: the train part's ids; "
                "summary: `grouping_summary` of the identify part (its groups and `near_reworded`).\n\n" + "\n".join(lines))
        replace_section(args.md, "prep", body, title="Record preparation before the model (`scripts/bench_prep.py`)")


if __name__ == "__main__":
    main()
