"""Uncertainty: bootstrap intervals over instructions and a permutation test.

Bootstrap: within each category, draw n_c instructions with replacement,
rebuild the category sets with the same rule, recompute the figures, and take
percentile intervals. A resample is a vector of multiplicities w [N], so the
category aggregate (votes for consensus, summed frequencies for pooled) of B
resamples at once is one matrix product W [B, N] @ V [N, U] per chunk of rows.

Permutation test: shuffle the category labels over instructions (sizes kept)
and recompute diag-minus-off-diagonal of the instruction-level 6x6 overlap.
"""

from __future__ import annotations

import numpy as np

from sparcom_jax.analysis.common import C, safe_div
from sparcom_jax.analysis.evaluate import (
    category_block_means, category_overlap, diagonal_dominance, set_sizes,
)
from sparcom_jax.analysis.identify import _TOL, Identification, select_units
from sparcom_jax.stats.counts import Counts


def resample_weights(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Multiplicities of B stratified resamples.

    Args:
      labels: int [N] category indices.
      n_boot: B.
      seed: RNG seed (draw order: replicate, then category).

    Returns:
      float32 [B, N]; each category's weights sum to its size n_c.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    groups = [np.flatnonzero(labels == c) for c in range(C)]
    w = np.zeros((n_boot, n), np.float32)
    for b in range(n_boot):
        for idx in groups:
            if idx.size:
                w[b] += np.bincount(rng.choice(idx, size=idx.size, replace=True), minlength=n)
    return w


def _replicate_stats(sets: np.ndarray) -> dict[str, np.ndarray]:
    """Figures bootstrapped for one replicate's sets bool [C, U]."""
    jac, coef = category_overlap(sets)
    breadth = sets.sum(0)
    union = int((breadth > 0).sum())
    general = int((breadth == C).sum())
    return {
        "per_category_count": set_sizes(sets),
        "unique": (sets & (breadth == 1)[None]).sum(1),
        "general": np.asarray(general),
        "general_share": np.asarray(general / union if union else np.nan),
        "overlap_jaccard": jac,
        "overlap_coefficient": coef,
    }


def _row_source(ident: Identification, counts: Counts | None, chunk: int):
    """Yield (start, float32 [n, U]) rows that the category aggregate sums."""
    if ident.config.aggregation == "consensus":
        for s in range(0, ident.n, chunk):
            yield s, ident.instruction_rows(s, min(s + chunk, ident.n)).astype(np.float32)
    else:
        if counts is None:
            raise ValueError("the pooled rule re-reads frequencies: pass counts=")
        for s, f in counts.iter_frequencies(ident.field, chunk):
            yield s, f.reshape(f.shape[0], -1)


def bootstrap(
    ident: Identification,
    *,
    counts: Counts | None = None,
    instruction_matrix: np.ndarray | None = None,
    n_boot: int = 100,
    seed: int = 0,
    ci: float = 0.95,
    budget_bytes: int = 1 << 28,
) -> dict:
    """Percentile bootstrap intervals over instructions.

    Args:
      ident: identification; with the consensus rule it must keep S(I).
      counts: the counts (needed for the pooled rule, which re-reads frequencies).
      instruction_matrix: optional float [N, N] instruction Jaccard; adds
        intervals for the instruction-level 6x6 overlap.
      n_boot: replicates.
      seed: RNG seed.
      ci: interval coverage.
      budget_bytes: memory for the float32 aggregates of one batch of replicates.

    Returns:
      dict: n_boot, seed, ci, and for each figure (per_category_count, unique,
      general, general_share, overlap_jaccard, overlap_coefficient,
      [instruction_overlap]) {"low": ..., "high": ...} with the figure's shape.
    """
    cfg = ident.config
    u = ident.n_units
    w_all = resample_weights(ident.labels, n_boot, seed)
    n_c = ident.n_per_category.astype(np.float64)
    batch = max(1, budget_bytes // (4 * C * max(u, 1)))
    reps: dict[str, list] = {}
    for b0 in range(0, n_boot, batch):
        w = w_all[b0:b0 + batch]
        agg = np.zeros((w.shape[0], C, u), np.float32)
        for s, rows in _row_source(ident, counts, cfg.chunk):
            lab = ident.labels[s:s + rows.shape[0]]
            for c in np.unique(lab):
                m = lab == c
                agg[:, c] += w[:, s:s + rows.shape[0]][:, m] @ rows[m]
        for r in range(w.shape[0]):
            if cfg.aggregation == "consensus":
                sets = (agg[r] >= cfg.q * n_c[:, None] - _TOL) & (n_c[:, None] > 0)
            else:
                sets = select_units(agg[r] / np.maximum(n_c, 1)[:, None], cfg, ident.field)
            for k, v in _replicate_stats(sets).items():
                reps.setdefault(k, []).append(v)
    if instruction_matrix is not None:
        reps["instruction_overlap"] = list(
            category_block_means(instruction_matrix, ident.labels, w_all))
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {"n_boot": n_boot, "seed": seed, "ci": ci}
    for k, v in reps.items():
        arr = np.asarray(v, dtype=np.float64)
        out[k] = {"low": _nanpercentile(arr, lo), "high": _nanpercentile(arr, hi)}
    return out


def _nanpercentile(a: np.ndarray, q: float) -> np.ndarray:
    """np.nanpercentile over axis 0, NaN (without a warning) where all are NaN."""
    ok = np.isfinite(a).any(0)
    out = np.full(a.shape[1:], np.nan)
    if np.any(ok):
        out[ok] = np.nanpercentile(a[:, ok], q, axis=0)
    return out


def permutation_test(
    instruction_matrix: np.ndarray, labels: np.ndarray, *, n_perm: int = 999, seed: int = 0,
    batch: int = 64,
) -> dict:
    """Is the diagonal of the instruction-level overlap larger than chance?

    Statistic: mean diagonal minus mean off-diagonal of the 6x6 mean pairwise
    Jaccard (self-pairs excluded). Null: the same with category labels shuffled
    over instructions. p = (1 + #{null >= observed}) / (1 + n_perm).

    Args:
      instruction_matrix: float [N, N] instruction Jaccard.
      labels: int [N] category indices.
      n_perm: permutations.
      seed: RNG seed.
      batch: permutations evaluated per matrix product.

    Returns:
      dict with statistic, p_value, n_perm, seed, null_mean, null_std.
    """
    obs = diagonal_dominance(category_block_means(instruction_matrix, labels))
    valid = np.isfinite(instruction_matrix)
    np.fill_diagonal(valid, False)
    vals = np.where(valid, instruction_matrix, 0.0).astype(np.float64)
    valid = valid.astype(np.float64)
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    null = []
    for p0 in range(0, n_perm, batch):
        perms = np.stack([rng.permutation(labels) for _ in range(min(batch, n_perm - p0))])
        y = np.zeros((n, perms.shape[0], C))                      # [N, P, C] one-hot
        y[np.arange(n)[:, None], np.arange(perms.shape[0])[None], perms.T] = 1.0
        flat = y.reshape(n, -1)
        # One [N, N] @ [N, P*C] product per batch instead of P small ones.
        sums = np.einsum("npc,npd->pcd", y, (vals @ flat).reshape(y.shape))
        cnts = np.einsum("npc,npd->pcd", y, (valid @ flat).reshape(y.shape))
        null.extend(diagonal_dominance(m) for m in safe_div(sums, cnts))
    null = np.asarray(null, dtype=np.float64)
    fin = null[np.isfinite(null)]
    return {
        "statistic": obs,
        # A tolerance so that a shuffle reproducing the observed labels counts despite
        # a different summation order; undefined null values count as exceeding
        # (conservative); no p-value when the statistic itself is undefined.
        "p_value": (float((1 + np.sum(~np.isfinite(null) | (null >= obs - 1e-12))) / (1 + n_perm))
                    if n_perm and np.isfinite(obs) else None),
        "n_perm": n_perm,
        "seed": seed,
        "null_mean": float(fin.mean()) if fin.size else None,
        "null_std": float(fin.std()) if fin.size else None,
    }
