"""Paired bootstrap intervals of the before/after comparison, against numpy brute force."""

import numpy as np
import pytest

from sparcom_jax.analysis import IdentifyConfig, analyze_model, compare_models, identify
from sparcom_jax.analysis.uncertainty import resample_weights
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts

N_PER, L, F, T = 4, 2, 16, 10


def counts(seed):
    rng = np.random.default_rng(seed)
    cats = [c for c in CATEGORIES for _ in range(N_PER)]
    return Counts(tokens=np.full(len(cats), T), neuron_active=rng.integers(0, T + 1, (len(cats), L, F)).astype(np.int32),
                  categories=cats, ids=[f"r{i}" for i in range(len(cats))])


KW = dict(n_boot=25, n_perm=0, seed=4, contrast=False, top_units=0, instruction_level=False)


def test_paired_intervals_match_brute_force():
    cfg = IdentifyConfig(eps=0.2, q=0.5)
    cb, ca = counts(0), counts(1)
    comp = compare_models(analyze_model(cb, cfg, name="b", **KW), analyze_model(ca, cfg, name="a", **KW))
    labels = np.repeat(np.arange(6), N_PER)
    w = resample_weights(labels, 25, 4).astype(np.float64)  # no group keys: records are drawn
    sb = identify(cb, "neuron_active", cfg).instruction_sets().reshape(len(labels), -1)
    sa = identify(ca, "neuron_active", cfg).instruction_sets().reshape(len(labels), -1)
    for c, cat in enumerate(CATEGORIES):
        m = labels == c
        jac, gained = [], []
        for wr in w:  # the same draw for both models
            n = wr[m].sum()
            b = wr[m] @ sb[m] >= 0.5 * n - 1e-9
            a = wr[m] @ sa[m] >= 0.5 * n - 1e-9
            union = (a | b).sum()
            jac.append((a & b).sum() / union if union else np.nan)
            gained.append((a & ~b).sum())
        got = comp["isn"][cat]["bootstrap"]
        jac = np.asarray(jac)
        assert got["jaccard"]["low"] == pytest.approx(np.percentile(jac[np.isfinite(jac)], 2.5))
        assert got["jaccard"]["high"] == pytest.approx(np.percentile(jac[np.isfinite(jac)], 97.5))
        assert got["gained"]["bias"] == pytest.approx(np.mean(gained) - comp["isn"][cat]["gained"])
        assert got["paired"] and got["n_boot"] == 25 and got["unit"] == "record"


def test_no_paired_interval_without_the_same_draws():
    cfg = IdentifyConfig(eps=0.2)
    b = analyze_model(counts(0), cfg, name="b", **KW)
    other_seed = analyze_model(counts(1), cfg, name="a", **{**KW, "seed": 5})
    assert compare_models(b, other_seed)["isn"]["code"]["bootstrap"] is None
    no_boot = analyze_model(counts(1), cfg, name="a", **{**KW, "n_boot": 0})
    assert compare_models(b, no_boot)["isn"]["code"]["bootstrap"] is None


def test_comparison_table_carries_the_paired_interval():
    from sparcom_jax.report.tables import comparison_tables
    cfg = IdentifyConfig(eps=0.2)
    comp = compare_models(analyze_model(counts(0), cfg, name="b", **KW), analyze_model(counts(1), cfg, name="a", **KW))
    table = next(comparison_tables("isn", comp["isn"]))
    row = dict(zip(table.header, table.rows[CATEGORIES.index("math")]))
    boot = comp["isn"]["math"]["bootstrap"]
    assert row["jaccard_low"] == boot["jaccard"]["low"] and row["lost_high"] == boot["lost"]["high"]
