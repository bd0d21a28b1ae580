"""Uncertainty: bootstrap intervals over instructions and a permutation test.

The unit of both is a cluster of records (`cluster_index`): the records of one
category that share a group key (`sparcom_jax.data.splits.group_ids`: by
default instructions whose word sets overlap by a Jaccard >= 0.6, chained; or
identical text) are near-duplicates that share most of their tokens, so they are
drawn and shuffled together, never as independent records. Without group keys
every record is its own cluster and both reduce
exactly (same draws for the same seed) to the record-level procedures.

Bootstrap: within each category, draw its g_c clusters with replacement (the
cluster bootstrap), rebuild the category sets with the same rule, recompute the
figures, and take percentile intervals. A resample is a vector of multiplicities
w [N] (a record's weight is how often its cluster was drawn), so the category
aggregate (votes for consensus, summed frequencies for pooled) of B resamples at
once is one matrix product W [B, N] @ V [N, U] per chunk of rows. With clusters
of unequal size a replicate's category size (its weight sum) varies, and the
consensus cut (a fraction q of the category's instructions) and the pooled mean
use each replicate's own size.

The set figures are built from thresholded sets (a unit is in S(c) only past a
cut), so resampling moves the units near the cut in or out and a figure can
shrink or grow on average (the general set, an intersection of six noisy sets,
often shrinks; a consensus set with many units just below q grows). Each figure
therefore also carries its bootstrap bias (mean replicate minus estimate) and
whether its estimate lies outside its own interval: there the interval shows
the spread of the figure over resampled studies, not coverage of the true
value. A bias-corrected (BC) percentile interval does not help on these
discrete figures: it degenerates to a point exactly where every replicate falls
on one side of the estimate.

Permutation test: shuffle the category labels over clusters (every category
keeps its number of clusters; within each source stratum when sources are
given) and recompute diag-minus-off-diagonal of the instruction-level 6x6
overlap, overall and per category. With clusters of unequal size the
categories' record counts vary between permutations; the statistic is a mean of
pair terms within blocks, so it stays defined (a block with no pair is NaN and
a NaN null value counts as exceeding the observed one).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sparcom_jax.analysis.common import C, safe_div
from sparcom_jax.analysis.compare import SET_KEYS, compare_sets
from sparcom_jax.analysis.evaluate import (
    category_block_means, category_overlap, diagonal_dominance, generality, pair_terms,
    per_category_dominance, set_sizes, uniqueness,
)
from sparcom_jax.analysis.identify import (
    Identification, _strength, consensus_sets, exact_frequencies, select_units,
)
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.stats.counts import Counts

# Bytes of the category aggregates of one batch of bootstrap replicates, and permutations per
# matrix product of the permutation test (analysis.memory sizes the analysis from both).
BOOT_BATCH_BYTES = 1 << 28
PERM_BATCH = 64


def cluster_index(labels: np.ndarray, groups: Sequence | None = None) -> np.ndarray:
    """The resampling unit of each record.

    Records of one category with the same group key form one cluster; a key that
    occurs in two categories gives one cluster per category (a cluster carries one
    label, which the permutation test moves as a whole). Clusters are numbered in
    the order of their first record, so without groups, or with all keys distinct,
    cluster i is record i.

    Args:
      labels: int [N] category indices.
      groups: optional length-N group keys (any hashable values).

    Returns:
      int [N] cluster of each record, numbered 0..K-1.
    """
    n = labels.shape[0]
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} instructions")
    ids: dict = {}
    return np.asarray([ids.setdefault((int(c), g), len(ids)) for c, g in zip(labels, groups)], np.int64)


def _cluster_labels(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """int [K] category of each cluster (clusters numbered by first record)."""
    return labels[np.unique(clusters, return_index=True)[1]]


def units_per_category(labels: np.ndarray, groups: Sequence | None = None) -> np.ndarray:
    """int [C] clusters (resampling units) per category."""
    return np.bincount(_cluster_labels(labels, cluster_index(labels, groups)), minlength=C)


def one_unit_note(boot: dict | None) -> str | None:
    """What to say when a category of a bootstrap result has a single resampling unit: every
    draw within it is that unit again, so the intervals resting on it have no width (they
    measure no variation, which is not certainty). None when every category with records
    has two or more units.

    Args:
      boot: a `bootstrap` / `instruction_bootstrap` result (or its JSON form), or None.
    """
    if not boot:
        return None
    one = [SHORT_NAMES[c] for c, n in zip(CATEGORIES, boot["n_units"]) if n == 1]
    if not one:
        return None
    unit = "instruction group" if boot.get("unit") == "group" else "instruction"
    each = "has a single" if len(one) == 1 else "have a single"
    return (f"{', '.join(one)} {each} {unit}{'' if len(one) == 1 else ' each'}: every resample repeats it, so the "
            "intervals resting on it have zero width and measure no uncertainty (they do not show certainty)")


def resample_weights(labels: np.ndarray, n_boot: int, seed: int, groups: Sequence | None = None) -> np.ndarray:
    """Multiplicities of B stratified (cluster) resamples.

    Within each category its g_c clusters are drawn g_c times with replacement;
    every record of a cluster gets the number of times its cluster was drawn.

    Args:
      labels: int [N] category indices.
      n_boot: B.
      seed: RNG seed (draw order: replicate, then category). Without groups (or
        with all keys distinct) the draws are those of a record bootstrap.
      groups: optional length-N group keys (`cluster_index`).

    Returns:
      float32 [B, N]; each category's weights sum to its size n_c without
      groups, and to the size of the drawn clusters with them.
    """
    rng = np.random.default_rng(seed)
    clusters = cluster_index(labels, groups)
    k = int(clusters.max()) + 1 if clusters.size else 0
    cl_labels = _cluster_labels(labels, clusters)
    members = [np.flatnonzero(cl_labels == c) for c in range(C)]
    w = np.zeros((n_boot, labels.shape[0]), np.float32)
    for b in range(n_boot):
        drawn = np.zeros(k)
        for idx in members:
            if idx.size:
                drawn += np.bincount(rng.choice(idx, size=idx.size, replace=True), minlength=k)
        w[b] = drawn[clusters]
    return w


def _instruction_stats(block: np.ndarray) -> dict[str, np.ndarray]:
    """Figures bootstrapped from one [C, C] instruction-level block-mean matrix."""
    return {"instruction_overlap": block, "diagonal_dominance": np.asarray(diagonal_dominance(block)),
            "per_category_dominance": per_category_dominance(block)}


def _replicate_stats(sets: np.ndarray, present: np.ndarray) -> dict[str, np.ndarray]:
    """Figures bootstrapped for one replicate's sets bool [C, U] (`present`: bool [C], the
    categories with instructions; a replicate draws within each category, so the same)."""
    jac, coef = category_overlap(sets, present)
    gen = generality(sets, present)
    return {
        "per_category_count": set_sizes(sets),
        "unique": uniqueness(sets)["unique"],
        "general": np.asarray(gen["general"]),
        "general_share": np.asarray(gen["general_share"]),
        "overlap_jaccard": jac,
        "overlap_coefficient": coef,
    }


def _row_source(ident: Identification, counts: Counts | None, chunk: int):
    """Yield (start, [n, U] rows that the category aggregate sums: float32 S(I) for
    consensus, float64 exact frequencies for pooled; float32 [n, U] tie-break strengths
    or None)."""
    cfg = ident.config
    if cfg.aggregation == "consensus":
        for s in range(0, ident.n, chunk):
            yield s, ident.instruction_rows(s, min(s + chunk, ident.n)).astype(np.float32), None
    else:
        if counts is None:
            raise ValueError("the pooled rule re-reads frequencies: pass counts=")
        for s, f in counts.iter_frequencies(ident.field, chunk):
            n = f.shape[0]
            st = _strength(counts, ident.field, s, s + n) if cfg.needs_strength else None
            yield s, exact_frequencies(f.reshape(n, -1), counts.tokens[s:s + n]), st


def bootstrap(
    ident: Identification,
    *,
    counts: Counts | None = None,
    instruction_matrix: np.ndarray | None = None,
    n_boot: int = 100,
    seed: int = 0,
    ci: float = 0.95,
    budget_bytes: int = BOOT_BATCH_BYTES,
    groups: Sequence | None = None,
    keep_sets: bool = False,
) -> dict:
    """Percentile bootstrap intervals over instruction clusters (or instructions).

    Args:
      ident: identification; with the consensus rule it must keep S(I).
      counts: the counts (needed for the pooled rule, which re-reads frequencies).
      instruction_matrix: optional float [N, N] instruction Jaccard; adds
        intervals for the instruction-level 6x6 overlap.
      n_boot: replicates.
      seed: RNG seed.
      ci: interval coverage.
      budget_bytes: memory for the float32 aggregates of one batch of replicates.
      groups: length-N group keys (e.g. `ident.groups`): clusters of records are
        resampled (`resample_weights`); None resamples records.
      keep_sets: also return each replicate's category sets and the draws, for a
        paired bootstrap of a comparison between models (`paired_set_intervals`).

    Returns:
      dict: n_boot, seed, ci; unit ("group" or "record": what was resampled)
      and n_units (int [C] clusters drawn from per category); for each figure (per_category_count, unique,
      general, general_share, overlap_jaccard, overlap_coefficient, and with
      the instruction matrix instruction_overlap, diagonal_dominance and
      per_category_dominance) {"low", "high", "bias", "outside"}, each with the
      figure's shape: the percentile interval, the bootstrap bias (mean of the
      replicates where the figure is defined, minus the estimate; NaN where
      either is undefined) and whether the estimate lies outside [low, high];
      and n_outside {figure: number of its entries outside their interval}. With
      keep_sets, also "replicate_sets" (uint8 [B, C, ceil(U/8)], np.packbits of each
      replicate's flattened sets) and "weights" (float32 [B, N], the draws); neither
      is JSON-safe, so pop them before storing the dict.
    """
    cfg = ident.config
    u = ident.n_units
    present = ident.n_per_category > 0
    w_all = resample_weights(ident.labels, n_boot, seed, groups)
    # Each replicate's category sizes (weight sums, [B, C]): with clusters of unequal size they
    # vary, and the consensus cut and the pooled mean are over the replicate's own instructions.
    n_rep = w_all.astype(np.float64) @ np.eye(C)[ident.labels]
    n_agg = 2 if cfg.aggregation == "pooled" and cfg.needs_strength else 1
    # Pooled means are summed in float64 and rounded to float32 once, as identify does, so
    # that exactly equal means stay tied (exact_frequencies); consensus votes are exact in float32.
    dtype = np.float64 if cfg.aggregation == "pooled" else np.float32
    batch = max(1, budget_bytes // (np.dtype(dtype).itemsize * n_agg * C * max(u, 1)))
    reps: dict[str, list] = {}
    kept: list[np.ndarray] = []
    for b0 in range(0, n_boot, batch):
        w = w_all[b0:b0 + batch].astype(dtype)
        agg = np.zeros((w.shape[0], C, u), dtype)
        agg_strength = np.zeros_like(agg) if n_agg == 2 else None
        for s, rows, strength in _row_source(ident, counts, cfg.chunk):
            lab = ident.labels[s:s + rows.shape[0]]
            for c in np.unique(lab):
                m = lab == c
                wc = w[:, s:s + rows.shape[0]][:, m]
                agg[:, c] += wc @ rows[m]
                if agg_strength is not None:
                    agg_strength[:, c] += wc @ strength[m]
        for r in range(w.shape[0]):
            n_r = n_rep[b0 + r]
            denom = np.maximum(n_r, 1)[:, None]
            if cfg.aggregation == "consensus":
                sets = consensus_sets(agg[r], n_r, cfg.q)
            else:
                sets = select_units((agg[r] / denom).astype(np.float32), cfg, ident.field,
                                    None if agg_strength is None else (agg_strength[r] / denom).astype(np.float32))
            for k, v in _replicate_stats(sets, present).items():
                reps.setdefault(k, []).append(v)
            if keep_sets:
                kept.append(np.packbits(sets, axis=1))
        # The aggregates are not needed past their batch: held on, they sat beside the
        # instruction-level replicates' [N, N] and [B, N, C] float64 arrays.
        del agg, agg_strength
    est = _replicate_stats(ident.category_sets.reshape(C, -1), present)
    if instruction_matrix is not None:
        ins_est, ins_reps = _instruction_replicates(instruction_matrix, ident.labels, w_all)
        est.update(ins_est)
        reps.update(ins_reps)
    out = {"n_boot": n_boot, "seed": seed, "ci": ci, "unit": "record" if groups is None else "group",
           "n_units": units_per_category(ident.labels, groups), **percentile_intervals(reps, est, ci)}
    if keep_sets:
        out["replicate_sets"] = np.stack(kept) if kept else np.zeros((0, C, (u + 7) // 8), np.uint8)
        out["weights"] = w_all
    return out


def paired_intervals(estimates: Sequence[np.ndarray], replicates: Sequence[np.ndarray], figures,
                     ci: float = 0.95, extra: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
    """Bootstrap intervals of figures of several models' category sets, paired by draw.

    Every model was identified on the same records and resampled with the same draws
    (the same instructions in every replicate), so `figures` sees replicate r of every
    model together: a difference between models is computed within one draw, and its
    interval holds only the variation with the instructions drawn that the models do
    not share.

    Args:
      estimates: M bool [C, *U] the models' category sets (the estimates).
      replicates: M uint8 [B, C, ceil(U/8)] packed replicate sets
        (`bootstrap(keep_sets=True)`), all drawn with the same weights.
      figures: callable(list of M bool [C, U]) -> {figure: array}.
      ci: interval coverage.
      extra: optional (estimates, replicates) of more figures ({figure: value},
        {figure: B values}) from the same draws, put through the same intervals.

    Returns:
      ({figure: the estimate} (`figures` of `estimates`, and extra's), the intervals:
      {figure: {"low", "high", "bias", "outside"}} and "n_outside" (`percentile_intervals`)).
    """
    c = estimates[0].shape[0]
    u = int(np.prod(estimates[0].shape[1:]))
    reps: dict[str, list] = {}
    for packed in zip(*replicates, strict=True):
        for k, v in figures([np.unpackbits(x, axis=1, count=u).astype(bool) for x in packed]).items():
            reps.setdefault(k, []).append(v)
    est = figures([e.reshape(c, u) for e in estimates])
    if extra is not None:
        est.update(extra[0])
        reps.update(extra[1])
    return est, percentile_intervals(reps, est, ci)


def set_figures(before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """{figure of `compare.SET_KEYS`: float [C]} of two models' sets bool [C, U]."""
    r = compare_sets(before[:, None], after[:, None])
    return {k: r[k] for k in SET_KEYS}


def paired_set_intervals(before: np.ndarray, after: np.ndarray, reps_before: np.ndarray,
                         reps_after: np.ndarray, ci: float = 0.95) -> dict:
    """Bootstrap intervals of a before/after comparison of category sets, paired by draw.

    Replicate r of one model is compared with replicate r of the other
    (`paired_intervals`): the intervals show how retained, gained, lost and the
    Jaccard vary with the instructions drawn. They do not say how much two models
    with the same weights would differ (the precision and same-template controls
    bear on that).

    Args:
      before, after: bool [C, *U] the two models' category sets (the estimates).
      reps_before, reps_after: uint8 [B, C, ceil(U/8)] packed replicate sets
        (`bootstrap(keep_sets=True)`), drawn with the same weights.
      ci: interval coverage.

    Returns:
      {figure: {"low", "high", "bias", "outside"} (float [C] each)} for the figures of
      `compare.SET_KEYS`, and "n_outside" (`percentile_intervals`).
    """
    return paired_intervals([before, after], [reps_before, reps_after], lambda s: set_figures(*s), ci)[1]


# Figures of a checkpoint series with a paired interval at every checkpoint; those of SERIES_CHANGE
# also as the change from the first to the last checkpoint (`series_figures`).
SERIES_CHANGE = ("per_category_count", "unique", "unique_ratio", "general", "general_share", "union")


def series_figures(sets: Sequence[np.ndarray], present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The trends of a checkpoint series and their change from first to last.

    Args:
      sets: S bool [C, U] category sets, in series order.
      present: optional bool [C], the categories with instructions (`generality`).

    Returns:
      {figure: float [S, C] or [S]} for the figures of SERIES_CHANGE, "vs_base_jaccard" and
      "vs_previous_jaccard" (NaN at the first checkpoint), and "change_<figure>" (float [C]
      or scalar: last minus first) for those of SERIES_CHANGE.
    """
    def figures(s):
        u, g = uniqueness(s), generality(s, present)
        return {"per_category_count": set_sizes(s), "unique": u["unique"], "unique_ratio": u["unique_ratio"],
                **{k: np.asarray(g[k]) for k in ("general", "general_share", "union")}}

    per = [figures(s) for s in sets]
    out = {k: np.stack([p[k] for p in per]).astype(np.float64) for k in SERIES_CHANGE}
    out["vs_base_jaccard"] = np.stack([set_figures(sets[0], s)["jaccard"] for s in sets])
    out["vs_previous_jaccard"] = np.stack([np.full(sets[0].shape[0], np.nan)]
                                          + [set_figures(p, s)["jaccard"] for p, s in zip(sets, sets[1:])])
    out.update({f"change_{k}": out[k][-1] - out[k][0] for k in SERIES_CHANGE})
    return out


def series_dominance(instruction_matrices: Sequence[np.ndarray], labels: np.ndarray,
                     weights: np.ndarray) -> tuple[dict, dict]:
    """(estimates, replicates) of the diagonal dominance along a series and of its change
    from first to last, every checkpoint's block means taken under the same draws.

    Args:
      instruction_matrices: S float [N, N] instruction Jaccard of each checkpoint.
      labels: int [N] category indices.
      weights: float [B, N] the draws (`resample_weights`).

    Returns:
      ({"diagonal_dominance": float [S], "change_diagonal_dominance": float},
       {the same two: B replicate values each}).
    """
    est = np.array([diagonal_dominance(category_block_means(m, labels)) for m in instruction_matrices])
    reps = np.array([[diagonal_dominance(b) for b in category_block_means(m, labels, weights)]
                     for m in instruction_matrices]).T  # [B, S]
    return ({"diagonal_dominance": est, "change_diagonal_dominance": est[-1] - est[0]},
            {"diagonal_dominance": list(reps), "change_diagonal_dominance": list(reps[:, -1] - reps[:, 0])})


def instruction_bootstrap(instruction_matrix: np.ndarray, labels: np.ndarray, groups: Sequence, *,
                          n_boot: int, seed: int, ci: float = 0.95) -> dict:
    """Cluster-bootstrap intervals of the instruction-level figures alone (instruction_overlap,
    diagonal_dominance, per_category_dominance), e.g. for a matrix whose within-group pairs
    are NaN (`sparcom_jax.analysis.study.between_groups`).

    The draws are `resample_weights(labels, n_boot, seed, groups)`: the same as those of
    `bootstrap` with the same seed and groups, so both intervals rest on one set of resamples.
    NaN pairs stay out of every replicate's block means, whichever copies of their records
    were drawn.

    Args:
      instruction_matrix: float [N, N] instruction Jaccard (NaN pairs are left out).
      labels: int [N] category indices.
      groups: length-N group keys.
      n_boot: replicates.
      seed: RNG seed.
      ci: interval coverage.

    Returns:
      dict: n_boot, seed, ci, unit ("group"), n_units (int [C] groups drawn from per
      category), the three figures as in `bootstrap`, and n_outside.
    """
    est, reps = _instruction_replicates(instruction_matrix, labels, resample_weights(labels, n_boot, seed, groups))
    return {"n_boot": n_boot, "seed": seed, "ci": ci, "unit": "group", "n_units": units_per_category(labels, groups),
            **percentile_intervals(reps, est, ci)}


def _instruction_replicates(instruction_matrix: np.ndarray, labels: np.ndarray,
                            w: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """(estimate, replicates) of the instruction-level figures (`_instruction_stats`): of the
    unweighted block means, and of those under each row of the weights `w` [B, N]."""
    reps: dict[str, list] = {}
    for block in category_block_means(instruction_matrix, labels, w):
        for k, v in _instruction_stats(block).items():
            reps.setdefault(k, []).append(v)
    return _instruction_stats(category_block_means(instruction_matrix, labels)), reps


def percentile_intervals(reps: dict[str, list], est: dict[str, np.ndarray], ci: float) -> dict:
    """Percentile interval, bootstrap bias and outside flag of every replicated figure.

    Args:
      reps: {figure: B replicate values, each of the figure's shape}.
      est: {figure: the estimate} for every figure of `reps`.
      ci: interval coverage.

    Returns:
      {figure: {"low", "high", "bias", "outside"}} (NaN bias where the estimate or every
      replicate is undefined; outside: the estimate lies outside [low, high]) and
      "n_outside": {figure: entries outside}.
    """
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out: dict = {}
    n_outside = {}
    for k, v in reps.items():
        arr = np.asarray(v, dtype=np.float64)
        e = np.asarray(est[k], dtype=np.float64)
        low, high = _nan_reduce(arr, np.nanpercentile, lo), _nan_reduce(arr, np.nanpercentile, hi)
        outside = np.isfinite(e) & ((e < low) | (e > high))  # NaN bounds compare False
        out[k] = {"low": low, "high": high, "bias": _nan_reduce(arr, np.nanmean) - e, "outside": outside}
        n_outside[k] = int(outside.sum())
    out["n_outside"] = n_outside
    return out


def _nan_reduce(a: np.ndarray, fn, *args) -> np.ndarray:
    """fn(a[:, ok], *args, axis=0) over the finite replicates of each entry (np.nanpercentile,
    np.nanmean); NaN (without a warning) where all replicates are NaN."""
    ok = np.isfinite(a).any(0)
    out = np.full(a.shape[1:], np.nan)
    if np.any(ok):
        out[ok] = fn(a[:, ok], *args, axis=0)
    return out


def _shuffle(labels: np.ndarray, strata: list[np.ndarray] | None, rng: np.random.Generator) -> np.ndarray:
    """The labels shuffled over all units, or within each stratum."""
    if strata is None:
        return rng.permutation(labels)
    out = labels.copy()
    for idx in strata:
        out[idx] = labels[idx][rng.permutation(idx.size)]
    return out


def _cluster_strata(strata: Sequence, clusters: np.ndarray, k: int) -> list[np.ndarray]:
    """The clusters of each stratum (strata in order of first appearance, clusters ascending).

    A cluster whose records all come from one stratum belongs to it; a cluster that mixes
    strata forms a stratum with the clusters of the same mix, so that a shuffle within
    strata never exchanges records of different sources."""
    mixes: list[dict] = [{} for _ in range(k)]
    for c, v in zip(clusters, strata):
        mixes[c][v] = None
    where: dict = {}
    for c, m in enumerate(mixes):
        key = next(iter(m)) if len(m) == 1 else tuple(sorted(m, key=repr))
        where.setdefault(key, []).append(c)
    return [np.asarray(v, np.int64) for v in where.values()]


def permutation_test(
    instruction_matrix: np.ndarray, labels: np.ndarray, *, n_perm: int = 999, seed: int = 0,
    batch: int = PERM_BATCH, strata: Sequence | None = None, groups: Sequence | None = None,
) -> dict:
    """Is the diagonal of the instruction-level overlap larger than chance?

    Statistic: mean diagonal minus mean off-diagonal of the 6x6 mean pairwise
    Jaccard (self-pairs excluded), and per category `per_category_dominance`.
    Null: the same with category labels shuffled over clusters of records
    (`cluster_index`: records of a category sharing a group key move together),
    or over records without groups; within each stratum (e.g. record source)
    when `strata` is given, so the null keeps every stratum's category mix.
    Every category keeps its number of clusters; with clusters of unequal size
    its number of records varies between permutations (the block means stay
    defined). p = (1 + #{null >= observed}) / (1 + n_perm), one-sided, for the
    overall statistic and for each category separately (six tests: their Holm
    adjustment, `per_category_p_holm`, holds the family-wise level).

    Args:
      instruction_matrix: float [N, N] instruction Jaccard (NaN pairs are left out).
      labels: int [N] category indices.
      n_perm: permutations.
      seed: RNG seed. Without groups (or with all keys distinct) the shuffles
        are those of the record-level test.
      batch: permutations evaluated per matrix product.
      strata: optional length-N stratum of each instruction (any hashable values).
      groups: optional length-N group keys; None shuffles records.

    Returns:
      dict with statistic, p_value, n_perm, seed, null_mean, null_std,
      per_category_statistic [C], per_category_p_value [C],
      per_category_p_holm [C] (`holm`: reject where <= alpha for a family-wise
      level alpha over the six categories), n_strata (None
      when not stratified), unit ("group" or "record": what was shuffled) and
      n_units (the number of shuffled clusters).
    """
    obs_block = category_block_means(instruction_matrix, labels)
    obs = diagonal_dominance(obs_block)
    obs_c = per_category_dominance(obs_block)
    vals, valid = pair_terms(instruction_matrix)
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    clusters = cluster_index(labels, groups)
    k = int(clusters.max()) + 1 if n else 0
    cl_labels = _cluster_labels(labels, clusters)
    cl_strata = None
    if strata is not None:
        if len(strata) != n:
            raise ValueError(f"{len(strata)} strata for {n} instructions")
        cl_strata = _cluster_strata(strata, clusters, k)
    null, null_c = [], []
    for p0 in range(0, n_perm, batch):
        perms = np.stack([_shuffle(cl_labels, cl_strata, rng)[clusters] for _ in range(min(batch, n_perm - p0))])
        y = np.eye(C)[perms.T]                                    # [N, P, C] one-hot
        flat = y.reshape(n, -1)
        # One [N, N] @ [N, P*C] product per batch instead of P small ones.
        sums = np.einsum("npc,npd->pcd", y, (vals @ flat).reshape(y.shape))
        cnts = np.einsum("npc,npd->pcd", y, (valid @ flat).reshape(y.shape))
        blocks = safe_div(sums, cnts)
        null.extend(diagonal_dominance(m) for m in blocks)
        null_c.extend(per_category_dominance(blocks))
    null = np.asarray(null, dtype=np.float64)
    null_c = np.asarray(null_c, dtype=np.float64).reshape(-1, C)
    fin = null[np.isfinite(null)]
    p_c = [_p_value(null_c[:, c], obs_c[c], n_perm) for c in range(C)]
    return {
        "statistic": obs,
        "p_value": _p_value(null, obs, n_perm),
        "n_perm": n_perm,
        "seed": seed,
        "null_mean": float(fin.mean()) if fin.size else None,
        "null_std": float(fin.std()) if fin.size else None,
        "per_category_statistic": obs_c.tolist(),
        "per_category_p_value": p_c,
        "per_category_p_holm": holm(p_c),
        "n_strata": None if cl_strata is None else len(cl_strata),
        "unit": "record" if groups is None else "group",
        "n_units": k,
    }


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (family-wise error control over the defined ones).

    With the m defined p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted
    value of p_(i) is max over j <= i of min(1, (m - j + 1) p_(j)); rejecting where it is
    <= alpha keeps the chance of any false rejection among the m tests <= alpha.

    Args:
      p_values: length-K p-values; None where a test is undefined (left out of m).

    Returns:
      length-K adjusted p-values, None where the input is None.
    """
    idx = [i for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (len(idx) - rank) * p_values[i]))
        out[i] = running
    return out


def _p_value(null: np.ndarray, obs: float, n_perm: int) -> float | None:
    # A tolerance so that a shuffle reproducing the observed labels counts despite
    # a different summation order; undefined null values count as exceeding
    # (conservative); no p-value when the statistic itself is undefined.
    if not n_perm or not np.isfinite(obs):
        return None
    return float((1 + np.sum(~np.isfinite(null) | (null >= obs - 1e-12))) / (1 + n_perm))
