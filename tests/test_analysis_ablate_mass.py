"""The mass-matched expert control: random experts outside the set dropping as much routing mass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparcom_jax.analysis.ablate import (AblationResult, ablation_matrix, mask_layer_mass, mass_fill,
                                         mass_matched_random, run_in_order)
from launch import simulate_process
from sparcom_jax.categories import CATEGORIES


def fill_by_hand(mass: list[float], target: float, u: float) -> list[bool]:
    """The selection rule read off its description: in order, each unit with mass that still
    fits under the target; then the lightest unit left (the first of equals) with probability
    (target - filled) / its mass, or whatever it weighs when nothing fits (at least one unit)."""
    take, filled = [False] * len(mass), 0.0
    for i, m in enumerate(mass):
        if m > 0 and filled + m <= target:
            take[i], filled = True, filled + m
    left = [(m, i) for i, m in enumerate(mass) if m > 0 and not take[i]]
    if left:
        m, i = min(left)
        if not any(take) or u < (target - filled) / m:
            take[i] = True
    elif not any(take):
        take[0] = True
    return take


def closest_prefix(mass: np.ndarray, target: float) -> int:
    """The earlier rule, the baseline the new one must beat: the prefix (1..W units) of the
    random order whose mass is closest to the target (a tie: the one that reaches it)."""
    cum = np.cumsum(mass)
    return min(range(1, mass.size + 1), key=lambda k: (abs(cum[k - 1] - target), cum[k - 1] < target, k))


def test_mass_fill_takes_what_fits_then_rounds_to_the_target_on_average():
    rng = np.random.default_rng(0)
    for _ in range(400):
        w = int(rng.integers(1, 8))
        mass = rng.random(w) * (rng.random(w) > 0.2)  # zero-mass units too: they must not be taken for nothing
        target = float(rng.random() * 1.2 * mass.sum())
        grid = (np.arange(100) + 0.5) / 100  # the rounding's u, evenly
        takes = [mass_fill(mass, target, u) for u in grid]
        for u, take in zip(grid, takes):
            assert take.tolist() == fill_by_hand(mass.tolist(), target, u), (mass, target, u)
            assert take.any() and not (take & (mass == 0)).any() or not mass.any()
        got = np.array([mass[t].sum() for t in takes])
        positive = mass[mass > 0]
        if positive.size and positive.min() <= target < positive.sum():
            # Reachable from both sides: on average over u the target itself (to the grid's step).
            assert abs(got.mean() - target) <= mass.max() / 100 + 1e-12, (mass, target, got.mean())
            assert mass[mass_fill(mass, target, 0.0)].sum() >= target  # u = 0: rounded up
    # By hand: 0.3 fits under 0.5, the next 0.3 does not: 0.3, and 0.3 more with p = 0.2 / 0.3.
    m = np.array([0.3, 0.3, 0.3])
    assert mass_fill(m, 0.5, 0.6).tolist() == [True, True, False]
    assert mass_fill(m, 0.5, 0.7).tolist() == [True, False, False]
    # A busy unit first is skipped, not taken (the closest prefix had to take it): 0.1 + 0.05.
    m = np.array([0.4, 0.1, 0.05, 0.2])
    assert mass_fill(m, 0.15, 0.99).tolist() == [False, True, True, False]
    assert mass_fill(np.array([0.3, 0.4]), 0.1, 0.99).tolist() == [True, False]  # all outweigh it: the lightest
    assert mass_fill(np.array([0.1, 0.0, 0.1]), 5.0, 0.0).tolist() == [True, False, True]  # all fall short: all
    assert mass_fill(np.zeros(3), 0.2, 0.0).tolist() == [True, False, False]  # no mass anywhere: still one


def closest_prefix_draw(mask, mass, rng, target):
    """A draw of the earlier rule: per layer of the set, the closest prefix of a random order."""
    out = np.zeros_like(mask)
    for l in np.flatnonzero(mask.any(1)):
        free = rng.permutation(np.flatnonzero(~mask[l]))
        out[l, free[:closest_prefix(mass[l, free], target[l])]] = True
    return out


# One layer of the fresh demo's tiny Mixtral (MATH's layer 1, on its own tokens): the set's one
# expert carries 0.021 and one expert outside it 0.078 (more than three times that).
DEMO_LAYER = np.array([[0.021, 0.019, 0.019, 0.024, 0.029, 0.029, 0.031, 0.078]])


def match_errors(rule, mask, mass, target, n=1000):
    """float [n, L] each draw's mass minus the target, per layer, and the draws."""
    draws = [rule(mask, mass, np.random.default_rng([9, k]), target) for k in range(n)]
    return np.array([mask_layer_mass(mass, d) for d in draws]) - target, draws


def test_mass_matched_draws_hit_the_target_on_average_and_closer_than_the_closest_prefix():
    """Over many draws on routing-mass tables (each layer's target reachable from both sides):
    the mean signed error is about 0 in every layer, the mean |error| below the earlier rule's
    (the closest prefix of a random order, which overshot small targets: it cannot skip a busy
    expert that comes first), and the draws differ."""
    def new_rule(mask, mass, rng, target):
        return mass_matched_random(mask, mass, rng, target=target)

    rng = np.random.default_rng(3)
    tables = [(np.eye(1, 8, dtype=bool), DEMO_LAYER, DEMO_LAYER[:, 0])]
    for _ in range(10):  # Dirichlet softmaxes of 8 experts; the set: each layer's busiest (as ISEs are)
        mass = rng.dirichlet(np.full(8, 2.0), size=2) / 2
        mask = np.zeros((2, 8), bool)
        mask[0, mass[0].argmax()] = True
        mask[1, np.argsort(mass[1])[-2:]] = True
        tables.append((mask, mass, mask_layer_mass(mass, mask) * np.array([1.2, 0.7])))  # the pass moved it
    new_abs, old_abs = [], []
    for mask, mass, target in tables:
        for l in range(mask.shape[0]):  # the tables' premise: reachable from below and above
            assert mass[l, ~mask[l]].min() <= target[l] < mass[l, ~mask[l]].sum()
        err, draws = match_errors(new_rule, mask, mass, target)
        old, _ = match_errors(closest_prefix_draw, mask, mass, target)
        se = err.std(0) / np.sqrt(len(err))
        assert (np.abs(err.mean(0)) <= 4 * se).all(), (err.mean(0), se)  # unbiased in every layer
        new_abs.append(np.abs(err).mean())
        old_abs.append(np.abs(old).mean())
        assert len({d.tobytes() for d in draws[:19]}) >= 3  # random: not the same "best" set each draw
    assert np.mean(new_abs) < 0.9 * np.mean(old_abs)
    # The demo's layer: the earlier rule overshot by half the target on average, this one does not.
    err, draws = match_errors(new_rule, *tables[0])
    old, _ = match_errors(closest_prefix_draw, *tables[0])
    assert old.mean() > 0.4 * DEMO_LAYER[0, 0]  # the bias this replaces (+0.011 of 0.021)
    assert abs(err.mean()) < 0.05 * DEMO_LAYER[0, 0]
    assert np.abs(err).mean() < 0.5 * np.abs(old).mean()
    assert not any(d[0, 7] for d in draws)  # the 0.078 expert never fits


def brute_draw(mask, mass, seed, target=None):
    """The draw by hand; `seed` an int or a generator; `target` float [L] (default the set's estimate)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.zeros_like(mask)
    for l in range(mask.shape[0]):
        if mask[l].any():
            free = rng.permutation(np.flatnonzero(~mask[l]))
            u = rng.random()
            goal = mass[l, mask[l]].sum() if target is None else target[l]
            out[l, free[fill_by_hand(mass[l, free].tolist(), goal, u)]] = True
    return out


def test_mass_matched_random_by_brute_force_outside_the_set_and_per_seed():
    rng = np.random.default_rng(1)
    for trial in range(200):
        L, E = int(rng.integers(1, 5)), int(rng.integers(2, 9))
        mass = rng.dirichlet(np.ones(E), size=L) / L  # a softmax per layer, shared by the L layers
        mask = rng.random((L, E)) < 0.3
        mask[mask.all(1), 0] = False  # a layer keeps an expert
        draw = mass_matched_random(mask, mass, np.random.default_rng(trial))
        assert np.array_equal(draw, brute_draw(mask, mass, trial))
        assert not (draw & mask).any()  # never an expert of the set
        assert np.array_equal(draw.any(1), mask.any(1))  # the layers of the set, and only those
        assert np.array_equal(draw, mass_matched_random(mask, mass, np.random.default_rng(trial)))
        for l in np.flatnonzero(mask.any(1)):
            target, got = mass[l, mask[l]].sum(), mass[l, draw[l]].sum()
            # Within one expert of the target, or every outside expert taken (they fall short).
            free = mass[l, ~mask[l]]
            assert got <= target + free.max() + 1e-12
            assert got >= target - free.max() - 1e-12 or draw[l].sum() == (~mask[l]).sum()
    # The demo's case: the set holds its layer's busiest expert (0.4); the rest carry 0.2, 0.15, ...
    mass = np.array([[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]])
    mask = np.array([[True, False, False, False, False, False]])
    draws = [mass_matched_random(mask, mass, np.random.default_rng(s)) for s in range(50)]
    assert all(d.sum() >= 2 for d in draws)  # more experts than the set: none outside comes within 0.2
    # Filled to at most 0.4, then at most one expert more: within 0.05 below (the lightest left
    # outweighs the gap) and 0.2 above.
    assert all(0.4 - 0.05 - 1e-12 <= mass[d].sum() <= 0.6 + 1e-12 for d in draws)
    assert len({d.tobytes() for d in draws}) > 1  # random, not the heaviest-first set


class MassModel:
    """loss_c(mask) = 1 + mass_c(mask) + 0.5 |mask ∩ S(c)|: the set hurts more than its mass.
    Reports the mass a mask drops on each category (`last_category_mass`) and overall, and each
    expert's mass in the pass (`last_expert_mass`). With `shift`, a mask removing a layer-0
    expert multiplies the later layers' masses of the experts it removes there by `shift` (the
    routing moves onto them, as it did on the demo's Mixtral)."""

    def __init__(self, sets, mass, shift=1.0):
        self.sets, self.mass, self.shift, self.masks = sets, mass, shift, []

    def __call__(self, mask):
        self.masks.append(None if mask is None else mask.copy())
        m = np.zeros_like(next(iter(self.sets.values()))) if mask is None else mask
        moved = {c: v * np.where(m & m[0].any() & (np.arange(len(m)) > 0)[:, None], self.shift, 1.0)
                 for c, v in self.mass.items()}
        self.last_expert_mass = moved
        by_cat = {c: float(moved[c][m].sum()) for c in CATEGORIES}
        self.last_category_mass = None if mask is None else by_cat
        self.last_dropped_mass = None if mask is None else float(np.mean(list(by_cat.values())))
        return {c: 1.0 + by_cat[c] + 0.5 * float((m & self.sets[c]).sum()) for c in CATEGORIES}


def setup(L=2, E=6):
    rng = np.random.default_rng(4)
    mass = {c: rng.dirichlet(np.ones(E), size=L) / L for c in CATEGORIES}
    sets = {}
    for c in CATEGORIES:  # each layer's busiest expert on the category, as top-eps ISEs are
        s = np.zeros((L, E), bool)
        s[np.arange(L), mass[c].argmax(1)] = True
        sets[c] = s
    sets["math"][:] = False  # an empty set: rows of 0, no draw
    return sets, mass


def test_ablation_matrix_runs_the_mass_matched_control_on_its_own_stream():
    sets, mass = setup()
    freq = np.tile(np.linspace(0.1, 0.9, 6), (2, 1))
    plain_model = MassModel(sets, mass)
    plain = ablation_matrix(sets, plain_model, n_random=4, seed=7, kind="experts", frequency=freq)
    assert plain.mass_random_draws is None and plain.to_dict()["mass_matched"] is None
    model = MassModel(sets, mass)
    r = ablation_matrix(sets, model, n_random=4, seed=7, kind="experts", frequency=freq, expert_mass=mass)
    # The frequency-matched draws stay the seed's: the mass-matched ones come after, from [seed, 2].
    assert np.array_equal(r.random_draws, plain.random_draws)
    rng = np.random.default_rng([7, 2])
    # The baseline and the sets with their frequency-matched draws as without the control, then
    # the mass-matched draws (they need the sets' passes), in category order.
    assert all(np.array_equal(x, y) for x, y in zip(model.masks[:len(plain_model.masks)], plain_model.masks,
                                                      strict=False))
    per = 4
    for a, cat in enumerate(CATEGORIES):
        if cat == "math":
            continue
        k = [c for c in CATEGORIES if c != "math"].index(cat)
        block = model.masks[len(plain_model.masks) + k * per:len(plain_model.masks) + (k + 1) * per]
        assert np.array_equal(model.masks[1 + k * 5], sets[cat])
        for d, m in enumerate(block):
            assert np.array_equal(m, mass_matched_random(sets[cat], mass[cat], rng))
            assert r.mass_random_sizes[d, a] == m.sum()
            assert r.mass_random_mass[d, a] == pytest.approx(mass[cat][m].sum())  # measured, on a's tokens
            # ... and on every category's tokens (only a's own is matched)
            np.testing.assert_allclose(r.mass_random_mass_matrix[d, a], [mass[b][m].sum() for b in CATEGORIES])
            assert r.mass_random_draws[d, a] == pytest.approx(
                [mass[b][m].sum() + 0.5 * (m & sets[b]).sum() for b in CATEGORIES])
        assert r.set_category_mass[a] == pytest.approx(mass[cat][sets[cat]].sum())
        np.testing.assert_allclose(r.set_mass_matrix[a], [mass[b][sets[cat]].sum() for b in CATEGORIES])
    assert len(model.masks) == len(plain_model.masks) + 5 * per == 1 + 5 * (1 + 4 + 4)
    m_ = CATEGORIES.index("math")
    assert np.all(r.mass_random_draws[:, m_] == 0) and r.mass_random_sizes[:, m_].sum() == 0
    # Excess and p-value against these draws, brute force.
    ok = [a for a, c in enumerate(CATEGORIES) if c != "math"]
    mean = r.mass_random_draws.mean(0)
    assert np.allclose(r.mass_excess, r.isn - mean)
    sp = r.excess_spread(r.mass_random_draws)
    n_ge = (r.mass_random_draws >= r.isn[None]).sum(0)
    assert np.allclose(sp["p_value"], (1 + n_ge) / 5)
    assert np.allclose(np.diag(sp["p_value"])[ok], 0.2)  # each set hurts 0.5 per expert beyond its mass
    # Round trip through JSON, and files without the control load as before.
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mass_matched"]["n_random"] == 4
    assert np.allclose(np.array(d["mass_matched"]["excess"], float), r.mass_excess, equal_nan=True)
    back = AblationResult.from_dict(d)
    for key in ("mass_random_draws", "mass_random_mass", "mass_random_sizes", "set_category_mass",
                "set_mass_matrix", "mass_random_mass_matrix"):
        assert np.array_equal(getattr(back, key), getattr(r, key), equal_nan=True), key
    assert back.mass_random_sizes.dtype == np.int64
    assert AblationResult.from_dict(json.loads(json.dumps(plain.to_dict()))).mass_random_draws is None
    with pytest.raises(ValueError, match="only experts"):
        ablation_matrix(sets, model, kind="neurons", expert_mass=mass)


def test_the_matching_warning_gives_the_mass_matched_outcome():
    sets, mass = setup()
    freq = np.tile(np.linspace(0.1, 0.9, 6), (2, 1))
    sets["code"][:] = False
    sets["code"][:, 5] = True  # the busiest by frequency: no frequency-matched draw fires as often
    r = ablation_matrix(sets, MassModel(sets, mass), n_random=3, seed=0, kind="experts", frequency=freq,
                        expert_mass=mass)
    plain = ablation_matrix(sets, MassModel(sets, mass), n_random=3, seed=0, kind="experts", frequency=freq)
    a = CATEGORIES.index("code")
    line = next(w for w in r.matching_warnings() if w.startswith("code:"))
    before = next(w for w in plain.matching_warnings() if w.startswith("code:"))
    p = r.excess_spread(r.mass_random_draws)["p_value"][a, a]
    assert line == before + (
        f"; the mass-matched control (3 draws of {r.mass_random_sizes[:, a].mean():.3g} experts outside the set, "
        f"against its 2) dropped {r.mass_random_mass[:, a].mean():.3g} of the routing mass on its own tokens (the "
        f"set {r.set_category_mass[a]:.3g}) and gives an own-category excess of {r.mass_excess[a, a]:+.3g} "
        f"(p = {p:.2g})")
    assert r.to_dict()["matching_warnings"] == r.matching_warnings()
    assert repr(r).splitlines()[4:6] == ["  own-category excess beyond the mass-matched expert draws:", "    " + (
        ", ".join(f"{s} {e:+.3g}" for s, e in zip(("CLS", "CODE", "QA", "GEN", "MATH", "SUM"),
                                                  np.diag(r.mass_excess))))]
    # A category whose held-out tokens give no mass (none scored): no draw, NaN, and no outcome to give.
    no_code = ablation_matrix(sets, MassModel(sets, mass), n_random=3, seed=0, kind="experts", frequency=freq,
                              expert_mass={c: m for c, m in mass.items() if c != "code"})
    assert np.isnan(no_code.mass_random_draws[:, a]).all() and np.isnan(no_code.mass_random_mass[:, a]).all()
    assert next(w for w in no_code.matching_warnings() if w.startswith("code:")) == before


def test_the_report_shows_the_mass_matched_control(tmp_path):
    import csv

    from sparcom_jax.report import write_report
    from sparcom_jax.report.tables import ABLATION_HEADER

    sets, mass = setup()
    r = ablation_matrix(sets, MassModel(sets, mass), n_random=2, seed=0, kind="experts", expert_mass=mass)
    d = json.loads(json.dumps(r.to_dict()))
    write_report(tmp_path, {"identification": {"rule": "top"}, "models": {}, "ablation": {"experts": d}}, dpi=20)
    with open(tmp_path / "tables" / "ablation_experts_mass_matched.csv") as fh:
        rows = [row for row in csv.reader(fh) if not row[0].startswith("#")]
    header, code = rows[0], rows[1 + CATEGORIES.index("code")]
    a = CATEGORIES.index("code")
    assert float(code[header.index("excess_own")]) == pytest.approx(r.mass_excess[a, a], abs=1e-5)
    assert float(code[header.index("p_own")]) == pytest.approx(1 / 3)
    assert float(code[header.index("set_mass_own_tokens")]) == pytest.approx(r.set_category_mass[a], abs=1e-5)
    for key, f in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        assert float(code[header.index(f"random_mass_own_tokens_{key}")]) == pytest.approx(
            f(r.mass_random_mass[:, a]), abs=1e-5)
    assert float(code[header.index("random_experts_mean")]) == pytest.approx(r.mass_random_sizes[:, a].mean())
    gap = r.mass_random_mass[:, a] - r.set_category_mass[a]  # each draw's error, by hand
    assert float(code[header.index("random_mass_error_mean")]) == pytest.approx(gap.mean(), abs=1e-6)
    assert float(code[header.index("random_mass_error_abs_mean")]) == pytest.approx(np.abs(gap).mean(), abs=1e-6)
    with open(tmp_path / "tables" / "ablation_experts_baseline.csv") as fh:  # the frequency-matched table as it was
        assert next(row for row in csv.reader(fh) if not row[0].startswith("#")) == ABLATION_HEADER
    assert (tmp_path / "tables" / "ablation_experts_mass_matched_p_value.csv").is_file()
    # The masses on every category's tokens: the set's, and the draws' mean (only the diagonal matched).
    for name, want in (("set_mass_matrix", r.set_mass_matrix), ("random_mass_matrix_mean",
                                                                 r.mass_random_mass_matrix.mean(0))):
        header, rows = _csv_rows(tmp_path / "tables" / f"ablation_experts_mass_matched_{name}.csv")
        assert [row[0] for row in rows] == list(CATEGORIES)
        np.testing.assert_allclose([[float(x) for x in row[1:]] for row in rows], want, atol=1e-6)
    page = (tmp_path / "index.html").read_text()
    assert "Mass-matched control (2 draws per category" in page
    assert "a mean beyond 10% of the set" in page  # the tolerance of the warning, said where the errors are
    assert "own-category excess over 2 mass-matched random draws" in page


def test_mass_matched_random_reaches_the_target_given_per_layer_by_brute_force():
    rng = np.random.default_rng(2)
    for trial in range(200):
        L, E = int(rng.integers(1, 5)), int(rng.integers(2, 9))
        mass = rng.dirichlet(np.ones(E), size=L) / L
        mask = rng.random((L, E)) < 0.3
        mask[mask.all(1), 0] = False
        target = rng.random(L) * 0.6 / L
        draw = mass_matched_random(mask, mass, np.random.default_rng(trial), target=target)
        assert np.array_equal(draw, brute_draw(mask, mass, trial, target))
        assert not (draw & mask).any() and np.array_equal(draw.any(1), mask.any(1))
    # By hand: the set's own expert estimated at 0.1, but it dropped 0.3 when removed: three of
    # the 0.1-experts, not one.
    mass, mask = np.full((1, 5), 0.1), np.eye(1, 5, dtype=bool)
    assert mass_matched_random(mask, mass, np.random.default_rng(0)).sum() == 1
    assert mass_matched_random(mask, mass, np.random.default_rng(0), target=np.array([0.3])).sum() == 3


def test_the_mass_matched_draws_match_the_mass_each_set_dropped_in_its_own_pass():
    """The routing moves onto a set's later experts when its layer-0 experts are removed
    (MassModel's shift): the draws match that measured mass per layer, not the estimate."""
    sets, mass = setup(L=3, E=8)
    for c in CATEGORIES:  # a second expert in the last layer: more mass to move there
        sets[c][2, np.argsort(mass[c][2])[-2]] = c != "math"
    model = MassModel(sets, mass, shift=2.0)
    rounds = []

    def counted(loss_fn, masks):
        rounds.append(len(masks))
        return run_in_order(loss_fn, masks)

    r = ablation_matrix(sets, model, n_random=3, seed=5, kind="experts", expert_mass=mass, run=counted)
    assert rounds == [1 + 5 * (1 + 3), 5 * 3]  # the baseline, sets and frequency-matched draws; then these
    rng = np.random.default_rng([5, 2])
    ests = []
    for a, cat in enumerate(CATEGORIES):
        s = sets[cat]
        est = (mass[cat] * s).sum(1)
        if cat == "math":
            assert (r.set_layer_mass[a] == 0).all() and (r.set_layer_estimate[a] == 0).all()
            continue
        measured = est * np.array([1.0, 2.0, 2.0])  # layer 0 as estimated, the later layers doubled
        np.testing.assert_allclose(r.set_layer_mass[a], measured, rtol=1e-12)
        np.testing.assert_allclose(r.set_layer_estimate[a], est, rtol=1e-12)
        assert r.set_category_mass[a] == pytest.approx(measured.sum())
        k = [c for c in CATEGORIES if c != "math"].index(cat)
        for d, m in enumerate(model.masks[-15:][3 * k:3 * k + 3]):
            state = rng.bit_generator.state
            assert np.array_equal(m, brute_draw(s, mass[cat], rng, measured))
            rng.bit_generator.state = state
            ests.append(brute_draw(s, mass[cat], rng, est))
            assert r.mass_random_sizes[d, a] == m.sum()
            # The draws' mass, estimated, is near the measured set mass in every layer (within one
            # expert), or the draw holds every expert outside the set.
            for l in np.flatnonzero(s.any(1)):
                gap = abs((mass[cat][l] * m[l]).sum() - measured[l])
                assert gap <= mass[cat][l][~s[l]].max() + 1e-12 or m[l].sum() == (~s[l]).sum()
    # Matching the estimate would have drawn other sets: the check can tell the two rules apart.
    assert any(not np.array_equal(x, y) for x, y in zip(ests, [m for m in model.masks[-15:]]))
    again = ablation_matrix(sets, MassModel(sets, mass, shift=2.0), n_random=3, seed=5, kind="experts",
                            expert_mass=mass)
    for key in ("mass_random_draws", "mass_random_sizes", "set_layer_mass", "random_draws"):
        assert np.array_equal(getattr(again, key), getattr(r, key), equal_nan=True), key
    # Recorded, and read back (files of the earlier rule, without them, load with None).
    d = json.loads(json.dumps(r.to_dict()))["mass_matched"]
    assert d["set_layer_mass"]["code"] == pytest.approx(list(r.set_layer_mass[CATEGORIES.index("code")]))
    back = AblationResult.from_dict(json.loads(json.dumps(r.to_dict())))
    np.testing.assert_array_equal(back.set_layer_estimate, r.set_layer_estimate)
    old = json.loads(json.dumps(r.to_dict()))
    del old["mass_matched"]["set_layer_mass"], old["mass_matched"]["set_layer_estimate"]
    assert AblationResult.from_dict(old).set_layer_mass is None
    assert AblationResult.from_dict(old).to_dict()["mass_matched"]["set_layer_mass"] is None
    with pytest.raises(ValueError, match="last_expert_mass"):  # no measured mass to match
        ablation_matrix(sets, lambda m: {c: 1.0 for c in CATEGORIES}, n_random=1, kind="experts", expert_mass=mass)


def test_the_pipeline_shares_each_round_and_every_process_draws_the_same(monkeypatch):
    """Two simulated processes (`launch.simulate_process`): process
    k runs the passes k, k+2, ... of each round (both share it evenly) and every process ends
    with the single process's result."""
    from sparcom_jax.pipeline.stages import _passes_shared

    sets, mass = setup(L=3, E=8)
    base = {c: 1.0 for c in CATEGORIES}
    kw = dict(n_random=2, seed=3, kind="experts", expert_mass=mass, baseline=base)
    alone_model = MassModel(sets, mass, shift=2.0)
    alone = ablation_matrix(sets, alone_model, **kw)
    n1 = 5 * (1 + 2)
    assert len(alone_model.masks) == n1 + 5 * 2
    p, sent = 2, {}

    def as_process(k):
        simulate_process(monkeypatch, k, p, sent)
        model = MassModel(sets, mass, shift=2.0)
        return ablation_matrix(sets, model, run=_passes_shared, **kw), model.masks

    for _ in range(3):  # until every process has the others' rows of both rounds
        got = [as_process(k) for k in range(p)]
    for k, (res, ran) in enumerate(got):
        share = alone_model.masks[:n1][k::p] + alone_model.masks[n1:][k::p]  # its passes of each round
        assert len(ran) == len(share)
        assert all(np.array_equal(x, y) for x, y in zip(ran, share))
        for key in ("isn", "random_draws", "mass_random_draws", "mass_random_sizes", "mass_random_mass",
                    "set_layer_mass", "set_category_mass", "dropped_mass"):
            np.testing.assert_array_equal(getattr(res, key), getattr(alone, key), err_msg=key)


def _csv_rows(path):
    import csv

    with open(path) as fh:
        rows = [row for row in csv.reader(fh) if not row[0].startswith("#")]
    return rows[0], rows[1:]


def test_the_report_shows_each_sets_estimated_and_measured_mass_per_layer(tmp_path):
    """The sets' per-layer masses (MassModel's shift doubles the later layers' in the set's own
    pass) in a per-layer table beside the mass-matched control's, their totals in its table."""
    from sparcom_jax.report import write_report

    sets, mass = setup(L=3, E=8)
    model = MassModel(sets, mass, shift=2.0)
    r = ablation_matrix(sets, model, n_random=2, seed=0, kind="experts", expert_mass=mass)
    r_masks = {c: model.masks[-10:][2 * k:2 * k + 2] for k, c in enumerate(c for c in CATEGORIES if c != "math")}
    r_masks["math"] = [np.zeros((3, 8), bool)] * 2  # an empty set: no draw, nothing dropped
    d = json.loads(json.dumps(r.to_dict()))
    write_report(tmp_path / "new", {"identification": {"rule": "top"}, "models": {}, "ablation": {"experts": d}},
                 dpi=20)
    header, rows = _csv_rows(tmp_path / "new" / "tables" / "ablation_experts_mass_matched_per_layer.csv")
    assert header == ["category", "layer", "set_mass_estimate", "set_mass_measured", "shift", "random_mass_mean",
                      "random_error_mean", "random_error_abs_mean"]
    assert [(c, int(j)) for c, j, *_ in rows] == [(c, j) for c in CATEGORIES for j in range(3)]
    mheader, mrows = _csv_rows(tmp_path / "new" / "tables" / "ablation_experts_mass_matched.csv")
    for a, cat in enumerate(CATEGORIES):
        est = (mass[cat] * sets[cat]).sum(1)  # by hand: the set's experts' baseline mass per layer
        measured = est * np.array([1.0, 2.0, 2.0])  # layer 0 untouched, the later layers' routing doubled
        got = np.array([[float(x) for x in row[2:]] for row in rows[3 * a:3 * a + 3]])
        draws = np.array([mask_layer_mass(mass[cat], m) for m in r_masks[cat]]) * [1.0, 2.0, 2.0]  # measured
        np.testing.assert_allclose(got, np.stack([est, measured, measured - est, draws.mean(0),
                                                  (draws - measured).mean(0), np.abs(draws - measured).mean(0)], 1),
                                   atol=1e-6)
        row = mrows[a]
        assert float(row[mheader.index("set_mass_own_tokens_estimate")]) == pytest.approx(est.sum(), abs=1e-6)
        assert float(row[mheader.index("set_mass_own_tokens")]) == pytest.approx(measured.sum(), abs=1e-6)
    assert any(float(row[4]) > 0 for row in rows)  # the shift the table is there to show
    page = (tmp_path / "new" / "index.html").read_text()
    assert "its gap to set_mass_own_tokens is the later layers&#x27; routing moving onto" in page
    assert "set_mass_own_tokens_estimate</th>" in page
    # A file of the earlier rule has no per-layer masses: no table, empty cells, no sentence.
    del d["mass_matched"]["set_layer_mass"], d["mass_matched"]["set_layer_estimate"]
    for k in [k for k in d["mass_matched"] if k.startswith(("error_", "random_layer_"))]:
        del d["mass_matched"][k]  # nor the draws' errors, kept since
    write_report(tmp_path / "old", {"identification": {"rule": "top"}, "models": {}, "ablation": {"experts": d}},
                 dpi=20)
    assert not (tmp_path / "old" / "tables" / "ablation_experts_mass_matched_per_layer.csv").exists()
    mheader, mrows = _csv_rows(tmp_path / "old" / "tables" / "ablation_experts_mass_matched.csv")
    assert {row[mheader.index("set_mass_own_tokens_estimate")] for row in mrows} == {""}
    assert {row[mheader.index("random_mass_error_mean")] for row in mrows} == {""}
    assert "set_mass_own_tokens is the later layers" not in (tmp_path / "old" / "index.html").read_text()


def test_each_draws_mass_per_layer_its_error_and_a_warning_beyond_the_tolerance():
    """Every expert carries 0.02 on every category's tokens, so the rule can match each set's
    mass exactly; with MassModel's shift the draws' own passes double their later layers' mass
    (the routing moves onto them, as it moved onto the sets'): measured, they then overshoot."""
    from sparcom_jax.analysis.ablate import MASS_TOLERANCE

    L, E = 3, 8
    flat = {c: np.full((L, E), 0.02) for c in CATEGORIES}
    sets = {c: np.zeros((L, E), bool) for c in CATEGORIES}
    for i, c in enumerate(CATEGORIES):
        sets[c][:, i % E] = True
        sets[c][2, (i + 1) % E] = True
    kw = dict(n_random=3, seed=1, kind="experts", expert_mass=flat)
    exact = ablation_matrix(sets, MassModel(sets, flat), **kw)
    shifted = ablation_matrix(sets, MassModel(sets, flat, shift=2.0), **kw)
    for a, cat in enumerate(CATEGORIES):
        target = np.array([0.02, 0.02, 0.04])
        np.testing.assert_allclose(exact.set_layer_mass[a], target)
        np.testing.assert_allclose(shifted.set_layer_mass[a], target * [1, 2, 2])
        for d in range(3):
            # The same draws in both (the targets differ: the shifted set dropped twice as much
            # after layer 0, so its draws hold twice the experts there), each valued by hand.
            for r, moved in ((exact, [1, 1, 1]), (shifted, [1, 2, 2])):
                got = r.mass_random_layer_estimate[d, a]
                np.testing.assert_allclose(got, r.set_layer_mass[a], atol=1e-12)  # exactly reachable: matched
                np.testing.assert_allclose(r.mass_random_layer_mass[d, a], got * moved, atol=1e-12)  # measured
    for r, moved in ((exact, 1.0), (shifted, 2.0)):
        err = r.mass_errors()
        per_layer = r.mass_random_layer_mass - r.set_layer_mass[None]
        np.testing.assert_allclose(err["layer_mean"], per_layer.mean(0), atol=1e-12)
        np.testing.assert_allclose(err["layer_abs_mean"], np.abs(per_layer).mean(0), atol=1e-12)
        np.testing.assert_allclose(err["estimate_mean"], 0, atol=1e-12)  # the rule itself: on target
        np.testing.assert_allclose(err["mean"], (r.mass_random_mass - r.set_category_mass).mean(0), atol=1e-12)
        np.testing.assert_allclose(err["abs_mean"], np.abs(r.mass_random_mass - r.set_category_mass).mean(0),
                                   atol=1e-12)
    np.testing.assert_allclose(exact.mass_errors()["mean"], 0, atol=1e-12)
    # Shifted: the draws drop 0.02 + 2 x (0.04 + 0.08) = 0.26 against the set's 0.14: +86 %.
    np.testing.assert_allclose(shifted.mass_errors()["mean"], 0.12, atol=1e-12)
    assert not [w for w in exact.matching_warnings() if "mass-matched draws dropped" in w]
    lines = [w for w in shifted.matching_warnings() if "mass-matched draws dropped" in w]
    assert [w.split(":")[0] for w in lines] == list(CATEGORIES)
    assert lines[0] == (f"{CATEGORIES[0]}: its mass-matched draws dropped on average 0.26 of the routing mass on its "
                        f"own tokens against the set's 0.14 (+86%, mean |error| 0.120; tolerance "
                        f"{MASS_TOLERANCE:.0%}); valued at their unablated estimates they drop +0.000 beside the set's "
                        "mass (the selection's own error, the rest is the routing the draws moved): that control is "
                        "harsher than the set: its excess against them is understated")
    assert shifted.to_dict()["matching_warnings"] == shifted.matching_warnings()
    # Recorded, read back; files made before they were kept load without them.
    d = json.loads(json.dumps(shifted.to_dict()))
    mm = d["mass_matched"]
    assert mm["error_mean"]["code"] == pytest.approx(0.12) and mm["error_tolerance"] == MASS_TOLERANCE
    assert np.allclose(mm["error_layer_mean"]["code"], [0, 0.04, 0.08])
    np.testing.assert_allclose(mm["random_layer_error"], shifted.mass_random_layer_mass - shifted.set_layer_mass[None])
    assert np.allclose(mm["random_layer_error"][2][CATEGORIES.index("code")], [0, 0.04, 0.08])  # each draw's
    back = AblationResult.from_dict(d)
    for key in ("mass_random_layer_mass", "mass_random_layer_estimate"):
        np.testing.assert_array_equal(getattr(back, key), getattr(shifted, key))
    for key in ("random_layer_mass", "random_layer_estimate"):
        del mm[key]
    old = AblationResult.from_dict(d)
    assert old.mass_random_layer_mass is None and old.mass_errors()["layer_mean"] is None
    np.testing.assert_allclose(old.mass_errors()["mean"], shifted.mass_errors()["mean"])  # from the totals
