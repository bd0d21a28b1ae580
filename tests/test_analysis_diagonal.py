"""Per-category diagonal dominance with bootstrap intervals, the source-stratified
permutation test, the human-written subset, and the top instructions per unit."""

import dataclasses

import numpy as np
import pytest

from sparcom_jax.analysis import IdentifyConfig, analyze_model, bootstrap, identify, instruction_jaccard
from sparcom_jax.analysis.evaluate import category_block_means, per_category_dominance
from sparcom_jax.analysis.examples import listed_units, top_instructions
from sparcom_jax.analysis.study import subset_diagonal
from sparcom_jax.analysis.uncertainty import _shuffle, permutation_test, resample_weights
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def test_per_category_dominance_hand_values():
    block = np.full((6, 6), 0.1)
    np.fill_diagonal(block, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    block[0, 1] = block[1, 0] = 0.35
    block[2, 3] = block[3, 2] = np.nan  # an undefined block is left out of the cross mean
    d = per_category_dominance(block)
    assert d[0] == pytest.approx(0.6 - (0.35 + 0.1 * 4) / 5)
    assert d[1] == pytest.approx(0.5 - (0.35 + 0.1 * 4) / 5)
    assert d[2] == pytest.approx(0.4 - 0.1)  # four finite cross blocks of 0.1
    assert d[5] == pytest.approx(0.0)
    # Batched over replicates.
    both = per_category_dominance(np.stack([block, block.T]))
    assert both.shape == (2, 6) and np.allclose(both[1], d)
    block[4, 4] = np.nan
    assert np.isnan(per_category_dominance(block)[4])


def block_counts(per_cat=5, seed=0):
    """Category c fires units [10c, 10c+3) plus 3 random other ones on every token."""
    rng = np.random.default_rng(seed)
    n = 6 * per_cat
    flat = np.ones((n, 60), np.int32)
    for i in range(n):
        c = i // per_cat
        core = np.arange(10 * c, 10 * c + 3)
        flat[i, core] = 10
        flat[i, rng.choice(np.setdiff1d(np.arange(60), core), size=3, replace=False)] = 10
    return Counts(tokens=np.full(n, 10), neuron_active=flat.reshape(n, 2, 30),
                  categories=[CATEGORIES[i // per_cat] for i in range(n)])


def test_bootstrap_dominance_intervals_brute_force():
    ident = identify(block_counts(), "neuron_active", IdentifyConfig(eps=6 / 60))
    j = instruction_jaccard(ident)
    b = bootstrap(ident, instruction_matrix=j, n_boot=30, seed=4)
    # The same replicates, one weight vector at a time.
    w = resample_weights(ident.labels, 30, seed=4)
    blocks = np.stack([category_block_means(j, ident.labels, w[r]) for r in range(30)])
    dom_c = per_category_dominance(blocks)
    overall = np.array([np.nanmean(np.diag(m)) - np.nanmean(m[~np.eye(6, dtype=bool)]) for m in blocks])
    assert np.allclose(b["per_category_dominance"]["low"], np.percentile(dom_c, 2.5, axis=0))
    assert np.allclose(b["per_category_dominance"]["high"], np.percentile(dom_c, 97.5, axis=0))
    assert b["diagonal_dominance"]["low"] == pytest.approx(np.percentile(overall, 2.5))
    assert b["diagonal_dominance"]["high"] == pytest.approx(np.percentile(overall, 97.5))
    est = per_category_dominance(category_block_means(j, ident.labels))
    assert np.all(b["per_category_dominance"]["low"] <= est + 1e-12)
    assert np.all(est <= b["per_category_dominance"]["high"] + 1e-12)
    assert np.all(b["per_category_dominance"]["low"] > 0.2)  # clear own-category structure


def test_stratified_shuffle_keeps_each_stratum_mix():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4)
    strata = [np.flatnonzero(np.arange(24) % 4 < 2), np.flatnonzero(np.arange(24) % 4 >= 2)]
    moved = False
    for _ in range(20):
        p = _shuffle(labels, strata, rng)
        for idx in strata:
            assert np.array_equal(np.bincount(p[idx], minlength=6), np.bincount(labels[idx], minlength=6))
        moved |= not np.array_equal(p, labels)
    assert moved


def test_permutation_within_sources_that_fix_the_labels():
    # Each source holds a single category: shuffling within sources changes nothing,
    # so every null value equals the statistic and p = 1; a free shuffle finds the diagonal.
    labels = np.repeat(np.arange(6), 6)
    m = np.where(labels[:, None] == labels[None], 0.7, 0.1)
    np.fill_diagonal(m, 1.0)
    sources = [f"s{c}" for c in labels]
    strat = permutation_test(m, labels, n_perm=49, seed=0, strata=sources)
    assert strat["p_value"] == pytest.approx(1.0) and strat["n_strata"] == 6
    free = permutation_test(m, labels, n_perm=49, seed=0)
    assert free["p_value"] == pytest.approx(1 / 50) and free["n_strata"] is None
    assert free["per_category_p_value"] == pytest.approx([1 / 50] * 6)
    assert free["per_category_statistic"] == pytest.approx([0.6] * 6)
    with pytest.raises(ValueError, match="strata"):
        permutation_test(m, labels, n_perm=3, strata=sources[:-1])


def test_per_category_p_values_brute_force():
    # Only CLS has a strong block; the per-category nulls are each category's own.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(6), 5)
    m = np.where((labels[:, None] == 0) & (labels[None] == 0), 0.8, 0.2) + rng.uniform(-0.15, 0.15, (30, 30))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    r = permutation_test(m, labels, n_perm=40, seed=9, batch=7)
    draw = np.random.default_rng(9)
    null = np.stack([per_category_dominance(category_block_means(m, draw.permutation(labels)))
                     for _ in range(40)])
    obs = per_category_dominance(category_block_means(m, labels))
    expect = [(1 + np.sum(null[:, c] >= obs[c] - 1e-12)) / 41 for c in range(6)]
    assert r["per_category_p_value"] == pytest.approx(expect)
    assert r["per_category_p_value"][0] == pytest.approx(1 / 41) and max(r["per_category_p_value"][1:]) > 0.2


def duplicated_matrix():
    """Templated records are near-duplicates within their category (Jaccard 0.9); human
    records share nothing special with their own category (0.2 everywhere)."""
    labels = np.tile(np.arange(6), 6)                     # 36 records, 6 per category
    sources = ["human-written" if i < 18 else "template-varied" for i in range(36)]
    tmpl = np.array([s.startswith("template") for s in sources])
    m = np.full((36, 36), 0.2)
    same = labels[:, None] == labels[None]
    m[same & tmpl[:, None] & tmpl[None]] = 0.9
    np.fill_diagonal(m, 1.0)
    return m, labels, sources


def test_human_subset_removes_the_duplicates_diagonal():
    m, labels, sources = duplicated_matrix()
    full = category_block_means(m, labels)
    assert np.nanmean(np.diag(full)) > 0.3
    h = subset_diagonal(m, labels, sources, "human", n_perm=19, seed=0)
    assert h["n"] == 18 and h["n_per_category"]["code"] == 3
    assert h["rule"] == "source starts with 'human'"
    assert h["diagonal_dominance"] == pytest.approx(0.0, abs=1e-12)
    assert h["per_category_dominance"]["math"] == pytest.approx(0.0, abs=1e-12)
    assert h["permutation"]["stratified_by"] == "source" and h["permutation"]["p_value"] > 0.5
    # A predicate instead of a prefix: the templated half keeps its diagonal.
    t = subset_diagonal(m, labels, sources, lambda s: s == "template-varied", n_perm=0)
    assert t["n"] == 18 and t["diagonal_dominance"] == pytest.approx(0.7)
    assert t["permutation"] is None
    assert subset_diagonal(m, labels, sources, "expert") is None
    # A prefix, not a substring: "not human-written" stays out.
    relabelled = ["not human-written" if i == 0 else x for i, x in enumerate(sources)]
    assert subset_diagonal(m, labels, relabelled, "human", n_perm=0)["n"] == 17
    # Two human sources: the subset's test shuffles within each, as the full test does.
    two = [f"{x}-{i % 2}" if x.startswith("human") else x for i, x in enumerate(sources)]
    h2 = subset_diagonal(m, labels, two, "human", n_perm=19, seed=0)["permutation"]
    keep = np.arange(18)
    direct = permutation_test(m[np.ix_(keep, keep)], labels[keep], n_perm=19, seed=0, strata=two[:18])
    assert h2["n_strata"] == 2 and h2["p_value"] == direct["p_value"] and h2["null_mean"] == direct["null_mean"]


def test_analyze_model_stratifies_and_reports_the_human_subset():
    counts = block_counts(per_cat=4, seed=1)
    counts.sources = ["human-written" if i % 2 else "template-varied" for i in range(counts.n)]
    s = analyze_model(counts, IdentifyConfig(eps=6 / 60), n_boot=5, n_perm=19, top_units=0).summary()["isn"]
    assert s["permutation"]["stratified_by"] == "source" and s["permutation"]["n_strata"] == 2
    # the length-matched test keeps the sources too (length bins within each source)
    assert s["length_matched"]["stratified_by"] == "prompt length and source"
    h = s["human_subset"]
    assert h["n"] == 12
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=6 / 60))
    j = instruction_jaccard(ident)
    keep = np.arange(24)[1::2]
    sub = category_block_means(j[np.ix_(keep, keep)], ident.labels[keep])
    assert h["per_category_dominance"]["code"] == pytest.approx(per_category_dominance(sub)[1])
    assert s["per_category_dominance"]["code"] == pytest.approx(
        per_category_dominance(category_block_means(j, ident.labels))[1])
    assert len(s["bootstrap"]["per_category_dominance"]["low"]) == 6
    counts.sources = None
    s2 = analyze_model(counts, IdentifyConfig(eps=6 / 60), n_boot=0, n_perm=19, top_units=0).summary()["isn"]
    assert s2["permutation"]["stratified_by"] is None and s2["human_subset"] is None
    assert s2["length_matched"]["stratified_by"] == "prompt length"


def test_analyze_model_between_groups_is_stratified_by_source_as_the_main_test():
    # Its permutation test shuffled groups across sources unnoticed (no test gave the counts both).
    from sparcom_jax.analysis.study import between_groups

    counts = block_counts(per_cat=4, seed=1)
    counts.sources = ["human-written" if i % 4 < 2 else "template-varied" for i in range(counts.n)]
    counts.groups = [f"g{i // 2}" for i in range(counts.n)]  # pairs within a category and a source
    cfg = IdentifyConfig(eps=6 / 60)
    s = analyze_model(counts, cfg, n_boot=3, n_perm=19, seed=4, ci=0.8, top_units=0).summary()["isn"][
        "between_groups"]
    ident = identify(counts, "neuron_active", cfg)
    direct = between_groups(instruction_jaccard(ident), ident.labels, counts.groups, n_perm=19, seed=4,
                            strata=counts.sources, n_boot=3, ci=0.8)
    assert s["permutation"]["stratified_by"] == "source" and s == direct
    free = between_groups(instruction_jaccard(ident), ident.labels, counts.groups, n_perm=19, seed=4)
    assert free["permutation"]["stratified_by"] is None and free["permutation"]["n_strata"] is None
    # Without the instruction matrix there is no diagonal to take the group pairs out of.
    alone = analyze_model(counts, cfg, n_boot=0, n_perm=0, top_units=0, instruction_level=False)
    assert alone.summary()["isn"]["between_groups"] is None


# ---------------------------------------------------------------- top instructions per unit

def example_counts():
    """12 instructions; unit 0 in every CLS set. Frequencies on unit 0 by instruction:
    0.9 (T=10), 0.5 (T=10), 0.5 (T=20), 0 (everything else), 1.0 for instruction 7 (a GEN record)."""
    n = 12
    t = np.full(n, 10)
    t[2] = 20
    na = np.zeros((n, 1, 6), np.int32)
    na[:, 0, 5] = 1  # a weak unit everyone fires once
    na[0, 0, 0], na[1, 0, 0], na[2, 0, 0], na[7, 0, 0] = 9, 5, 10, 10
    na[0, 0, 1] = na[1, 0, 1] = 8  # unit 1: CLS's second unit, lower category mean
    return Counts(tokens=t, neuron_active=na, categories=[CATEGORIES[i // 2] for i in range(n)],
                  ids=[f"r{i}" for i in range(n)])


def test_top_instructions_hand_case():
    counts = example_counts()
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=2 / 6, q=0.5))
    assert set(np.flatnonzero(ident.category_sets[0].ravel())) == {0, 1}
    top = top_instructions(counts, ident, units_per_category=2, top=3)
    cls = top["classification"]
    # Listed: the two units with the highest CLS mean (unit 0: 0.7, unit 1: 0.8 -> 1 first).
    assert [(u["layer"], u["neuron"]) for u in cls] == [(0, 1), (0, 0)]
    assert cls[0]["category_frequency"] == pytest.approx(0.8)
    unit0 = cls[1]["instructions"]
    # 1.0 for r7 (GEN) first; 0.9; then the 0.5 tie goes to the longer prompt r2.
    assert [i["id"] for i in unit0] == ["r7", "r0", "r2"]
    assert unit0[0] == {"index": 7, "id": "r7", "category": "generation", "frequency": 1.0, "tokens": 10}
    assert unit0[2]["tokens"] == 20 and unit0[2]["frequency"] == pytest.approx(0.5)
    # Unit 1 fired on two instructions only: no zero-frequency entries listed.
    assert [i["id"] for i in cls[0]["instructions"]] == ["r0", "r1"]
    # MATH fired only the weak unit 5 (p = 0.1): equal frequencies, equal T -> lower index first;
    # r2 (T = 20) has p = 0.05 and comes last.
    assert [(u["neuron"], [i["id"] for i in u["instructions"]]) for u in top["math"]] == [
        (5, ["r0", "r1", "r3"])]


def test_top_instructions_streams_in_chunks():
    counts = example_counts()
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=2 / 6, q=0.5))
    whole = top_instructions(counts, ident, units_per_category=3, top=4, chunk=100)
    reads = []

    class Lazy:
        shape, dtype = counts.neuron_active.shape, counts.neuron_active.dtype

        def __getitem__(self, idx):
            reads.append(idx.stop - idx.start)
            return counts.neuron_active[idx]

    lazy = dataclasses.replace(counts, neuron_active=Lazy())
    assert top_instructions(lazy, ident, units_per_category=3, top=4, chunk=5) == whole
    assert max(reads) == 5 and len(reads) == 3


def test_listed_units_cap_and_tie_order():
    counts = example_counts()
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=3 / 6, q=0.5))
    units = listed_units(ident, 2)
    assert all(u.size <= 2 for u in units)
    mean = ident.category_mean.reshape(6, -1)
    for c, u in enumerate(units):
        members = np.flatnonzero(ident.category_sets[c].ravel())
        brute = sorted(members, key=lambda x: (-mean[c, x], x))[:2]
        assert u.tolist() == brute


def test_listed_units_break_mean_ties_by_index():
    na = np.zeros((12, 1, 6), np.int32)
    na[:2, 0, [1, 3, 4]] = 10
    na[:2, 0, 0] = 5
    counts = Counts(tokens=np.full(12, 10), neuron_active=na, categories=[CATEGORIES[i // 2] for i in range(12)])
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=4 / 6))
    assert set(np.flatnonzero(ident.category_sets[0].ravel())) == {0, 1, 3, 4}
    assert listed_units(ident, 2)[0].tolist() == [1, 3]


def test_summary_top_instructions_key():
    s = analyze_model(example_counts(), IdentifyConfig(eps=2 / 6), n_boot=0, n_perm=0,
                      top_units=1, top_per_unit=2).summary()["isn"]
    cls = s["top_instructions"]["classification"]
    assert len(cls) == 1 and [i["id"] for i in cls[0]["instructions"]] == ["r0", "r1"]
    assert analyze_model(example_counts(), IdentifyConfig(eps=2 / 6), n_boot=0, n_perm=0,
                         top_units=0).summary()["isn"]["top_instructions"] is None


def test_bootstrap_instruction_overlap_is_the_mean_over_the_resampled_pairs():
    # One replicate per seed (n_boot=1: low = high = that replicate), against the explicit
    # resample: every ordered pair of drawn positions, pairs of one instruction with itself
    # (twice drawn) left out as documented. Catches a wrong multiplicity weighting.
    ident = identify(block_counts(per_cat=3), "neuron_active", IdentifyConfig(eps=6 / 60))
    j = instruction_jaccard(ident)
    for seed in range(4):
        pos = np.repeat(np.arange(ident.n), resample_weights(ident.labels, 1, seed)[0].astype(int))
        lab = ident.labels[pos]
        pairs = [[[j[p, q] for p, a in zip(pos, lab) for q, b in zip(pos, lab) if a == r and b == c and p != q]
                  for c in range(6)] for r in range(6)]
        # A category drawn as one instruction three times has no pair: NaN, as documented.
        block = np.array([[np.mean(v) if v else np.nan for v in row] for row in pairs])
        got = bootstrap(ident, instruction_matrix=j, n_boot=1, seed=seed)
        assert np.allclose(got["instruction_overlap"]["low"], block, equal_nan=True)
        assert np.allclose(got["per_category_dominance"]["high"], per_category_dominance(block), equal_nan=True)


def _holm_rejects(p, alpha):
    """Holm's sequential procedure at level alpha: reject the smallest p while p_(j) <= alpha / (m - j + 1)."""
    defined = sorted((v, i) for i, v in enumerate(p) if v is not None)
    rejected = set()
    for j, (v, i) in enumerate(defined):
        if v > alpha / (len(defined) - j):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusted_p_values_match_the_sequential_procedure():
    from sparcom_jax.analysis.uncertainty import holm
    rng = np.random.default_rng(5)
    for _ in range(30):
        p = [None if rng.random() < 0.2 else float(rng.choice([0.001, 0.004, 0.01, 0.02, 0.3, 0.9]))
             for _ in range(6)]
        adj = holm(p)
        assert [a is None for a in adj] == [v is None for v in p]
        for alpha in (0.005, 0.01, 0.02, 0.05, 0.1, 0.5):
            # Brute force: a test is rejected at alpha exactly when its adjusted p is <= alpha.
            assert {i for i, a in enumerate(adj) if a is not None and a <= alpha + 1e-12} == _holm_rejects(p, alpha)
    assert holm([0.01, 0.04, None, 0.03, 0.5, 0.002, 0.02]) == pytest.approx([0.05, 0.09, None, 0.09, 0.5, 0.012, 0.08])


def test_permutation_test_reports_holm_adjusted_per_category_p_values():
    from sparcom_jax.analysis.uncertainty import holm
    from sparcom_jax.report.tables import DOMINANCE_HEADER, dominance_rows
    labels = np.repeat(np.arange(6), 4)
    rng = np.random.default_rng(2)
    m = np.where(labels[:, None] == labels[None], 0.6, 0.2) * rng.uniform(0.5, 1.5, (24, 24))
    m = (m + m.T) / 2
    r = permutation_test(m, labels, n_perm=30, seed=1)
    assert r["per_category_p_holm"] == pytest.approx(holm(r["per_category_p_value"]))
    # Every category beats all 30 shuffles: p = 1/31 = 0.03 each, below 0.05 one by one, but
    # 6/31 = 0.19 for the family of six (30 permutations are too few for six tests).
    assert r["per_category_p_value"] == pytest.approx([1 / 31] * 6)
    assert r["per_category_p_holm"] == pytest.approx([6 / 31] * 6)
    block = category_block_means(m, labels)
    s = {"per_category_dominance": dict(zip(CATEGORIES, per_category_dominance(block))),
         "diagonal_dominance": 0.0, "permutation": r}
    rows = dominance_rows(s)
    assert [dict(zip(DOMINANCE_HEADER, row))["permutation_p_holm"] for row in rows[:6]] == r["per_category_p_holm"]
    assert dict(zip(DOMINANCE_HEADER, rows[-1]))["permutation_p_holm"] is None
