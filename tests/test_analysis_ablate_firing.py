"""The firing-mass-matched control for neurons and expert neurons: random units outside the set
whose firing on the category's records sums, per layer, to the set's on average."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparcom_jax.analysis.ablate import AblationResult, ablation_matrix, mass_matched_random
from launch import simulate_process
from sparcom_jax.categories import CATEGORIES


def group_masses(mask: np.ndarray, mass: np.ndarray) -> dict[int, float]:
    """{layer: summed mass of the mask's units there}, by explicit loops over the units."""
    out: dict[int, float] = {}
    for idx in np.ndindex(mask.shape):
        out[idx[0]] = out.get(idx[0], 0.0) + (float(mass[idx]) if mask[idx] else 0.0)
    return out


@pytest.mark.parametrize("shape", [(3, 40), (2, 3, 30)])
def test_the_expected_mass_is_the_sets_in_every_layer_and_no_draw_takes_a_set_unit(shape):
    """Over many draws the mean mass per layer is the set's there, to the Monte-Carlo error (for
    expert neurons drawn from every expert of the layer); each draw is within one unit of it and
    never holds a unit of the set."""
    rng = np.random.default_rng(5)
    mass = rng.random(shape) ** 2  # skewed, as firing frequencies are: a few busy units
    mass[rng.random(shape) < 0.15] = 0.0  # never-firing units
    # The set: each group's (layer's; expert's) busiest units, which frequency matching cannot match.
    flat = mass.reshape(-1, shape[-1])
    mask = np.zeros_like(flat, bool)
    for g, row in enumerate(flat):
        mask[g, np.argsort(row)[-3:]] = True
    mask = mask.reshape(shape)
    target = group_masses(mask, mass)
    draws = [mass_matched_random(mask, mass, rng) for _ in range(3000)]
    got = [group_masses(d, mass) for d in draws]
    for g, t in target.items():
        per_draw = np.array([x[g] for x in got])
        free = mass[g][~mask[g]]
        assert free.sum() > t  # reachable: the fill can match it on average
        se = per_draw.std() / np.sqrt(len(per_draw))
        assert abs(per_draw.mean() - t) < 4 * se + 1e-9, (g, per_draw.mean(), t)
        assert np.all(np.abs(per_draw - t) <= free.max() + 1e-12)  # within one unit of the target
    assert not any((d & mask).any() for d in draws)
    # The draws differ (random order and rounding), and hold more units than the set's busiest.
    assert len({d.tobytes() for d in draws[:50]}) > 40
    assert np.mean([d.sum() for d in draws]) > mask.sum()


class FiringModel:
    """A loss that grows with the firing mass removed on each category's records, so the
    firing-mass-matched draws should hurt about as much as the set."""

    def __init__(self, fm):
        self.fm, self.masks = fm, []

    def __call__(self, mask):
        self.masks.append(mask)
        return {c: 1.0 + (0.0 if mask is None else float((self.fm[c] * mask).sum())) for c in CATEGORIES}


def setup(seed=0, L=3, F=30, lead_shape=None):
    rng = np.random.default_rng(seed)
    shape = lead_shape or (L, F)
    freq = rng.random(shape) * 0.5
    fm = {c: np.clip(freq + 0.1 * rng.standard_normal(shape), 0, 1) for c in CATEGORIES}
    sets = {}
    for i, c in enumerate(CATEGORIES):
        score = fm[c] if i % 2 else rng.random(shape)  # odd categories: their busiest units (warned)
        flat = score.reshape(-1, shape[-1])
        m = np.zeros_like(flat, bool)
        for g, row in enumerate(flat):
            m[g, np.argsort(row)[-3:]] = True
        sets[c] = m.reshape(shape)
    return sets, fm, freq


@pytest.mark.parametrize("kind, shape", [("neurons", (3, 30)), ("expert_neurons", (2, 3, 20))])
def test_ablation_matrix_runs_the_firing_mass_draws_and_records_their_masses(kind, shape):
    sets, fm, freq = setup(lead_shape=shape)
    model = FiringModel(fm)
    r = ablation_matrix(sets, model, n_random=4, seed=3, kind=kind, frequency=freq, firing_mass=fm)
    # The masks of the control: per category after its set and frequency-matched draws (one round).
    assert len(model.masks) == 1 + len(CATEGORIES) * (1 + 2 * 4)
    for a, c in enumerate(CATEGORIES):
        start = 1 + a * 9
        assert model.masks[start] is sets[c] or np.array_equal(model.masks[start], sets[c])
        mass_masks = model.masks[start + 5:start + 9]
        assert not any((m & sets[c]).any() for m in mass_masks)
        # Masses by hand: the set's and each draw's firing on every category's records.
        np.testing.assert_allclose(r.set_mass_matrix[a], [fm[b][sets[c]].sum() for b in CATEGORIES])
        np.testing.assert_allclose(r.set_category_mass[a], fm[c][sets[c]].sum())
        for d, m in enumerate(mass_masks):
            np.testing.assert_allclose(r.mass_random_mass[d, a], fm[c][m].sum())
            np.testing.assert_allclose(r.mass_random_layer_mass[d, a], [fm[c][l][m[l]].sum() for l in range(shape[0])])
            assert r.mass_random_sizes[d, a] == m.sum()
            # The loss: the draw's own pass, minus the baseline.
            np.testing.assert_allclose(r.mass_random_draws[d, a], [fm[b][m].sum() for b in CATEGORIES])
            # Each draw within one unit of the set's mass in every layer.
            for g, t in group_masses(sets[c], fm[c]).items():
                assert abs(group_masses(m, fm[c])[g] - t) <= fm[c][g].max() + 1e-12
    np.testing.assert_allclose(r.mass_excess, r.isn - r.mass_random_draws.mean(0))
    # The frequency-matched draws are those of the seed with or without the control.
    plain = ablation_matrix(sets, FiringModel(fm), n_random=4, seed=3, kind=kind, frequency=freq)
    np.testing.assert_array_equal(plain.random_draws, r.random_draws)
    assert plain.mass_random_draws is None and plain.to_dict()["mass_matched"] is None
    # The dict carries it as the experts' does, and reads back.
    d = json.loads(json.dumps(r.to_dict()))
    mm = d["mass_matched"]
    assert (mm["where"], mm["mass"], mm["n_random"]) == ("always", "firing", 4)
    np.testing.assert_allclose(np.array(mm["excess"], float), r.mass_excess)
    back = AblationResult.from_dict(d)
    np.testing.assert_allclose(back.mass_excess, r.mass_excess)
    assert back.mass_where == "always"


def warned_setup():
    """`setup` whose odd categories' sets are their layers' three busiest units, which no
    frequency-matched draw can match (warned about), and whose other sets hold none of them."""
    sets, fm, freq = setup()
    busiest = np.zeros_like(freq, bool)
    busiest[:, :3] = True
    freq[busiest] = 1.0  # three units per layer fire twice as often as any other (at most 0.5)
    for c in CATEGORIES[1::2]:  # their sets: those, which no frequency-matched draw can match
        sets[c] = busiest
    for c in CATEGORIES[::2]:  # the others: none of them
        sets[c] = sets[c] & ~busiest
    return sets, fm, freq


def test_where_warned_draws_only_for_the_categories_the_frequency_matching_warns_about():
    sets, fm, freq = warned_setup()
    model = FiringModel(fm)
    r = ablation_matrix(sets, model, n_random=3, seed=0, kind="neurons", frequency=freq, firing_mass=fm,
                        mass_where="where_warned")
    warned = {w.split(":")[0] for w in r.matching_warnings() if "fire less often" in w}
    assert warned == set(CATEGORIES[1::2])
    for a, c in enumerate(CATEGORIES):
        assert np.isfinite(r.mass_random_draws[:, a]).all() == (c in warned), c
    assert len(model.masks) == 1 + len(CATEGORIES) * 4 + 3 * len(warned)  # no pass for the others
    # The warning line names the control's outcome; the dict says where it ran.
    line = next(w for w in r.matching_warnings() if w.startswith(f"{CATEGORIES[1]}:"))
    a = 1
    assert (f"the firing-mass-matched control (3 draws of {r.mass_random_sizes[:, a].mean():.3g} neurons outside "
            f"the set, against its 9) carried {r.mass_random_mass[:, a].mean():.3g} of the firing mass") in line
    assert r.to_dict()["mass_matched"]["where"] == "where_warned"
    assert "beyond the firing-mass-matched neuron draws" in repr(r)


def test_bad_firing_mass_is_refused_by_name():
    sets, fm, freq = setup()
    with pytest.raises(ValueError, match="experts take expert_mass"):
        ablation_matrix({c: m[:, :4] for c, m in sets.items()}, FiringModel(fm), n_random=1, kind="experts",
                        firing_mass={c: m[:, :4] for c, m in fm.items()})
    with pytest.raises(ValueError, match=r"firing_mass\['code'\] has shape \(3, 5\), the sets \(3, 30\)"):
        ablation_matrix(sets, FiringModel(fm), n_random=1, firing_mass={**fm, "code": np.zeros((3, 5))})
    with pytest.raises(ValueError, match=r"firing_mass\['math'\]: every unit needs a finite firing frequency"):
        ablation_matrix(sets, FiringModel(fm), n_random=1, firing_mass={**fm, "math": -fm["math"]})
    with pytest.raises(ValueError, match="mass_where must be one of"):
        ablation_matrix(sets, FiringModel(fm), n_random=1, firing_mass=fm, mass_where="sometimes")
    with pytest.raises(ValueError, match=r"^firing_source must be one of \('held_out', 'identification'\) \(or None\), "
                                         r"got 'held-out'$"):
        ablation_matrix(sets, FiringModel(fm), n_random=1, firing_mass=fm, firing_source="held-out")


def test_the_report_shows_the_firing_mass_control(tmp_path):
    import csv

    from sparcom_jax.report import write_report

    sets, fm, freq = setup()
    r = ablation_matrix(sets, FiringModel(fm), n_random=2, seed=0, kind="neurons", frequency=freq, firing_mass=fm)
    d = json.loads(json.dumps(r.to_dict()))
    write_report(tmp_path, {"identification": {"rule": "top"}, "models": {}, "ablation": {"neurons": d}}, dpi=20)
    with open(tmp_path / "tables" / "ablation_neurons_mass_matched.csv") as fh:
        rows = [row for row in csv.reader(fh) if not row[0].startswith("#")]
    header, a = rows[0], CATEGORIES.index("code")
    code = rows[1 + a]
    assert float(code[header.index("excess_own")]) == pytest.approx(r.mass_excess[a, a], abs=1e-5)
    assert float(code[header.index("set_mass_own_tokens")]) == pytest.approx(fm["code"][sets["code"]].sum(), abs=1e-5)
    assert float(code[header.index("random_neurons_mean")]) == pytest.approx(r.mass_random_sizes[:, a].mean())
    page = (tmp_path / "index.html").read_text()
    assert "own-category excess over 2 firing-mass-matched random draws" in page
    assert "Firing-mass-matched control (2 draws per category" in page
    assert "Mass-matched control (" not in page  # (the experts' caption, about routing mass)
    assert "which ones was not recorded" in page  # (a caller's own masses: their records not said)


@pytest.mark.parametrize("source", ["held_out", "identification", "absent"])
def test_the_report_says_where_the_firing_was_counted(tmp_path, source):
    """Held-out firing: the caption says so and the set's identification firing is its estimate, the
    gap per layer in the per-layer table; identification firing (and files made before the source
    was recorded): the caption says the control is harsher by an amount the run does not measure."""
    import csv

    from sparcom_jax.analysis import ablate_identification
    from sparcom_jax.report import write_report

    ident, held = disagreeing_identification()
    r = ablate_identification(ident, HeldOutFiring(held), n_random=2, firing_matched="always",
                              firing_source="identification" if source == "absent" else source)
    d = json.loads(json.dumps(r.to_dict()))
    if source == "absent":
        del d["mass_matched"]["source"]
    write_report(tmp_path, {"identification": {"rule": "top"}, "models": {}, "ablation": {"neurons": d}}, dpi=20)
    page = (tmp_path / "index.html").read_text()
    held_words = "counted in the unablated pass on the held-out records the loss is measured on"
    assert (held_words in page) == (source == "held_out")
    assert ("by an amount this run does not measure" in page) == (source != "held_out")
    with open(tmp_path / "tables" / "ablation_neurons_mass_matched_per_layer.csv") as fh:
        rows = [row for row in csv.reader(fh) if not row[0].startswith("#")]
    header, code = rows[0], [row for row in rows[1:] if row[0] == "code"]
    for l, row in enumerate(code):
        assert float(row[header.index("set_mass_measured")]) == pytest.approx(
            held["code"][l, 9] if source == "held_out" else 0.9, abs=1e-6)
        assert float(row[header.index("set_mass_estimate")]) == pytest.approx(0.9, abs=1e-6)


def test_the_report_says_which_categories_where_warned_drew_for(tmp_path):
    """With mass_where="where_warned" the page says the other categories' rows are empty on purpose."""
    from sparcom_jax.report import write_report

    sets, fm, freq = setup()
    r = ablation_matrix(sets, FiringModel(fm), n_random=2, seed=0, kind="neurons", frequency=freq, firing_mass=fm,
                        mass_where="where_warned")
    d = json.loads(json.dumps(r.to_dict()))
    write_report(tmp_path, {"identification": {"rule": "top"}, "models": {}, "ablation": {"neurons": d}}, dpi=20)
    page = (tmp_path / "index.html").read_text()
    assert "Drawn only for the categories whose frequency-matched draws fire on average more than 10% " in page
    always = ablation_matrix(sets, FiringModel(fm), n_random=2, seed=0, kind="neurons", frequency=freq,
                             firing_mass=fm)
    write_report(tmp_path / "always", {"identification": {"rule": "top"}, "models": {},
                                       "ablation": {"neurons": json.loads(json.dumps(always.to_dict()))}}, dpi=20)
    assert "Drawn only for" not in (tmp_path / "always" / "index.html").read_text()


class HeldOutFiring(FiringModel):
    """A FiringModel whose baseline pass also counts each unit's firing on the held-out records."""

    def __call__(self, mask):
        self.last_unit_firing = dict(self.fm) if mask is None else None
        return super().__call__(mask)


def disagreeing_identification():
    """An identification where neuron i of each layer fires on i of 10 tokens of every category's
    records (the sets: neuron 9 of each layer), and held-out firings that rank the neurons otherwise."""
    from sparcom_jax.analysis import IdentifyConfig, identify
    from sparcom_jax.stats.counts import Counts

    n = 12
    na = np.tile(np.arange(10, dtype=np.int32), (n, 2, 1))
    counts = Counts(tokens=np.full(n, 10), neuron_active=na, categories=[CATEGORIES[k // 2] for k in range(n)])
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.1))
    rng = np.random.default_rng(4)
    held = {c: rng.random((2, 10)) * 0.3 for c in CATEGORIES}  # the set fires 0.9 on identification records
    return ident, held


def test_the_firing_draws_follow_the_held_out_firing_the_baseline_pass_counts():
    from sparcom_jax.analysis import ablate_identification

    ident, held = disagreeing_identification()
    sets = ident.sets()
    assert all(np.array_equal(np.flatnonzero(s.reshape(-1)), [9, 19]) for s in sets.values())
    model = HeldOutFiring(held)
    r = ablate_identification(ident, model, n_random=6, seed=1, firing_matched="always")
    assert model.masks[0] is None and r.baseline == {c: 1.0 for c in CATEGORIES}  # one baseline pass, counted
    assert sum(m is None for m in model.masks) == 1
    assert r.mass_source == "held_out"
    ident_r = ablate_identification(ident, HeldOutFiring(held), n_random=6, seed=1, firing_matched="always",
                                    firing_source="identification")
    assert ident_r.mass_source == "identification"
    for a, c in enumerate(CATEGORIES):
        s = sets[c]
        np.testing.assert_allclose(r.set_category_mass[a], held[c][s].sum())
        np.testing.assert_allclose(r.set_layer_mass[a], held[c][:, 9])
        np.testing.assert_allclose(ident_r.set_category_mass[a], 1.8, rtol=1e-6)  # 0.9 per layer, counted
        # Beside the held-out firing, the identification's: how much less the set fires on new records.
        np.testing.assert_allclose(r.set_layer_estimate[a], [0.9, 0.9], rtol=1e-6)
        np.testing.assert_array_equal(ident_r.set_layer_estimate[a], ident_r.set_layer_mass[a])
        draws = model.masks[1 + a * 13 + 7:1 + a * 13 + 13]  # after the baseline: per category its set, 6, 6
        for d, m in enumerate(draws):
            assert not (m & s).any()
            np.testing.assert_allclose(r.mass_random_mass[d, a], held[c][m].sum())
            for l in range(2):  # within one unit of the set's held-out firing in each layer
                assert abs(held[c][l][m[l]].sum() - held[c][l, 9]) <= held[c][l, :9].max() + 1e-12
        # Matched on the identification's firing, the draws carry 1.8 there (within one unit per
        # layer); matched on the held-out firing, far less: the two sources give other draws.
        assert abs(ident_r.mass_random_mass[:, a].mean() - 1.8) <= 0.2
        assert r.mass_random_mass[:, a].mean() < 0.6
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mass_matched"]["source"] == "held_out"
    assert AblationResult.from_dict(d).mass_source == "held_out"
    assert "counted on its held-out records" in r._mass_words()[2]


def test_a_held_out_firing_source_needs_a_loss_that_counts_it_and_old_files_say_identification():
    from sparcom_jax.analysis import ablate_identification

    ident, held = disagreeing_identification()
    with pytest.raises(ValueError, match="last_unit_firing.*firing_source='identification'"):
        ablate_identification(ident, FiringModel(held), n_random=2, firing_matched="always")
    with pytest.raises(ValueError, match="firing_source must be one of"):
        ablate_identification(ident, HeldOutFiring(held), n_random=2, firing_matched="always", firing_source="test")
    with pytest.raises(ValueError, match="firing_source must be one of"):  # (refused without the control too)
        ablate_identification(ident, HeldOutFiring(held), n_random=2, firing_source="test")
    r = ablate_identification(ident, FiringModel(held), n_random=2, firing_matched="always",
                              firing_source="identification")
    d = json.loads(json.dumps(r.to_dict()))
    del d["mass_matched"]["source"]  # as written before the source was recorded
    assert AblationResult.from_dict(d).mass_source == "identification"
    assert "from the identification counts" in AblationResult.from_dict(d)._mass_words()[2]


def test_every_process_draws_from_the_held_out_firing_process_0_counted(monkeypatch):
    """Two simulated processes (`launch.simulate_process`): only process
    0 runs the baseline pass that counts the firing, and both end with its losses and firing bit for
    bit (a category without held-out records stays out), so both draw the same sets."""
    from sparcom_jax.analysis.ablate import baseline_unit_firing
    from sparcom_jax.pipeline.stages import _baseline_shared

    rng = np.random.default_rng(0)
    shape = (2, 3, 4)
    firing = {c: rng.random(shape) for c in CATEGORIES if c != "math"}
    ran, p, sent = [], 2, {}

    def as_process(k):
        simulate_process(monkeypatch, k, p, sent)
        model = HeldOutFiring({c: v * (k + 1) for c, v in firing.items()})  # process 1's would differ
        ran.append((k, model))
        return _baseline_shared(model, baseline_unit_firing, shape, "unit firing")

    for _ in range(2):  # until every process has process 0's row
        got = [as_process(k) for k in range(p)]
    assert all(model.masks == ([None] if k == 0 else []) for k, model in ran)
    for losses, mass in got:
        assert losses == {c: 1.0 for c in CATEGORIES}
        assert set(mass) == set(firing)
        for c, v in firing.items():
            np.testing.assert_array_equal(mass[c], v)


def held_out_result(firing_records, records=None, source="held_out"):
    """ablate_identification with held-out firing whose loss_fn reports `firing_records` and, with
    `records` ({category: held-out records}), the coverage of its loss."""
    from sparcom_jax.analysis import ablate_identification

    ident, held = disagreeing_identification()
    model = HeldOutFiring(held)
    model.firing_records = firing_records
    if records is not None:
        model.coverage = {c: {"records": n, "scored_records": n, "response_tokens": 10 * n} for c, n in records.items()}
    return ablate_identification(ident, model, n_random=2, firing_matched="always", firing_source=source)


def firing_warnings(r):
    return [w for w in r.matching_warnings() if "held-out firing" in w]


def test_the_result_records_the_held_out_records_the_firing_rests_on_and_old_files_load():
    counts = {c: 7 + i for i, c in enumerate(CATEGORIES)}
    r = held_out_result(counts)
    assert r.firing_records == counts
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mass_matched"]["firing_records"] == counts
    assert AblationResult.from_dict(d).firing_records == counts
    del d["mass_matched"]["firing_records"]  # as written before it was kept
    old = AblationResult.from_dict(d)
    assert old.firing_records is None and not firing_warnings(old)
    # The identification's firing rests on other records: nothing to record.
    assert held_out_result(counts, source="identification").firing_records is None


def test_few_held_out_firing_records_are_warned_about_exactly_below_the_coverage_thresholds():
    from sparcom_jax.analysis.ablate import MIN_SCORED_FRACTION, MIN_SCORED_RECORDS

    few, n = MIN_SCORED_RECORDS, 2 * MIN_SCORED_RECORDS + 2
    share = int(np.ceil(MIN_SCORED_FRACTION * n))  # the fewest records not under the share
    cases = {  # category: (records with a counted token, held-out records, warned)
        CATEGORIES[0]: (few - 1, few - 1, True), CATEGORIES[1]: (few, few, False),
        CATEGORIES[2]: (share - 1, n, True), CATEGORIES[3]: (share, n, False),
        CATEGORIES[4]: (0, n, True), CATEGORIES[5]: (n, n, False)}
    assert share - 1 >= few  # (the third warns for the share, not the count)
    r = held_out_result({c: k for c, (k, _, _) in cases.items()}, {c: m for c, (_, m, _) in cases.items()})
    lines = firing_warnings(r)
    assert [w.split(":")[0] for w in lines] == [c for c, (_, _, warned) in cases.items() if warned]
    for w in lines:
        k, m, _ = cases[w.split(":")[0]]
        assert f"rests on {k} of its {m} held-out records" in w
        assert "target is noisy" in w and "data.split" in w and "ablation.max_records" in w
        # the records left out are named only where the share is under the threshold (not for few alone)
        low = k < MIN_SCORED_FRACTION * m
        assert ("; the others have no token in the scope the sets were identified on (data.scope) and count 0"
                in w) == low, w
    assert {k < MIN_SCORED_FRACTION * m for k, m, warned in cases.values() if warned} == {True, False}
    assert lines == [w for w in r.to_dict()["matching_warnings"] if "held-out firing" in w]
    # Without the loss's coverage, only the count is checked.
    r = held_out_result({c: k for c, (k, _, _) in cases.items()})
    assert [w.split(":")[0] for w in firing_warnings(r)] == [CATEGORIES[0], CATEGORIES[4]]


def test_the_report_shows_the_held_out_firing_records_and_their_warning(tmp_path):
    import csv

    from sparcom_jax.report import write_report

    counts = {c: 3 if c == "code" else 9 for c in CATEGORIES}
    d = json.loads(json.dumps(held_out_result(counts).to_dict()))
    write_report(tmp_path, {"identification": {"rule": "top"}, "models": {}, "ablation": {"neurons": d}}, dpi=20)
    with open(tmp_path / "tables" / "ablation_neurons_mass_matched.csv") as fh:
        rows = [row for row in csv.reader(fh) if not row[0].startswith("#")]
    header = rows[0]
    assert {row[0]: int(row[header.index("held_out_firing_records")]) for row in rows[1:]} == counts
    page = (tmp_path / "index.html").read_text()
    assert "held_out_firing_records is how many of the category" in page
    assert "code: the held-out firing its firing-mass-matched draws are matched to rests on 3 held-out" in page


def test_the_firing_records_warning_names_only_the_categories_the_control_ran_for():
    """where_warned: a category without firing-mass draws was matched to nothing, so its few
    records are no warning; nor is an empty set's."""
    sets, fm, freq = warned_setup()
    sets[CATEGORIES[3]] = np.zeros_like(sets[CATEGORIES[3]])
    model = FiringModel(fm)
    model.firing_records = {c: 1 for c in CATEGORIES}
    r = ablation_matrix(sets, model, n_random=3, seed=0, kind="neurons", frequency=freq, firing_mass=fm,
                        mass_where="where_warned", firing_source="held_out")
    drawn = [c for a, c in enumerate(CATEGORIES) if r.set_sizes[a] and np.isfinite(r.mass_random_draws[:, a]).all()]
    assert drawn == [CATEGORIES[1], CATEGORIES[5]]
    assert [w.split(":")[0] for w in firing_warnings(r)] == drawn
