"""Disjoint splits of one record set: fine-tuning, identification and the causal check's evaluation.

A finding about what fine-tuning changes must not rest on the records the model was
tuned on, and a causal check must not be scored on the records its units were chosen
from. `split_records` cuts one set into disjoint parts:

- stratified by category, so every part keeps the categories balanced;
- grouped by instruction text (case and spacing ignored), so templated near-duplicates
  that share an instruction never straddle two parts;
- deterministic for a seed and a record set. It is not stable per record: groups are
  dealt out against category totals, so adding or removing records can move others to
  another part (the pipeline refuses checkpoints tuned on another train part).

    parts = split_records(records, {"train": 0.5, "identify": 0.3, "ablate": 0.2}, seed=0)
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping, Sequence

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data.records import Record
from sparcom_jax.fingerprint import digest


def group_key(record: Record) -> str:
    """The text that makes two records near-duplicates: the instruction, lower-cased,
    whitespace collapsed."""
    return re.sub(r"\s+", " ", record.instruction.strip().lower())


def group_ids(records: Sequence[Record]) -> list[str]:
    """A short digest of each record's `group_key`: what count stores keep per record, so
    that the analysis resamples near-duplicates together (records of one category with
    one id form one cluster, `sparcom_jax.analysis.uncertainty.cluster_index`)."""
    return [digest(group_key(r)) for r in records]


def _rank(seed: int, category: str, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{key}".encode()).hexdigest()


def split_records(records: Sequence[Record], fractions: Mapping[str, float], seed: int = 0
                  ) -> dict[str, list[Record]]:
    """Cut `records` into disjoint parts with the given shares of every category.

    Within each category, groups of records sharing an instruction are ordered by a
    seeded hash of their text and dealt out in that order: a group goes to the part
    furthest below its target share of the category's records (ties to the earlier
    part). Parts keep the input order of their records.

    Args:
      records: the records (unique ids).
      fractions: {part name: share}; shares > 0, summing to 1 (within 1e-6).
      seed: the split's seed.

    Returns:
      {part name: records}, in the order of `fractions`.

    Raises:
      ValueError: on shares that are not positive or do not sum to 1.
    """
    names = list(fractions)
    shares = [float(fractions[n]) for n in names]
    if not names or any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"split shares {dict(fractions)} must be > 0 and sum to 1")
    where: dict[str, str] = {}
    for cat in CATEGORIES:
        groups: dict[str, list[Record]] = {}
        for r in records:
            if r.category == cat:
                groups.setdefault(group_key(r), []).append(r)
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
