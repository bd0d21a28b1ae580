"""Ablation orchestration against a fake model whose losses are known."""

import numpy as np
import pytest

from sparcom_jax.analysis import ablation_matrix, random_like
from sparcom_jax.categories import CATEGORIES

L, F = 3, 8


def make_sets():
    """Category c's set: neuron c in every layer, plus neuron 7 in layer 0 for CLS."""
    sets = {}
    for c, cat in enumerate(CATEGORIES):
        m = np.zeros((L, F), bool)
        m[:, c] = True
        sets[cat] = m
    sets["classification"][0, 7] = True
    return sets


class FakeModel:
    """loss_e(mask) = 1 + e/10 + 0.5 * |mask ∩ S(e)| + 0.01 * |mask|; records every mask."""

    def __init__(self, sets):
        self.sets = sets
        self.masks = []

    def __call__(self, mask):
        self.masks.append(None if mask is None else mask.copy())
        out = {}
        for e, cat in enumerate(CATEGORIES):
            loss = 1 + e / 10
            if mask is not None:
                loss += 0.5 * (mask & self.sets[cat]).sum() + 0.01 * mask.sum()
            out[cat] = loss
        return out


def test_isn_matrix_is_known():
    sets = make_sets()
    model = FakeModel(sets)
    r = ablation_matrix(sets, model, n_random=2, seed=0)
    assert r.baseline["code"] == pytest.approx(1.1)
    # Ablating S(a) on category e: 0.5 * |S(a) ∩ S(e)| + 0.01 * |S(a)|.
    expected = np.array([[0.5 * (sets[a] & sets[e]).sum() + 0.01 * sets[a].sum() for e in CATEGORIES]
                         for a in CATEGORIES])
    assert np.allclose(r.isn, expected)
    assert r.isn[0, 0] == pytest.approx(0.5 * 4 + 0.04)
    assert r.isn[0, 1] == pytest.approx(0.04)
    assert r.set_sizes.tolist() == [4, 3, 3, 3, 3, 3]
    assert model.masks[0] is None  # the baseline is evaluated first, unablated
    assert len(model.masks) == 1 + 6 * (1 + 2)


def test_random_controls_keep_per_layer_counts_and_are_seeded():
    sets = make_sets()
    model = FakeModel(sets)
    r = ablation_matrix(sets, model, n_random=3, seed=5)
    masks = model.masks[1:]
    for a, cat in enumerate(CATEGORIES):
        block = masks[a * 4:(a + 1) * 4]  # the set, then its 3 random draws
        assert np.array_equal(block[0], sets[cat])
        for m in block[1:]:
            assert m.sum(1).tolist() == sets[cat].sum(1).tolist()
    # Per-draw values are what the fake model gives for the recorded masks.
    m = masks[1]
    expect = [0.5 * (m & sets[e]).sum() + 0.01 * m.sum() for e in CATEGORIES]
    assert np.allclose(r.random_draws[0, 0], expect)
    assert np.allclose(r.random, r.random_draws.mean(0))
    # The size term is the same for random sets; the overlap term is what differs.
    assert np.allclose(r.excess, r.isn - r.random)
    again = ablation_matrix(sets, FakeModel(sets), n_random=3, seed=5)
    assert np.array_equal(r.random_draws, again.random_draws)
    other = ablation_matrix(sets, FakeModel(sets), n_random=3, seed=6)
    assert not np.array_equal(r.random_draws, other.random_draws)


def test_random_like_uniform_within_layer():
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 10), bool)
    mask[0, :3] = True
    hits = np.zeros((2, 10))
    for _ in range(2000):
        m = random_like(mask, rng)
        assert m.sum(1).tolist() == [3, 0]
        hits += m
    assert np.allclose(hits[0] / 2000, 0.3, atol=0.05)


def test_empty_and_missing_sets_and_experts_guard():
    sets = make_sets()
    sets["math"][:] = False
    del sets["summarization"]
    model = FakeModel(make_sets())
    r = ablation_matrix(sets, model, n_random=1, kind="neurons")
    assert np.all(r.isn[CATEGORIES.index("math")] == 0)
    assert np.isnan(r.isn[CATEGORIES.index("summarization")]).all()
    d = r.to_dict()
    assert d["isn"][5] == [None] * 6 and len(d["random"]) == 6
    full = {"code": np.ones((2, 4), bool)}
    with pytest.raises(ValueError, match="every expert"):
        ablation_matrix(full, lambda m: {c: 0.0 for c in CATEGORIES}, kind="experts")


class MassModel(FakeModel):
    """FakeModel that drops 0.1 routing mass per ablated unit and names categories short, in any case."""

    def __call__(self, mask):
        out = super().__call__(mask)
        self.last_dropped_mass = 0.0 if mask is None else 0.1 * mask.sum()
        return {name.upper() if e % 2 else name.lower(): out[cat]
                for e, (cat, name) in enumerate(zip(CATEGORIES, ["cls", "code", "qa", "gen", "math", "sum"]))}


def test_an_empty_set_runs_nothing_and_drops_no_mass_and_short_names_count():
    """An empty set ablates nothing: the model is not called for it or its draws, and its rows,
    routing mass included, are 0 (NaN would read as 'not measured'). A loss_fn naming the
    categories by short name, in any case, gives the same matrix as one naming them in full."""
    sets = make_sets()
    sets["math"][:] = False
    model = MassModel(make_sets())
    r = ablation_matrix(sets, model, n_random=2, seed=0)
    assert len(model.masks) == 1 + 5 * (1 + 2) and not any(m is not None and not m.any() for m in model.masks)
    m = CATEGORIES.index("math")
    assert r.dropped_mass[m] == 0 and (r.random_dropped_mass[:, m] == 0).all()
    assert (r.isn[m] == 0).all() and (r.random_draws[:, m] == 0).all()
    full = make_sets()  # by hand, as in test_isn_matrix_is_known
    for a, cat in enumerate(CATEGORIES):
        if cat != "math":
            assert r.isn[a] == pytest.approx([0.5 * (sets[cat] & full[e]).sum() + 0.01 * sets[cat].sum()
                                              for e in CATEGORIES])
            assert r.dropped_mass[a] == pytest.approx(0.1 * sets[cat].sum())


def test_without_random_draws_the_controls_are_nan_and_nothing_is_flagged():
    sets = make_sets()
    model = FakeModel(sets)
    freq = np.linspace(0, 1, L * F).reshape(L, F)
    r = ablation_matrix(sets, model, n_random=0, frequency=freq)
    assert len(model.masks) == 1 + 6
    assert r.random_draws.shape == (0, 6, 6) and np.isnan(r.random).all() and np.isnan(r.excess).all()
    assert r.isn[1, 1] == pytest.approx(0.5 * 3 + 0.03)
    assert all(np.isnan(v).all() for v in r.excess_spread().values())
    assert r.matching_warnings() == [] and "0 matched random draws" in repr(r)
    assert r.to_dict()["p_value"] == [[None] * 6] * 6
    back = type(r).from_dict(r.to_dict())
    assert back.random_draws.shape == (0, 6, 6) and back.n_random == 0 and np.isnan(back.excess).all()


def test_experts_covering_one_whole_layer_are_refused():
    """Routing has nothing left in a layer that loses every expert, even when no expert is
    in the set in every layer."""
    mask = np.zeros((3, 4), bool)
    mask[1] = True
    mask[0, 2] = True
    with pytest.raises(ValueError, match=r"^code: its ISEs cover every expert of layer\(s\) \[1\]$"):
        ablation_matrix({"code": mask}, lambda m: {c: 0.0 for c in CATEGORIES}, kind="experts")
    mask[1, 3] = False  # one expert left in each layer: measured
    r = ablation_matrix({"code": mask}, lambda m: {c: float(0 if m is None else m.sum()) for c in CATEGORIES},
                        kind="experts", n_random=1)
    assert r.isn[CATEGORIES.index("code")].tolist() == [4.0] * 6
