"""The magnitude-matched control: random units outside the set carrying, per layer, on average as much
activation on the category's held-out records as the set (the firing-mass-matched draws' fill, each
unit valued at its magnitude), so that "the set matters because its units fire strongly" can be tested."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sparcom_jax.analysis.ablate import MAGNITUDE_GAP, MASS_TOLERANCE, AblationResult, ablation_matrix
from sparcom_jax.categories import CATEGORIES
from test_analysis_ablate_magnitude import MagnitudeModel, layer_sums, uniform_case

L, F = 3, 16


class WeightedModel(MagnitudeModel):
    """MagnitudeModel whose loss on category c is 1 + the units switched off weighted by `weights[c]`,
    so that every draw's loss increase is known by hand."""

    def __init__(self, firing, magnitude, weights):
        super().__init__(firing, magnitude)
        self.weights = weights

    def __call__(self, mask):
        super().__call__(mask)
        return {c: 1.0 + (0.0 if mask is None else float((self.weights[c] * mask).sum())) for c in CATEGORIES}


def random_case(seed=0):
    """Sets of 1-3 units per layer; every unit's firing and magnitude differ (the set's units fire
    strongly: 1-2 against 0.05-1 outside), so a firing match and a magnitude match take different units."""
    rng = np.random.default_rng(seed)
    sets, firing, magnitude = {}, {}, {}
    for c in CATEGORIES:
        m = np.zeros((L, F), bool)
        for j in range(L):
            m[j, rng.choice(F, size=rng.integers(1, 4), replace=False)] = True
        sets[c], firing[c] = m, rng.uniform(0.05, 0.6, (L, F))
        magnitude[c] = np.where(m, rng.uniform(1.0, 2.0, (L, F)), rng.uniform(0.05, 1.0, (L, F)))
    return sets, firing, magnitude


def magnitude_draws(model, n, a):
    """The masks of category a's magnitude-matched draws: after the baseline, per category its set and
    n frequency-matched, n firing-mass-matched and n magnitude-matched draws (every category has a set)."""
    start = 1 + a * (1 + 3 * n)
    return model.masks[start + 1 + 2 * n:start + 1 + 3 * n]


def test_the_draws_carry_the_sets_magnitude_within_one_unit_and_on_average():
    sets, firing, magnitude = random_case()
    n = 300
    model = MagnitudeModel(firing, magnitude)
    r = ablation_matrix(sets, model, n_random=n, seed=4, firing_mass=firing, firing_magnitude=magnitude,
                        firing_source="held_out", magnitude_where="always")
    got = r.magnitude_matched()
    for a, c in enumerate(CATEGORIES):
        s, draws = sets[c], magnitude_draws(model, n, a)
        assert len(draws) == n and not any((d & s).any() for d in draws)
        target = layer_sums(s, magnitude[c])
        by_hand = np.array([layer_sums(d, magnitude[c]) for d in draws])
        np.testing.assert_allclose(r.magnitude_random_layer_magnitude[:, a], by_hand, rtol=1e-12)
        np.testing.assert_allclose(r.magnitude_random_layer_firing[:, a],
                                   [layer_sums(d, firing[c]) for d in draws], rtol=1e-12)
        np.testing.assert_array_equal(r.magnitude_random_sizes[:, a], [d.sum() for d in draws])
        # Each draw within one unit of the target in every layer (the fill's tolerance) ...
        heaviest = np.where(s, 0.0, magnitude[c]).max(1)
        assert (np.abs(by_hand - target) <= heaviest + 1e-12).all()
        # ... and the target on average: within 4 standard errors over the draws.
        se = by_hand.std(0) / np.sqrt(n)
        assert (np.abs(by_hand.mean(0) - target) <= 4 * se + 1e-9).all(), c
        assert got["set"][a] == pytest.approx(target.sum(), rel=1e-12)
        assert got["random_mean"][a] == pytest.approx(by_hand.sum(1).mean(), rel=1e-12)
        assert got["error_abs_mean"][a] == pytest.approx(np.abs(by_hand.sum(1) - target.sum()).mean(), rel=1e-12)
        set_firing, draw_firing = firing[c][s].sum(), np.array([firing[c][d].sum() for d in draws])
        assert got["set_firing"][a] == pytest.approx(set_firing, rel=1e-12)
        assert got["firing_ratio"][a] == pytest.approx(draw_firing.mean() / set_firing, rel=1e-12)
        # Strong set units: matching their magnitude takes more, weaker units, firing more often.
        assert got["firing_ratio"][a] > 1.5 and r.magnitude_random_sizes[:, a].mean() > s.sum()
    # The firing-mass-matched draws are those of a run without this control (their own stream).
    plain = ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=n, seed=4, firing_mass=firing,
                            firing_magnitude=magnitude, firing_source="held_out")
    np.testing.assert_array_equal(plain.mass_random_layer_magnitude, r.mass_random_layer_magnitude)
    np.testing.assert_array_equal(plain.random_draws, r.random_draws)
    assert plain.magnitude_random_draws is None and plain.magnitude_matched() is None


def test_the_excess_and_p_value_over_the_magnitude_matched_draws():
    sets, firing, magnitude = random_case(1)
    rng = np.random.default_rng(2)
    # The set's own units matter more in some categories than in others, so the p-values differ.
    weights = {c: rng.random((L, F)) + np.where(sets[c], 0.8 * i, 0.0) for i, c in enumerate(CATEGORIES)}
    n = 9
    model = WeightedModel(firing, magnitude, weights)
    r = ablation_matrix(sets, model, n_random=n, seed=0, firing_mass=firing, firing_magnitude=magnitude,
                        magnitude_where="always")
    d = r.to_dict()["magnitude_matched"]
    p_seen = set()
    for a, c in enumerate(CATEGORIES):
        draws = magnitude_draws(model, n, a)
        own_set = weights[c][sets[c]].sum()
        own_draws = np.array([weights[c][m].sum() for m in draws])
        assert r.magnitude_excess[a, a] == pytest.approx(own_set - own_draws.mean(), rel=1e-9)
        p = (1 + (own_draws >= own_set).sum()) / (1 + n)
        assert d["p_value"][a][a] == pytest.approx(p) and d["excess"][a][a] == pytest.approx(own_set - own_draws.mean())
        assert d["random_ge_fraction"][a][a] == pytest.approx((own_draws >= own_set).mean())
        assert d["excess_std"][a][a] == pytest.approx((own_set - own_draws).std(), rel=1e-9)
        # off the diagonal: category b's loss, the same draws
        b = (a + 1) % len(CATEGORIES)
        other = CATEGORIES[b]
        assert r.magnitude_excess[a, b] == pytest.approx(
            weights[other][sets[c]].sum() - np.mean([weights[other][m].sum() for m in draws]), rel=1e-9)
        p_seen.add(round(p, 6))
    assert len(p_seen) > 1, "one p-value for all: the test is blind"
    assert f"{r.magnitude_excess[0, 0]:+.3g}" in repr(r) and "magnitude-matched" in repr(r)


def test_where_warned_draws_only_for_sets_stronger_than_their_firing_matched_draws():
    strong, weak = CATEGORIES[1], CATEGORIES[3]
    sets, firing, magnitude = uniform_case({strong: 1 + 3 * MAGNITUDE_GAP, weak: 0.5})
    model = MagnitudeModel(firing, magnitude)
    r = ablation_matrix(sets, model, n_random=3, firing_mass=firing, firing_magnitude=magnitude,
                        magnitude_where="where_warned")
    ran = np.isfinite(r.magnitude_random_draws).all((0, 2))
    assert [c for c, x in zip(CATEGORIES, ran) if x] == [strong]
    # baseline + 6 x (set, 3 frequency-, 3 firing-matched) + the strong set's 3 magnitude-matched draws
    assert len(model.masks) == 1 + 6 * 7 + 3
    assert r.to_dict()["magnitude_matched"]["where"] == "where_warned"
    # Its warning names what the magnitude-matched control found.
    line = next(w for w in r.matching_warnings() if w.startswith(f"{strong}:") and "positive activation" in w)
    assert "the magnitude-matched control (3 draws of" in line and "own-category excess of" in line
    with pytest.raises(ValueError, match="magnitude_where must be one of"):
        ablation_matrix(sets, model, n_random=1, firing_mass=firing, magnitude_where="always")


def test_a_draw_missing_the_sets_magnitude_is_flagged():
    # Every unit outside the set weighs far more than the set: each draw takes one and overshoots.
    sets, firing, magnitude = uniform_case({})
    c = CATEGORIES[0]
    magnitude[c] = np.where(sets[c], 0.1, 5.0)
    r = ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=2, firing_mass=firing,
                        firing_magnitude=magnitude, magnitude_where="always")
    lines = [w for w in r.matching_warnings() if "magnitude-matched draws carried" in w]
    assert [w.split(":")[0] for w in lines] == [c]
    assert "harsher than the set" in lines[0] and f"tolerance {MASS_TOLERANCE:.0%}" in lines[0]


def test_the_control_round_trips_its_report_columns_and_an_old_file_says_not_run(tmp_path):
    from sparcom_jax.report import write_report

    sets, firing, magnitude = random_case(3)
    r = ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=3, firing_mass=firing,
                        firing_magnitude=magnitude, firing_source="held_out", magnitude_where="always")
    d = json.loads(json.dumps(r.to_dict()))
    back = AblationResult.from_dict(d)
    for k in ("magnitude_random_draws", "magnitude_random_sizes", "magnitude_random_layer_magnitude",
              "magnitude_random_layer_firing"):
        np.testing.assert_array_equal(getattr(back, k), getattr(r, k))
    assert back.magnitude_where == "always" and back.to_dict() == d

    def page_and_rows(name, result):
        write_report(tmp_path / name, {"identification": {"rule": "top"}, "models": {},
                                       "ablation": {"neurons": result}}, dpi=20)
        f = tmp_path / name / "tables" / "ablation_neurons_magnitude_matched.csv"
        rows = None if not f.exists() else [row for row in csv.reader(f.open()) if not row[0].startswith("#")]
        return (tmp_path / name / "index.html").read_text(), rows

    page, rows = page_and_rows("new", d)
    header, got = rows[0], r.magnitude_matched()
    spread = r.excess_spread(r.magnitude_random_draws)
    for a, row in enumerate(rows[1:]):
        assert row[0] == CATEGORIES[a]
        assert float(row[header.index("excess_own")]) == pytest.approx(r.magnitude_excess[a, a], rel=1e-4)
        assert float(row[header.index("p_own")]) == pytest.approx(spread["p_value"][a, a], rel=1e-4)
        assert float(row[header.index("set_magnitude_own_records")]) == pytest.approx(got["set"][a], rel=1e-4)
        assert float(row[header.index("random_magnitude_mean")]) == pytest.approx(got["random_mean"][a], rel=1e-4)
        assert float(row[header.index("random_firing_ratio")]) == pytest.approx(got["firing_ratio"][a], rel=1e-4)
        assert float(row[header.index("random_neurons_mean")]) == pytest.approx(
            r.magnitude_random_sizes[:, a].mean(), rel=1e-4)
    assert (tmp_path / "new" / "tables" / "ablation_neurons_magnitude_matched_p_value.csv").exists()
    assert "removing as much activation elsewhere in the same layers" in page
    assert "random_firing_ratio times as often as the set" in page and "No magnitude-matched control" not in page

    # A file made before the control existed opens and says it was not run.
    del d["magnitude_matched"]
    old = AblationResult.from_dict(d)
    assert old.magnitude_random_draws is None and old.magnitude_matched() is None and old.magnitude_excess is None
    assert old.to_dict()["magnitude_matched"] is None and "magnitude-matched" not in repr(old)
    page, rows = page_and_rows("old", d)
    assert rows is None and "No magnitude-matched control was run for this result" in page
