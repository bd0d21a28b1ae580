"""Benchmark near-duplicate grouping (`sparcom_jax.data.splits`) on synthetic records.

    PYTHONPATH=. python scripts/bench_groups.py --per-category 1000 10000 --data templated slot
    PYTHONPATH=. python scripts/bench_groups.py --rows ROWS --before /path/to/old/checkout --md docs/benchmarks.md

Record sets (seeded, the same for every version; six categories of `--per-category` records
unless said otherwise):

- "templated": instructions as public instruction sets have them. Words are drawn from a
  vocabulary of 30,000 with Zipf frequencies (p ~ 1/(rank + 3)), so a few words ("the",
  "of") are in most instructions and most words are rare. 40% of the records are filled
  templates: one template per 40 records of a category, 6-20 Zipf words with 1-3 slots,
  each slot a number (written as 0 by `near_words`, so variants differ in text only), one
  of 50 fillers (countries, genres) or a Zipf word. The other 60% are free text of 3-60
  Zipf words (lognormal, median 12).
- "numbers": `--per-category` variants of one template in one category (MATH) that differ
  only in numbers ("Calculate 12% of 450."): one word set, every record pair a near pair.
- "slot": `--per-category` fillers of one free word slot in one category ("What is the capital
  of X?"): as many distinct word sets, every pair of them joined.
- "phrases": one slot filled by `--per-category` distinct phrases of 1 to 3 words ("Write a
  short poem for children about the X."), every pair joined.
- "slots2": two slots filled by about sqrt(`--per-category`) words each ("Write a poem about X in
  the style of Y."): pairs that differ in both slots are joined too.
- "mixed": "templated" plus, per category, five one-slot templates of 5-15 words, each filled
  by `--per-category` / 10 distinct words.
- "uniform": 5-25 words drawn uniformly from 20,000 (the case docs/data.md measured the
  all-pairs search on: most words shared by a few records, few pairs).
- "shipped": the shipped 360 records (`--per-category` ignored).

Each set is measured in a fresh process (an empty cache, and its own peak memory): first
`group_keys(records, "near")`, what a split and the counts' group ids need; then the rest of
one `grouping_summary` call (the records that share their group with another wording; the
groups come from the cache). Prints, per set: records, CPU seconds (they vary less than wall seconds on a
shared machine) and the process's peak resident memory, for the groups and, after them, for
the summary; the reworded records the summary counts, the near groups, and a digest of every record's
near group key, so two versions can be checked to group alike. `--before` runs the groups of
the same sets under another checkout too (in memory and time limits: `--limit-gb`,
`--limit-s`, `--before-max`; the summary: `--summary-limit-s`); `--md` writes the table into that file's "groups" section (`bench_common`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data import Record
from sparcom_jax.data.splits import group_keys, grouping_summary
from sparcom_jax.fingerprint import digest


def templated(per_category: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / (np.arange(30_000) + 3.0))
    cdf /= cdf[-1]

    def zipf(n):  # n words of the Zipf vocabulary
        return [f"w{k}" for k in np.minimum(np.searchsorted(cdf, rng.random(n)), cdf.size - 1)]

    out = []
    for cat in CATEGORIES:
        templates = []
        for _ in range(max(per_category // 40, 1)):
            words = zipf(int(rng.integers(6, 21)))
            for slot in rng.choice(len(words), int(rng.integers(1, 4)), replace=False):
                words[slot] = ("{num}", "{fill}", "{word}")[int(rng.integers(3))]
            templates.append(words)
        for i in range(per_category):
            if rng.random() < 0.4:
                fill = {"{num}": str(int(rng.integers(1, 1000))), "{fill}": f"f{int(rng.integers(50))}",
                        "{word}": zipf(1)[0]}
                words = [fill.get(w, w) for w in templates[int(rng.integers(len(templates)))]]
            else:
                words = zipf(int(np.clip(rng.lognormal(np.log(12), 0.6), 3, 60)))
            out.append(Record(f"{cat}-{i}", cat, " ".join(words) + "."))
    return out


def uniform(per_category: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [Record(f"{cat}-{i}", cat, " ".join(f"w{k}" for k in rng.integers(0, 20_000, int(rng.integers(5, 26)))))
            for cat in CATEGORIES for i in range(per_category)]


def numbers(per_category: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [Record(f"math-{i}", "math", f"Calculate {int(a)}% of {int(b)}.")
            for i, (a, b) in enumerate(rng.integers(1, 1000, (per_category, 2)))]


def slot(per_category: int, seed: int = 0) -> list[Record]:
    return [Record(f"qa-{i}", "general_qa", f"What is the capital of x{i}?") for i in range(per_category)]


def phrases(per_category: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [Record(f"gen-{i}", "generation", "Write a short poem for children about the "
                   + " ".join(f"p{i}x{j}" for j in range(int(rng.integers(1, 4)))) + ".")
            for i in range(per_category)]


def slots2(per_category: int, seed: int = 0) -> list[Record]:
    side = int(np.ceil(np.sqrt(per_category)))
    return [Record(f"gen-{i}", "generation", f"Write a poem about a{i // side} in the style of b{i % side}.")
            for i in range(per_category)]


def mixed(per_category: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed + 1)
    out = templated(per_category, seed)
    for cat in CATEGORIES:
        for t in range(5):  # five one-slot templates per category, each filled by distinct words
            words = [f"w{int(k)}" for k in rng.integers(0, 300, int(rng.integers(5, 15)))]
            at = int(rng.integers(len(words)))
            for i in range(per_category // 10):
                filled = [*words[:at], f"s{t}x{i}", *words[at:]]
                out.append(Record(f"{cat}-s{t}-{i}", cat, " ".join(filled) + "."))
    return out


def shipped(per_category: int, seed: int = 0) -> list[Record]:
    from sparcom_jax.data import SHIPPED_PATH, load_instructions

    return load_instructions(SHIPPED_PATH)


def measure(data: str, per_category: int, threshold: float, summary: bool) -> None:
    """In this (fresh) process: print the near groups of a record set (`group_keys`) as a JSON
    line, then, given `summary`, the rest of one `grouping_summary` call as another."""
    records = globals()[data](per_category)
    cpu = time.process_time()
    keys = group_keys(records, "near", threshold)
    groups = len({(r.category, k) for r, k in zip(records, keys)})
    print(json.dumps({"records": len(records), "cpu": time.process_time() - cpu, "groups": groups,
                      "digest": digest(keys)[:16], "peak_mb": _peak_mb()}), flush=True)
    if summary:
        cpu = time.process_time()
        got = grouping_summary(records, "near", threshold)
        assert got["near_groups"]["total"] == groups
        print(json.dumps({"summary_cpu": time.process_time() - cpu, "reworded": got["near_reworded"],
                          "summary_peak_mb": _peak_mb()}), flush=True)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _limited(gb: float):
    """A child's set-up: at most `gb` of address space (a search past it fails instead of
    taking the machine's memory)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(gb * 2**30), int(gb * 2**30)))
    return limit


def run_child(data: str, n: int, threshold: float, path: str | None, summary: bool, limit_s: float | None,
              limit_gb: float | None) -> dict:
    """`measure` in a fresh process, with PYTHONPATH=`path` when given: its JSON lines merged, and
    "stopped" saying why it stopped early (a limit) where it did."""
    env = {**os.environ, "PYTHONPATH": path} if path else None
    cmd = [sys.executable, __file__, "--one", data, str(n), "--threshold", str(threshold)] + (["--summary"] if summary else [])
    out, why = "", None
    try:
        child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=limit_s,
                               preexec_fn=_limited(limit_gb) if limit_gb else None)
        out = child.stdout
        if child.returncode:
            why = f"failed (over {limit_gb:g} GB)" if limit_gb else f"failed (exit {child.returncode})"
    except subprocess.TimeoutExpired as e:
        out, why = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), f"over {limit_s:g} s"
    got = {}
    for line in out.splitlines():
        if line.startswith("{"):
            got.update(json.loads(line))
    return {**got, "stopped": why} if why else got


def _cell(m: dict, cpu: str, peak: str) -> str:
    return f"{m[cpu]:.2f} s, {m[peak]:,.0f} MB" if cpu in m else f"stopped: {m.get('stopped')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = ["shipped", "templated", "numbers", "uniform", "slot", "phrases", "slots2", "mixed"]
    ap.add_argument("--per-category", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--data", nargs="+", default=sets, choices=sets)
    ap.add_argument("--rows", nargs="+", metavar="DATA:PER_CATEGORY", help="sets to run instead of --data x --per-category")
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--no-summary", dest="summary", action="store_false", help="measure the groups only")
    ap.add_argument("--before", metavar="PATH", help="another checkout: its groups of the same sets beside")
    ap.add_argument("--limit-s", type=float, default=600.0, help="seconds a --before child may run")
    ap.add_argument("--summary-limit-s", type=float, default=600.0, help="seconds this version's child may run (its summary)")
    ap.add_argument("--limit-gb", type=float, default=8.0, help="memory a --before child may take")
    ap.add_argument("--before-max", type=int, default=100_000, help="records beyond which --before is not run")
    ap.add_argument("--md", metavar="PATH", help="write the table into this file's 'groups' section")
    ap.add_argument("--one", nargs=2, metavar=("DATA", "PER_CATEGORY"), help=argparse.SUPPRESS)  # a child's set
    ap.add_argument("--summary", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        measure(args.one[0], int(args.one[1]), args.threshold, args.summary)
        return
    rows = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.rows] if args.rows else
            [(d, n) for d in args.data for n in (args.per_category if d != "shipped" else [0])])
    head = ["data", "records", *(["groups, before"] if args.before else []), "groups", "summary",
            "reworded", "near groups", "digest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(" | ".join(head))
    for data, n in rows:
        now = run_child(data, n, args.threshold, None, args.summary, args.summary_limit_s, None)
        if "digest" not in now:
            raise SystemExit(f"{data} {n}: this version's child failed")
        cells = [data, f"{now['records']:,}"]
        if args.before and now["records"] > args.before_max:
            cells.append(f"not run (over {args.before_max:,} records)")
        elif args.before:
            old = run_child(data, n, args.threshold, args.before, False, args.limit_s, args.limit_gb)
            same = "" if "digest" not in old else " (same groups)" if old["digest"] == now["digest"] else " (OTHER GROUPS)"
            cells.append(_cell(old, "cpu", "peak_mb") + same)
        cells += [_cell(now, "cpu", "peak_mb"), _cell(now, "summary_cpu", "summary_peak_mb") if args.summary else "-",
                  f"{now['reworded']:,}" if "reworded" in now else "-", f"{now['groups']:,}", now["digest"]]
        print(" | ".join(cells), flush=True)
        lines.append("| " + " | ".join(cells) + " |")
    if args.md:
        from bench_common import device_name, replace_section

        body = (f"{device_name()}, one run of `scripts/bench_groups.py` (CPU seconds and peak resident memory of a "
                f"fresh process, records and imports included; the summary column is the rest of one grouping_summary "
                f"call after the groups (reworded: its near_reworded), its memory the process peak by then, stopped at {args.summary_limit_s:g} s of wall time; the version before, "
                f"stopped at {args.limit_s:g} s of wall time or {args.limit_gb:g} GB of address space).\n\n" + "\n".join(lines))
        replace_section(args.md, "groups", body, title="Near-duplicate grouping (`scripts/bench_groups.py`)")



if __name__ == "__main__":
    main()
