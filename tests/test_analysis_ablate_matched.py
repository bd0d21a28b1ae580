"""Random controls matched unit by unit on activation frequency, their spread, expert neurons
and the dropped routing mass."""

import json

import numpy as np
import pytest

from sparcom_jax.analysis import (
    AblationResult, IdentifyConfig, ablate_identification, ablation_matrix, identify, matched_random,
)
from sparcom_jax.analysis.ablate import above_all_others
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def reachable(members, freq, k):
    """Brute force: every set one group's draw can be, with its probability, by walking every
    sequence of choices (the set's units most frequent first, each replaced uniformly by one of
    the k free units nearest to it in frequency, or tied with the k-th)."""
    units = sorted(np.flatnonzero(members), key=lambda u: (-freq[u], u))
    out = {}

    def walk(i, taken, p):
        if i == len(units):
            out[taken] = out.get(taken, 0.0) + p
            return
        free = [c for c in range(len(freq)) if not members[c] and c not in taken]
        dist = {c: abs(freq[c] - freq[units[i]]) for c in free}
        cut = sorted(dist.values())[min(k, len(free)) - 1]
        pool = [c for c in free if dist[c] <= cut]
        for c in pool:
            walk(i + 1, taken | {c}, p / len(pool))

    walk(0, frozenset(), 1.0)
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_each_unit_is_replaced_by_one_of_its_nearest_free_units_brute_force(k):
    # Group 0: the choice of the most frequent unit (90) changes what the next (50) can take.
    # Group 1: ties; the never-firing unit 7 has two free never-firing neighbours.
    freq = np.array([[90, 80, 70, 50, 45, 30, 20, 10, 5, 0],
                     [90, 80, 80, 50, 44, 30, 10, 0, 0, 0]], float)
    mask = np.zeros((2, 10), bool)
    mask[0, [0, 3]] = True
    mask[1, [0, 3, 7]] = True
    want = [reachable(mask[g], freq[g], k) for g in range(2)]
    if k == 2:  # hand check of the brute force itself: 90 takes 80 or 70; 50 then one of its two nearest
        assert want[0] == pytest.approx({frozenset({1, 2}): 1 / 6, frozenset({1, 4}): 1 / 6, frozenset({1, 5}): 1 / 6,
                                         frozenset({2, 4}): 1 / 4, frozenset({2, 5}): 1 / 4})
        assert len(want[1]) == 8 and set().union(*want[1]) == {1, 2, 4, 5, 8, 9}
    rng = np.random.default_rng(0)
    n = 2000
    seen = [dict(), dict()]
    for _ in range(n):
        r, inside = matched_random(mask, rng, freq, neighbours=k)
        assert inside == 0 and not (r & mask).any()
        for g in range(2):
            key = frozenset(np.flatnonzero(r[g]).tolist())
            seen[g][key] = seen[g].get(key, 0) + 1
    for g in range(2):
        assert set(seen[g]) == set(want[g])  # never a set the rule cannot draw, and every one it can
        for key, p in want[g].items():
            assert seen[g][key] / n == pytest.approx(p, abs=0.04)


def scan_draw(mask, rng, freq, k, exclude):
    """Reference: matched_random as first written, a scan of the whole group for every unit
    (rng.choice among the free units within the k-th distance, in index order)."""
    out = np.zeros_like(mask)
    for g in np.flatnonzero(mask.any(1)):
        members, f = mask[g], freq[g]
        free = ~members if exclude else np.ones_like(members)
        units = np.flatnonzero(members)
        n = min(units.size, int(free.sum()))
        for u in units[np.argsort(-f[units], kind="stable")][:n]:
            cand = np.flatnonzero(free & ~out[g])
            dist = np.abs(f[cand] - f[u])
            cut = np.sort(dist)[min(k, cand.size) - 1]
            out[g, rng.choice(cand[dist <= cut])] = True
        if units.size > n:
            out[g, rng.choice(np.flatnonzero(~out[g]), size=units.size - n, replace=False)] = True
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_draws_equal_a_scan_of_the_whole_group(k):
    # The fast search (sorted once, walk outward, bisect the ties) must draw exactly what a
    # scan draws, RNG stream included: many ties (few distinct frequencies), sets of each
    # group's top units (their neighbours are set members), random sets, full groups.
    for seed in range(6):
        gen = np.random.default_rng(seed)
        freq = gen.integers(0, 6, (5, 40)) / 5.0
        mask = gen.random((5, 40)) < 0.2
        top = np.argsort(-freq[1], kind="stable")[:8]
        mask[1] = False
        mask[1, top] = True
        mask[2] = True
        mask[2, :3] = False  # more units in the set than free ones
        mask[3] = False  # an empty group draws nothing
        for exclude in (True, False):
            want = scan_draw(mask, np.random.default_rng(seed), freq, k, exclude)
            got, _ = matched_random(mask, np.random.default_rng(seed), freq, neighbours=k, exclude=exclude)
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, exclude {exclude}")


def test_a_frequency_that_is_not_finite_is_refused():
    # The sorted search has no nearest unit to a NaN: one clear error, not a silent draw.
    mask = np.zeros((2, 6), bool)
    mask[0, 1] = True
    freq = np.arange(12.0).reshape(2, 6)
    freq[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"^frequency: 1 unit\(s\) have a NaN or infinite frequency"):
        matched_random(mask, np.random.default_rng(0), freq)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ablation_matrix({CATEGORIES[0]: mask}, lambda m: {}, n_random=1, frequency=np.where(freq == 3, np.inf, 0))


def test_without_frequency_draws_are_uniform_outside_the_set():
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 10), bool)
    mask[0, [0, 4]] = True
    hits = np.zeros(10)
    for _ in range(3000):
        r, inside = matched_random(mask, rng)
        assert inside == 0 and r.sum() == 2 and not (r & mask).any()
        hits += r[0]
    assert np.allclose(np.delete(hits, [0, 4]) / 3000, 2 / 8, atol=0.04)
    with pytest.raises(ValueError, match="neighbours"):
        matched_random(mask, rng, np.zeros((1, 10)), neighbours=0)


def test_a_group_without_enough_free_units_takes_the_rest_from_the_set():
    rng = np.random.default_rng(1)
    freq = np.arange(8.0)[None]
    full = np.ones((1, 8), bool)
    full[0, 7] = False
    r, inside = matched_random(full, rng, freq)
    assert r.sum() == 7 and r[0, 7] and inside == 6
    # Without exclusion a set's own unit is its nearest neighbour.
    mask = np.zeros((1, 8), bool)
    mask[0, [2, 5]] = True
    r, inside = matched_random(mask, rng, freq, neighbours=1, exclude=False)
    assert r[0, 2] and r[0, 5] and r.sum() == 2 and inside == 0


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


def test_ablation_matrix_matches_per_layer_and_records_spread_and_mass():
    sets = layered_sets()
    freq = np.tile(np.linspace(0.0, 1.0, 16), (3, 1))  # unit u: frequency u / 15 in every layer
    model = Model(sets)
    r = ablation_matrix(sets, model, seed=3, frequency=freq)
    # default: 19 draws, so that a set beating every draw gets p = 1 / 20 = 0.05
    assert r.n_random == 19 and len(model.masks) == 1 + 6 * 20
    rng = np.random.default_rng(3)  # the draws are the seed's, in order (category, then draw)
    for a, cat in enumerate(CATEGORIES):
        block = model.masks[1 + a * 20:1 + (a + 1) * 20]
        assert np.array_equal(block[0], sets[cat])
        for m in block[1:]:
            assert not (m & sets[cat]).any() and m.sum(1).tolist() == sets[cat].sum(1).tolist()
            assert np.array_equal(m, matched_random(sets[cat], rng, freq, neighbours=2)[0])
    assert r.in_set.sum() == 0
    assert r.matching == {"group": "layer", "nearest_frequency": 2, "exclude_tested_set": True}
    # With ties the closest match draws too, from its own stream: the draws stay the seed's.
    tied, tied_model = np.floor(freq * 3), Model(sets)
    ablation_matrix(sets, tied_model, seed=3, frequency=tied, n_random=2)
    rng = np.random.default_rng(3)
    for a, cat in enumerate(CATEGORIES):
        for m in tied_model.masks[2 + a * 3:1 + (a + 1) * 3]:
            assert np.array_equal(m, matched_random(sets[cat], rng, tied, neighbours=2)[0])
    again = ablation_matrix(sets, Model(sets), seed=3, frequency=freq)
    other = ablation_matrix(sets, Model(sets), seed=4, frequency=freq)
    assert np.array_equal(again.random_frequency, r.random_frequency)
    assert not np.array_equal(other.random_frequency, again.random_frequency)
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
        for d, m in enumerate(model.masks[2 + a * 20:1 + (a + 1) * 20]):
            assert r.random_dropped_mass[d, a] == pytest.approx(0.1 * m.sum() + 0.01 * m[:, 0].sum())
    assert np.allclose(r.random_dropped_mass[:, 0], 0.6)  # CLS's draws cannot take its neuron 0
    # CODE's set (neurons 2, 3) is replaced from neurons 0, 1, 4, 5: some draws take neuron 0.
    assert r.random_dropped_mass[:, 1].max() > 0.605
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


def test_experts_that_lead_their_layer_cannot_be_matched_and_say_so():
    # The demo's ISEs: the busiest expert of a layer (routed 0.87) is in the set, the next
    # fires 0.44. No draw outside the set fires as often; the warning gives the numbers.
    freq = np.array([[0.87, 0.44, 0.22, 0.18, 0.14, 0.08, 0.06, 0.01],
                     [0.30, 0.28, 0.27, 0.25, 0.24, 0.20, 0.19, 0.18]])
    sets = {c: np.zeros((2, 8), bool) for c in CATEGORIES}
    sets["code"][0, 0] = sets["code"][1, 3] = True  # the top expert of layer 0, a middle one of layer 1
    sets["math"][1, 2] = True  # matched within 0.02 by experts 1 and 3
    sets["generation"][1, 0] = True  # matched within 10 % (0.28, 0.27 for 0.30), but it holds the mass of expert 0
    model = Model(sets)
    r = ablation_matrix(sets, model, n_random=40, kind="experts", frequency=freq, seed=0)
    code, math = CATEGORIES.index("code"), CATEGORIES.index("math")
    assert r.set_frequency[code] == pytest.approx((0.87 + 0.25) / 2)
    # Closest: 0.44 for the top expert, 0.24 for expert 3 (0.01 below it; 0.27 is 0.02 above).
    assert r.closest_frequency[code] == pytest.approx((0.44 + 0.24) / 2)
    assert r.above_others[code] == 1 and r.above_others[math] == 0
    # A unit tied with one outside the set can be matched; two above every other cannot.
    assert above_all_others(np.array([[True, False, False]]), np.array([[0.5, 0.5, 0.1]])) == 0
    assert above_all_others(np.array([[True, True, False]]), np.array([[0.5, 0.4, 0.1]])) == 2
    # Layer 0: expert 1 or 2 (0.44 or 0.22); layer 1: expert 2 or 4 (0.27 or 0.24).
    assert set(np.round(r.random_frequency[:, code] * 2, 6)) == {0.68, 0.71, 0.46, 0.49}
    assert r.random_frequency[:, math] == pytest.approx(np.where(r.random_frequency[:, math] > 0.27, 0.28, 0.25))
    lines = r.matching_warnings()
    assert len(lines) == 2 and lines[0] == (
        f"code: its matched random experts fire less often than its set ({r.random_frequency[:, code].mean():.3g} "
        f"against 0.56; each replaced by its nearest outside the set: 0.34); 1 of its 2 experts fire more often "
        "than every one of their layer outside the set, so no draw can match them; routing mass dropped: 0.21 by "
        "the set, 0.2 by the draws (at most 0.2): part of its excess can be the effect of removing busier units; "
        "and it drops more routing mass than every draw, so its excess cannot be told apart from a larger "
        "disruption of the routing")
    # Model: mass = 0.1 per expert + 0.01 for expert 0 of a layer, which the set holds and no draw can take.
    assert lines[1] == ("generation: routing mass dropped: 0.11 by the set, 0.1 by the draws (at most 0.1): it drops "
                        "more routing mass than every draw, so its excess cannot be told apart from a larger "
                        "disruption of the routing")
    as_neurons = AblationResult(**{**r.__dict__, "kind": "neurons"})  # mass is the experts' measure
    assert [w.split(":")[0] for w in as_neurons.matching_warnings()] == ["code"]
    assert f"  warning: {lines[0]}" in repr(r).splitlines()
    assert r.to_dict()["matching_warnings"] == lines and r.in_set.sum() == 0


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
              "in_set", "closest_frequency", "above_others"):
        assert np.allclose(getattr(back, k), getattr(r, k)), k
    assert back.matching == r.matching and back.to_dict() == d
    r.in_set[2, 4], r.above_others[3] = 5, 2  # as a poorly matched control would record them
    again = AblationResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.in_set[2, 4] == 5 and again.in_set[1, 2] == 0 and again.above_others.tolist() == [0, 0, 0, 2, 0, 0]
    old = {k: d[k] for k in ("kind", "baseline", "isn", "random", "random_draws", "set_sizes", "n_random", "seed")}
    old["isn"][0][1] = None
    legacy = AblationResult.from_dict(old)
    assert np.isnan(legacy.isn[0, 1]) and legacy.dropped_mass is None and legacy.closest_frequency is None
    assert legacy.matching_warnings() == []


def test_ablate_identification_matches_on_mean_frequency():
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
    r = ablate_identification(ident, model, n_random=2, neighbours=2, seed=0)
    assert r.kind == "neurons" and r.matching["nearest_frequency"] == 2
    # CLS's set is neuron 9 of both layers (k = 2, both at p = 0.9): draws take one of its two
    # nearest in frequency (neurons 8, 7) in each layer.
    assert np.array_equal(model.masks[1], sets["classification"])
    assert set(zip(*np.nonzero(sets["classification"]))) == {(0, 9), (1, 9)}
    for m in model.masks[2:4]:
        assert m.sum(1).tolist() == [1, 1]
        assert set(np.flatnonzero(m[0])) | set(np.flatnonzero(m[1])) <= {7, 8}


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
    # Frequencies u / 15 per layer. A set of the two most frequent units (14, 15) cannot be
    # matched: the closest draw takes 13 for 15, then 12 for 14 (mean 12.5 / 15 against the
    # set's 14.5 / 15); with 2 neighbours 15 takes 13 or 12, 14 one of the two next below.
    freq = np.tile(np.arange(16.0) / 15, (3, 1))
    top = np.zeros((3, 16), bool)
    top[:, 14:] = True
    sets = {c: top for c in CATEGORIES}
    model = Model(sets)
    r = ablation_matrix(sets, model, n_random=3, seed=1, frequency=freq)
    assert np.allclose(r.set_frequency, 14.5 / 15) and np.allclose(r.closest_frequency, 12.5 / 15)
    assert np.all(r.above_others == 6)  # both units of 3 layers
    assert np.all((r.random_frequency >= 11.5 / 15 - 1e-12) & (r.random_frequency <= 12.5 / 15 + 1e-12))
    for a in range(6):  # brute force over the masks the model saw
        for d, m in enumerate(model.masks[2 + a * 4:1 + (a + 1) * 4]):
            assert r.random_frequency[d, a] == pytest.approx(freq[m].mean())
    d = json.loads(json.dumps(r.to_dict()))
    back = AblationResult.from_dict(d)
    assert np.allclose(back.set_frequency, r.set_frequency) and np.allclose(back.random_frequency, r.random_frequency)
    from sparcom_jax.report.tables import ABLATION_HEADER, ablation_rows
    row = dict(zip(ABLATION_HEADER, ablation_rows(d)[2]))
    assert row["set_frequency"] == pytest.approx(14.5 / 15) and row["closest_frequency"] == pytest.approx(12.5 / 15)
    assert row["random_frequency_mean"] == pytest.approx(r.random_frequency[:, 2].mean()) and row["above_others"] == 6
    assert len(d["matching_warnings"]) == 6  # 11.5-12.5 / 15 is below 0.9 x 14.5 / 15: every category flagged
    assert ablation_matrix(sets, Model(sets), n_random=1).set_frequency is None  # counts-only matching


def test_the_records_each_categorys_loss_rests_on_are_recorded_and_thin_ones_flagged():
    # The demo's held-out SUM records: long prompts cut 5 of 8 at max_length, so SUM's loss
    # rested on 3 records without a word in the result.
    from sparcom_jax.analysis.ablate import (MIN_SCORED_FRACTION, MIN_SCORED_RECORDS, coverage_log_lines,
                                             coverage_warnings)

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
    # In a log (the ablate stage's, repr): one line naming the three, each with its numbers.
    line = ("the causal-check loss of 3 categories rests on few held-out records (scored of held-out): code 5 of 12 "
            "(40 response tokens), general_qa 4 of 6 (30 response tokens), summarization 3 of 8 (21 response "
            "tokens): the prompts of the rest fill max_length: raise data.max_length")
    assert coverage_log_lines(cov) == [line]
    assert repr(r).splitlines()[-1] == f"  warning: {line}" and repr(r).count("warning") == 1
    d = json.loads(json.dumps(r.to_dict()))
    assert d["coverage_warnings"] == want  # the result (and the report) keep one line per category
    assert AblationResult.from_dict(d).coverage == cov
    from sparcom_jax.report.tables import ABLATION_HEADER, ablation_rows
    row = dict(zip(ABLATION_HEADER, ablation_rows(d)[CATEGORIES.index("summarization")]))
    assert (row["held_out_records"], row["scored_records"], row["response_tokens"]) == (8, 3, 21)
    # Nothing cut, but few held-out records: the fix is more of them.
    few = {"generation": {"records": 2, "scored_records": 2, "response_tokens": 9}}
    assert coverage_warnings(few) == ["generation: its causal-check loss rests on only 2 held-out records (9 "
                                      "response tokens): raise ablation.max_records or hold out more records "
                                      "(data.split)"]
    assert coverage_log_lines(few) == coverage_warnings(few)  # one flagged: its own line
    # Both fixes: each names its categories.
    both = {**few, "summarization": cov["summarization"], "math": cov["math"]}
    assert coverage_log_lines(both) == [
        "the causal-check loss of 2 categories rests on few held-out records (scored of held-out): summarization "
        "3 of 8 (21 response tokens): the prompts of the rest fill max_length: raise data.max_length; generation "
        "2 of 2 (9 response tokens): raise ablation.max_records or hold out more records (data.split)"]
    assert coverage_log_lines(None) == []
    # A callback that does not say leaves the result silent about it.
    bare = ablation_matrix(sets, Model(sets), n_random=1)
    assert bare.coverage is None and bare.to_dict()["coverage_warnings"] == [] and "warning" not in repr(bare)


def test_draws_firing_exactly_the_gap_below_their_set_are_not_flagged():
    """Flagged: draws firing on average *less* than (1 - FREQUENCY_GAP) = 0.9 x the set's mean
    frequency; exactly 0.9 x is within the tolerance."""
    zeros = np.zeros((6, 6))
    r = AblationResult(kind="neurons", baseline={}, isn=zeros, random=zeros, random_draws=np.zeros((2, 6, 6)),
                       set_sizes=np.ones(6, np.int64), n_random=2, seed=0, set_frequency=np.ones(6),
                       random_frequency=np.full((2, 6), 0.9))
    assert r.matching_warnings() == []
    r.random_frequency[:, 3] = [0.9, 0.88]
    assert [w.split(":")[0] for w in r.matching_warnings()] == [CATEGORIES[3]]


def test_the_least_frequent_free_unit_is_taken_when_it_is_the_nearest():
    """Unit 1 (frequency 0.1) is nearest to unit 0 (0.0), not unit 2 (1.0): with one neighbour
    every draw is unit 0, the lowest of the free units (the walk's left edge)."""
    mask = np.array([[False, True, False]])
    freq = np.array([[0.0, 0.1, 1.0]])
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert matched_random(mask, rng, freq, neighbours=1)[0].tolist() == [[True, False, False]]
    # and mirrored: the highest free unit, at the right edge
    for _ in range(20):
        assert matched_random(mask, rng, 1 - freq, neighbours=1)[0].tolist() == [[True, False, False]]


def test_experts_are_flagged_only_when_their_set_drops_more_mass_than_every_draw():
    zeros = np.zeros((6, 6))
    r = AblationResult(kind="experts", baseline={}, isn=zeros, random=zeros, random_draws=np.zeros((2, 6, 6)),
                       set_sizes=np.ones(6, np.int64), n_random=2, seed=0, dropped_mass=np.full(6, 0.3),
                       random_dropped_mass=np.tile([[0.1], [0.5]], (1, 6)))
    assert r.matching_warnings() == []  # a draw dropped more (0.5) than the set (0.3)
    r.random_dropped_mass[1, 4] = 0.2
    assert r.matching_warnings() == [f"{CATEGORIES[4]}: routing mass dropped: 0.3 by the set, 0.15 by the draws (at "
                                     "most 0.2): it drops more routing mass than every draw, so its excess cannot be "
                                     "told apart from a larger disruption of the routing"]
