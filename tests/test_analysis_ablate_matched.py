"""Random controls matched on activation-frequency bins, their spread, expert neurons and
the dropped routing mass."""

import json

import numpy as np
import pytest

from sparcom_jax.analysis import (
    AblationResult, IdentifyConfig, ablate_identification, ablation_matrix, frequency_bins, identify,
    matched_random,
)
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def test_frequency_bins_hand_case():
    # Quantiles at 1/4, 1/2, 3/4 of [0,0,0,0,1,2,3,4] are 0, 0.5, 2.25: zeros alone in bin 0.
    f = np.array([[0, 0, 0, 0, 1, 2, 3, 4], [8, 7, 6, 5, 4, 3, 2, 1]], float)
    b = frequency_bins(f, 4)
    assert b[0].tolist() == [0, 0, 0, 0, 2, 2, 3, 3]
    assert b[1].tolist() == [3, 3, 2, 2, 1, 1, 0, 0]  # per group (row), not over the whole array
    assert frequency_bins(f, 1).max() == 0
    g = frequency_bins(np.arange(16, dtype=float).reshape(2, 2, 4), 2, lead=2)
    assert g.tolist() == [[[0, 0, 1, 1]] * 2] * 2
    with pytest.raises(ValueError, match="n_bins"):
        frequency_bins(f, 0)


def test_matched_draws_keep_bin_counts_exclude_the_set_and_are_uniform():
    rng = np.random.default_rng(0)
    bins = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    mask = np.zeros((1, 10), bool)
    mask[0, [0, 4]] = True  # one unit in each bin
    hits = np.zeros(10)
    for _ in range(3000):
        r, off, inside = matched_random(mask, rng, bins)
        assert (off, inside) == (0, 0)
        assert not (r & mask).any()
        assert np.bincount(bins[r], minlength=2).tolist() == [1, 1]
        hits += r[0]
    # Bin 0 offers units 1..3, bin 1 units 5..9.
    assert np.allclose(hits[1:4] / 3000, 1 / 3, atol=0.04)
    assert np.allclose(hits[5:] / 3000, 1 / 5, atol=0.04)


def test_short_bins_borrow_from_the_nearest_then_from_the_set():
    rng = np.random.default_rng(1)
    bins = np.array([[0, 0, 1, 1, 2, 2, 3, 3]])
    mask = np.zeros((1, 8), bool)
    mask[0, [2, 3]] = True  # bin 1 has nothing outside the set
    for _ in range(50):
        r, off, inside = matched_random(mask, rng, bins)
        assert (off, inside) == (2, 0)
        assert set(np.flatnonzero(r[0])) <= {0, 1, 4, 5}  # distance 1 only
    full = np.ones((1, 8), bool)
    full[0, 7] = False
    r, off, inside = matched_random(full, rng, bins)
    assert r.sum() == 7 and r[0, 7] and (off, inside) == (0, 6)
    # Without exclusion the set's own units are fair game in their bin.
    r, off, inside = matched_random(mask, rng, bins, exclude=False)
    assert r[0, 2] and r[0, 3] and (off, inside) == (0, 0)


class Model:
    """loss_e(mask) = 1 + 0.5 |mask ∩ S(e)| + 0.01 |mask|; exposes last_dropped_mass =
    0.1 |mask| + 0.01 (units of the mask in the first index column)."""

    def __init__(self, sets, mass=True):
        self.sets, self.mass, self.masks = sets, mass, []

    def __call__(self, mask):
        self.masks.append(None if mask is None else mask.copy())
        if self.mass:
            self.last_dropped_mass = 0.0 if mask is None else 0.1 * float(mask.sum()) + 0.01 * float(
                mask[..., 0].sum())
        return {c: 1.0 + (0.0 if mask is None else 0.5 * (mask & self.sets[c]).sum() + 0.01 * mask.sum())
                for c in CATEGORIES}


def layered_sets(shape=(3, 16)):
    sets = {}
    for c, cat in enumerate(CATEGORIES):
        m = np.zeros(shape, bool)
        m[:, 2 * c:2 * c + 2] = True
        sets[cat] = m
    return sets


def test_ablation_matrix_matches_bins_per_layer_and_records_spread_and_mass():
    sets = layered_sets()
    freq = np.tile(np.linspace(0.0, 1.0, 16), (3, 1))  # unit u: frequency u / 15 in every layer
    model = Model(sets)
    r = ablation_matrix(sets, model, seed=3, frequency=freq, n_bins=4)
    assert r.n_random == 10 and len(model.masks) == 1 + 6 * 11  # default: 10 draws
    bins = frequency_bins(freq, 4)
    for a, cat in enumerate(CATEGORIES):
        block = model.masks[1 + a * 11:1 + (a + 1) * 11]
        assert np.array_equal(block[0], sets[cat])
        for m in block[1:]:
            assert not (m & sets[cat]).any()
            for layer in range(3):
                want = np.bincount(bins[layer][sets[cat][layer]], minlength=4)
                assert np.bincount(bins[layer][m[layer]], minlength=4).tolist() == want.tolist()
    assert r.in_set.sum() == 0 and r.off_bin.sum() == 0
    assert r.matching == {"group": "layer", "frequency_bins": 4, "exclude_tested_set": True}
    # The spread over draws, brute force.
    ex = r.isn[None] - r.random_draws
    sp = r.excess_spread()
    assert np.allclose(sp["std"], ex.std(0))
    assert np.allclose(sp["p5"], np.percentile(ex, 5, axis=0))
    assert np.allclose(sp["random_ge_fraction"], (r.random_draws >= r.isn[None]).mean(0))
    assert np.allclose(np.diag(r.isn), 0.5 * 6 + 0.06)
    assert np.allclose(np.diag(sp["random_ge_fraction"]), 0.0)
    # Dropped routing mass: what the model reported after each call.
    assert np.allclose(r.dropped_mass, [0.63] + [0.6] * 5)  # CLS holds neuron 0 of 3 layers
    for a in range(6):
        for d, m in enumerate(model.masks[2 + a * 11:1 + (a + 1) * 11]):
            assert r.random_dropped_mass[d, a] == pytest.approx(0.1 * m.sum() + 0.01 * m[:, 0].sum())
    # CODE's set (neurons 2, 3) shares bin 0 with neurons 0, 1 only: every draw takes neuron 0.
    assert np.allclose(r.random_dropped_mass[:, 1], 0.63)
    assert np.allclose(r.random_dropped_mass[:, 0], 0.6)
    d = r.to_dict()
    assert d["dropped_mass"]["code"] == pytest.approx(0.6)
    assert np.allclose(np.array(d["excess_std"], float), sp["std"])
    assert set(d["excess_percentiles"]) == {"5", "50", "95"}


def test_no_mass_attribute_gives_none_and_empty_sets_stay_zero():
    sets = layered_sets()
    sets["math"][:] = False
    r = ablation_matrix(sets, Model(sets, mass=False), n_random=2)
    assert r.dropped_mass is None and r.random_dropped_mass is None
    assert r.to_dict()["dropped_mass"] is None
    assert np.all(r.isn[CATEGORIES.index("math")] == 0)


def test_expert_neurons_match_per_layer_and_expert():
    shape = (2, 3, 8)  # L, E, G
    sets = {}
    for c, cat in enumerate(CATEGORIES):
        m = np.zeros(shape, bool)
        m[c % 2, c % 3, :3] = True
        m[1, 2, 7] = True
        sets[cat] = m
    model = Model(sets)
    r = ablation_matrix(sets, model, n_random=4, seed=0, kind="expert_neurons")
    assert r.kind == "expert_neurons" and r.matching["group"] == "layer, expert"
    for a, cat in enumerate(CATEGORIES):
        for m in model.masks[2 + a * 5:1 + (a + 1) * 5]:
            assert np.array_equal(m.sum(-1), sets[cat].sum(-1))  # per (layer, expert)
            assert not (m & sets[cat]).any()
    with pytest.raises(ValueError, match="kind"):
        ablation_matrix(sets, model, kind="heads")


def test_few_units_per_group_get_fewer_bins():
    sets = {c: np.eye(2, 8, k=i % 6, dtype=bool) for i, c in enumerate(CATEGORIES)}  # [L, E] = [2, 8]
    r = ablation_matrix(sets, Model(sets), n_random=2, kind="experts", frequency=np.tile(np.arange(8.0), (2, 1)))
    assert r.matching["frequency_bins"] == 2  # 8 experts: one bin per 4 units
    assert r.in_set.sum() == 0


def test_frequency_shape_checked():
    sets = layered_sets()
    with pytest.raises(ValueError, match="frequency has shape"):
        ablation_matrix(sets, Model(sets), frequency=np.zeros((3, 8)))


def test_to_dict_from_dict_round_trip_and_old_files():
    sets = layered_sets()
    r = ablation_matrix(sets, Model(sets), n_random=3, seed=2, frequency=np.tile(np.arange(16.0), (3, 1)))
    d = json.loads(json.dumps(r.to_dict()))
    back = AblationResult.from_dict(d)
    for k in ("isn", "random", "random_draws", "set_sizes", "dropped_mass", "random_dropped_mass",
              "off_bin", "in_set"):
        assert np.allclose(getattr(back, k), getattr(r, k)), k
    assert back.matching == r.matching and back.to_dict() == d
    r.off_bin[1, 2], r.in_set[2, 4] = 3, 5  # as a poorly matched control would record them
    again = AblationResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.off_bin[1, 2] == 3 and again.in_set[2, 4] == 5 and again.in_set[1, 2] == 0
    old = {k: d[k] for k in ("kind", "baseline", "isn", "random", "random_draws", "set_sizes", "n_random", "seed")}
    old["isn"][0][1] = None
    legacy = AblationResult.from_dict(old)
    assert np.isnan(legacy.isn[0, 1]) and legacy.dropped_mass is None and legacy.off_bin is None


def test_ablate_identification_bins_on_mean_frequency():
    # Unit frequencies over all instructions: neuron i of every layer fires on i of 10 tokens
    # in CLS and MATH and on none elsewhere -> unit_frequency = (2 * i / 10) / 12 * 2.
    n = 12
    na = np.zeros((n, 2, 10), np.int32)
    for k in range(n):
        if CATEGORIES[k // 2] in ("classification", "math"):
            na[k] = np.arange(10)
    counts = Counts(tokens=np.full(n, 10), neuron_active=na, categories=[CATEGORIES[k // 2] for k in range(n)])
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.1))
    assert np.allclose(ident.unit_frequency(), np.tile(np.arange(10) / 10 * 4 / 12, (2, 1)))
    sets = ident.sets()
    model = Model(sets)
    r = ablate_identification(ident, model, n_random=2, n_bins=2, seed=0)
    assert r.kind == "neurons" and r.matching["frequency_bins"] == 2
    # CLS's set is neuron 9 of both layers (k = 2, both at p = 0.9): draws come from the
    # upper bin (neurons 5..9) of each layer, outside the set.
    assert np.array_equal(model.masks[1], sets["classification"])
    assert set(zip(*np.nonzero(sets["classification"]))) == {(0, 9), (1, 9)}
    for m in model.masks[2:4]:
        assert m.sum(1).tolist() == [1, 1]
        assert set(np.flatnonzero(m[0])) | set(np.flatnonzero(m[1])) <= {5, 6, 7, 8}


def test_monte_carlo_p_value_has_a_floor_of_one_over_draws_plus_one():
    # Hand case: set loss increases 1.0; draws 0.5, 1.0, 2.0, 0.2 on every cell -> 2 of 4
    # draws reach the set, p = (1 + 2) / (1 + 4); a set that beats every draw gets 1 / 5, not 0.
    r = AblationResult(kind="neurons", baseline={c: 1.0 for c in CATEGORIES}, isn=np.ones((6, 6)),
                       random=np.zeros((6, 6)), random_draws=np.array([0.5, 1.0, 2.0, 0.2])[:, None, None]
                       * np.ones((1, 6, 6)), set_sizes=np.ones(6, np.int64), n_random=4, seed=0)
    r.isn[0, 0] = 3.0
    sp = r.excess_spread()
    assert sp["p_value"][1, 1] == pytest.approx(3 / 5) and sp["random_ge_fraction"][1, 1] == pytest.approx(0.5)
    assert sp["p_value"][0, 0] == pytest.approx(1 / 5) and sp["random_ge_fraction"][0, 0] == 0.0
    d = json.loads(json.dumps(r.to_dict()))
    assert d["p_value"][0][0] == pytest.approx(0.2)
    from sparcom_jax.report.tables import ABLATION_HEADER, ablation_rows
    row = dict(zip(ABLATION_HEADER, ablation_rows(d)[0]))
    assert row["p_own"] == pytest.approx(0.2) and row["random_ge_fraction_own"] == 0.0


def test_frequency_match_of_the_draws_is_recorded():
    # Frequencies u / 15 per layer, 4 quantile bins (units 0-3, 4-7, 8-11, 12-15). A set of the
    # two most frequent units (14, 15) fills the top of the top bin: its draws can only take
    # units 12 and 13, so they fire less (mean 12.5 / 15) than the set (14.5 / 15).
    freq = np.tile(np.arange(16.0) / 15, (3, 1))
    top = np.zeros((3, 16), bool)
    top[:, 14:] = True
    sets = {c: top for c in CATEGORIES}
    model = Model(sets)
    r = ablation_matrix(sets, model, n_random=3, seed=1, frequency=freq, n_bins=4)
    assert np.allclose(r.set_frequency, 14.5 / 15)
    assert np.allclose(r.random_frequency, 12.5 / 15)
    for a in range(6):  # brute force over the masks the model saw
        for d, m in enumerate(model.masks[2 + a * 4:1 + (a + 1) * 4]):
            assert r.random_frequency[d, a] == pytest.approx(freq[m].mean())
    d = json.loads(json.dumps(r.to_dict()))
    back = AblationResult.from_dict(d)
    assert np.allclose(back.set_frequency, r.set_frequency) and np.allclose(back.random_frequency, r.random_frequency)
    from sparcom_jax.report.tables import ABLATION_HEADER, ablation_rows
    row = dict(zip(ABLATION_HEADER, ablation_rows(d)[2]))
    assert row["set_frequency"] == pytest.approx(14.5 / 15) and row["random_frequency_mean"] == pytest.approx(12.5 / 15)
    assert ablation_matrix(sets, Model(sets), n_random=1).set_frequency is None  # counts-only matching


def test_the_records_each_categorys_loss_rests_on_are_recorded_and_thin_ones_flagged():
    # The demo's held-out SUM records: long prompts cut 5 of 8 at max_length, so SUM's loss
    # rested on 3 records without a word in the result.
    from sparcom_jax.analysis.ablate import MIN_SCORED_FRACTION, MIN_SCORED_RECORDS, coverage_warnings

    assert (MIN_SCORED_RECORDS, MIN_SCORED_FRACTION) == (5, 0.5)
    cov = {c: {"records": 8, "scored_records": 8, "response_tokens": 80} for c in CATEGORIES}
    cov["summarization"] = {"records": 8, "scored_records": 3, "response_tokens": 21}  # too few
    cov["code"] = {"records": 12, "scored_records": 5, "response_tokens": 40}  # 5 >= 5 but 5 < 6
    cov["math"] = {"records": 10, "scored_records": 5, "response_tokens": 30}  # 5 of 10: kept
    cov["general_qa"] = {"records": 6, "scored_records": 4, "response_tokens": 30}  # 4 >= 3, but 4 < 5
    sets = layered_sets()
    model = Model(sets, mass=False)
    model.coverage = cov
    r = ablation_matrix(sets, model, n_random=1)
    assert r.coverage == cov
    want = ["code: its causal-check loss rests on 5 of 12 held-out records (40 response tokens); the prompts of "
            "the rest fill max_length: raise data.max_length",
            "general_qa: its causal-check loss rests on 4 of 6 held-out records (30 response tokens); the "
            "prompts of the rest fill max_length: raise data.max_length",
            "summarization: its causal-check loss rests on 3 of 8 held-out records (21 response tokens); the "
            "prompts of the rest fill max_length: raise data.max_length"]
    assert coverage_warnings(cov) == want
    assert repr(r).splitlines()[-3:] == [f"  warning: {w}" for w in want]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["coverage_warnings"] == want
    assert AblationResult.from_dict(d).coverage == cov
    from sparcom_jax.report.tables import ABLATION_HEADER, ablation_rows
    row = dict(zip(ABLATION_HEADER, ablation_rows(d)[CATEGORIES.index("summarization")]))
    assert (row["held_out_records"], row["scored_records"], row["response_tokens"]) == (8, 3, 21)
    # Nothing cut, but few held-out records: the fix is more of them.
    few = {"generation": {"records": 2, "scored_records": 2, "response_tokens": 9}}
    assert coverage_warnings(few) == ["generation: its causal-check loss rests on only 2 held-out records (9 "
                                      "response tokens): raise ablation.max_records or hold out more records "
                                      "(data.split)"]
    # A callback that does not say leaves the result silent about it.
    bare = ablation_matrix(sets, Model(sets), n_random=1)
    assert bare.coverage is None and bare.to_dict()["coverage_warnings"] == [] and "warning" not in repr(bare)
