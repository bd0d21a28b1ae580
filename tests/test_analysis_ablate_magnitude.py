"""The activation magnitude beside the firing-mass-matched control: how strongly (not only how often)
the set's units and its draws' fire on the held-out records, and the warning when the set's are
clearly stronger (its excess over the control can then be the removal of more activation)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sparcom_jax.analysis.ablate import MAGNITUDE_GAP, AblationResult, ablation_matrix
from sparcom_jax.categories import CATEGORIES

L, F, K = 2, 12, 3  # layers, neurons per layer, set units per layer


class MagnitudeModel:
    """A loss_fn whose baseline pass reports each unit's held-out firing and magnitude, as
    `CategoryLoss` with firing scopes does."""

    def __init__(self, firing, magnitude):
        self.firing, self.magnitude, self.masks = firing, magnitude, []

    def __call__(self, mask):
        self.masks.append(mask)
        base = mask is None
        self.last_unit_firing = dict(self.firing) if base else None
        self.last_unit_magnitude = dict(self.magnitude) if base else None
        return {c: 1.0 + (0.0 if base else float(mask.sum())) for c in CATEGORIES}


def layer_sums(mask, values):
    """[L]: per layer, `values` summed over the units of `mask`, by loops over the units."""
    out = [0.0] * mask.shape[0]
    for idx in np.ndindex(mask.shape):
        if mask[idx]:
            out[idx[0]] += float(values[idx])
    return np.array(out)


def uniform_case(strength):
    """Every unit fires on a quarter of the tokens (so each draw holds exactly K units per layer);
    each unit carries magnitude 1, but the set's units of category c carry `strength[c]`."""
    sets, firing, magnitude = {}, {}, {}
    for i, c in enumerate(CATEGORIES):
        m = np.zeros((L, F), bool)
        m[:, i:i + K] = True
        sets[c], firing[c] = m, np.full((L, F), 0.25)
        magnitude[c] = np.where(m, strength.get(c, 1.0), 1.0)
    return sets, firing, magnitude


def magnitude_lines(r):
    return [w for w in r.matching_warnings() if "positive activation" in w]


def test_the_sets_and_draws_magnitude_are_their_units_summed_per_layer():
    from sparcom_jax.analysis import ablate_identification
    from test_analysis_ablate_firing import disagreeing_identification

    ident, held = disagreeing_identification()
    rng = np.random.default_rng(3)
    magnitude = {c: rng.random(v.shape) * 2 for c, v in held.items()}
    model = MagnitudeModel(held, magnitude)
    n = 4
    r = ablate_identification(ident, model, n_random=n, seed=2, firing_matched="always")
    sets = ident.sets()
    mag = r.magnitude()
    for a, c in enumerate(CATEGORIES):
        s = sets[c]
        np.testing.assert_allclose(r.set_layer_magnitude[a], layer_sums(s, magnitude[c]), rtol=1e-12)
        # After the baseline, per category: its set, n frequency-matched draws, n firing-mass-matched ones.
        draws = model.masks[1 + a * (1 + 2 * n) + 1 + n:1 + (a + 1) * (1 + 2 * n)]
        assert len(draws) == n and not any((d & s).any() for d in draws)
        by_hand = np.array([layer_sums(d, magnitude[c]) for d in draws])
        np.testing.assert_allclose(r.mass_random_layer_magnitude[:, a], by_hand, rtol=1e-12)
        # The draws' firing is matched to the set's, their magnitude is only measured.
        np.testing.assert_allclose(r.mass_random_mass[:, a], [held[c][d].sum() for d in draws], rtol=1e-12)
        assert mag["set"][a] == pytest.approx(magnitude[c][s].sum(), rel=1e-12)
        assert mag["random_mean"][a] == pytest.approx(by_hand.sum(1).mean(), rel=1e-12)
        assert mag["ratio"][a] == pytest.approx(magnitude[c][s].sum() / by_hand.sum(1).mean(), rel=1e-12)
        assert mag["random_below"][a] == pytest.approx(np.mean(by_hand.sum(1) < magnitude[c][s].sum()))
    assert len(set(np.round(mag["ratio"], 6))) > 3, "one ratio for all: the test is blind"


def test_a_set_clearly_stronger_than_its_matched_draws_is_warned_about_and_a_matched_one_is_not():
    strong, near = CATEGORIES[1], CATEGORIES[4]
    over = 1 + 2 * MAGNITUDE_GAP
    sets, firing, magnitude = uniform_case({strong: over, near: 1 + MAGNITUDE_GAP / 2})
    r = ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=3, seed=0, firing_mass=firing,
                        firing_magnitude=magnitude)
    np.testing.assert_array_equal(r.mass_random_sizes, np.full((3, len(CATEGORIES)), L * K))  # matched exactly
    mag = r.magnitude()
    expected = np.ones(len(CATEGORIES))
    expected[CATEGORIES.index(strong)], expected[CATEGORIES.index(near)] = over, 1 + MAGNITUDE_GAP / 2
    np.testing.assert_allclose(mag["ratio"], expected, rtol=1e-12)
    lines = magnitude_lines(r)
    assert [w.split(":")[0] for w in lines] == [strong]
    assert (f"carry {over * L * K:.3g} of positive activation per token on its held-out records, its "
            f"firing-mass-matched draws {L * K:.3g} on average ({over:.2f} x; more than 3 of the 3 draws") in lines[0]
    assert "part of its excess over that control can be the removal of more activation" in lines[0]
    assert lines == [w for w in r.to_dict()["matching_warnings"] if "positive activation" in w]
    assert f"{over:.3g} x" in repr(r) and "activation magnitude of the set over" in repr(r)
    # Weaker than its draws: not the objection (the set removes less activation), no line.
    sets, firing, magnitude = uniform_case({strong: 0.5})
    r = ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=3, firing_mass=firing,
                        firing_magnitude=magnitude)
    assert r.magnitude()["ratio"][CATEGORIES.index(strong)] == pytest.approx(0.5) and not magnitude_lines(r)


def test_the_magnitude_is_kept_with_its_measure_and_a_file_without_it_says_not_measured(tmp_path):
    from sparcom_jax.report import write_report

    sets, firing, magnitude = uniform_case({CATEGORIES[2]: 2.0})
    r = ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=2, firing_mass=firing,
                        firing_magnitude=magnitude, firing_source="held_out")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mass_matched"]["magnitude"]["measure"].startswith("positive_activation")
    back = AblationResult.from_dict(d)
    np.testing.assert_array_equal(back.set_layer_magnitude, r.set_layer_magnitude)
    np.testing.assert_array_equal(back.mass_random_layer_magnitude, r.mass_random_layer_magnitude)
    assert back.matching_warnings() == r.matching_warnings() and magnitude_lines(back)

    def page_and_table(name, result):
        write_report(tmp_path / name, {"identification": {"rule": "top"}, "models": {},
                                       "ablation": {"neurons": result}}, dpi=20)
        with open(tmp_path / name / "tables" / "ablation_neurons_mass_matched.csv") as fh:
            rows = [row for row in csv.reader(fh) if not row[0].startswith("#")]
        with open(tmp_path / name / "tables" / "ablation_neurons_mass_matched_per_layer.csv") as fh:
            layers = [row for row in csv.reader(fh) if not row[0].startswith("#")]
        return (tmp_path / name / "index.html").read_text(), rows, layers

    page, rows, layers = page_and_table("new", d)
    header = rows[0]
    for a, row in enumerate(rows[1:]):
        assert float(row[header.index("magnitude_ratio")]) == pytest.approx(r.magnitude()["ratio"][a], rel=1e-6)
        assert float(row[header.index("set_magnitude_own_records")]) == pytest.approx(
            magnitude[CATEGORIES[a]][sets[CATEGORIES[a]]].sum(), rel=1e-6)
    lh = layers[0]
    for row in layers[1:]:
        a, j = CATEGORIES.index(row[0]), int(row[1])
        assert float(row[lh.index("set_magnitude")]) == pytest.approx(r.set_layer_magnitude[a, j], rel=1e-6)
        assert float(row[lh.index("random_magnitude_mean")]) == pytest.approx(
            r.mass_random_layer_magnitude[:, a, j].mean(), rel=1e-6)
    assert "The draws are matched on how often their units fire, not on how strongly" in page
    assert "does not show specificity" in page and "not measured" not in page
    assert f"{CATEGORIES[2]}: its set&#x27;s neurons carry 12 of positive activation" in page  # the warning

    # A file made before the magnitude was kept opens, and says it was not measured.
    del d["mass_matched"]["magnitude"]
    d["matching_warnings"] = [w for w in d["matching_warnings"] if "positive activation" not in w]
    old = AblationResult.from_dict(d)
    assert old.set_layer_magnitude is None and old.magnitude() is None and not magnitude_lines(old)
    assert old.to_dict()["mass_matched"]["magnitude"] is None and "activation magnitude" not in repr(old)
    page, rows, layers = page_and_table("old", d)
    assert all(row[rows[0].index("magnitude_ratio")] == "" for row in rows[1:])
    assert all(row[layers[0].index("set_magnitude")] == "" for row in layers[1:])
    assert "activation magnitude the set and its draws carry was not measured" in page
    assert "not on how strongly" not in page


def test_the_identification_firing_measures_no_magnitude_and_bad_magnitudes_are_refused():
    from sparcom_jax.analysis import ablate_identification
    from test_analysis_ablate_firing import disagreeing_identification

    ident, held = disagreeing_identification()
    model = MagnitudeModel(held, {c: np.ones_like(v) for c, v in held.items()})
    r = ablate_identification(ident, model, n_random=2, firing_matched="always", firing_source="identification")
    assert r.set_layer_magnitude is None and r.magnitude() is None
    sets, firing, magnitude = uniform_case({})
    with pytest.raises(ValueError, match="firing_magnitude is measured beside the firing-mass-matched control"):
        ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=1, firing_magnitude=magnitude)
    with pytest.raises(ValueError, match=r"firing_magnitude\['code'\] has shape \(2, 5\)"):
        ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=1, firing_mass=firing,
                        firing_magnitude={**magnitude, "code": np.ones((2, 5))})
    with pytest.raises(ValueError, match=r"firing_magnitude\['math'\]: every unit needs a finite activation "
                                         r"magnitude >= 0 \(e.g. CategoryLoss.last_unit_magnitude\)"):
        ablation_matrix(sets, MagnitudeModel(firing, magnitude), n_random=1, firing_mass=firing,
                        firing_magnitude={**magnitude, "math": np.full((L, F), np.nan)})


def test_every_process_gets_the_firing_and_the_magnitude_process_0_measured(monkeypatch):
    """The stage's shared baseline (two simulated processes): only process 0 runs the pass; both
    end with its firing and, stacked behind it, its magnitude, each category's own, bit for bit."""
    from launch import simulate_process
    from sparcom_jax.analysis.ablate import baseline_firing_magnitude
    from sparcom_jax.pipeline.stages import _baseline_shared

    rng = np.random.default_rng(1)
    shape = (L, F)
    firing = {c: rng.random(shape) for c in CATEGORIES if c != "code"}
    magnitude = {c: rng.random(shape) * 3 for c in firing}
    ran, p, sent = [], 2, {}

    def as_process(k):
        simulate_process(monkeypatch, k, p, sent)
        model = MagnitudeModel({c: v * (k + 1) for c, v in firing.items()},
                               {c: v * (k + 2) for c, v in magnitude.items()})  # process 1's would differ
        ran.append((k, model))
        return _baseline_shared(model, baseline_firing_magnitude, (2, *shape), "unit firing")

    for _ in range(2):  # until every process has process 0's row
        got = [as_process(k) for k in range(p)]
    assert all(model.masks == ([None] if k == 0 else []) for k, model in ran)
    for losses, both in got:
        assert losses == {c: 1.0 for c in CATEGORIES} and set(both) == set(firing)
        for c in firing:
            np.testing.assert_array_equal(both[c][0], firing[c])
            np.testing.assert_array_equal(both[c][1], magnitude[c] * 2)
    # A loss_fn that counts the firing but measures no magnitude is refused by name.
    with pytest.raises(ValueError, match="last_unit_magnitude"):
        baseline_firing_magnitude(FiringOnly(firing, magnitude))


class FiringOnly(MagnitudeModel):
    """A loss_fn whose baseline counts the firing and measures no magnitude."""

    def __call__(self, mask):
        out = super().__call__(mask)
        self.last_unit_magnitude = None
        return out
