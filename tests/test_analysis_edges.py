"""Edges of identification, evaluation and comparison the hand cases do not reach (found by
mutation testing).

Each test says which wrong line it catches. Expected values are worked out by hand or
by plain numpy, never read back from the code under test.
"""

import warnings

import numpy as np
import pytest

from sparcom_jax.analysis import (
    IdentifyConfig, category_order, contrast_config, generality, identify, identify_all, instruction_jaccard,
    instruction_sets, locate_phases, select_units,
)
from sparcom_jax.analysis.common import jsonable, nan_mean, safe_div
from sparcom_jax.analysis.compare import compare_sets, frequency_shift
from sparcom_jax.analysis.identify import Identification, consensus_sets
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def as_set(mask):
    return set(np.flatnonzero(np.asarray(mask).ravel()).tolist())


def small_counts(n=12, shape=(2, 4), seed=0, sums=False, categories=None):
    """Random counts with ties (T in 1..5) over `shape` units, categories in turn."""
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 6, n)
    c = np.minimum(rng.integers(0, 6, (n,) + shape), t.reshape((-1,) + (1,) * len(shape))).astype(np.int32)
    s = (c * rng.random((n,) + shape)).astype(np.float32) if sums else None
    cats = categories or [CATEGORIES[i % 6] for i in range(n)]
    return Counts(tokens=t, neuron_active=c, neuron_act_sum=s, categories=cats)


def brute_top(freq, eps, strength=None):
    """Top-eps by sorting: ties kept (strength None) or exact k by (strength desc, index asc)."""
    flat = freq.reshape(freq.shape[0], -1)
    u = flat.shape[1]
    k = max(1, int(np.ceil(round(eps * u, 9))))
    out = np.zeros(flat.shape, bool)
    for r, row in enumerate(flat):
        if strength is None:
            out[r] = (row >= np.sort(row)[::-1][k - 1]) & (row > 0)
        else:
            st = strength.reshape(flat.shape)[r]
            for i in sorted(range(u), key=lambda i: (-row[i], -st[i], i))[:k]:
                out[r, i] = row[i] > 0
    return out.reshape(freq.shape)


# ---------------------------------------------------------------- IdentifyConfig

def test_config_bounds_are_inclusive_where_documented():
    # eps, eps_experts in (0, 1]; q in (0, 1]; threshold in [0, 1]; chunk >= 1.
    for ok in (dict(eps=1.0), dict(eps_experts=1.0), dict(q=1.0), dict(threshold=0.0),
               dict(threshold=1.0), dict(chunk=1)):
        IdentifyConfig(**ok)
    for bad in (dict(eps=0.0), dict(eps=1.5), dict(eps_experts=0.0), dict(eps_experts=1.5), dict(q=1.5),
                dict(threshold=1.5), dict(threshold=-0.1), dict(chunk=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            IdentifyConfig(**bad)


def test_documented_defaults():
    # docs/analysis.md: top 1 % (eps = 0.01), threshold 0.5, consensus at q = 0.5, ties kept.
    cfg = IdentifyConfig()
    assert (cfg.rule, cfg.eps, cfg.threshold, cfg.aggregation, cfg.q, cfg.ties) == (
        "top", 0.01, 0.5, "consensus", 0.5, "keep")


def test_recorded_zero_frequency_flag_matches_what_select_units_does():
    # to_dict() records whether a unit that never fired can be selected: with threshold 0,
    # frequency 0 passes ">= threshold", and still nothing is selected.
    cfg = IdentifyConfig(rule="absolute", threshold=0.0)
    zero_selected = bool(select_units(np.zeros((1, 5)), cfg).any())
    assert cfg.to_dict()["zero_frequency_selected"] is zero_selected is False


# ---------------------------------------------------------------- select_units

def test_tiny_eps_still_keeps_one_unit():
    # eps * U far below 1 still gives k = 1 (the max(1, ...) floor), not k = 0.
    row = np.array([[0.1, 0.9, 0.3]])
    assert as_set(select_units(row, IdentifyConfig(eps=1e-12))) == {1}


def test_break_ranks_nan_strength_last():
    # Three units tie at the cut (k = 2 of 10); unit 0's strength is NaN (a corrupt sum):
    # it ranks below every real strength, so units 1 and 2 are kept.
    row = np.array([[5, 5, 5, 0, 0, 0, 0, 0, 0, 0]], np.float32) / 10
    strength = np.array([[np.nan, 0.1, 0.3, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    assert as_set(select_units(row, IdentifyConfig(eps=0.2, ties="break"), strength=strength)) == {1, 2}


def test_break_on_unflattened_units_matches_brute_force():
    # freq and strength [n, L, F], as the docstring allows (not only [n, U_flat]).
    rng = np.random.default_rng(1)
    freq = rng.integers(0, 4, (3, 2, 5)) / 4
    strength = rng.random((3, 2, 5)).astype(np.float32)
    got = select_units(freq, IdentifyConfig(eps=0.3, ties="break"), strength=strength)
    assert got.shape == (3, 2, 5)
    assert np.array_equal(got, brute_top(freq, 0.3, strength))


def test_consensus_vote_guard_and_empty_categories():
    # q * n_c = 0.28 * 25 is 7.000000000000001 in floating point: 7 votes of 25 reach q = 0.28.
    assert consensus_sets(np.array([[7, 6]]), np.array([25]), 0.28).tolist() == [[True, False]]
    # A category with no instructions selects nothing, whatever q (0 votes >= q * 0).
    assert not consensus_sets(np.zeros((1, 3)), np.array([0]), 0.5).any()


# ---------------------------------------------------------------- identify / identify_all

def test_absent_category_has_empty_sets_zero_mean_and_does_not_spoil_unit_frequency():
    cats = [c for c in CATEGORIES if c != "math"]
    counts = small_counts(n=10, categories=[cats[i % 5] for i in range(10)])
    m = CATEGORIES.index("math")
    freq = counts.neuron_active / counts.tokens[:, None, None]
    for cfg in (IdentifyConfig(eps=0.3), IdentifyConfig(eps=0.3, aggregation="pooled")):
        ident = identify(counts, "neuron_active", cfg)
        assert ident.n_per_category[m] == 0 and not ident.category_sets[m].any()
        assert np.all(ident.category_mean[m] == 0)
        np.testing.assert_allclose(ident.unit_frequency(), freq.mean(0), rtol=1e-6)
    one = small_counts(n=1)  # a single instruction: the mean over instructions is its own row
    np.testing.assert_allclose(identify(one, "neuron_active").unit_frequency(),
                               one.neuron_active[0] / one.tokens[0], rtol=1e-6)


def test_instruction_rows_slices_and_refuses_once_dropped():
    counts = small_counts()
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.25))
    assert ident.section == "isn"
    assert ident.instruction_bits.dtype == bool and ident.instruction_bits.shape == (12, 2, 4)  # not packed
    want = brute_top(counts.neuron_active / counts.tokens[:, None, None], 0.25).reshape(12, -1)
    assert np.array_equal(ident.instruction_rows(2, 5), want[2:5])
    assert np.array_equal(ident.instruction_rows(7), want[7:])
    ident.drop_instruction_sets()
    with pytest.raises(ValueError, match="dropped"):
        ident.instruction_rows()


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="no 'expert_routed'"):
        identify(small_counts(), "expert_routed")


@pytest.mark.parametrize("shape", [(1, 8), (1, 9)])  # exactly one byte; one bit into a second byte
def test_instruction_sets_default_rule_break_chunked_and_packed(shape):
    counts = small_counts(n=7, shape=shape, seed=2, sums=True)
    freq = counts.neuron_active / counts.tokens[:, None, None]
    # No cfg: the default rule (eps = 0.01 -> k = 1, ties kept).
    assert np.array_equal(instruction_sets(counts), brute_top(freq, 0.01))
    mean_act = np.divide(counts.neuron_act_sum, counts.neuron_active, out=np.zeros(freq.shape),
                         where=counts.neuron_active > 0)
    want = brute_top(freq, 0.25, mean_act)
    cfg = IdentifyConfig(eps=0.25, ties="break", chunk=3)  # chunks of 3, 3, 1 rows
    assert np.array_equal(instruction_sets(counts, cfg=cfg), want)
    packed = instruction_sets(counts, cfg=cfg, packed=True)
    u = shape[0] * shape[1]
    assert packed.dtype == np.uint8 and packed.shape == (7, (u + 7) // 8)
    assert np.array_equal(np.unpackbits(packed, axis=1, count=u).astype(bool), want.reshape(7, -1))
    ident = identify(counts, "neuron_active", cfg, packed=True)
    assert ident.instruction_bits.shape == (7, (u + 7) // 8)


def test_identify_all_defaults_and_input_checks():
    counts = small_counts()
    a, b = identify_all(counts, "neuron_active", [IdentifyConfig(eps=0.25), IdentifyConfig(rule="absolute")])
    freq = counts.neuron_active / counts.tokens[:, None, None]
    # Instruction sets kept for every rule, unpacked, by default.
    assert a.instruction_bits.dtype == bool and b.instruction_bits.dtype == bool
    assert np.array_equal(a.instruction_sets(), brute_top(freq, 0.25))
    assert np.array_equal(b.instruction_sets(), freq >= 0.5)
    with pytest.raises(ValueError, match="at least one rule"):
        identify_all(counts, "neuron_active", [])
    short = small_counts()
    short.categories = short.categories[:-1]
    with pytest.raises(ValueError, match="11 categories for 12 instructions"):
        identify(short, "neuron_active")
    counts.sources = ["human"] * 11
    with pytest.raises(ValueError, match="11 sources for 12 instructions"):
        identify(counts, "neuron_active")


def exact_tie_counts():
    """T = 5, two instructions per category: unit 0 fires 5 and 2 times, unit 1 4 and 3 times,
    so both category means are exactly 0.7 (sums of float32 5/5 + 2/5 and 4/5 + 3/5 are not).
    Unit 0 is the stronger one (mean activation 2 against 1)."""
    na = np.ones((12, 1, 10), np.int32)
    sums = na.astype(np.float32)
    na[0::2, 0, :2], na[1::2, 0, :2] = [5, 4], [2, 3]
    sums[:, 0, 0] = 2.0 * na[:, 0, 0]
    return Counts(tokens=np.full(12, 5), neuron_active=na, neuron_act_sum=sums,
                  categories=[CATEGORIES[i // 2] for i in range(12)])


def test_pooled_rule_beside_a_consensus_rule_keeps_exact_means():
    # One pass for a consensus and a pooled rule: the pooled one still cuts exact means
    # (k = 1 of 10, both units at 0.7 kept), not float32 sums that split the tie.
    counts = exact_tie_counts()
    _, pooled = identify_all(counts, "neuron_active",
                             [IdentifyConfig(eps=0.1), IdentifyConfig(eps=0.1, aggregation="pooled")])
    assert [as_set(s) for s in pooled.category_sets] == [{0, 1}] * 6


def test_pooled_break_beside_its_contrast_rule_reads_the_category_strength():
    # The pooled exact-k rule and its contrast (absolute, ties kept) in one pass, as
    # analyze_model runs them: the tie at 0.7 is broken by the stronger unit 0.
    cfg = IdentifyConfig(eps=0.1, aggregation="pooled", ties="break")
    main, contrast = identify_all(exact_tie_counts(), "neuron_active", [cfg, contrast_config(cfg)])
    assert [as_set(s) for s in main.category_sets] == [{0}] * 6
    assert [as_set(s) for s in contrast.category_sets] == [{0, 1}] * 6  # mean 0.7 >= 0.5


# ---------------------------------------------------------------- instruction_jaccard

def brute_jaccard(rows):
    n = rows.shape[0]
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            union = (rows[i] | rows[j]).sum()
            if union:
                out[i, j] = (rows[i] & rows[j]).sum() / union
    return out


def test_instruction_jaccard_blocks_hold_at_most_the_budget():
    # budget 3 rows of 10 float32 units: blocks [0, 3), [3, 6), [6, 7); every pair still exact.
    counts = small_counts(n=7, shape=(2, 5), seed=4)
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.3))
    rows = ident.instruction_rows()
    reads = []
    full_rows = ident.instruction_rows

    def recording(start=0, stop=None):
        out = full_rows(start, stop)
        reads.append((start, start + out.shape[0]))
        return out

    ident.instruction_rows = recording
    got = instruction_jaccard(ident, budget_bytes=4 * 10 * 3)
    assert sorted(set(reads)) == [(0, 3), (3, 6), (6, 7)]
    np.testing.assert_allclose(got, brute_jaccard(rows), rtol=1e-6)
    # A budget below one row still reads one row at a time.
    reads.clear()
    np.testing.assert_allclose(instruction_jaccard(ident, budget_bytes=1), brute_jaccard(rows), rtol=1e-6)
    assert sorted(set(reads)) == [(i, i + 1) for i in range(7)]


def unit_heavy_ident(units):
    """One instruction over `units` units, its set packed (the unit count is all that matters)."""
    bits = np.zeros((1, (units + 7) // 8), np.uint8)
    bits[0, 0] = 0b11000000  # units 0 and 1
    return Identification(
        field="neuron_active", config=IdentifyConfig(), unit_shape=(units,), labels=np.zeros(1, np.int64),
        category_sets=np.zeros((6, 1), bool), category_mean=np.zeros((6, 1), np.float32),
        n_per_category=np.array([1, 0, 0, 0, 0, 0]), instruction_size=np.array([2]),
        instruction_bits=bits, packed=True)


def test_instruction_jaccard_refuses_unit_counts_float32_cannot_count():
    # The documented guard: from 2**24 units on, float32 intersection counts may stop being
    # exact and the call is refused; 2**23 units are counted (here one pair of 2 units).
    with pytest.raises(ValueError, match="exceed exact float32"):
        instruction_jaccard(unit_heavy_ident(1 << 24))
    assert instruction_jaccard(unit_heavy_ident(1 << 23)).tolist() == [[1.0]]


# ---------------------------------------------------------------- evaluation helpers

def test_breadth_histogram_has_one_entry_per_category_count_when_no_unit_is_general():
    # Units in 1, 2 and 2 of the six sets, none in all: the histogram still has six entries
    # (entry k-1 = units in exactly k sets).
    sets = np.zeros((6, 4), bool)
    sets[0, 0] = True
    sets[[1, 2], 1] = True
    sets[[3, 5], 2] = True
    g = generality(sets)
    assert g["breadth_histogram"].tolist() == [1, 2, 0, 0, 0, 0]
    assert (g["general"], g["union"]) == (0, 3)


def test_category_order_groups_stably_and_bounds_every_category():
    labels = np.array([2, 0, 2, 1, 0, 5])
    order, bounds = category_order(labels)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # input order kept within a category
    assert bounds.tolist() == [0, 2, 3, 5, 5, 5, 6]  # empty categories 3 and 4: empty spans


def brute_phases(y):
    """Every split 1 <= b1 < b2 <= L-1 scored by the plain residual of three means; the
    smallest wins, the earliest among those within a relative 1e-9 of it."""
    y = np.asarray(y, np.float64)
    n = len(y)

    def sse(seg):
        return float(((seg - seg.mean()) ** 2).sum())

    cost = {(b1, b2): sse(y[:b1]) + sse(y[b1:b2]) + sse(y[b2:])
            for b1 in range(1, n - 1) for b2 in range(b1 + 1, n)}
    total = sse(y)
    low = min(cost.values())
    b1, b2 = min(k for k, v in cost.items() if v <= low + 1e-9 * max(1.0, total))
    means = [y[:b1].mean(), y[b1:b2].mean(), y[b2:].mean()]
    return [b1, b2], means, (1 - cost[b1, b2] / total if total > 0 else None)


def test_locate_phases_matches_brute_force_on_random_profiles():
    rng = np.random.default_rng(5)
    for n in (3, 4, 5, 7, 9):
        for scale in (1.0, 300.0):  # per-layer shares and per-layer counts
            y = rng.random(n) * scale
            got = locate_phases(y)
            bounds, means, explained = brute_phases(y)
            assert got["boundaries"] == bounds, y
            assert [got[p]["mean"] for p in ("early", "middle", "late")] == pytest.approx(means)
            assert got["early"]["layers"] == [0, bounds[0] - 1] and got["late"]["layers"] == [bounds[1], n - 1]
            assert got["explained"] == pytest.approx(explained)
            assert got["early_dominant"] == (means[0] > means[1] and means[0] > means[2])


def test_locate_phases_matches_brute_force_on_random_profiles_with_ties():
    # Few distinct values: many splits fit exactly alike, and the earliest must win (the observed
    # fit and the shuffles' fits are the one vectorised search).
    rng = np.random.default_rng(15)
    for n in (3, 4, 6, 8, 11):
        step = np.where(np.arange(n) < rng.integers(1, n), *rng.random(2) * 300)  # one step: zero-cost splits
        for y in (rng.integers(0, 3, n).astype(float), rng.integers(0, 2, n) * 0.1, step):
            got = locate_phases(y)
            bounds, means, explained = brute_phases(y)
            assert got["boundaries"] == bounds, y
            assert [got[p]["mean"] for p in ("early", "middle", "late")] == pytest.approx(means)
            assert (got["explained"] is None) == (explained is None), y
            assert explained is None or got["explained"] == pytest.approx(explained)


def test_locate_phases_ties_and_equal_phase_means():
    # Splits that tie exactly go to the earliest boundaries, also where float rounding
    # makes a later tie look better by less than the relative tolerance.
    assert locate_phases([2.0, 2.0, 2.0, 2.0])["boundaries"] == [1, 2]
    assert locate_phases([0.1, 0.1, 0.1, 0.7])["boundaries"] == [1, 3]
    assert locate_phases([81345.7, 81345.7, 81345.7, 91284.28])["boundaries"] == [1, 3]
    # Early dominates only when strictly above both other phases.
    three = locate_phases([1.0, 1.0, 0.0])  # three layers: one per phase
    assert three["boundaries"] == [1, 2] and three["early_dominant"] is False  # early == middle
    assert locate_phases([1.0, 0.0, 0.0, 1.0])["early_dominant"] is False  # early == late


# ---------------------------------------------------------------- comparison

def test_compare_sets_matches_brute_force_per_category_and_layer():
    rng = np.random.default_rng(6)
    before, after = rng.random((2, 6, 3, 4)) < 0.4  # L = 3 layers of 4 units (L != F)
    got = compare_sets(before, after)
    for c in range(6):
        # (key prefix, index into the result, the two sets): the category, then each layer.
        cases = [("", (c,), before[c], after[c])]
        cases += [("per_layer_", (c, li), before[c, li], after[c, li]) for li in range(3)]
        for prefix, idx, b, a in cases:
            want = {"size_before": b.sum(), "size_after": a.sum(), "retained": (b & a).sum(),
                    "gained": (a & ~b).sum(), "lost": (b & ~a).sum(),
                    "jaccard": (b & a).sum() / (b | a).sum() if (b | a).any() else np.nan}
            for k, v in want.items():
                assert np.isclose(got[prefix + k][idx], v, equal_nan=True), (prefix + k, idx)
    assert got["per_layer_size_before"].shape == got["per_layer_size_after"].shape == (6, 3)


def test_frequency_shift_means_over_all_units_and_shape_check():
    rng = np.random.default_rng(7)
    pb, pa = rng.random((2, 6, 2, 5))
    sets = rng.random((6, 2, 5)) < 0.5
    fs = frequency_shift(pb, pa, sets, sets)
    np.testing.assert_allclose(fs["mean_before"], pb.reshape(6, -1).mean(1))
    np.testing.assert_allclose(fs["mean_after"], pa.reshape(6, -1).mean(1))
    with pytest.raises(ValueError, match="differ in units"):
        frequency_shift(pb, pa[:, :1], sets, sets[:, :1])


# ---------------------------------------------------------------- common helpers

def test_safe_div_and_nan_mean():
    # Array-likes too; only a zero denominator gives NaN (a denominator of 1 divides).
    np.testing.assert_array_equal(safe_div([1, 2, 3], [0, 1, 4]), [np.nan, 2.0, 0.75])
    assert nan_mean([1.0, np.nan, 3.0, np.inf]) == 2.0  # non-finite entries skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "no warning" for an all-NaN input
        assert np.isnan(nan_mean([np.nan])) and np.isnan(nan_mean([]))


def test_jsonable_gives_plain_python():
    out = jsonable({1: np.int64(3), "f": np.float32(0.5), "nan": np.float64("nan"), "b": np.bool_(True),
                    "t": (np.arange(2), [np.inf])})
    assert out == {"1": 3, "f": 0.5, "nan": None, "b": True, "t": [[0, 1], [None]]}
    assert type(out["1"]) is int and type(out["f"]) is float and type(out["b"]) is bool


def test_phase_fit_p_value_matches_brute_force_over_the_same_shuffles():
    rng = np.random.default_rng(8)
    for y in (rng.poisson(100, 7).astype(float), np.array([9.0, 8, 9, 3, 2, 3, 1, 0]), rng.random(5)):
        got = locate_phases(y, n_perm=40, seed=3)
        draw = np.random.default_rng(3)
        shuffled = [brute_phases(draw.permutation(y))[2] for _ in range(40)]
        expect = (1 + sum(e >= got["explained"] - 1e-9 for e in shuffled)) / 41
        assert got["explained_p"] == pytest.approx(expect) and got["n_perm"] == 40
        assert locate_phases(y)["explained_p"] is None  # no shuffles, no test
    # A clean step along depth beats almost every order; a flat noisy profile does not,
    # although its best three-step fit explains most of its variance.
    assert locate_phases([5.0, 5, 5, 2, 2, 2, 0, 0, 0], n_perm=99)["explained_p"] <= 0.05
    flat = locate_phases([101.0, 93, 104, 98], n_perm=99)
    assert flat["explained"] > 0.7 and flat["explained_p"] > 0.3
    assert locate_phases([3.0, 3, 3, 3], n_perm=9)["explained_p"] is None


def test_a_study_of_some_categories_counts_general_units_over_those_it_has():
    # A notebook study of three categories (load_instructions(categories=...)): the three absent
    # categories' empty sets were counted among "every category", so `general` was 0 whatever the
    # three shared, and absent categories overlapped present ones with Jaccard 0 (unmeasured, not disjoint).
    from sparcom_jax.analysis import analyze_model, category_overlap
    from sparcom_jax.analysis.uncertainty import series_figures

    present_names = ["classification", "code", "general_qa"]
    counts = small_counts(n=12, shape=(4, 8), categories=[present_names[i % 3] for i in range(12)])
    analysis = analyze_model(counts, IdentifyConfig(eps=0.4), n_boot=4, n_perm=0)
    sets = analysis["isn"].ident.category_sets.reshape(6, -1)
    present = np.isin(CATEGORIES, present_names)
    in_all_three = int(np.logical_and.reduce(sets[present]).sum())  # brute force
    s = analysis["isn"].summary
    assert in_all_three > 0 and s["general"] == in_all_three
    assert s["general_share"] == pytest.approx(in_all_three / int(sets.any(0).sum()))
    assert s["breadth_histogram"]["3"] == in_all_three and s["breadth_histogram"]["6"] == 0
    assert s["general_per_layer"] == np.logical_and.reduce(sets[present]).reshape(4, 8).sum(1).tolist()
    a, b = CATEGORIES.index("code"), CATEGORIES.index("math")
    assert s["overlap_jaccard"][a][b] is None and s["overlap_coefficient"][b][a] is None
    inter, union = (sets[0] & sets[a]).sum(), (sets[0] | sets[a]).sum()
    assert s["overlap_jaccard"][0][a] == pytest.approx(inter / union)
    assert category_overlap(sets)[0][a, b] == 0.0  # without `present`, as before: every category measured
    # The bootstrap and a series' trends use the same rule.
    assert s["bootstrap"]["general"]["high"] > 0  # replicates counted over the three categories too
    assert series_figures([sets, sets], present)["general"].tolist() == [in_all_three] * 2
    assert series_figures([sets, sets])["general"].tolist() == [0, 0]
    text = repr(analysis)
    assert "|S(c)|            CLS %d, CODE %d, QA %d, GEN -, MATH -, SUM -" % tuple(sets[:3].sum(1)) in text
    assert f"general / union   {in_all_three} / {int(sets.any(0).sum())}" in text
    assert "no instructions   GEN, MATH, SUM (shown as -; general: in all 3 categories that have instructions)" in text


def test_general_units_are_undefined_with_fewer_than_two_categories():
    # With no category present generality() raised ("cannot reshape array of size 0"); with one,
    # general == union and general_share == 1.0 read as "every selected unit is general".
    from sparcom_jax.analysis import analyze_model
    from sparcom_jax.report.writer import _general_text

    sets = np.zeros((6, 2, 3), bool)
    sets[0, 0, :2] = sets[1, 0, 1:] = True  # CLS {0, 1}, CODE {1, 2}: by hand, general {1} of 3
    one, none = np.eye(6, dtype=bool)[0], np.zeros(6, bool)
    g = generality(sets, one | np.eye(6, dtype=bool)[1])
    assert (g["general"], g["union"], g["general_share"]) == (1, 3, pytest.approx(1 / 3))
    for present, union in ((one, 2), (none, 0)):
        g = generality(sets, present)
        assert np.isnan(g["general"]) and np.isnan(g["general_share"]) and g["union"] == union
        assert not g["general_mask"].any() and g["general_mask"].shape == (2, 3)
    counts = small_counts(n=4, shape=(2, 8), categories=["code"] * 4)
    analysis = analyze_model(counts, IdentifyConfig(eps=0.4), n_boot=3, n_perm=0)
    s = analysis["isn"].summary
    assert s["union"] > 0 and s["general"] is None and s["general_share"] is None
    assert s["general_per_layer"] == [None, None]
    assert f"general / union   - / {s['union']}" in repr(analysis)
    assert "undefined with fewer than two categories" in _general_text("base", "isn", s).text


def test_absent_categories_are_those_counted_zero_in_either_form():
    # One helper for what three reprs each built: a sequence in CATEGORIES order or a mapping; a
    # category left out of the mapping or counted None (not known) is not shown as absent.
    from sparcom_jax.categories import absent_categories

    assert absent_categories(np.array([2, 0, 1, 0, 3, 0])) == ["code", "generation", "summarization"]
    assert absent_categories({"code": 0, "math": None, "classification": 4}) == ["code"]
