"""The diagonal's permutation test with labels shuffled among records of similar prompt length."""

import numpy as np
import pytest

from sparcom_jax.analysis.study import length_bins, length_matched
from sparcom_jax.analysis.uncertainty import permutation_test


def test_length_bins_hand_case():
    # Quintile edges of 1..10 are 2.8, 4.6, 6.4, 8.2; equal lengths share a bin.
    assert length_bins(np.arange(1, 11)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert length_bins(np.array([5, 5, 5, 5, 9])).tolist() == [0, 0, 0, 0, 1]
    # A length on an edge goes above it: the median of 1, 2, 3 is 2, so 2 joins 3, not 1.
    assert length_bins(np.array([1, 2, 3]), 2).tolist() == [0, 1, 1]
    empty = length_bins(np.array([], int))  # np.quantile refuses an empty array: no records, no bins
    assert empty.shape == (0,) and empty.dtype == np.int64


def length_only():
    """Overlap that follows prompt length alone; categories differ in length (10 to 56 tokens)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 10)
    tokens = np.round(np.exp(np.log([10, 14, 20, 28, 40, 56])[labels] + rng.normal(0, 0.5, 60))).astype(int)
    lt = np.log(tokens)
    return np.exp(-np.abs(lt[:, None] - lt[None])), labels, tokens


def test_length_alone_makes_a_free_diagonal_significant_and_the_matched_null_absorbs_it():
    m, labels, tokens = length_only()
    free = permutation_test(m, labels, n_perm=99, seed=0)
    matched = length_matched(m, labels, tokens, n_perm=99, seed=0)
    assert free["p_value"] == pytest.approx(0.01) and abs(free["null_mean"]) < 0.01  # "significant"
    assert matched["statistic"] == pytest.approx(free["statistic"])
    assert matched["null_mean"] > 0.8 * matched["statistic"]  # length alone gives most of the diagonal
    assert matched["stratified_by"] == "prompt length" and matched["n_bins"] == 5
    assert sum(sum(b.values()) for b in matched["per_bin"]) == 60


def test_length_matched_is_the_test_stratified_by_length_bin_and_source():
    m, labels, tokens = length_only()
    sources = ["human" if i % 2 else "generated" for i in range(60)]
    groups = [f"g{i // 2}" for i in range(60)]  # pairs of records move together
    got = length_matched(m, labels, tokens, n_perm=30, seed=4, sources=sources, groups=groups)
    want = permutation_test(m, labels, n_perm=30, seed=4, groups=groups,
                            strata=list(zip(sources, length_bins(tokens).tolist())))
    assert got["p_value"] == pytest.approx(want["p_value"]) and got["null_mean"] == pytest.approx(want["null_mean"])
    assert got["per_category_p_value"] == pytest.approx(want["per_category_p_value"])
    assert got["stratified_by"] == "prompt length and source" and got["unit"] == "group"


def test_dominance_table_carries_the_length_matched_test():
    from sparcom_jax.report.tables import DOMINANCE_HEADER, dominance_rows
    from sparcom_jax.analysis.evaluate import category_block_means, per_category_dominance
    from sparcom_jax.categories import CATEGORIES
    m, labels, tokens = length_only()
    lm = length_matched(m, labels, tokens, n_perm=20, seed=1)
    s = {"per_category_dominance": dict(zip(CATEGORIES, per_category_dominance(category_block_means(m, labels)))),
         "diagonal_dominance": lm["statistic"], "length_matched": lm}
    rows = [dict(zip(DOMINANCE_HEADER, r)) for r in dominance_rows(s)]
    assert [r["length_matched_permutation_p"] for r in rows[:6]] == lm["per_category_p_value"]
    assert rows[-1]["length_matched_permutation_p"] == lm["p_value"]
    assert rows[-1]["length_matched_null_mean"] == lm["null_mean"]
