"""Disjoint splits of one record set: fine-tuning, identification and the causal check's evaluation.

A finding about what fine-tuning changes must not rest on the records the model was
tuned on, and a causal check must not be scored on the records its units were chosen
from. `split_records` cuts one set into disjoint parts:

- stratified by category, so every part keeps the categories balanced;
- grouped by instruction (`group_keys`), so templated near-duplicates never straddle
  two parts: "near" (the default of runs, `data.group_by`) makes records of one
  category whose instructions share most of their words one group, joined through
  chains of such pairs; "text" (these functions' default) joins only identical
  instruction text (case and spacing ignored);
- deterministic for a seed and a record set. It is not stable per record: groups are
  dealt out against category totals, so adding or removing records can move others to
  another part (the pipeline refuses checkpoints tuned on another train part).

    parts = split_records(records, {"train": 0.5, "identify": 0.3, "ablate": 0.2}, seed=0)
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Literal, Mapping, Sequence

import numpy as np

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data.records import Record
from sparcom_jax.fingerprint import digest

GroupBy = Literal["text", "near"]
# The grouping of runs (data.group_by, collect_instructions): identical text alone leaves
# templated variants ("Find the mean ..." / "Find the median ...") as independent records.
DEFAULT_GROUP_BY: GroupBy = "near"
# Measured on the shipped set (docs/data.md): at 0.6 the joins are templated variants ("What is
# the capital city of Canada?" / "... of Japan?"); at 0.5 chains start to join unrelated
# instructions into one group of 24.
NEAR_THRESHOLD = 0.6
_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*\b")
_WORD = re.compile(r"\w+")


def group_key(record: Record) -> str:
    """The instruction text that identical-text groups share: lower-cased, whitespace collapsed."""
    return re.sub(r"\s+", " ", record.instruction.strip().lower())


def near_words(record: Record) -> frozenset[str]:
    """The word set that near-duplicate grouping compares: the words of `group_key`, every
    number written as 0 (templates often vary a number: "Calculate 12% of 450.")."""
    return frozenset(_WORD.findall(_NUMBER.sub("0", group_key(record))))


def near_pairs(records: Sequence[Record], threshold: float = NEAR_THRESHOLD,
               chunk: int = 1024) -> list[tuple[int, int]]:
    """Pairs of records of one category whose word sets (`near_words`) overlap by a Jaccard
    of at least `threshold`.

    Exact and pairwise: per category one [n_c, V] 0/1 matrix of the words that occur in two
    or more of its records (the others enter the set sizes only), and its products with
    itself in row chunks (the upper triangle), so time grows as n_c^2 V / 2 and memory as
    n_c V + chunk n_c.

    Args:
      records: the records.
      threshold: the smallest Jaccard that joins two records, in (0, 1].
      chunk: rows per product.

    Returns:
      (i, j) index pairs, i < j, sorted. Two records without words are never a pair.
    """
    out: list[tuple[int, int]] = []
    for cat in CATEGORIES:
        idx = np.asarray([i for i, r in enumerate(records) if r.category == cat], np.int64)
        words = [near_words(records[i]) for i in idx]
        df = Counter(w for ws in words for w in ws)
        vocab = {w: k for k, w in enumerate(w for w, n in df.items() if n > 1)}
        x = np.zeros((idx.size, len(vocab)), np.float32)  # counts below 2**24 are exact in float32
        for row, ws in enumerate(words):
            x[row, [vocab[w] for w in ws if w in vocab]] = 1.0
        size = np.asarray([len(ws) for ws in words], np.float64)
        for s in range(0, idx.size, chunk):
            # Rows s.. against columns s.. only: the pairs (i, j > i) of this chunk.
            inter = (x[s:s + chunk] @ x[s:].T).astype(np.float64)       # [chunk, n_c - s]
            union = size[s:s + chunk, None] + size[None, s:] - inter
            # A tolerance: 0.7 * 10 is 7.000000000000001 in floating point.
            hit = (union > 0) & (inter >= threshold * union - 1e-9)
            rows, cols = np.nonzero(hit)
            keep = cols > rows
            out += zip(idx[rows[keep] + s].tolist(), idx[cols[keep] + s].tolist())
    return sorted(out)


# The last few `near_pairs` results, by the records' (category, `group_key`) and the threshold:
# a run groups one record set many times (its split, every model's counts, the report's data
# section), and the search is quadratic in the records of a category.
_PAIRS_CACHE: dict[tuple[str, float], tuple[tuple[int, int], ...]] = {}
_PAIRS_CACHE_SIZE = 4


def _near_pairs_once(records: Sequence[Record], threshold: float) -> tuple[tuple[int, int], ...]:
    """`near_pairs(records, threshold)`, computed once for the same records' texts and categories."""
    key = (digest([[r.category, group_key(r)] for r in records]), float(threshold))
    if key not in _PAIRS_CACHE:
        while len(_PAIRS_CACHE) >= _PAIRS_CACHE_SIZE:
            _PAIRS_CACHE.pop(next(iter(_PAIRS_CACHE)))
        _PAIRS_CACHE[key] = tuple(near_pairs(records, threshold))
    return _PAIRS_CACHE[key]


def group_keys(records: Sequence[Record], by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> list[str]:
    """The group of each record: records of one category with one key are near-duplicates.

    Args:
      records: the records.
      by: "text" (the default of these functions, as before "near" existed): the
        `group_key` (identical instruction text); "near" (the default of runs,
        `DEFAULT_GROUP_BY`, `data.group_by`): records of one
        category with identical text or a `near_pairs` Jaccard >= threshold are joined,
        and so are chains of such pairs (union-find); a group's key is the `group_key` of
        its first record.
      threshold: the "near" rule's Jaccard.

    Returns:
      One key per record, in order.

    Raises:
      ValueError: on another `by`, or a threshold outside (0, 1].
    """
    keys = [group_key(r) for r in records]
    if by == "text":
        return keys
    if by != "near":
        raise ValueError(f"group_by={by!r}: use 'near' (near-duplicate instructions) or 'text' (identical text)")
    if not 0 < threshold <= 1:
        raise ValueError(f"group_threshold={threshold}: a Jaccard in (0, 1]")
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    same_text = [(first.setdefault((r.category, k), i), i) for i, (r, k) in enumerate(zip(records, keys))]
    for i, j in [*same_text, *_near_pairs_once(records, threshold)]:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)  # the root stays the earliest record of its group
    return [keys[root(i)] for i in range(len(records))]


def group_ids(records: Sequence[Record], by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> list[str]:
    """A short digest of each record's `group_keys`: what count stores keep per record, so
    that the analysis resamples near-duplicates together (records of one category with
    one id form one cluster, `sparcom_jax.analysis.uncertainty.cluster_index`)."""
    return [digest(k) for k in group_keys(records, by, threshold)]


def grouping_summary(records: Sequence[Record], by: GroupBy = "near",
                     threshold: float = NEAR_THRESHOLD) -> dict:
    """What a report says about the grouping of `records`: the rule, and the groups under
    identical text and under the near-duplicate rule at `threshold` (measured whichever
    rule is used, so a run grouped by text shows what it leaves ungrouped).

    Returns:
      {"group_by", "threshold" (of the near rule, measured even when grouping by text),
      "records", "text_groups", "near_groups" (per category and "total"), "near_pairs"
      (pairs of records with different texts that the near rule joins directly),
      "largest_near_group"}.
    """
    text, near = group_keys(records, "text"), group_keys(records, "near", threshold)

    def per_cat(keys):
        got = {c: len({k for r, k in zip(records, keys) if r.category == c}) for c in CATEGORIES}
        return {**got, "total": sum(got.values())}

    sizes = Counter((r.category, k) for r, k in zip(records, near))
    return {"group_by": by, "threshold": threshold, "records": len(records),
            "text_groups": per_cat(text), "near_groups": per_cat(near),
            "near_pairs": sum(group_key(records[i]) != group_key(records[j])
                              for i, j in _near_pairs_once(records, threshold)),
            "largest_near_group": max(sizes.values(), default=0)}


def _rank(seed: int, category: str, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{key}".encode()).hexdigest()


def split_records(records: Sequence[Record], fractions: Mapping[str, float], seed: int = 0,
                  by: GroupBy = "text", threshold: float = NEAR_THRESHOLD) -> dict[str, list[Record]]:
    """Cut `records` into disjoint parts with the given shares of every category.

    Within each category, the groups of records (`group_keys`) are ordered by a seeded
    hash of their key and dealt out in that order: a group goes to the part furthest
    below its target share of the category's records (ties to the earlier part). Parts
    keep the input order of their records.

    Args:
      records: the records (unique ids).
      fractions: {part name: share}; shares > 0, summing to 1 (within 1e-6).
      seed: the split's seed.
      by, threshold: the grouping (`group_keys`).

    Returns:
      {part name: records}, in the order of `fractions`.

    Raises:
      ValueError: on shares that are not positive or do not sum to 1.
    """
    names = list(fractions)
    shares = [float(fractions[n]) for n in names]
    if not names or any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"split shares {dict(fractions)} must be > 0 and sum to 1")
    keys = group_keys(records, by, threshold)
    where: dict[str, str] = {}
    for cat in CATEGORIES:
        groups: dict[str, list[Record]] = {}
        for r, k in zip(records, keys):
            if r.category == cat:
                groups.setdefault(k, []).append(r)
        total = sum(len(g) for g in groups.values())
        got = [0] * len(names)
        for key in sorted(groups, key=lambda k: _rank(seed, cat, k)):
            # The part with the largest shortfall against its target share.
            j = max(range(len(names)), key=lambda i: (shares[i] * total - got[i], -i))
            got[j] += len(groups[key])
            for r in groups[key]:
                where[r.id] = names[j]
    out: dict[str, list[Record]] = {n: [] for n in names}
    for r in records:
        out[where[r.id]].append(r)
    return out


def split_summary(parts: Mapping[str, Sequence[Record]]) -> dict[str, dict[str, int]]:
    """{part: {category: records}}: what a report records about a split."""
    return {name: {c: sum(r.category == c for r in recs) for c in CATEGORIES} for name, recs in parts.items()}
