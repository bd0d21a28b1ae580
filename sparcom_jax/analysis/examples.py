"""Examples behind the sets: the instructions that activate each identified unit most.

Axis letters: see `sparcom_jax.axes`.

Researchers read examples before they trust a unit. For the units of each
category set with the highest category mean frequency, list the instructions
(of any category) with the highest frequency on that unit. The counts are read
in chunks of instructions (store-backed counts are lazy), keeping only a
running top list per unit.
"""

from __future__ import annotations

import numpy as np

from sparcom_jax.analysis.common import C, UNIT_AXES
from sparcom_jax.analysis.identify import Identification
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def listed_units(ident: Identification, units_per_category: int) -> list[np.ndarray]:
    """Per category, the flat indices of the units to list: the `units_per_category`
    members of S(c) with the highest category mean frequency (ties: lower index)."""
    member = ident.category_sets.reshape(C, -1)
    mean = ident.category_mean.reshape(C, -1)
    out = []
    for c in range(C):
        idx = np.flatnonzero(member[c])
        order = np.lexsort((idx, -mean[c, idx].astype(np.float64)))
        out.append(idx[order[:units_per_category]])
    return out


def top_instructions(
    counts: Counts, ident: Identification, *, units_per_category: int = 20, top: int = 5,
    chunk: int | None = None,
) -> dict:
    """The instructions that activate the listed units of each category set most.

    Args:
      counts: the counts the identification was made from.
      ident: the identification (its category sets and means).
      units_per_category: units listed per category (see listed_units).
      top: instructions listed per unit.
      chunk: instructions read at a time (default: the rule's chunk).

    Returns:
      {category: [{<unit axes>: int..., "category_frequency": p(c) of the unit,
      "instructions": [{"index", "id", "category", "frequency", "tokens"}]}]}.
      Instructions are ordered by frequency on the unit, then by more tokens
      (the same frequency over more tokens is more evidence), then by index;
      instructions on which the unit never fired are not listed.
    """
    per_cat = listed_units(ident, units_per_category)
    units = np.unique(np.concatenate(per_cat))
    tokens = np.asarray(counts.tokens[:], np.int64)
    best_f = np.full((units.size, 0), -np.inf)
    best_i = np.zeros((units.size, 0), np.int64)
    if units.size:
        for s, freq in counts.iter_frequencies(ident.field, chunk or ident.config.chunk):
            n = freq.shape[0]
            f = np.concatenate([best_f, freq.reshape(n, -1)[:, units].T.astype(np.float64)], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + n), (units.size, n))], axis=1)
            order = np.lexsort((i, -tokens[i], -f), axis=1)[:, :top]
            best_f = np.take_along_axis(f, order, 1)
            best_i = np.take_along_axis(i, order, 1)
    col = {u: k for k, u in enumerate(units.tolist())}
    axes = UNIT_AXES[ident.field]
    mean = ident.category_mean.reshape(C, -1)
    out = {}
    for c, cat in enumerate(CATEGORIES):
        rows = []
        for u in per_cat[c].tolist():
            coords = np.unravel_index(u, ident.unit_shape)
            k = col[u]
            inst = [{"index": int(i), "id": ident.ids[i] if ident.ids is not None else str(i),
                     "category": CATEGORIES[ident.labels[i]], "frequency": float(f),
                     "tokens": int(tokens[i])}
                    for f, i in zip(best_f[k], best_i[k]) if f > 0]
            rows.append({**{a: int(x) for a, x in zip(axes, coords)},
                         "category_frequency": float(mean[c, u]), "instructions": inst})
        out[cat] = rows
    return out
