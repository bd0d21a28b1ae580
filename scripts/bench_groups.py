"""Benchmark the near-duplicate pair search (`sparcom_jax.data.splits.near_pairs`) on synthetic records.

    PYTHONPATH=. python scripts/bench_groups.py --per-category 1000 3000 10000 --data templated uniform
    PYTHONPATH=/path/to/other/checkout python scripts/bench_groups.py ...   # another version, same records

Record sets (seeded, the same for every version; six categories of `--per-category` records):

- "templated": instructions as public instruction sets have them. Words are drawn from a
  vocabulary of 30,000 with Zipf frequencies (p ~ 1/(rank + 3)), so a few words ("the",
  "of") are in most instructions and most words are rare. 40% of the records are filled
  templates: one template per 40 records of a category, 6-20 Zipf words with 1-3 slots,
  each slot a number (written as 0 by `near_words`, so variants differ in text only), one
  of 50 fillers (countries, genres) or a Zipf word. The other 60% are free text of 3-60
  Zipf words (lognormal, median 12).
- "uniform": 5-25 words drawn uniformly from 20,000 (the case docs/data.md measured the
  all-pairs search on: most words shared by a few records, few pairs).
- "shipped": the shipped 360 records (`--per-category` ignored).

Prints, per set: records, the wall and CPU seconds of one `near_pairs` call (no cache; CPU
seconds vary less on a shared machine), the pairs, the near groups, and a digest of the
pairs, so two versions can be checked to find the same pairs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data import Record
from sparcom_jax.data.splits import group_keys, near_pairs
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


def shipped(per_category: int, seed: int = 0) -> list[Record]:
    from sparcom_jax.data import SHIPPED_PATH, load_instructions

    return load_instructions(SHIPPED_PATH)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--data", nargs="+", default=["shipped", "templated", "uniform"],
                    choices=["shipped", "templated", "uniform"])
    ap.add_argument("--threshold", type=float, default=0.6)
    args = ap.parse_args()
    print(f"{'data':<10} {'records':>8} {'wall s':>8} {'CPU s':>8} {'pairs':>9} {'groups':>8}  pairs digest")
    for data in args.data:
        for n in args.per_category if data != "shipped" else [0]:
            records = globals()[data](n)
            start, cpu = time.perf_counter(), time.process_time()
            pairs = near_pairs(records, args.threshold)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            groups = len({(r.category, k) for r, k in zip(records, group_keys(records, "near", args.threshold))})
            print(f"{data:<10} {len(records):>8} {seconds:>8.2f} {cpu:>8.2f} {len(pairs):>9} {groups:>8}  {digest(pairs)[:16]}",
                  flush=True)


if __name__ == "__main__":
    main()
