"""The firing-mass-matched control's edges: bad or partial firing masses, where it is drawn,
what it records and reads back, and the wording and thresholds of its lines.

Written against hand-made mutants of sparcom_jax/analysis/ablate.py that the first tests let
through (a NaN firing mass accepted, a category without firing mass read as 0, the set's
per-layer mass taken from another category, where_warned lost on the way in or out, ...)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_analysis_ablate_firing import FiringModel, group_masses, setup

from sparcom_jax.analysis.ablate import (MASS_TOLERANCE, AblationResult, ablate_identification, ablation_matrix,
                                         fires_less, mass_fill)
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_firing_mass_that_is_not_a_finite_frequency_is_refused(bad):
    sets, fm, _ = setup()
    fm["general_qa"] = fm["general_qa"].copy()
    fm["general_qa"][1, 4] = bad
    with pytest.raises(ValueError, match=r"firing_mass\['general_qa'\]: every unit needs a finite firing frequency >= 0"):
        ablation_matrix(sets, FiringModel(fm), n_random=1, kind="neurons", firing_mass=fm)


def test_a_category_without_firing_mass_gets_nan_and_short_upper_case_names_count():
    """firing_mass names the categories by short name in upper case and leaves MATH out: MATH
    gets no draws and every set's firing on MATH's records is NaN (not 0: not measured); the
    others are what the full, canonically named firing mass gives them."""
    sets, fm, freq = setup()
    m = CATEGORIES.index("math")
    partial = {SHORT_NAMES[c].upper(): v for c, v in fm.items() if c != "math"}
    model = FiringModel(fm)
    r = ablation_matrix(sets, model, n_random=3, seed=2, kind="neurons", frequency=freq, firing_mass=partial)
    full = ablation_matrix(sets, FiringModel(fm), n_random=3, seed=2, kind="neurons", frequency=freq,
                           firing_mass=fm)
    assert len(model.masks) == 1 + len(CATEGORIES) * (1 + 3) + (len(CATEGORIES) - 1) * 3  # none drawn for MATH
    assert np.isnan(r.mass_random_draws[:, m]).all() and np.isnan(r.set_category_mass[m])
    assert np.isnan(r.set_mass_matrix[:, m][np.arange(len(CATEGORIES)) != m]).all()
    assert np.isnan(r.mass_random_mass_matrix[:, :, m]).all()
    others = [a for a in range(len(CATEGORIES)) if a != m]
    keep = [b for b in range(len(CATEGORIES)) if b != m]
    assert np.isfinite(r.mass_random_draws[:, others]).all()
    np.testing.assert_array_equal(r.set_mass_matrix[np.ix_(others, keep)], full.set_mass_matrix[np.ix_(others, keep)])
    np.testing.assert_array_equal(r.set_category_mass[others], full.set_category_mass[others])


@pytest.mark.parametrize("kind, shape", [("neurons", (3, 30)), ("expert_neurons", (2, 3, 20))])
def test_the_sets_and_draws_firing_per_layer_measured_and_estimated_by_hand(kind, shape):
    """For the firing mass the estimate is the measurement (both come from the counts): the set's
    per-layer firing on its own category's records, and each draw's, recorded under both names."""
    sets, fm, freq = setup(lead_shape=shape)
    r = ablation_matrix(sets, FiringModel(fm), n_random=3, seed=1, kind=kind, frequency=freq, firing_mass=fm)
    for a, c in enumerate(CATEGORIES):
        by_layer = group_masses(sets[c], fm[c])
        hand = [by_layer[layer] for layer in range(shape[0])]
        np.testing.assert_allclose(r.set_layer_mass[a], hand)
        np.testing.assert_allclose(r.set_layer_estimate[a], hand)
    np.testing.assert_array_equal(r.mass_random_layer_estimate, r.mass_random_layer_mass)
    assert np.isfinite(r.mass_random_layer_mass).all()


def test_where_warned_needs_firing_mass_and_without_frequencies_nothing_is_warned():
    sets, fm, freq = setup()
    with pytest.raises(ValueError, match="'where_warned' needs firing_mass"):
        ablation_matrix(sets, FiringModel(fm), n_random=1, frequency=freq, mass_where="where_warned")
    # Counts-only matching gives no frequency warning, so where_warned draws for no category.
    model = FiringModel(fm)
    r = ablation_matrix(sets, model, n_random=2, seed=0, firing_mass=fm, mass_where="where_warned")
    assert len(model.masks) == 1 + len(CATEGORIES) * 3
    assert np.isnan(r.mass_random_draws).all() and r.mass_where == "where_warned"
    # No control run: no `where` either.
    assert ablation_matrix(sets, FiringModel(fm), n_random=2, seed=0, frequency=freq).mass_where is None


def test_where_warned_draws_exactly_for_the_warned_categories_on_all_their_draws():
    """Whether a category is drawn for is the warning's test on the mean of ALL its
    frequency-matched draws. Each category's set is one unit at 1.0 whose two nearest free
    units fire 0.95 and 0.8 (the others 0.1): a draw fires 0.95 or 0.8 at random, the mean of
    eight straddles the warning's 0.9, and the first draw alone often decides otherwise."""
    freq = np.full((1, 10), 0.1)
    freq[0, :3] = [1.0, 0.95, 0.8]
    mask = np.zeros((1, 10), bool)
    mask[0, 0] = True
    sets = {c: mask for c in CATEGORIES}
    fm = {c: freq for c in CATEGORIES}
    outcomes, first_differs = set(), 0
    for seed in range(6):
        r = ablation_matrix(sets, FiringModel(fm), n_random=8, seed=seed, kind="neurons", frequency=freq,
                            firing_mass=fm, mass_where="where_warned")
        warned = {w.split(":")[0] for w in r.matching_warnings() if "fire less often" in w}
        for a, c in enumerate(CATEGORIES):
            assert np.isfinite(r.mass_random_draws[:, a]).all() == (c in warned), (seed, c)
            assert np.isnan(r.mass_random_draws[:, a]).all() == (c not in warned), (seed, c)
            rf = r.random_frequency[:, a]
            outcomes.add(c in warned)
            first_differs += fires_less(1.0, rf) != fires_less(1.0, rf[:1])
    assert outcomes == {True, False} and first_differs  # (both outcomes, and cases the first draw would miss)


def ident_with_category_firing():
    """An identification whose categories fire on different neurons, so each category's mean
    frequency (what the firing mass is) differs from the mean over all instructions."""
    from sparcom_jax.analysis import IdentifyConfig, identify
    from sparcom_jax.stats.counts import Counts

    n, F = 12, 10
    na = np.zeros((n, 2, F), np.int32)
    for k in range(n):
        na[k] = (np.arange(F) + 3 * (k // 2)) % F  # category k // 2: its busiest neurons rotate
    counts = Counts(tokens=np.full(n, F), neuron_active=na, categories=[CATEGORIES[k // 2] for k in range(n)])
    return identify(counts, "neuron_active", IdentifyConfig(eps=0.1))


def test_ablate_identification_draws_on_the_category_means_where_asked():
    ident = ident_with_category_firing()
    sets = ident.sets()
    fm = {c: np.asarray(v, np.float64) for c, v in zip(CATEGORIES, ident.category_mean)}
    r = ablate_identification(ident, FiringModel(fm), n_random=2, seed=0, firing_matched="always",
                              firing_source="identification")
    assert r.mass_where == "always" and np.isfinite(r.mass_random_draws).all()
    for a, c in enumerate(CATEGORIES):
        assert r.set_category_mass[a] == pytest.approx(fm[c][sets[c]].sum())
        assert r.set_mass_matrix[a].tolist() == pytest.approx([fm[b][sets[c]].sum() for b in CATEGORIES])
    assert not np.allclose(r.set_category_mass, [ident.unit_frequency()[sets[c]].sum() for c in CATEGORIES])
    warned = ablate_identification(ident, FiringModel(fm), n_random=2, seed=0, firing_matched="where_warned",
                                   firing_source="identification")
    assert warned.mass_where == "where_warned"
    assert ablate_identification(ident, FiringModel(fm), n_random=2, seed=0).mass_random_draws is None
    # The default source is the held-out firing the loss_fn's baseline pass reports: this one reports none.
    with pytest.raises(ValueError, match="last_unit_firing"):
        ablate_identification(ident, FiringModel(fm), n_random=2, seed=0, firing_matched="always")
    # "never" is the config's word for None (the stage maps it); here it, or nothing, is refused.
    for bad in ("never", ""):
        with pytest.raises(ValueError, match="mass_where must be one of"):
            ablate_identification(ident, FiringModel(fm), n_random=2, firing_matched=bad, firing_source="identification")


def hand_result(kind, set_mass, draw_mass, *, isn_own=1.0, mass_draws_own=(0.5, 2.0, 0.2)):
    """A result whose CODE set carried `set_mass` and whose mass-matched draws `draw_mass` each
    (the other categories: exactly matched, and no frequency to warn about); CODE's
    frequency-matched draws fire half as often as the set and hurt less than it (p = 1 / (1 + 3)), its mass-matched ones as `mass_draws_own`."""
    C, M = len(CATEGORIES), len(draw_mass)
    a = CATEGORIES.index("code")
    set_mass_v = np.ones(C)
    set_mass_v[a] = set_mass
    draw_mass_v = np.ones((M, C))
    draw_mass_v[:, a] = draw_mass
    isn = np.zeros((C, C))
    isn[a, a] = isn_own
    mass_draws = np.zeros((M, C, C))
    mass_draws[:, a, a] = mass_draws_own
    set_freq = np.full(C, np.nan)
    set_freq[a] = 0.4
    return AblationResult(
        kind=kind, baseline={c: 1.0 for c in CATEGORIES}, isn=isn, random=np.zeros((C, C)),
        random_draws=np.zeros((3, C, C)), set_sizes=np.full(C, 4, np.int64), n_random=3, seed=0,
        set_frequency=set_freq, random_frequency=np.full((3, C), 0.2), mass_random_draws=mass_draws,
        set_category_mass=set_mass_v, mass_random_mass=draw_mass_v, mass_random_sizes=np.full((M, C), 5, np.int64),
        set_layer_mass=set_mass_v[:, None], set_layer_estimate=set_mass_v[:, None],
        mass_random_layer_mass=draw_mass_v[:, :, None], mass_random_layer_estimate=draw_mass_v[:, :, None],
        mass_where="always")


def mass_lines(r):
    return [w for w in r.matching_warnings() if "-matched draws carried on average" in w or
            "-matched draws dropped on average" in w]


@pytest.mark.parametrize("kind, units", [("neurons", "neurons"), ("expert_neurons", "expert neurons")])
def test_a_firing_mass_error_beyond_the_tolerance_is_told_in_the_neurons_words(kind, units):
    """Draws carrying 20% less than the set: a 'milder' line worded for firing (no routing
    estimate: for firing the estimate is the measurement); exactly at the tolerance, a set
    carrying nothing, or draws within it: no line."""
    assert MASS_TOLERANCE == pytest.approx(0.1)  # (the cases below sit at and around it)
    (line,) = mass_lines(hand_result(kind, 10.0, [8.0, 8.0, 8.0]))
    # (what the firing is counted on may be worded otherwise: the records' scope is not pinned here)
    assert line.startswith("code: its firing-mass-matched draws carried on average 8 of the firing mass")
    assert " against the set's 10 (-20%, mean |error| 2.000; tolerance 10%): " in line
    assert line.endswith("that control is milder than the set: its excess against them is overstated")
    assert "unablated estimates" not in line and "routing" not in line
    (over,) = mass_lines(hand_result(kind, 10.0, [12.0, 12.0, 12.0]))
    assert "(+20%" in over and over.endswith("harsher than the set: its excess against them is understated")
    assert mass_lines(hand_result(kind, 10.0, [11.0, 11.0, 11.0])) == []  # +1: exactly the tolerance
    assert mass_lines(hand_result(kind, 10.0, [10.5, 10.5, 10.5])) == []
    assert mass_lines(hand_result(kind, 0.0, [0.5, 0.5, 0.5])) == []  # no share of nothing to miss by
    # The frequency warning's outcome: the firing-mass control's own draws and p-value.
    r = hand_result(kind, 10.0, [10.0, 10.0, 10.0])
    (freq_line,) = [w for w in r.matching_warnings() if "fire less often" in w]
    outcome = freq_line[freq_line.index("; the "):]
    assert outcome.startswith(f"; the firing-mass-matched control (3 draws of 5 {units} outside the set, against "
                              "its 4) carried 10 of the firing mass")
    # (1 + the one draw at 2.0 >= 1.0) / (1 + 3); the excess 1 - mean(0.5, 2, 0.2)
    assert outcome.endswith(" (the set 10) and gives an own-category excess of +0.1 (p = 0.5)")
    assert f"beyond the firing-mass-matched {units[:-1]} draws" in repr(r)


def test_the_mass_dict_names_its_mass_and_where_and_reads_them_back():
    """'mass' is the experts' routing or the neurons' firing; 'where' reads back, and a file
    from before it was kept reads as 'always' (the only rule there was)."""
    for kind, mass in (("experts", "routing"), ("neurons", "firing"), ("expert_neurons", "firing")):
        r = hand_result(kind, 10.0, [10.0, 10.0, 10.0])
        r.mass_where = "where_warned"
        d = json.loads(json.dumps(r.to_dict()))
        assert (d["mass_matched"]["mass"], d["mass_matched"]["where"]) == (mass, "where_warned")
        assert AblationResult.from_dict(d).mass_where == "where_warned"
        del d["mass_matched"]["where"]
        assert AblationResult.from_dict(d).mass_where == "always"


def test_mass_fill_takes_a_unit_that_fills_the_target_exactly_and_nothing_after_it():
    """A unit that fits exactly under what is left is taken; once the target is reached the
    rounding adds nothing, whatever its draw (u = 0 included: probability 0 / mass)."""
    for u in (0.0, 0.5, 0.999):
        assert mass_fill(np.array([1.0, 0.3]), 1.0, u).tolist() == [True, False]
        assert mass_fill(np.array([0.5, 0.5, 0.2]), 1.0, u).tolist() == [True, True, False]
