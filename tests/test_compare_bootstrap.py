"""Paired bootstrap intervals of the before/after comparison, against numpy brute force."""

import numpy as np
import pytest

from sparcom_jax.analysis import (
    IdentifyConfig, analyze_model, compare_models, compare_series, identify, same_template_control,
)
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


def brute_sets(inst, labels, wr, q=0.5):
    """Consensus category sets bool [C, U] of one draw (weights wr [N]) of the instruction sets inst [N, U]."""
    return np.array([wr[labels == c] @ inst[labels == c] >= q * wr[labels == c].sum() - 1e-9 for c in range(6)])


def brute_dominance(inst, labels, wr):
    """Diagonal minus off-diagonal mean of the weighted block means of the instruction Jaccard (pairs of
    distinct records, weighted by how often each was drawn), by loops."""
    n = len(labels)
    num, den = np.zeros((6, 6)), np.zeros((6, 6))
    for i in range(n):
        for j in range(n):
            union = (inst[i] | inst[j]).sum()
            if i != j and union:
                num[labels[i], labels[j]] += wr[i] * wr[j] * (inst[i] & inst[j]).sum() / union
                den[labels[i], labels[j]] += wr[i] * wr[j]
    block = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)  # a block with no pair drawn: left out
    return np.nanmean(np.diag(block)) - np.nanmean(block[~np.eye(6, dtype=bool)])


def jaccard(a, b):
    union = (a | b).sum(-1)
    return np.where(union > 0, (a & b).sum(-1) / np.maximum(union, 1), np.nan)


def pct(x, q):
    x = np.asarray(x, float)
    return np.nanpercentile(x, q, axis=0)


def test_series_intervals_pair_the_draws_across_checkpoints():
    """Every checkpoint's replicate r comes from one draw: the change from first to last, the
    Jaccard with the first checkpoint and the diagonal dominance against loops over that draw."""
    cfg = IdentifyConfig(eps=0.2, q=0.5)
    cs = [counts(s) for s in (0, 1, 2)]
    ser = compare_series([(f"c{i}", analyze_model(c, cfg, name=f"c{i}", **{**KW, "instruction_level": True}))
                          for i, c in enumerate(cs)])
    b = ser["isn"]["bootstrap"]
    labels = np.repeat(np.arange(6), N_PER)
    w = resample_weights(labels, 25, 4).astype(np.float64)
    inst = [identify(c, "neuron_active", cfg).instruction_sets().reshape(len(labels), -1) for c in cs]
    size_change, jac_last, share_change, dom, sizes = [], [], [], [], []
    for wr in w:
        sets = [brute_sets(s, labels, wr) for s in inst]
        size_change.append(sets[-1].sum(1) - sets[0].sum(1))
        jac_last.append(jaccard(sets[0], sets[-1]))
        share = [s.all(0).sum() / s.any(0).sum() for s in sets]
        share_change.append(share[-1] - share[0])
        dom.append([brute_dominance(s, labels, wr) for s in inst])
        sizes.append(sets[1].sum(1))
    dom = np.asarray(dom)
    for i, c in enumerate(CATEGORIES):
        ch = b["change"]["per_category_count"]
        assert ch["estimate"][c] == ser["isn"]["per_category_count"][c][-1] - ser["isn"]["per_category_count"][c][0]
        assert (ch["low"][c], ch["high"][c]) == pytest.approx((pct(size_change, 2.5)[i], pct(size_change, 97.5)[i]))
        jb = b["per_checkpoint"]["vs_base_jaccard"]
        assert (jb["low"][c][-1], jb["high"][c][-1]) == pytest.approx((pct(jac_last, 2.5)[i], pct(jac_last, 97.5)[i]))
        assert jb["low"][c][0] == jb["high"][c][0] == 1.0  # a checkpoint against itself, in every draw
        pc = b["per_checkpoint"]["per_category_count"]
        assert pc["bias"][c][1] == pytest.approx(np.mean(sizes, 0)[i] - ser["isn"]["per_category_count"][c][1])
    gs = b["change"]["general_share"]
    assert (gs["low"], gs["high"]) == pytest.approx((pct(share_change, 2.5), pct(share_change, 97.5)))
    dd = b["change"]["diagonal_dominance"]
    assert dd["estimate"] == pytest.approx(ser["isn"]["diagonal_dominance"][-1] - ser["isn"]["diagonal_dominance"][0])
    dom_change = dom[:, -1] - dom[:, 0]
    assert (dd["low"], dd["high"]) == pytest.approx((pct(dom_change, 2.5), pct(dom_change, 97.5)))
    per = b["per_checkpoint"]["diagonal_dominance"]
    assert per["high"] == pytest.approx(list(pct(dom, 97.5)))
    assert b["paired"] and b["unit"] == "record" and b["n_boot"] == 25


def test_series_has_no_interval_without_the_same_draws():
    cfg = IdentifyConfig(eps=0.2)
    ms = [("a", analyze_model(counts(0), cfg, name="a", **KW)), ("b", analyze_model(counts(1), cfg, name="b", **KW)),
          ("c", analyze_model(counts(2), cfg, name="c", **{**KW, "seed": 5}))]
    assert compare_series(ms)["isn"]["bootstrap"] is None
    assert compare_series(ms[:2])["isn"]["bootstrap"] is not None


def test_template_effect_is_paired_over_three_models():
    """Jaccard(base, tuned) - Jaccard(base, tuned under the base template), replicate by replicate."""
    cfg = IdentifyConfig(eps=0.2, q=0.5)
    cs = [counts(s) for s in (0, 1, 2)]
    base, tuned, same = (analyze_model(c, cfg, name=n, **KW) for c, n in zip(cs, ("base", "tuned", "same")))
    ctrl = same_template_control(base, tuned, same)
    main = compare_models(base, tuned)
    labels = np.repeat(np.arange(6), N_PER)
    inst = [identify(c, "neuron_active", cfg).instruction_sets().reshape(len(labels), -1) for c in cs]
    diff, lost = [], []
    for wr in resample_weights(labels, 25, 4).astype(np.float64):
        sb, sm, ss = (brute_sets(s, labels, wr) for s in inst)
        diff.append(jaccard(sb, sm) - jaccard(sb, ss))
        lost.append((sb & ~sm).sum(1) - (sb & ~ss).sum(1))
    for i, c in enumerate(CATEGORIES):
        eff = ctrl["isn"][c]["template_effect"]
        assert eff["jaccard"]["estimate"] == pytest.approx(main["isn"][c]["jaccard"] - ctrl["isn"][c]["jaccard"])
        assert (eff["jaccard"]["low"], eff["jaccard"]["high"]) == pytest.approx((pct(diff, 2.5)[i], pct(diff, 97.5)[i]))
        assert eff["lost"]["bias"] == pytest.approx(np.mean(lost, 0)[i] - eff["lost"]["estimate"])
        assert eff["paired"] and ctrl["isn"][c]["bootstrap"]["paired"]
    other = analyze_model(cs[2], cfg, name="same", **{**KW, "seed": 5})
    eff = same_template_control(base, tuned, other)["isn"]["code"]["template_effect"]
    assert not eff["paired"] and eff["jaccard"]["low"] is None
    assert eff["jaccard"]["estimate"] == pytest.approx(main["isn"]["code"]["jaccard"]
                                                       - compare_models(base, other)["isn"]["code"]["jaccard"])
