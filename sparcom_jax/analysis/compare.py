"""Step 3 of SPARCOM: how the sets move between models (base -> fine-tuned, or a series).

All functions take per-model arrays with identical unit shapes: category sets
bool [C, L, ...] and category mean frequencies float [C, L, ...].
"""

from __future__ import annotations

import numpy as np

from sparcom_jax.analysis.common import safe_div

# The per-category figures of compare_sets, in the order tables list them.
SET_KEYS = ("size_before", "size_after", "retained", "gained", "lost", "jaccard")


def _check(before: np.ndarray, after: np.ndarray) -> None:
    if before.shape != after.shape:
        raise ValueError(
            f"models differ in units: {before.shape} vs {after.shape}; "
            "comparison needs the same architecture"
        )


def compare_sets(before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """Retained, gained and lost units per category and per layer.

    Args:
      before: bool [C, L, ...] sets of the first model.
      after: bool [C, L, ...] sets of the second model.

    Returns:
      dict of int/float arrays [C] (size_before, size_after, retained = |B∩A|,
      gained = |A\\B|, lost = |B\\A|, jaccard = |B∩A| / |B∪A|, NaN if both empty)
      and the same per layer as `per_layer_<name>` [C, L].
    """
    _check(before, after)
    c, n_layers = before.shape[:2]
    b = before.reshape(c, n_layers, -1)
    a = after.reshape(c, n_layers, -1)
    layer = {
        "size_before": b.sum(2),
        "size_after": a.sum(2),
        "retained": (b & a).sum(2),
        "gained": (a & ~b).sum(2),
        "lost": (b & ~a).sum(2),
    }
    union_l = (b | a).sum(2)
    out = {k: v.sum(1) for k, v in layer.items()}
    out["jaccard"] = safe_div(out["retained"], union_l.sum(1))
    layer["jaccard"] = safe_div(layer["retained"], union_l)
    out.update({f"per_layer_{k}": v for k, v in layer.items()})
    return out


def _masked_means(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float [C]: mean of x[c] over mask[c] (x, mask [C, U]), NaN where the mask is empty."""
    return np.array([x[i][mask[i]].mean() if mask[i].any() else np.nan for i in range(x.shape[0])])


def frequency_shift(
    mean_before: np.ndarray, mean_after: np.ndarray,
    sets_before: np.ndarray, sets_after: np.ndarray,
) -> dict[str, np.ndarray]:
    """Shift of the category mean frequency p(c) between two models.

    Args:
      mean_before, mean_after: float [C, L, ...] mean frequency per category.
      sets_before, sets_after: bool [C, L, ...] category sets.

    Returns:
      dict of float arrays [C]: mean_before / mean_after / delta (over all units),
      mean_abs_delta, on_before_set_before / on_before_set_after (mean p over
      S_before(c) in each model: do the original units weaken?),
      on_after_set_before / on_after_set_after (mean p over S_after(c): were the
      new units already active?), and per_layer_delta [C, L].
    """
    _check(mean_before, mean_after)
    c, n_layers = mean_before.shape[:2]
    pb = mean_before.reshape(c, n_layers, -1).astype(np.float64)
    pa = mean_after.reshape(c, n_layers, -1).astype(np.float64)
    sb = sets_before.reshape(c, -1)
    sa = sets_after.reshape(c, -1)
    d = pa - pb
    flat_b, flat_a = pb.reshape(c, -1), pa.reshape(c, -1)
    return {
        "mean_before": flat_b.mean(1),
        "mean_after": flat_a.mean(1),
        "delta": d.reshape(c, -1).mean(1),
        "mean_abs_delta": np.abs(d).reshape(c, -1).mean(1),
        "on_before_set_before": _masked_means(flat_b, sb),
        "on_before_set_after": _masked_means(flat_a, sb),
        "on_after_set_before": _masked_means(flat_b, sa),
        "on_after_set_after": _masked_means(flat_a, sa),
        "per_layer_delta": d.mean(2),
    }
