"""Small helpers shared by the analysis modules.

Axis letters: see `sparcom_jax.axes` (categories always in `CATEGORIES` order).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from sparcom_jax.categories import CATEGORIES, normalize_category

C = len(CATEGORIES)

# Which count field feeds which summary section, and what its unit axes are called.
SECTIONS: dict[str, str] = {
    "neuron_active": "isn",
    "expert_routed": "ise",
    "expert_neuron_active": "expert_neurons",
}
UNIT_AXES: dict[str, tuple[str, ...]] = {
    "neuron_active": ("layer", "neuron"),
    "expert_routed": ("layer", "expert"),
    "expert_neuron_active": ("layer", "expert", "neuron"),
}


def category_labels(categories: Sequence[str] | None) -> np.ndarray:
    """Map per-instruction category names to indices into `CATEGORIES`.

    Args:
      categories: length-N names (long or short, any case).

    Returns:
      int [N] indices.

    Raises:
      ValueError: when the counts carry no categories or a name is unknown.
    """
    if categories is None:
        raise ValueError(
            "these counts carry no per-instruction categories; category sets need them. Collect with "
            "collect_instructions(model, records) (records carry their categories), or pass "
            "categories=[one category per sequence] to collect_counts"
        )
    return np.asarray(
        [CATEGORIES.index(normalize_category(c)) for c in categories], dtype=np.int64
    )


def safe_div(num, den, dtype=np.float64) -> np.ndarray:
    """num / den elementwise in `dtype`, NaN where den == 0 (an undefined ratio, not zero)."""
    num = np.asarray(num, dtype=dtype)
    den = np.asarray(den, dtype=dtype)
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype)
    np.divide(num, den, out=out, where=den != 0)
    return out


def nan_mean(x) -> float:
    """Mean of the finite entries, NaN when there are none (no warning)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def jsonable(obj: Any) -> Any:
    """Convert numpy values, tuples and NaN to JSON-safe python (NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def by_category(values) -> dict[str, Any]:
    """A length-C sequence (or leading axis) -> {category name: value}."""
    return {c: values[i] for i, c in enumerate(CATEGORIES)}
