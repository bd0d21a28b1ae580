"""Export ISN / ISE / expert-neuron lists as CSV and JSON.

One entry per (category, unit in S(c)): layer, [expert], index, frequency (the
mean p over the category's instructions), the categories whose sets hold the
unit, and whether the unit is unique to the category. Layers and indices are
0-based.
"""

from __future__ import annotations

import os

import numpy as np

from sparcom_jax.analysis.common import C, UNIT_AXES, jsonable
from sparcom_jax.analysis.identify import Identification
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.report.io import write_csv, write_json


def set_records(ident: Identification) -> dict[str, list[dict]]:
    """{category: [{"layer", ["expert"], "index", "frequency", "categories", "unique"}]}.

    Units are listed in (layer, [expert], index) order.
    """
    axes = UNIT_AXES[ident.field]
    member = ident.category_sets.reshape(C, -1)
    mean = ident.category_mean.reshape(C, -1)
    out = {}
    for ci, cat in enumerate(CATEGORIES):
        flat = np.flatnonzero(member[ci])
        coords = np.unravel_index(flat, ident.unit_shape)
        freq = mean[ci, flat]
        rows = []
        for j, u in enumerate(flat):
            cats = [CATEGORIES[k] for k in np.flatnonzero(member[:, u])]
            rec = {("index" if a == axes[-1] else a): int(coords[ai][j]) for ai, a in enumerate(axes)}
            rec.update(frequency=float(freq[j]), categories=cats, unique=len(cats) == 1)
            rows.append(rec)
        out[cat] = rows
    return out


def export_sets(out_dir: str | os.PathLike, ident: Identification, prefix: str = "") -> tuple[str, str]:
    """Write `<prefix><section>.csv` and `.json` under out_dir.

    Args:
      out_dir: destination directory.
      ident: the identification whose category sets are exported.
      prefix: file name prefix (e.g. "base_").

    Returns:
      (csv path, json path).
    """
    recs = set_records(ident)
    axes = UNIT_AXES[ident.field]
    cols = ["layer"] + (["expert"] if len(axes) == 3 else []) + ["index"]
    rule = ident.config.to_dict()
    comments = [
        f"{ident.section} ({ident.field}); index = {axes[-1]}; 0-based",
        "identification: " + " ".join(f"{k}={v}" for k, v in rule.items()),
    ]
    rows = [[cat, *[r[c] for c in cols], r["frequency"], ";".join(SHORT_NAMES[c] for c in r["categories"]),
             int(r["unique"])] for cat, rs in recs.items() for r in rs]
    base = os.path.join(os.fspath(out_dir), f"{prefix}{ident.section}")
    csv_path = write_csv(base + ".csv", ["category", *cols, "frequency", "categories", "unique"],
                         rows, comments)
    json_path = write_json(base + ".json", jsonable({
        "section": ident.section,
        "field": ident.field,
        "units": list(axes),
        "unit_shape": list(ident.unit_shape),
        "identification": rule,
        "sets": recs,
    }))
    return csv_path, json_path
