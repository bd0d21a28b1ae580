"""Benchmark near-duplicate grouping (`sparcom_jax.data.splits.grouping_summary`) on synthetic records.

    PYTHONPATH=. python scripts/bench_groups.py --per-category 1000 3000 10000 --data templated numbers uniform
    PYTHONPATH=/path/to/other/checkout python scripts/bench_groups.py ...   # another version, same records

Record sets (seeded, the same for every version; six categories of `--per-category` records):

- "templated": instructions as public instruction sets have them. Words are drawn from a
  vocabulary of 30,000 with Zipf frequencies (p ~ 1/(rank + 3)), so a few words ("the",
  "of") are in most instructions and most words are rare. 40% of the records are filled
  templates: one template per 40 records of a category, 6-20 Zipf words with 1-3 slots,
  each slot a number (written as 0 by `near_words`, so variants differ in text only), one
  of 50 fillers (countries, genres) or a Zipf word. The other 60% are free text of 3-60
  Zipf words (lognormal, median 12).
- "numbers": `--per-category` variants of one template in one category (MATH) that differ
  only in numbers ("Calculate 12% of 450."): one word set, every record pair a near pair.
- "uniform": 5-25 words drawn uniformly from 20,000 (the case docs/data.md measured the
  all-pairs search on: most words shared by a few records, few pairs).
- "shipped": the shipped 360 records (`--per-category` ignored).

Each set is measured in a fresh process (an empty cache, and its own peak memory): one
`grouping_summary` call, the work a run does to group records (the pair search once, the
groups under both rules, the count of joined pairs). Prints, per set: records, the wall and
CPU seconds of that call (CPU seconds vary less on a shared machine), the process's peak
resident memory, the pairs of differently worded records joined directly (`near_pairs` of
the summary), the near groups, and a digest of every record's near group key, so two
versions can be checked to group alike.
"""

from __future__ import annotations

import argparse
import json
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


def measure(data: str, per_category: int, threshold: float, summary: bool) -> dict:
    """In this (fresh) process: the near groups of a record set (`group_keys`, what a split and the
    counts' group ids need), then, given `summary`, the rest of one `grouping_summary` call (the
    count of joined pairs; the groups come from the cache the first call filled)."""
    records = globals()[data](per_category)
    start, cpu = time.perf_counter(), time.process_time()
    keys = group_keys(records, "near", threshold)
    out = {"records": len(records), "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
           "groups": len({(r.category, k) for r, k in zip(records, keys)}), "digest": digest(keys)[:16],
           "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if summary:
        cpu = time.process_time()
        got = grouping_summary(records, "near", threshold)
        assert got["near_groups"]["total"] == out["groups"]
        out.update(summary_cpu=time.process_time() - cpu, pairs=got["near_pairs"],
                   summary_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--data", nargs="+", default=["shipped", "templated", "numbers", "uniform"],
                    choices=["shipped", "templated", "numbers", "uniform", "slot", "phrases", "slots2", "mixed"])
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--one", nargs=2, metavar=("DATA", "PER_CATEGORY"), help=argparse.SUPPRESS)  # a child's set
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.threshold)))
        return
    print(f"{'data':<10} {'records':>8} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} {'pairs':>10} {'groups':>8}  groups digest")
    for data in args.data:
        for n in args.per_category if data != "shipped" else [0]:
            child = subprocess.run([sys.executable, __file__, "--one", data, str(n), "--threshold", str(args.threshold)],
                                   stdout=subprocess.PIPE, text=True, check=True)  # its traceback shows
            m = json.loads(child.stdout.splitlines()[-1])
            print(f"{data:<10} {m['records']:>8} {m['wall']:>8.2f} {m['cpu']:>8.2f} {m['peak_mb']:>8.0f} {m['pairs']:>10} "
                  f"{m['groups']:>8}  {m['digest']}", flush=True)


if __name__ == "__main__":
    main()
