"""Bootstrap intervals and the permutation test for diagonal dominance."""

import numpy as np
import pytest

from sparcom_jax.analysis import IdentifyConfig, bootstrap, identify, instruction_jaccard, permutation_test
from sparcom_jax.analysis.uncertainty import resample_weights
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def block_counts(per_cat=4, noise=0.0, seed=0, n_units=60):
    """Category c fires units [10c, 10c+3) and unit 59 on every token; optional noise units."""
    rng = np.random.default_rng(seed)
    n = 6 * per_cat
    na = np.zeros((n, 2, n_units // 2), np.int32)
    flat = na.reshape(n, -1)
    cats = []
    for i in range(n):
        c = i // per_cat
        cats.append(CATEGORIES[c])
        flat[i, 10 * c:10 * c + 3] = 10
        flat[i, 59] = 10
        if noise:
            extra = rng.choice(n_units - 1, size=3, replace=False)
            flat[i, extra] = np.maximum(flat[i, extra], 10)
        flat[i][flat[i] == 0] = 1
    return Counts(tokens=np.full(n, 10), neuron_active=na, categories=cats)


CFG = IdentifyConfig(eps=4 / 60, q=0.5)


def test_resample_weights_stratified_and_seeded():
    labels = np.repeat(np.arange(6), 3)
    w = resample_weights(labels, 5, seed=1)
    assert w.shape == (5, 18)
    for c in range(6):
        assert np.all(w[:, labels == c].sum(1) == 3)  # each category keeps its size
    assert np.array_equal(w, resample_weights(labels, 5, seed=1))
    assert not np.array_equal(w, resample_weights(labels, 5, seed=2))


def test_bootstrap_clean_case_collapses_on_estimate():
    # Identical instructions within a category: every resample rebuilds the same sets.
    ident = identify(block_counts(), "neuron_active", CFG)
    j = instruction_jaccard(ident)
    b = bootstrap(ident, instruction_matrix=j, n_boot=20, seed=0)
    size = ident.category_sets.reshape(6, -1).sum(1)
    assert size.tolist() == [4] * 6
    assert np.array_equal(b["per_category_count"]["low"], size)
    assert np.array_equal(b["per_category_count"]["high"], size)
    assert b["general"]["low"] == b["general"]["high"] == 1
    assert np.allclose(b["overlap_jaccard"]["low"][0, 1], 1 / 7)  # {0,1,2,59} vs {10,11,12,59}
    assert np.allclose(np.diag(b["instruction_overlap"]["high"]), 1.0)


def test_bootstrap_noisy_case_contains_estimate_and_is_seeded():
    counts = block_counts(per_cat=6, noise=1.0, seed=3)
    ident = identify(counts, "neuron_active", CFG)
    b1 = bootstrap(ident, n_boot=60, seed=7)
    b2 = bootstrap(ident, n_boot=60, seed=7)
    b3 = bootstrap(ident, n_boot=60, seed=8)
    for k in ("per_category_count", "overlap_jaccard", "unique"):
        assert np.array_equal(b1[k]["low"], b2[k]["low"], equal_nan=True)
        assert np.array_equal(b1[k]["high"], b2[k]["high"], equal_nan=True)
    assert any(not np.array_equal(b1[k]["high"], b3[k]["high"], equal_nan=True)
               or not np.array_equal(b1[k]["low"], b3[k]["low"], equal_nan=True)
               for k in ("per_category_count", "overlap_jaccard", "unique", "general_share"))
    size = ident.category_sets.reshape(6, -1).sum(1)
    lo, hi = b1["per_category_count"]["low"], b1["per_category_count"]["high"]
    assert np.all(lo <= hi)
    assert np.any(lo < hi)  # noise makes the sets vary
    # The core units (3 + the shared one) survive every resample.
    assert np.all(lo >= 4)
    assert np.all((lo <= size) & (size <= hi))


def test_bootstrap_batches_do_not_change_results():
    ident = identify(block_counts(per_cat=5, noise=1.0, seed=4), "neuron_active", CFG)
    big = bootstrap(ident, n_boot=12, seed=2)
    small = bootstrap(ident, n_boot=12, seed=2, budget_bytes=4 * 6 * 60 * 5)  # 5 replicates per batch
    for k in ("per_category_count", "overlap_coefficient", "general"):
        assert np.array_equal(big[k]["low"], small[k]["low"], equal_nan=True)
        assert np.array_equal(big[k]["high"], small[k]["high"], equal_nan=True)


def test_bootstrap_pooled_rereads_counts():
    counts = block_counts()
    cfg = IdentifyConfig(eps=4 / 60, aggregation="pooled")
    ident = identify(counts, "neuron_active", cfg, keep_instruction_sets=False)
    with pytest.raises(ValueError, match="counts="):
        bootstrap(ident, n_boot=3)
    b = bootstrap(ident, counts=counts, n_boot=5)
    assert b["per_category_count"]["low"].tolist() == [4] * 6


def _jaccard_matrix(labels, within, between, rng, jitter):
    n = labels.shape[0]
    m = np.where(labels[:, None] == labels[None], within, between) + rng.uniform(-jitter, jitter, (n, n))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def test_permutation_test_block_diagonal_is_significant():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 8)
    m = _jaccard_matrix(labels, 0.6, 0.1, rng, 0.05)
    r = permutation_test(m, labels, n_perm=199, seed=0)
    assert r["statistic"] == pytest.approx(0.5, abs=0.02)
    assert r["p_value"] == pytest.approx(1 / 200)
    assert abs(r["null_mean"]) < 0.05


def test_permutation_test_random_is_not_significant():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 8)
    m = _jaccard_matrix(labels, 0.3, 0.3, rng, 0.2)
    r = permutation_test(m, labels, n_perm=199, seed=0)
    assert r["p_value"] > 0.1
    assert r == permutation_test(m, labels, n_perm=199, seed=0)


def test_permutation_test_on_identified_sets():
    ident = identify(block_counts(per_cat=5, noise=1.0, seed=5), "neuron_active", CFG)
    r = permutation_test(instruction_jaccard(ident), ident.labels, n_perm=99, seed=0)
    assert r["p_value"] == pytest.approx(0.01)


def test_bootstrap_pooled_sizes_brute_force_with_exact_means():
    # Equal-length prompts: category means of different units tie exactly and often. Each
    # resample's pooled set (ties at the top-eps cut kept), from exact fractions; one
    # replicate per seed (n_boot=1), so the interval is that replicate's value.
    from fractions import Fraction

    rng = np.random.default_rng(0)
    n, units, t = 18, 24, 10
    na = rng.integers(0, t + 1, (n, 1, units)).astype(np.int32)
    labels = np.arange(n) % 6
    counts = Counts(tokens=np.full(n, t), neuron_active=na, categories=[CATEGORIES[c] for c in labels])
    cfg = IdentifyConfig(eps=0.1, aggregation="pooled")  # k = 3 of 24
    ident = identify(counts, "neuron_active", cfg, keep_instruction_sets=False)
    for seed in range(8):
        w = resample_weights(labels, 1, seed)[0].astype(int)
        sizes = []
        for c in range(6):
            m = labels == c
            mean = [Fraction(int((w[m] * na[m, 0, u]).sum()), t * int(m.sum())) for u in range(units)]
            kth = sorted(mean, reverse=True)[2]
            sizes.append(sum(1 for v in mean if v >= kth and v > 0))
        b = bootstrap(ident, counts=counts, n_boot=1, seed=seed)
        assert b["per_category_count"]["low"].tolist() == sizes, seed


def test_bootstrap_bias_and_outside_brute_force():
    # Explicit resamples (lists of drawn instructions), each category's consensus set rebuilt by
    # counting the drawn instructions that select a unit, and the instruction-level block means
    # over pairs of draws of different instructions; the bias is mean replicate minus estimate.
    counts = block_counts(per_cat=6, noise=1.0, seed=3)
    ident = identify(counts, "neuron_active", CFG)
    j = instruction_jaccard(ident)
    s_i = ident.instruction_rows(0, ident.n).astype(bool)
    j64 = j.astype(np.float64)
    labels = ident.labels
    n_boot, seed = 40, 7

    def figures(drawn):
        sets = np.array([s_i[drawn[labels[drawn] == c]].sum(0) * 2 >= (labels == c).sum() for c in range(6)])
        breadth = sets.sum(0)
        block = np.zeros((6, 6))
        for a in range(6):
            for b in range(6):
                da, db = drawn[labels[drawn] == a], drawn[labels[drawn] == b]
                block[a, b] = np.mean([j64[x, y] for x in da for y in db if x != y])
        off = ~np.eye(6, dtype=bool)
        return {"per_category_count": sets.sum(1), "general": (breadth == 6).sum(),
                "general_share": (breadth == 6).sum() / (breadth > 0).sum(),
                "unique": (sets & (breadth == 1)).sum(1),
                "diagonal_dominance": np.diag(block).mean() - block[off].mean(),
                "per_category_dominance": np.diag(block) - np.where(off, block, 0).sum(1) / 5}

    est = figures(np.arange(ident.n))
    w = resample_weights(labels, n_boot, seed).astype(int)
    reps = [figures(np.repeat(np.arange(ident.n), w[b])) for b in range(n_boot)]
    got = bootstrap(ident, instruction_matrix=j, n_boot=n_boot, seed=seed)
    for k, e in est.items():
        r = np.array([x[k] for x in reps], float)
        assert np.allclose(got[k]["bias"], r.mean(0) - e, atol=1e-9), k
        lo, hi = np.percentile(r, [2.5, 97.5], axis=0)
        assert np.array_equal(got[k]["outside"], (e < lo) | (e > hi)), k
        assert got["n_outside"][k] == int(np.sum(got[k]["outside"])), k
    # The noise units just below q = 1/2 join the consensus sets in resamples, so the sets grow
    # and the general share (one unit of a growing union) falls below its own interval.
    assert np.all(got["per_category_count"]["bias"] > 0)
    assert got["general_share"]["bias"] < 0 and got["general_share"]["outside"]
    assert got["general"]["bias"] == 0 and not got["general"]["outside"]


def test_bootstrap_outside_is_false_where_replicates_equal_the_estimate():
    # Identical instructions per category: every replicate equals the estimate, so no bias and
    # nothing outside.
    ident = identify(block_counts(), "neuron_active", CFG)
    b = bootstrap(ident, instruction_matrix=instruction_jaccard(ident), n_boot=10, seed=0)
    assert sum(b["n_outside"].values()) == 0
    assert np.allclose(b["per_category_count"]["bias"], 0) and np.allclose(b["diagonal_dominance"]["bias"], 0)


def test_bootstrap_pooled_ties_survive_a_sum_over_chunks():
    # Units 0 and 1 count (1, 5, 3) and (1, 3, 5) of T = 10 tokens in the three records of a
    # category: their means tie exactly. Summed one record at a time (chunk=1) in float32 they
    # would not (0.1 + 0.5 + 0.3 -> 0.90000004, 0.1 + 0.3 + 0.5 -> 0.9) and the tie at the
    # top-1 cut would drop one. Sizes per replicate from exact fractions, as above.
    from fractions import Fraction

    t = 10
    per = np.array([[1, 1, 0], [5, 3, 0], [3, 5, 0]])              # [record, unit]
    na = np.tile(per, (6, 1))[:, None, :].astype(np.int32)         # 6 categories x 3 records
    labels = np.repeat(np.arange(6), 3)
    counts = Counts(tokens=np.full(18, t), neuron_active=na, categories=[CATEGORIES[c] for c in labels])
    cfg = IdentifyConfig(eps=1 / 3, aggregation="pooled", chunk=1)  # k = 1 of 3, ties kept
    ident = identify(counts, "neuron_active", cfg, keep_instruction_sets=False)
    assert ident.category_sets.reshape(6, -1).sum(1).tolist() == [2] * 6
    seen_tie = False
    for seed in range(6):
        w = resample_weights(labels, 1, seed)[0].astype(int)
        sizes = []
        for c in range(6):
            m = labels == c
            mean = [Fraction(int((w[m] * na[m, 0, u]).sum()), t * 3) for u in range(3)]
            sizes.append(sum(1 for v in mean if v >= max(mean) and v > 0))
            seen_tie |= w[m].tolist() == [1, 1, 1]
        b = bootstrap(ident, counts=counts, n_boot=1, seed=seed)
        assert b["per_category_count"]["low"].tolist() == sizes, seed
    assert seen_tie  # a replicate that draws every record once: the float32 order would break it


def test_p_value_counts_undefined_null_values_against_the_statistic():
    # p = (1 + #{null >= obs, or undefined}) / (1 + n_perm); none when the statistic is undefined
    # or no permutation was run.
    from sparcom_jax.analysis.uncertainty import _p_value

    null = np.array([np.nan, 0.5, 0.1, 0.3])
    assert _p_value(null, 0.3, 4) == pytest.approx((1 + 3) / 5)
    assert _p_value(null, 0.6, 4) == pytest.approx((1 + 1) / 5)
    assert _p_value(null, float("nan"), 4) is None
    assert _p_value(np.zeros(0), 0.3, 0) is None


def test_permutation_test_without_permutations_or_pairs_gives_no_p_value():
    # One record in MATH: its diagonal block has no pair, so its statistic and p are undefined.
    rng = np.random.default_rng(2)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5])
    m = _jaccard_matrix(labels, 0.6, 0.1, rng, 0.05)
    r = permutation_test(m, labels, n_perm=9, seed=0)
    assert np.isnan(r["per_category_statistic"][5]) and r["per_category_p_value"][5] is None
    assert all(p is not None for p in r["per_category_p_value"][:5]) and r["p_value"] is not None
    r0 = permutation_test(m, labels, n_perm=0)
    assert r0["p_value"] is None and r0["per_category_p_value"] == [None] * 6
    assert r0["null_mean"] is None and r0["null_std"] is None
    assert (r0["unit"], r0["n_units"]) == ("record", 11)


def test_permutation_null_mean_and_std_brute_force():
    from sparcom_jax.analysis.evaluate import category_block_means, diagonal_dominance

    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(6), 3)
    m = _jaccard_matrix(labels, 0.5, 0.2, rng, 0.1)
    r = permutation_test(m, labels, n_perm=30, seed=5, batch=4)
    draw = np.random.default_rng(5)
    null = np.array([diagonal_dominance(category_block_means(m, draw.permutation(labels))) for _ in range(30)])
    assert (r["null_mean"], r["null_std"]) == pytest.approx((null.mean(), null.std()))
    assert r["p_value"] == pytest.approx((1 + np.sum(null >= r["statistic"] - 1e-12)) / 31)


def test_the_python_api_resamples_as_often_as_a_run_by_default():
    # docs/analysis.md states one default per setting (n_boot 100, n_perm 999): the functions'
    # defaults are the config's, so an API call is as precise as a `sparcom` run.
    import inspect

    from sparcom_jax.config import IdentifySpec

    spec = IdentifySpec()
    assert inspect.signature(bootstrap).parameters["n_boot"].default == spec.n_boot
    assert inspect.signature(permutation_test).parameters["n_perm"].default == spec.n_perm


def test_pooled_bootstrap_of_a_one_record_and_an_empty_category():
    # MATH has one record: every replicate draws it once, so its pooled mean is that record's
    # frequency and its interval is its own set (frequency >= 0.5); SUM has no record: empty.
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
    t = 10
    na = np.random.default_rng(0).integers(0, t + 1, (labels.size, 1, 8)).astype(np.int32)
    counts = Counts(tokens=np.full(labels.size, t), neuron_active=na, categories=[CATEGORIES[c] for c in labels])
    ident = identify(counts, "neuron_active", IdentifyConfig(rule="absolute", threshold=0.5, aggregation="pooled"))
    b = bootstrap(ident, counts=counts, n_boot=4, seed=0)
    own = int((2 * na[8, 0] >= t).sum())
    assert 0 < own < 8
    assert b["per_category_count"]["low"][4:].tolist() == b["per_category_count"]["high"][4:].tolist() == [own, 0]
