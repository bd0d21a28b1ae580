"""Causal check: switch off a category's ISNs (or ISEs) and measure every category's loss.

The model execution lives elsewhere; this module orchestrates it through a
callback ``loss_fn(mask) -> {category: mean loss on its reference responses}``
where `mask` is bool [L, F] (neurons: True = activation forced to 0) or [L, E]
(experts: True = removed from routing, the remaining experts renormalised as
the model does), and None means no ablation (the baseline).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from sparcom_jax.analysis.common import C, by_category, jsonable
from sparcom_jax.categories import CATEGORIES, normalize_category

LossFn = Callable[[np.ndarray | None], Mapping[str, float]]


@dataclasses.dataclass
class AblationResult:
    """Loss increases; rows = ablated category, columns = evaluated category.

    Attributes:
      kind: "neurons" or "experts".
      baseline: {category: loss without ablation}.
      isn: float [C, C] loss(ablate S(a)) on b minus baseline on b.
      random: float [C, C] mean over draws of the same for random sets with the
        same per-layer counts as S(a).
      random_draws: float [D, C, C] per draw.
      set_sizes: int [C] |S(a)|.
      n_random: D.
      seed: RNG seed of the random draws.
    """

    kind: str
    baseline: dict[str, float]
    isn: np.ndarray
    random: np.ndarray
    random_draws: np.ndarray
    set_sizes: np.ndarray
    n_random: int
    seed: int

    @property
    def excess(self) -> np.ndarray:
        """float [C, C] loss increase beyond the random control."""
        return self.isn - self.random

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN -> None); matrices as nested lists in CATEGORIES order."""
        return jsonable({
            "kind": self.kind,
            "categories": list(CATEGORIES),
            "baseline": self.baseline,
            "isn": self.isn,
            "random": self.random,
            "excess": self.excess,
            "random_draws": self.random_draws,
            "set_sizes": by_category(self.set_sizes),
            "n_random": self.n_random,
            "seed": self.seed,
        })


def random_like(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random mask with the same number of True per layer, uniform within each layer.

    Args:
      mask: bool [L, ...].
      rng: generator.

    Returns:
      bool [L, ...].
    """
    n_layers = mask.shape[0]
    flat = mask.reshape(n_layers, -1)
    out = np.zeros_like(flat)
    for layer, k in enumerate(flat.sum(1)):
        if k:
            out[layer, rng.choice(flat.shape[1], size=int(k), replace=False)] = True
    return out.reshape(mask.shape)


def _row(losses: Mapping[str, float], baseline: dict[str, float]) -> np.ndarray:
    losses = {normalize_category(k): float(v) for k, v in losses.items()}
    return np.array([losses.get(c, np.nan) - baseline.get(c, np.nan) for c in CATEGORIES])


def ablation_matrix(
    category_sets: Mapping[str, np.ndarray],
    loss_fn: LossFn,
    *,
    n_random: int = 3,
    seed: int = 0,
    kind: str = "neurons",
) -> AblationResult:
    """Loss increase of every category when each category's set is switched off.

    Args:
      category_sets: {category: bool [L, F] (neurons) or [L, E] (experts)};
        missing categories give NaN rows.
      loss_fn: mask (True = off) or None -> {category: mean loss}.
      n_random: random control draws per category.
      seed: RNG seed (draw order: category, then draw, then layer).
      kind: "neurons" or "experts" (for experts a layer may not lose all its
        experts, since routing then has nothing to renormalise over).

    Returns:
      An AblationResult. An empty set ablates nothing: its rows are 0 without
      calling the model.
    """
    if kind not in ("neurons", "experts"):
        raise ValueError(f"kind must be 'neurons' or 'experts', got {kind!r}")
    sets = {normalize_category(k): np.asarray(v, dtype=bool) for k, v in category_sets.items()}
    baseline = {normalize_category(k): float(v) for k, v in loss_fn(None).items()}
    isn = np.full((C, C), np.nan)
    draws = np.full((n_random, C, C), np.nan)
    sizes = np.zeros(C, np.int64)
    rng = np.random.default_rng(seed)
    for a, cat in enumerate(CATEGORIES):
        if cat not in sets:
            continue
        mask = sets[cat]
        if kind == "experts":
            full = mask.reshape(mask.shape[0], -1).all(1)
            if full.any():
                raise ValueError(
                    f"{cat}: its ISEs cover every expert of layer(s) {np.flatnonzero(full).tolist()}"
                )
        sizes[a] = mask.sum()
        if not sizes[a]:
            isn[a] = draws[:, a] = 0.0
            continue
        isn[a] = _row(loss_fn(mask), baseline)
        for d in range(n_random):
            draws[d, a] = _row(loss_fn(random_like(mask, rng)), baseline)
    rand = draws.mean(0) if n_random else np.full((C, C), np.nan)
    return AblationResult(kind=kind, baseline=baseline, isn=isn, random=rand,
                          random_draws=draws, set_sizes=sizes, n_random=n_random, seed=seed)
