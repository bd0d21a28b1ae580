"""Step 2 of SPARCOM: generality, uniqueness, overlaps and layer profiles.

Inputs are category sets bool [C, *U] (rows in CATEGORIES order, U = (L, ...))
and, for instruction-level overlap, an `Identification` holding S(I).
Undefined ratios (0/0, e.g. the Jaccard of two empty sets) are NaN, never 0.
"""

from __future__ import annotations

import numpy as np

from sparcom_jax.analysis.common import C, nan_mean, safe_div
from sparcom_jax.analysis.identify import Identification


def set_sizes(sets: np.ndarray) -> np.ndarray:
    """int [C] |S(c)| of bool [C, *U] sets."""
    return sets.reshape(sets.shape[0], -1).sum(1)


def category_overlap(sets: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise overlap of category sets.

    Args:
      sets: bool [C, *U].
      present: optional bool [C], the categories that have instructions; an absent
        category's empty set overlaps nothing because it was not measured, so its
        rows and columns are NaN (default: every category present).

    Returns:
      (jaccard [C, C] = |A∩B| / |A∪B|, overlap coefficient [C, C] =
      |A∩B| / min(|A|, |B|)); NaN where the denominator is 0 or a category is absent.
    """
    x = sets.reshape(sets.shape[0], -1).astype(np.float64)
    inter = x @ x.T  # exact: integer sums far below 2**53
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    jac, coef = safe_div(inter, union), safe_div(inter, np.minimum(size[:, None], size[None, :]))
    if present is not None:
        absent = ~np.asarray(present, bool)
        for m in (jac, coef):
            m[absent, :] = np.nan
            m[:, absent] = np.nan
    return jac, coef


# Bytes of float32 instruction rows one block of `instruction_jaccard` holds (analysis.memory sizes from it).
JACCARD_BLOCK_BYTES = 1 << 27


def instruction_jaccard(ident: Identification, *, budget_bytes: int = JACCARD_BLOCK_BYTES) -> np.ndarray:
    """Jaccard of every pair of instruction sets.

    |A∩B| = X X^T over float32 blocks of rows (exact: counts < 2**24), |A∪B| =
    |A| + |B| - |A∩B|, so no [N, N, U] tensor is formed; each block holds at most
    `budget_bytes` of float32 rows.

    Args:
      ident: an Identification with instruction sets kept.
      budget_bytes: memory for one block of float32 rows.

    Returns:
      float32 [N, N] in the instructions' original order; NaN where both sets
      are empty; 1 on the diagonal for non-empty sets.
    """
    n, u = ident.n, ident.n_units
    if u >= 1 << 24:
        raise ValueError(f"{u} units exceed exact float32 counting; split the field")
    # |A| + |B| is exact in float32 below 2**24, and so is the quotient of two exact integers
    # (float32 division rounds once, like float64 division rounded to float32), at half the
    # memory of float64 [b, b] intersections, unions and quotients.
    dtype = np.float32 if 2 * u < 1 << 24 else np.float64
    size = ident.instruction_size.astype(dtype)
    out = np.empty((n, n), np.float32)
    b = max(1, budget_bytes // (4 * max(u, 1)))
    for i0 in range(0, n, b):
        xi = ident.instruction_rows(i0, min(i0 + b, n)).astype(np.float32)
        for j0 in range(i0, n, b):
            xj = xi if j0 == i0 else ident.instruction_rows(j0, min(j0 + b, n)).astype(np.float32)
            inter = (xi @ xj.T).astype(dtype, copy=False)
            union = size[i0:i0 + xi.shape[0], None] + size[None, j0:j0 + xj.shape[0]] - inter
            jac = safe_div(inter, union, dtype)
            out[i0:i0 + xi.shape[0], j0:j0 + xj.shape[0]] = jac
            out[j0:j0 + xj.shape[0], i0:i0 + xi.shape[0]] = jac.T
    return out


def pair_terms(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, N] values and 0/1 validity of the pairs a block mean averages:
    self-pairs and NaN entries (undefined Jaccard) have value 0 and validity 0."""
    valid = np.isfinite(pair)
    np.fill_diagonal(valid, False)
    return np.where(valid, pair, 0.0).astype(np.float64), valid.astype(np.float64)


def category_block_means(
    pair: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
) -> np.ndarray:
    """Mean of an instruction x instruction matrix within category blocks.

    Self-pairs (the diagonal) are excluded, so the diagonal block of c is the
    mean over ordered pairs I != I' in c; NaN entries (undefined Jaccard) are
    skipped.

    Args:
      pair: float [N, N], symmetric.
      labels: int [N] category indices.
      weights: optional float [N] multiplicities (bootstrap resamples), or
        [B, N] for B weightings at once.

    Returns:
      float [C, C], or [B, C, C] for 2-D weights; NaN for blocks with no pair.
    """
    vals, valid = pair_terms(pair)
    y = np.eye(C)[labels]  # [N, C] one-hot
    if weights is None:
        return safe_div(y.T @ vals @ y, y.T @ valid @ y)
    w = np.atleast_2d(weights).astype(np.float64)           # [B, N]
    yw = w[:, :, None] * y[None]                              # [B, N, C]
    sums = np.einsum("bnc,nm,bmd->bcd", yw, vals, yw, optimize=True)
    cnts = np.einsum("bnc,nm,bmd->bcd", yw, valid, yw, optimize=True)
    out = safe_div(sums, cnts)
    return out if np.ndim(weights) == 2 else out[0]


def diagonal_dominance(block: np.ndarray) -> float:
    """Mean of the diagonal minus mean of the off-diagonal of a [C, C] matrix (finite entries)."""
    block = np.asarray(block, dtype=np.float64)
    off = ~np.eye(block.shape[0], dtype=bool)
    return nan_mean(np.diag(block)) - nan_mean(block[off])


def per_category_dominance(block: np.ndarray) -> np.ndarray:
    """Diagonal dominance of each category of a [C, C] block-mean matrix.

    dominance_c = block[c, c] - (unweighted mean of the finite block[c, b], b != c):
    the mean same-category pairwise Jaccard minus the plain average of c's five
    cross-category block means (each block mean is itself a mean over its
    instruction pairs; blocks are not weighted by their number of pairs, so
    every other category counts once, whatever its size). `block` is symmetric,
    so row and column give the same value.

    Args:
      block: float [..., C, C] (e.g. [P, C, C] for bootstrap replicates).

    Returns:
      float [..., C]; NaN where the diagonal or every cross block is undefined.
    """
    block = np.asarray(block, dtype=np.float64)
    c = block.shape[-1]
    off = ~np.eye(c, dtype=bool)
    cross = np.where(off & np.isfinite(block), block, 0.0)
    n_cross = (off & np.isfinite(block)).sum(-1)
    cross_mean = safe_div(cross.sum(-1), n_cross)
    return np.diagonal(block, axis1=-2, axis2=-1) - cross_mean


def average_ranks(x) -> np.ndarray:
    """1-based ranks of x, ties given the mean of the ranks they span (float64 [n])."""
    _, inv, cnt = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(cnt)
    return ((ends - cnt + 1 + ends) / 2.0)[inv.ravel()]


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when
    fewer than 3 pairs or either variable is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[0] < 3:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def size_vs_length(sizes: np.ndarray, tokens: np.ndarray, labels: np.ndarray) -> dict:
    """|S(I)| against prompt length T(I).

    Args:
      sizes: int [N] |S(I)|.
      tokens: int [N] T(I).
      labels: int [N] category indices.

    Returns:
      dict: `spearman` (all instructions), `per_category` {c: {n, mean_tokens,
      mean_set_size, spearman}} (index c into CATEGORIES), and the per-instruction
      `tokens`, `set_size`, `category` (index) lists for a scatter plot.
    """
    per = {}
    for c in range(C):
        m = labels == c
        per[c] = {"n": int(m.sum()), "mean_tokens": nan_mean(tokens[m]), "mean_set_size": nan_mean(sizes[m]),
                  "spearman": spearman(sizes[m], tokens[m])}
    return {"spearman": spearman(sizes, tokens), "per_category": per,
            "tokens": np.asarray(tokens), "set_size": np.asarray(sizes), "category": np.asarray(labels)}


def category_order(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instruction order grouped by category (stable) and the block boundaries.

    Returns:
      (order int [N], bounds int [C + 1]): instructions of category c are
      order[bounds[c]:bounds[c + 1]].
    """
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=C))])
    return order, bounds


def generality(sets: np.ndarray, present: np.ndarray | None = None) -> dict:
    """Units shared by every category that has instructions.

    Args:
      sets: bool [C, *U].
      present: optional bool [C], the categories that have instructions (default: all).
        A category without instructions has an empty set because it was not measured;
        counted among "every category" it made `general` 0 whatever the others share.

    Returns:
      dict with `general` (units in all present categories' sets), `union` (units in
      any set), `general_share` (general / union, NaN if the union is empty),
      `breadth_histogram` int [C]: entry k-1 counts units in exactly k sets, and
      `general_mask` bool [*U]. With fewer than two categories present "in every set" is
      only "in the one set" (general would equal the union, a share of 1): `general` and
      `general_share` are then NaN and `general_mask` is all False.
    """
    present = np.ones(sets.shape[0], bool) if present is None else np.asarray(present, bool)
    breadth = sets.reshape(sets.shape[0], -1)[present].sum(0)
    n_sets = int(present.sum())
    general_mask = (breadth == n_sets) & (n_sets > 1)
    general = int(general_mask.sum()) if n_sets > 1 else np.nan
    union = int((breadth > 0).sum())
    return {
        "general": general,
        "union": union,
        "general_share": float(safe_div(general, union)),
        "breadth_histogram": np.bincount(breadth, minlength=sets.shape[0] + 1)[1:],
        "general_mask": general_mask.reshape(sets.shape[1:]),
    }


def uniqueness(sets: np.ndarray) -> dict:
    """U(c) = S(c) minus the union of the other categories' sets.

    Args:
      sets: bool [C, *U].

    Returns:
      dict with `unique` int [C] = |U(c)|, `unique_ratio` float [C] =
      |U(c)| / |S(c)| (NaN for empty S(c)), `unique_sets` bool [C, *U].
    """
    breadth = sets.sum(0)
    uniq = sets & (breadth == 1)[None]
    n_uniq = set_sizes(uniq)
    return {"unique": n_uniq, "unique_ratio": safe_div(n_uniq, set_sizes(sets)), "unique_sets": uniq}


def layer_distribution(sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selected units per layer.

    Args:
      sets: bool [C, L, ...] (layer is the first unit axis).

    Returns:
      (count int [C, L], share float [C, L] = count / units per layer).
    """
    count = sets.reshape(sets.shape[0], sets.shape[1], -1).sum(2)
    width = int(np.prod(sets.shape[2:]))
    return count, count / width


def _three_step_costs(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares residuals of the three-constant-piece fits of each row of y [P, L]
    (L >= 3), over every pair of boundaries 1 <= b1 < b2 <= L-1 at once (O(L^2) with
    prefix sums).

    Returns:
      (cost float [P, K] of the K pairs, ordered by b1 then b2; b1 int [K]; b2 int [K]).
    """
    p, n_layers = y.shape
    zero = np.zeros((p, 1))
    s1 = np.concatenate([zero, np.cumsum(y, 1)], 1)
    s2 = np.concatenate([zero, np.cumsum(y * y, 1)], 1)
    b1, b2 = np.triu_indices(n_layers, k=1)
    keep = b1 >= 1
    b1, b2 = b1[keep], b2[keep]

    def sse(a, b):
        return s2[:, b] - s2[:, a] - (s1[:, b] - s1[:, a]) ** 2 / (b - a)

    cost = sse(np.zeros_like(b1), b1) + sse(b1, b2) + sse(b2, np.full_like(b2, n_layers))
    return cost, b1, b2


def locate_phases(profile, n_perm: int = 0, seed: int = 0) -> dict:
    """Split a per-layer profile into early, middle and late phases.

    Rule: the two boundaries 1 <= b1 < b2 <= L-1 that best fit the profile by
    three constant segments [0, b1), [b1, b2), [b2, L) in least squares
    (exhaustive search, O(L^2) with prefix sums; ties go to the earliest
    boundaries). This finds where the profile steps down or up without assuming
    the phases are thirds. `explained` = 1 - residual / total sum of squares
    tells how step-like the profile is (None for a flat profile, where any split
    fits). `early_dominant` is the paper's pattern: the early phase has more
    units per layer than both the middle and the late phase.

    The best of (L-1)(L-2)/2 fits explains much of any profile: on flat profiles
    with Poisson noise (mean 100 per layer) `explained` averages 0.93 at L = 4, 0.66
    at L = 8 and 0.27 at L = 32, and `early_dominant` holds for a quarter to a
    third of them. `explained_p` therefore compares `explained` with the same fit
    on the layers in random order: (1 + #{shuffled >= observed}) / (1 + n_perm). A
    small value says the profile has more structure along depth than its values
    in random order; it does not say the structure is three phases (a steady
    decline also gives a small p) nor which phase is largest.

    Args:
      profile: float [L] units per layer.
      n_perm: layer-order shuffles for `explained_p` (0 = no test).
      seed: RNG seed of the shuffles.

    Returns:
      dict with `boundaries` [b1, b2] (first layer of middle and late; 0-based),
      per-phase `layers` [first, last] and `mean`, `explained`, `early_dominant`,
      `explained_p` (None without shuffles or for a flat profile) and `n_perm`;
      for L < 3 the boundaries and phases are None.
    """
    y = np.asarray(profile, dtype=np.float64)
    n_layers = y.shape[0]
    if n_layers < 3:
        return {"rule": "three-segment least squares", "boundaries": None, "early": None,
                "middle": None, "late": None, "explained": None, "early_dominant": None,
                "explained_p": None, "n_perm": n_perm}
    cost, b1s, b2s = _three_step_costs(y[None])
    cost = cost[0]
    # The residual of one constant over all layers; exactly 0 for a flat profile, whose sum of
    # squares minus squared sum leaves float rounding (+-1e-12 for 80 layers of 7.3) that gave
    # `explained` values such as 5.0.
    total = 0.0 if np.ptp(y) == 0 else float(y @ y - y.sum() ** 2 / n_layers)
    tol = 1e-9 * max(1.0, total)
    # The earliest pair within the tolerance of the least residual: float rounding must not
    # let a later split that ties exactly look better.
    k = int(np.flatnonzero(cost <= cost.min() + tol)[0])
    b1, b2, best_cost = int(b1s[k]), int(b2s[k]), float(cost[k])
    spans = {"early": (0, b1), "middle": (b1, b2), "late": (b2, n_layers)}
    phases = {k: {"layers": [a, b - 1], "mean": float(y[a:b].mean())} for k, (a, b) in spans.items()}
    means = {k: v["mean"] for k, v in phases.items()}
    explained_p = None
    if n_perm > 0 and total > 0:
        rng = np.random.default_rng(seed)
        shuffled = np.stack([rng.permutation(y) for _ in range(n_perm)])
        # Residuals compared directly (the total is the same for every order); the tolerance
        # lets an order that reproduces the observed fit count despite another summation order.
        n_ge = int((_three_step_costs(shuffled)[0].min(1) <= best_cost + tol).sum())
        explained_p = (1 + n_ge) / (1 + n_perm)
    return {
        "rule": "three-segment least squares",
        "boundaries": [b1, b2],
        **phases,
        "explained": float(1.0 - best_cost / total) if total > 0 else None,
        "early_dominant": bool(means["early"] > means["middle"] and means["early"] > means["late"]),
        "explained_p": explained_p,
        "n_perm": n_perm,
    }
