"""Exact-k identification (ties='break'), set size vs prompt length, and the contrast rule."""

import dataclasses

import numpy as np
import pytest

from sparcom_jax.analysis import (
    IdentifyConfig, analyze_model, bootstrap, compare_models, compare_series, identify, select_units,
)
from sparcom_jax.analysis.evaluate import average_ranks, size_vs_length, spearman
from sparcom_jax.analysis.identify import RULE_SUPPORT, contrast_config, identify_all
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts

BREAK = IdentifyConfig(eps=0.2, ties="break")  # k = 2 of 10 units


def as_set(mask):
    return set(np.flatnonzero(np.asarray(mask).ravel()).tolist())


class LazyArray:
    """Slices along N only, like a tensorstore view."""

    def __init__(self, arr):
        self._arr, self.shape, self.dtype = arr, arr.shape, arr.dtype
        self.reads = []

    def __getitem__(self, idx):
        assert isinstance(idx, slice)
        self.reads.append(idx)
        return self._arr[idx].copy()


# ---------------------------------------------------------------- select_units

def test_break_keeps_exactly_k_by_strength_then_index():
    row = np.array([[9, 7, 7, 7, 3, 0, 1, 2, 0, 0]], np.float32) / 10
    strength = np.array([[0.1, 0.5, 0.9, 0.9, 5.0, 9.0, 0, 0, 0, 0]], np.float32)
    assert as_set(select_units(row, IdentifyConfig(eps=0.2))) == {0, 1, 2, 3}  # ties kept
    # Unit 0 is above the cut; of the three tied at 0.7, units 2 and 3 are strongest
    # (0.9 each) and the lower index wins.
    assert as_set(select_units(row, BREAK, strength=strength)) == {0, 2}
    # Strength decides before the index.
    strength[0, 3] = 1.0
    assert as_set(select_units(row, BREAK, strength=strength)) == {0, 3}
    # k = 3: all units above the cut plus one tie.
    assert as_set(select_units(row, dataclasses.replace(BREAK, eps=0.3), strength=strength)) == {0, 3, 2}


def test_break_never_selects_zero_frequency():
    strength = np.ones((1, 10), np.float32)
    sparse = np.array([[0, 0, 5, 0, 0, 0, 0, 0, 0, 0]], np.float32) / 10
    assert as_set(select_units(sparse, BREAK, strength=strength)) == {2}  # 1 fired < k = 2
    assert not select_units(np.zeros((1, 10), np.float32), BREAK, strength=strength).any()
    with pytest.raises(ValueError, match="strength"):
        select_units(sparse, BREAK)


def brute_exact_k(freq, strength, k):
    """Sort every unit by (frequency desc, strength desc, index asc); keep the first k that fired."""
    out = np.zeros(freq.shape, bool)
    for r in range(freq.shape[0]):
        order = sorted(range(freq.shape[1]), key=lambda u: (-freq[r, u], -strength[r, u], u))
        for u in order[:k]:
            out[r, u] = freq[r, u] > 0
    return out


def tied_counts(n=24, shape=(2, 15), seed=0, sums=True):
    """Short prompts (T in 1..4): frequencies tie a lot; activation sums random."""
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 5, n)
    c = np.minimum(rng.integers(0, 5, (n,) + shape), t[:, None, None]).astype(np.int32)
    s = (c * rng.random((n,) + shape)).astype(np.float32)  # sum 0 where the count is 0
    return Counts(tokens=t, neuron_active=c, neuron_act_sum=s if sums else None,
                  categories=[CATEGORIES[i % 6] for i in range(n)])


def test_identify_break_matches_brute_force_and_chunking():
    counts = tied_counts()
    cfg = IdentifyConfig(eps=0.1, ties="break", chunk=5)  # k = 3 of 30
    ident = identify(counts, "neuron_active", cfg)
    freq = counts.frequencies("neuron_active").reshape(24, -1)
    mean_act = counts.mean_active("neuron_active").reshape(24, -1)
    expect = brute_exact_k(freq, mean_act, 3)
    assert np.array_equal(ident.instruction_rows(), expect)
    fired = (freq > 0).sum(1)
    assert np.array_equal(ident.instruction_size, np.minimum(3, fired))
    # Ties kept: the same short prompts get more than k units.
    keep = identify(counts, "neuron_active", dataclasses.replace(cfg, ties="keep"))
    assert keep.instruction_size.max() > 3
    assert np.all(keep.instruction_rows() >= expect)  # break only ever removes tied units
    # Lazily read in chunks of 2 gives the same sets.
    lazy = dataclasses.replace(counts, neuron_active=LazyArray(counts.neuron_active),
                               neuron_act_sum=LazyArray(counts.neuron_act_sum))
    chunked = identify(lazy, "neuron_active", dataclasses.replace(cfg, chunk=2))
    assert np.array_equal(chunked.instruction_rows(), expect)
    assert np.array_equal(chunked.category_sets, ident.category_sets)
    assert max(r.stop - r.start for r in lazy.neuron_active.reads) == 2


def test_break_without_sums_says_how_to_collect():
    with pytest.raises(ValueError, match="neuron_act_sum.*sums=True"):
        identify(tied_counts(sums=False), "neuron_active", BREAK)


def test_pooled_break_uses_category_mean_strength():
    # Two CLS instructions; units 1 and 2 tie on mean frequency 0.5 (one fires 10/10 and
    # 0/10, the other 5/10 twice); unit 2 is stronger on average -> pooled k = 2 keeps 0, 2.
    na = np.zeros((12, 1, 10), np.int32)
    sums = np.zeros((12, 1, 10), np.float32)
    na[:, 0, 0] = 10
    sums[:, 0, 0] = 10.0
    na[0, 0, 1], sums[0, 0, 1] = 10, 10.0        # mean A 1.0 and 0 -> category mean 0.5
    na[0, 0, 2], sums[0, 0, 2] = 5, 5.0          # mean A 1.0
    na[1, 0, 2], sums[1, 0, 2] = 5, 5.0          # mean A 1.0 -> category mean 1.0
    cats = [CATEGORIES[i // 2] for i in range(12)]
    counts = Counts(tokens=np.full(12, 10), neuron_active=na, neuron_act_sum=sums, categories=cats)
    cfg = IdentifyConfig(eps=0.2, aggregation="pooled", ties="break")
    ident = identify(counts, "neuron_active", cfg)
    assert ident.category_mean[0, 0, 1] == ident.category_mean[0, 0, 2] == pytest.approx(0.5)
    assert as_set(ident.category_sets[0]) == {0, 2}
    kept = identify(counts, "neuron_active", dataclasses.replace(cfg, ties="keep"))
    assert as_set(kept.category_sets[0]) == {0, 1, 2}
    # The bootstrap rebuilds the pooled sets with the same tie-break: never above k.
    b = bootstrap(ident, counts=counts, n_boot=8, seed=0)
    assert np.all(b["per_category_count"]["high"] <= 2)
    assert b["per_category_count"]["low"][0] == 2
    # Identical CLS instructions tie units 1 and 2 in every resample; the category mean
    # strength (1.0 vs 0.5) must pick unit 2, as CODE's set {0, 2} does: Jaccard 1 always.
    na[1], sums[1] = na[0], sums[0]
    na[0:2, 0, 1], sums[0:2, 0, 1] = 5, 2.5             # p 0.5, mean A 0.5 on unit 1 (unit 2: 0.5, 1.0)
    na[2:4, 0, 2], sums[2:4, 0, 2] = 9, 9.0             # CODE: units 0 and 2
    ident = identify(counts, "neuron_active", cfg)
    assert as_set(ident.category_sets[0]) == {0, 2} and as_set(ident.category_sets[1]) == {0, 2}
    b = bootstrap(ident, counts=counts, n_boot=6, seed=1)
    assert b["overlap_jaccard"]["low"][0, 1] == 1.0


def test_ties_config_validation():
    with pytest.raises(ValueError, match="ties"):
        IdentifyConfig(ties="random")
    with pytest.raises(ValueError, match="rule='top' only"):
        IdentifyConfig(rule="absolute", ties="break")
    d = BREAK.to_dict()
    assert d["ties"] == "break" and IdentifyConfig.from_dict(d) == BREAK
    assert IdentifyConfig().ties == "keep"  # the paper's rule stays the default


# ---------------------------------------------------------------- set size vs prompt length

def test_spearman_hand_values():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert average_ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    # Ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1, 2], [1, 2]))


def test_size_vs_length_per_category():
    sizes = np.array([3, 5, 4, 8, 1, 1])
    tokens = np.array([10, 20, 30, 40, 5, 6])
    labels = np.array([0, 0, 0, 1, 2, 2])
    r = size_vs_length(sizes, tokens, labels)
    assert r["per_category"][0]["mean_tokens"] == 20 and r["per_category"][0]["mean_set_size"] == 4
    assert r["per_category"][0]["spearman"] == pytest.approx(0.5)  # ranks [1,3,2] vs [1,2,3]
    assert np.isnan(r["per_category"][1]["spearman"]) and r["per_category"][1]["n"] == 1
    assert np.isnan(r["per_category"][3]["mean_tokens"])
    assert r["spearman"] == pytest.approx(spearman(sizes, tokens))


def test_summary_reports_set_size_against_length():
    counts = tied_counts(n=12)
    s = analyze_model(counts, IdentifyConfig(eps=0.1), n_boot=0, n_perm=0, top_units=0).summary()["isn"]
    v = s["set_size_vs_length"]
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.1))
    assert v["tokens"] == counts.tokens.tolist() and v["set_size"] == ident.instruction_size.tolist()
    assert v["category"] == counts.categories
    cls = [i for i in range(12) if counts.categories[i] == "classification"]
    assert v["per_category"]["classification"]["mean_tokens"] == pytest.approx(counts.tokens[cls].mean())
    assert v["spearman"] == pytest.approx(spearman(ident.instruction_size, counts.tokens))


def test_breaking_ties_reports_the_sizes_ties_would_have_given():
    counts = tied_counts(n=12)
    cfg = IdentifyConfig(eps=0.1, ties="break")
    s = analyze_model(counts, cfg, n_boot=0, n_perm=0, top_units=0).summary()["isn"]["set_size_vs_length"]
    kept = identify(counts, "neuron_active", dataclasses.replace(cfg, ties="keep")).instruction_size
    broken = identify(counts, "neuron_active", cfg).instruction_size
    assert not np.array_equal(kept, broken)  # the fixture has ties at the cut
    assert s["set_size"] == broken.tolist()
    assert s["ties_kept"]["spearman"] == pytest.approx(spearman(kept, counts.tokens))
    cls = [i for i in range(12) if counts.categories[i] == "classification"]
    assert s["ties_kept"]["per_category"]["classification"]["mean_set_size"] == pytest.approx(kept[cls].mean())
    from sparcom_jax.report.tables import length_rows

    rows = length_rows(s)  # the report's table carries both
    # exactly k units each: the sizes are constant, so their correlation with length is undefined
    assert np.isnan(spearman(broken, counts.tokens)) and rows[-1][4] is None
    assert rows[-1][6] == pytest.approx(spearman(kept, counts.tokens))
    assert rows[0][5] == pytest.approx(kept[cls].mean())
    # with the paper's rule there is nothing to compare against
    keep = analyze_model(counts, dataclasses.replace(cfg, ties="keep"), n_boot=0, n_perm=0, top_units=0)
    assert "ties_kept" not in keep.summary()["isn"]["set_size_vs_length"]


# ---------------------------------------------------------------- contrast rule

def grow_counts(extra):
    """Every instruction fires units 0..2 on 9 of 10 tokens and 3..9 on 2 of 10; `extra`
    of the low units are raised to 6 of 10 (above 0.5 but below the top units)."""
    na = np.full((12, 1, 10), 2, np.int32)
    na[:, 0, :3] = 9
    na[:, 0, 3:3 + extra] = 6
    return Counts(tokens=np.full(12, 10), neuron_active=na, categories=[CATEGORIES[i // 2] for i in range(12)])


def test_contrast_config_is_the_other_rule():
    top = IdentifyConfig(eps=0.05, threshold=0.3, ties="break")
    assert contrast_config(top) == IdentifyConfig(rule="absolute", eps=0.05, threshold=0.3)
    assert contrast_config(IdentifyConfig(rule="absolute")).rule == "top"
    assert set(RULE_SUPPORT) == {"top", "absolute"}


def test_contrast_rule_can_change_the_number():
    cfg = IdentifyConfig(eps=0.3, threshold=0.5)  # top k = 3; absolute >= 0.5
    kw = dict(n_boot=0, n_perm=0, top_units=0)
    before = analyze_model(grow_counts(0), cfg, name="base", **kw)
    after = analyze_model(grow_counts(4), cfg, name="tuned", **kw)
    sb = before.summary()["isn"]
    assert sb["contrast"]["identification"]["rule"] == "absolute"
    assert sb["contrast"]["per_category_count"]["code"] == 3
    assert after.summary()["isn"]["contrast"]["per_category_count"]["code"] == 7
    assert after.summary()["isn"]["contrast"]["mean_instruction_set_size"]["code"] == 7
    cmp = compare_models(before, after)
    e = cmp["isn"]["code"]
    # Top-eps: the same 3 units before and after; absolute: 4 gained, none lost.
    assert (e["size_before"], e["size_after"], e["gained"]) == (3, 3, 0)
    assert e["contrast"] == {"size_before": 3, "size_after": 7, "retained": 3, "gained": 4, "lost": 0,
                             "jaccard": pytest.approx(3 / 7)}
    assert cmp["rules"]["main"]["supports"] == RULE_SUPPORT["top"]
    assert cmp["rules"]["contrast"]["identification"]["rule"] == "absolute"
    ser = compare_series([("b", before), ("t", after)])
    assert ser["isn"]["contrast_per_category_count"]["math"] == [3, 7]


def test_contrast_sizes_are_means_over_instructions():
    counts = grow_counts(0)
    counts.neuron_active[1, 0, 3:5] = 6  # CLS: 3 units >= 0.5 in one instruction, 5 in the other
    s = analyze_model(counts, IdentifyConfig(eps=0.3), n_boot=0, n_perm=0, top_units=0).summary()["isn"]
    assert s["contrast"]["mean_instruction_set_size"]["classification"] == 4.0
    assert s["contrast"]["per_category_count"]["classification"] == 5  # consensus q = 0.5: 1 of 2 suffices


def test_contrast_off_and_one_pass():
    counts = grow_counts(2)
    ma = analyze_model(counts, IdentifyConfig(eps=0.3), n_boot=0, n_perm=0, top_units=0, contrast=False)
    assert ma["isn"].summary["contrast"] is None and ma["isn"].contrast is None
    assert compare_models(ma, ma)["isn"]["code"]["contrast"] is None
    lazy = dataclasses.replace(counts, neuron_active=LazyArray(counts.neuron_active))
    a, b = identify_all(lazy, "neuron_active", [IdentifyConfig(eps=0.3, chunk=5),
                                                IdentifyConfig(rule="absolute")],
                        keep_instruction_sets=[True, False])
    assert len(lazy.neuron_active.reads) == 3  # one pass for both rules
    assert b.instruction_bits is None and a.instruction_bits is not None
    assert b.instruction_size.tolist() == [5] * 12 and a.instruction_size.tolist() == [3] * 12


def test_pooled_keeps_category_means_that_tie_exactly():
    # Two instructions per category, T = 5: unit 0 fires 5 and 2 times, unit 1 4 and 3
    # times, so both category means are exactly 0.7 (in float32, 5/5 + 2/5 and 4/5 + 3/5
    # round apart). k = 1 of 10: ties kept -> both; ties broken -> the stronger unit 0.
    na = np.ones((12, 1, 10), np.int32)
    sums = na.astype(np.float32)
    na[0::2, 0, :2], na[1::2, 0, :2] = [5, 4], [2, 3]
    sums[:, 0, 0] = 2.0 * na[:, 0, 0]
    cats = [CATEGORIES[i // 2] for i in range(12)]
    counts = Counts(tokens=np.full(12, 5), neuron_active=na, neuron_act_sum=sums, categories=cats)
    cfg = IdentifyConfig(eps=0.1, aggregation="pooled")
    ident = identify(counts, "neuron_active", cfg)
    assert [as_set(s) for s in ident.category_sets] == [{0, 1}] * 6
    broken = identify(counts, "neuron_active", dataclasses.replace(cfg, ties="break"))
    assert [as_set(s) for s in broken.category_sets] == [{0}] * 6
