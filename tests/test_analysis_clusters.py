"""Clustered uncertainty: records sharing an instruction text (a group) are drawn and shuffled
together. Brute-force numpy references for the cluster bootstrap's weights and replicate sets,
its reduction to the record bootstrap, and the group-level permutation test."""

import numpy as np
import pytest

from sparcom_jax.analysis import (
    IdentifyConfig, between_groups, bootstrap, cluster_index, identify, permutation_test, resample_weights,
)
from sparcom_jax.analysis.uncertainty import _cluster_strata
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts

# Group sizes per category: unequal, so a replicate's category size varies with the groups drawn.
SIZES = [[4, 1, 1, 2], [3, 3, 1], [1, 1, 1, 1, 2], [5, 1], [2, 2, 2], [1, 6, 1]]


def grouped_records(sizes=SIZES):
    """labels int [N] and group keys (one key reused across categories: 'shared')."""
    labels, groups = [], []
    for c, row in enumerate(sizes):
        for g, k in enumerate(row):
            labels += [c] * k
            groups += ["shared" if g == 0 else f"c{c}g{g}"] * k
    return np.asarray(labels), groups


def grouped_counts(seed=0, units=30, t=10):
    """Records of one group share their counts up to small noise (near-duplicates)."""
    rng = np.random.default_rng(seed)
    labels, groups = grouped_records()
    cl = cluster_index(labels, groups)
    base = rng.integers(0, t + 1, (cl.max() + 1, units))
    na = np.clip(base[cl] + rng.integers(-1, 2, (labels.size, units)), 0, t).astype(np.int32)
    return Counts(tokens=np.full(labels.size, t), neuron_active=na[:, None, :],
                  categories=[CATEGORIES[c] for c in labels], groups=groups), labels, groups


def test_cluster_index_numbers_clusters_by_first_record_and_splits_keys_across_categories():
    labels = np.array([0, 0, 1, 0, 1, 1])
    groups = ["a", "b", "a", "a", "c", "c"]
    assert cluster_index(labels, groups).tolist() == [0, 1, 2, 0, 3, 3]  # "a" in CLS and in CODE: two clusters
    assert cluster_index(labels).tolist() == list(range(6))
    with pytest.raises(ValueError, match="group keys"):
        cluster_index(labels, groups[:-1])


def test_group_weights_are_shared_within_a_group_and_draw_each_category_s_group_count():
    labels, groups = grouped_records()
    cl = cluster_index(labels, groups)
    w = resample_weights(labels, 200, seed=3, groups=groups)
    for k in range(cl.max() + 1):
        members = np.flatnonzero(cl == k)
        assert np.all(w[:, members] == w[:, members[:1]]), k  # every record of a group: one weight
    for c, row in enumerate(SIZES):
        first = [np.flatnonzero(cl == k)[0] for k in np.unique(cl[labels == c])]
        assert np.all(w[:, first].sum(1) == len(row))  # g_c group draws, not n_c record draws
    # The groups are drawn uniformly: GEN's 5-record group (1 of 2 groups) is left out with
    # probability (1/2)^2, its records then weigh 0 and the category has a single record.
    math5 = np.flatnonzero((labels == 3) & (np.asarray(groups) == "shared"))[0]
    assert 0.12 < np.mean(w[:, math5] == 0) < 0.40
    # The key shared by every category is six clusters, drawn independently.
    shared = [np.flatnonzero((labels == c) & (np.asarray(groups) == "shared"))[0] for c in range(6)]
    assert len({tuple(w[:, i]) for i in shared}) == 6


def _record_bootstrap(labels, n_boot, seed):
    """The record bootstrap's draws: per replicate, per category, n_c records with replacement."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, labels.size))
    for b in range(n_boot):
        for c in range(6):
            idx = np.flatnonzero(labels == c)
            if idx.size:
                np.add.at(w[b], rng.choice(idx, size=idx.size, replace=True), 1)
    return w


def test_singleton_groups_give_the_record_bootstrap_draw_for_draw():
    counts, labels, _ = grouped_counts()
    distinct = [f"r{i}" for i in range(labels.size)]
    ref = _record_bootstrap(labels, 25, seed=11)
    assert np.array_equal(resample_weights(labels, 25, 11, groups=distinct), ref)
    assert np.array_equal(resample_weights(labels, 25, 11), ref)
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.2, q=0.6))
    j = np.corrcoef(counts.neuron_active[:, 0]) ** 2  # any symmetric [N, N] pair matrix
    a = bootstrap(ident, instruction_matrix=j, n_boot=25, seed=11, groups=distinct)
    b = bootstrap(ident, instruction_matrix=j, n_boot=25, seed=11)
    assert (a.pop("unit"), b.pop("unit")) == ("group", "record")
    for k in a:
        if isinstance(a[k], dict) and "low" in a[k]:
            for part in ("low", "high", "bias"):
                assert np.array_equal(a[k][part], b[k][part], equal_nan=True), (k, part)
        else:
            assert np.array_equal(a[k], b[k]), k
    src = ["human" if i % 3 else "template" for i in range(labels.size)]
    p = permutation_test(j, labels, n_perm=30, seed=5, strata=src, groups=distinct)
    q = permutation_test(j, labels, n_perm=30, seed=5, strata=src)
    assert (p.pop("unit"), q.pop("unit")) == ("group", "record")
    assert p == q


@pytest.mark.parametrize("cfg", [IdentifyConfig(eps=0.2, q=0.6),
                                 IdentifyConfig(rule="absolute", threshold=0.5, aggregation="pooled")],
                         ids=["consensus", "pooled"])
def test_replicate_sets_use_the_replicate_s_own_category_size(cfg):
    # One replicate per seed (n_boot=1, so low = high = that replicate's value) against the
    # explicit resample: the drawn records of each category, the consensus cut at q of *their*
    # number, the pooled mean over *them*. A cut at q of the category's n_c (or a mean over n_c)
    # gives other sets whenever the drawn groups are larger or smaller than the category.
    counts, labels, groups = grouped_counts(seed=2)
    na, t = counts.neuron_active[:, 0].astype(int), 10
    ident = identify(counts, "neuron_active", cfg)
    s_i = ident.instruction_rows(0, ident.n).astype(int) if cfg.aggregation == "consensus" else None
    n_c = np.bincount(labels, minlength=6)
    differs = 0
    for seed in range(12):
        w = resample_weights(labels, 1, seed, groups)[0].astype(int)
        own, fixed = [], []
        for c in range(6):
            drawn = np.repeat(np.flatnonzero(labels == c), w[labels == c])
            for size, out in ((drawn.size, own), (n_c[c], fixed)):
                if s_i is not None:  # votes >= 0.6 * size, in integers
                    sel = 5 * s_i[drawn].sum(0) >= 3 * size
                else:  # pooled mean >= 0.5, in integers
                    sel = (2 * na[drawn].sum(0) >= t * size) & (na[drawn].sum(0) > 0)
                out.append(int(sel.sum()))
        got = bootstrap(ident, counts=counts, n_boot=1, seed=seed, groups=groups)
        assert got["per_category_count"]["low"].tolist() == own, seed
        differs += own != fixed
    assert differs >= 3  # the fixture tells the two cuts apart


@pytest.mark.parametrize("cfg", [IdentifyConfig(eps=0.2, q=0.6),
                                 IdentifyConfig(rule="absolute", threshold=0.5, aggregation="pooled")],
                         ids=["consensus", "pooled"])
def test_each_replicate_of_a_batched_bootstrap_uses_its_own_category_size(cfg):
    # As above, but six replicates in one call, two per batch (a small budget_bytes): replicate
    # b's sets must use replicate b's drawn size, also in the batches after the first. The
    # intervals are the percentiles of the six brute-force counts.
    counts, labels, groups = grouped_counts(seed=2)
    na, t, n_boot = counts.neuron_active[:, 0].astype(int), 10, 6
    ident = identify(counts, "neuron_active", cfg)
    s_i = ident.instruction_rows(0, ident.n).astype(int) if cfg.aggregation == "consensus" else None
    w = resample_weights(labels, n_boot, 5, groups).astype(int)
    reps = []
    for b in range(n_boot):
        row = []
        for c in range(6):
            drawn = np.repeat(np.flatnonzero(labels == c), w[b, labels == c])
            if s_i is not None:
                sel = 5 * s_i[drawn].sum(0) >= 3 * drawn.size
            else:
                sel = (2 * na[drawn].sum(0) >= t * drawn.size) & (na[drawn].sum(0) > 0)
            row.append(int(sel.sum()))
        reps.append(row)
    per_replicate = 6 * 30 * (4 if s_i is not None else 8)  # one replicate's category aggregate
    got = bootstrap(ident, counts=counts, n_boot=n_boot, seed=5, groups=groups, budget_bytes=2 * per_replicate)
    low, high = np.percentile(np.array(reps, float), [2.5, 97.5], axis=0)
    assert np.allclose(got["per_category_count"]["low"], low) and np.allclose(got["per_category_count"]["high"], high)
    assert len({tuple(r) for r in reps}) > 1  # the replicates differ


def duplicated_templates(structure: float, seed=0):
    """Six categories of three groups of three records. Records of one group are near-duplicates
    (Jaccard 0.8); distinct groups of one category have Jaccard 0.2 + `structure`, groups of
    different categories 0.2; every pair jittered by up to 0.05."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(6), 9)
    groups = [f"g{i // 3}" for i in range(54)]
    cl = np.arange(54) // 3
    m = np.where(labels[:, None] == labels[None], 0.2 + structure, 0.2)
    m[cl[:, None] == cl[None]] = 0.8
    m = m + rng.uniform(-0.05, 0.05, m.shape)
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m, labels, groups


def test_duplicated_templates_fool_the_record_test_not_the_group_test():
    # The categories differ only through their duplicated templates: the record-level null
    # splits the groups over categories, so the observed diagonal (which holds every
    # within-group pair) looks extreme; the group-level null keeps them together.
    m, labels, groups = duplicated_templates(structure=0.0)
    rec = permutation_test(m, labels, n_perm=199, seed=0)
    grp = permutation_test(m, labels, n_perm=199, seed=0, groups=groups)
    assert rec["statistic"] == grp["statistic"] > 0.1
    assert rec["p_value"] == pytest.approx(1 / 200)
    assert grp["p_value"] > 0.2 and grp["unit"] == "group" and grp["n_units"] == 18
    assert max(grp["per_category_p_value"]) > 0.2
    # Without the within-group pairs nothing is left on the diagonal.
    bg = between_groups(m, labels, groups, n_perm=199, seed=0)
    assert abs(bg["diagonal_dominance"]) < 0.02 and bg["permutation"]["p_value"] > 0.2
    # A real category structure beyond the templates is still found at the group level.
    m, labels, groups = duplicated_templates(structure=0.2)
    assert permutation_test(m, labels, n_perm=199, seed=0, groups=groups)["p_value"] == pytest.approx(1 / 200)
    bg = between_groups(m, labels, groups, n_perm=199, seed=0)
    assert bg["diagonal_dominance"] == pytest.approx(0.2, abs=0.02)
    assert bg["permutation"]["p_value"] == pytest.approx(1 / 200)


def test_group_shuffles_move_whole_groups_and_keep_their_number_per_category():
    # The null, brute force: per permutation, the category labels of the 18 groups shuffled and
    # handed to their records; the same generator draws as the test's.
    m, labels, groups = duplicated_templates(structure=0.1, seed=4)
    labels = labels.copy()
    labels[:3] = 1  # CLS's first group moves to CODE: 2 groups (6 records) against 4 (12 records)
    from sparcom_jax.analysis.evaluate import category_block_means, diagonal_dominance

    cl = cluster_index(labels, groups)
    cl_lab = labels[np.unique(cl, return_index=True)[1]]
    rng = np.random.default_rng(7)
    null = [diagonal_dominance(category_block_means(m, rng.permutation(cl_lab)[cl])) for _ in range(40)]
    obs = diagonal_dominance(category_block_means(m, labels))
    r = permutation_test(m, labels, n_perm=40, seed=7, groups=groups, batch=9)
    assert r["p_value"] == pytest.approx((1 + np.sum(np.asarray(null) >= obs - 1e-12)) / 41)
    assert r["null_mean"] == pytest.approx(np.mean(null))


def test_mixed_source_groups_form_their_own_stratum():
    clusters = np.array([0, 0, 1, 2, 2, 3])
    strata = ["h", "t", "h", "t", "h", "t"]
    got = [g.tolist() for g in _cluster_strata(strata, clusters, 4)]
    assert got == [[0, 2], [1], [3]]  # {h, t} mixes: clusters 0 and 2; pure h: 1; pure t: 3
    # Each category's records all from one source: shuffling within strata cannot move labels.
    m, labels, groups = duplicated_templates(structure=0.3)
    src = [f"s{c}" for c in labels]
    assert permutation_test(m, labels, n_perm=19, seed=0, groups=groups, strata=src)["p_value"] == 1.0


def test_between_groups_brute_force():
    rng = np.random.default_rng(1)
    labels, groups = grouped_records()
    n = labels.size
    m = rng.uniform(0, 1, (n, n))
    m = (m + m.T) / 2
    m[0, 2] = m[2, 0] = np.nan  # an undefined pair stays out
    np.fill_diagonal(m, 1.0)
    cl = cluster_index(labels, groups)
    r = between_groups(m, labels, groups, n_perm=0)
    for c in range(6):
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if cl[i] == cl[j] and labels[i] == c]
        assert r["within_group_pairs"][CATEGORIES[c]] == len(pairs)
        vals = [m[i, j] for i, j in pairs if np.isfinite(m[i, j])]
        assert r["within_group_jaccard"][CATEGORIES[c]] == pytest.approx(np.mean(vals))
    block = np.array([[np.nanmean([m[i, j] for i in range(n) for j in range(n)
                                   if labels[i] == a and labels[j] == b and cl[i] != cl[j]])
                       for b in range(6)] for a in range(6)])
    assert np.allclose(np.asarray(r["instruction_overlap"], float), block)
    assert r["permutation"] is None and r["n_groups"]["classification"] == 4
    assert between_groups(m, labels, [f"r{i}" for i in range(n)]) is None  # no two records share a group


def test_summary_records_the_unit_and_the_report_says_what_was_resampled():
    from sparcom_jax.analysis import analyze_model
    from sparcom_jax.report.tables import DOMINANCE_HEADER, dominance_rows
    from sparcom_jax.report.writer import _bootstrap_text

    counts, labels, groups = grouped_counts()
    counts.sources = ["human-written" if g.startswith("c") else "template-varied" for g in groups]
    cfg = IdentifyConfig(eps=0.2, q=0.6)
    kw = dict(n_boot=6, n_perm=9, top_units=0, contrast=False)
    s = analyze_model(counts, cfg, **kw).summary()["isn"]
    n_groups = [len(row) for row in SIZES]
    assert list(s["n_groups_per_category"].values()) == n_groups
    assert s["bootstrap"]["unit"] == "group" and s["bootstrap"]["n_units"] == n_groups
    assert (s["permutation"]["unit"], s["permutation"]["n_units"]) == ("group", sum(n_groups))
    assert s["human_subset"]["permutation"]["unit"] == "group"
    bg = s["between_groups"]
    assert list(bg["within_group_pairs"].values()) == [sum(k * (k - 1) // 2 for k in row) for row in SIZES]
    assert bg["permutation"]["unit"] == "group"
    text = _bootstrap_text(s)
    assert f"labels within each record source over {sum(n_groups)} instruction groups, the records" in text
    assert "bootstrap intervals over instruction groups (6 resamples; within each category its groups" in text
    assert f"leaving out the {sum(bg['within_group_pairs'].values())} pairs of records that share" in text
    assert "treat the records as independent draws" not in text
    row = dict(zip(DOMINANCE_HEADER, dominance_rows(s)[-1]))
    assert row["between_groups_dominance"] == bg["diagonal_dominance"]
    assert row["between_groups_permutation_p"] == bg["permutation"]["p_value"]
    # resample="record": records on their own (the between-groups entry still moves groups).
    r = analyze_model(counts, cfg, resample="record", **kw).summary()["isn"]
    assert r["bootstrap"]["unit"] == r["permutation"]["unit"] == "record"
    assert r["bootstrap"]["n_units"] == [sum(row) for row in SIZES]
    assert "treat the records as independent draws" in _bootstrap_text(r)
    assert r["between_groups"] == bg
    # Counts without group keys: records, said so; nothing to leave out.
    counts.groups = None
    n = analyze_model(counts, cfg, **kw).summary()["isn"]
    assert n["bootstrap"]["unit"] == "record" and n["n_groups_per_category"] is None and n["between_groups"] is None
    with pytest.raises(ValueError, match="resample"):
        analyze_model(counts, cfg, resample="groups", **kw)


def _between_replicate(m, labels, cl, w):
    """Brute force: the drawn records laid out one position per copy; ordered pairs of positions
    from different groups only (two copies of one group, or two records of it, are left out)."""
    pos = np.repeat(np.arange(labels.size), w.astype(int))
    sums, cnts = np.zeros((6, 6)), np.zeros((6, 6))
    for p in range(pos.size):
        for q in range(pos.size):
            i, j = pos[p], pos[q]
            if p != q and cl[i] != cl[j] and np.isfinite(m[i, j]):
                sums[labels[i], labels[j]] += m[i, j]
                cnts[labels[i], labels[j]] += 1
    block = np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan)
    diag, off = np.diag(block), block[~np.eye(6, dtype=bool)]
    per = [block[c, c] - np.nanmean(np.delete(block[c], c)) for c in range(6)]
    return np.nanmean(diag) - np.nanmean(off), per


def test_between_groups_interval_brute_force_and_the_main_bootstrap_s_draws():
    labels, groups = grouped_records()
    n, cl = labels.size, cluster_index(labels, groups)
    rng = np.random.default_rng(5)
    m = rng.uniform(0, 0.4, (n, n)) + 0.3 * (labels[:, None] == labels[None])
    m[cl[:, None] == cl[None]] = 0.95  # near-duplicates: any within-group pair in a replicate shows
    m = (m + m.T) / 2
    m[1, 40] = m[40, 1] = np.nan
    np.fill_diagonal(m, 1.0)
    n_boot, seed = 40, 3
    r = between_groups(m, labels, groups, n_perm=0, seed=seed, n_boot=n_boot, ci=0.9)
    b = r["bootstrap"]
    w = resample_weights(labels, n_boot, seed, groups)
    reps = [_between_replicate(m, labels, cl, wb) for wb in w]
    dom = np.array([d for d, _ in reps])
    per = np.array([p for _, p in reps])
    assert b["diagonal_dominance"]["low"] == pytest.approx(np.percentile(dom, 5))
    assert b["diagonal_dominance"]["high"] == pytest.approx(np.percentile(dom, 95))
    assert b["diagonal_dominance"]["bias"] == pytest.approx(dom.mean() - r["diagonal_dominance"])
    assert np.allclose(b["per_category_dominance"]["low"], np.nanpercentile(per, 5, axis=0))
    assert np.allclose(b["per_category_dominance"]["high"], np.nanpercentile(per, 95, axis=0))
    est = np.array(list(r["per_category_dominance"].values()))
    out = (est < np.nanpercentile(per, 5, axis=0)) | (est > np.nanpercentile(per, 95, axis=0))
    assert b["per_category_dominance"]["outside"] == out.tolist()
    assert (b["unit"], b["n_units"], b["ci"]) == ("group", [len(row) for row in SIZES], 0.9)
    assert between_groups(m, labels, groups, n_perm=0)["bootstrap"] is None  # n_boot = 0: none
    # Its draws are the main group bootstrap's for the same seed: on the full matrix, the same interval.
    from sparcom_jax.analysis.uncertainty import instruction_bootstrap

    counts, _, _ = grouped_counts()
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.2, q=0.6))
    main = bootstrap(ident, instruction_matrix=m, n_boot=n_boot, seed=seed, ci=0.9, groups=groups)
    alone = instruction_bootstrap(m, labels, groups, n_boot=n_boot, seed=seed, ci=0.9)
    for k in ("instruction_overlap", "diagonal_dominance", "per_category_dominance"):
        for part in ("low", "high", "bias", "outside"):
            assert np.array_equal(alone[k][part], main[k][part], equal_nan=True), (k, part)


def test_between_groups_interval_reaches_summary_table_and_page():
    from sparcom_jax.analysis import analyze_model
    from sparcom_jax.report.tables import DOMINANCE_HEADER, dominance_rows
    from sparcom_jax.report.writer import _bootstrap_text

    counts, _, _ = grouped_counts()
    kw = dict(n_boot=6, n_perm=0, top_units=0, contrast=False, ci=0.8)
    s = analyze_model(counts, IdentifyConfig(eps=0.2, q=0.6), **kw).summary()["isn"]
    bb = s["between_groups"]["bootstrap"]
    assert (bb["n_boot"], bb["ci"], bb["unit"]) == (6, 0.8, "group")
    d = bb["diagonal_dominance"]
    rows = dominance_rows(s)
    overall = dict(zip(DOMINANCE_HEADER, rows[-1]))
    assert [overall[f"between_groups_{p}"] for p in ("low", "high", "bias", "outside")] == \
        [d["low"], d["high"], d["bias"], d["outside"]]
    first = dict(zip(DOMINANCE_HEADER, rows[0]))
    assert first["between_groups_high"] == bb["per_category_dominance"]["high"][0]
    assert f"80% bootstrap interval {d['low']:.4g} to {d['high']:.4g} over 6 resamples of whole groups" \
        in _bootstrap_text(s)
    # The record-level main bootstrap leaves the between-groups interval on whole groups.
    r = analyze_model(counts, IdentifyConfig(eps=0.2, q=0.6), resample="record", **kw).summary()["isn"]
    assert r["between_groups"]["bootstrap"] == bb


def test_a_category_of_one_group_is_said_to_have_zero_width_intervals():
    # A notebook user's templated records (each category one near-duplicate group) showed
    # "diagonal 0.0822 [0.0822, 0.0822] (95% bootstrap)": an interval of no width, read as certainty.
    from sparcom_jax.analysis import analyze_model
    from sparcom_jax.analysis.uncertainty import one_unit_note
    from sparcom_jax.report.writer import _bootstrap_text

    sizes = [[4], [3, 3, 1], [1, 1, 1, 1, 2], [5, 1], [6], [2, 2, 2]]  # CLS and MATH: one group
    labels, groups = grouped_records(sizes)
    rng = np.random.default_rng(0)
    na = rng.integers(0, 11, (labels.size, 1, 30)).astype(np.int32)
    counts = Counts(tokens=np.full(labels.size, 10), neuron_active=na, categories=[CATEGORIES[c] for c in labels],
                    groups=groups)
    kw = dict(n_boot=8, n_perm=0, top_units=0, contrast=False)
    ma = analyze_model(counts, IdentifyConfig(eps=0.2, q=0.6), **kw)
    s = ma.summary()["isn"]
    count_ci = s["bootstrap"]["per_category_count"]
    assert count_ci["low"][0] == count_ci["high"][0] and count_ci["low"][4] == count_ci["high"][4]  # what it says
    note = ("CLS, MATH have a single instruction group each: every resample repeats it, so the intervals resting "
            "on it have zero width and measure no uncertainty (they do not show certainty)")
    assert f"    bootstrap         {note}\n" in repr(ma)
    assert f"; {note}" in _bootstrap_text(s)
    # One record of one category, resampled by record: said of the record.
    one = analyze_model(counts, IdentifyConfig(eps=0.2, q=0.6), resample="record", **kw).summary()["isn"]
    assert one_unit_note(one["bootstrap"]) is None
    assert one_unit_note({"unit": "record", "n_units": [1, 2, 2, 2, 2, 0]}).startswith(
        "CLS has a single instruction: every resample")
    # Two or more groups in every category (and none in an absent one): nothing to say.
    assert one_unit_note({"unit": "group", "n_units": [2, 3, 5, 2, 3, 0]}) is None
    assert one_unit_note(None) is None
    several = analyze_model(grouped_counts()[0], IdentifyConfig(eps=0.2, q=0.6), **kw)
    assert "bootstrap  " not in repr(several) and "single instruction" not in _bootstrap_text(several.summary()["isn"])
