"""Balanced sampling: the same number of instructions from every category."""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

import numpy as np

from sparcom_jax.categories import CATEGORIES, SHORT_NAMES, normalize_category
from sparcom_jax.data.records import Record


def count_by_category(records: Iterable[Record]) -> dict[str, int]:
    """Records per category, in the canonical category order (absent ones omitted)."""
    counts = collections.Counter(r.category for r in records)
    return {c: counts[c] for c in CATEGORIES if counts[c]}


def sample_balanced(
    records: Sequence[Record],
    n_per_category: int,
    seed: int = 0,
    categories: Iterable[str] | None = None,
) -> list[Record]:
    """Draw `n_per_category` records from each category, without replacement.

    Deterministic for a given seed and input order. The result lists categories
    in the canonical order and keeps the input order within each category.

    Args:
      records: the pool to draw from.
      n_per_category: how many records each category contributes.
      seed: seed of the numpy generator.
      categories: the categories to sample (any accepted name); default: every
        category present in `records`.

    Returns:
      n_per_category * (number of categories) records.

    Raises:
      ValueError: when a category has fewer than `n_per_category` records; the
        message names the category by its short name and the counts.
    """
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    by_cat: dict[str, list[Record]] = {c: [] for c in CATEGORIES}
    for r in records:
        by_cat[r.category].append(r)
    if categories is None:
        wanted = [c for c in CATEGORIES if by_cat[c]]
    else:
        wanted = sorted({normalize_category(c) for c in categories}, key=CATEGORIES.index)
    short = [c for c in wanted if len(by_cat[c]) < n_per_category]
    if short:
        detail = ", ".join(f"{SHORT_NAMES[c]} ({c}) has {len(by_cat[c])}" for c in short)
        raise ValueError(
            f"not enough records for {n_per_category} per category: {detail}; "
            "lower n_per_category or add records to those categories"
        )
    out: list[Record] = []
    for c in wanted:
        pool = by_cat[c]
        # One generator per category: a category's draw does not depend on which
        # other categories are sampled.
        rng = np.random.default_rng([seed, CATEGORIES.index(c)])
        pick = np.sort(rng.choice(len(pool), size=n_per_category, replace=False))
        out.extend(pool[i] for i in pick)
    return out
