"""The chunked, lazily-read and bit-packed paths give the in-memory results."""

import dataclasses

import numpy as np

from sparcom_jax.analysis import (
    IdentifyConfig, analyze_model, identify, instruction_jaccard, instruction_sets,
)
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


class LazyArray:
    """A stand-in for a tensorstore view: only slices along N, and it records them."""

    def __init__(self, arr):
        self._arr = arr
        self.shape, self.dtype = arr.shape, arr.dtype
        self.reads = []

    def __getitem__(self, idx):
        assert isinstance(idx, slice), "the analysis must read contiguous row slices"
        start, stop, _ = idx.indices(self.shape[0])
        self.reads.append(stop - start)
        return self._arr[idx].copy()


def random_counts(n=30, shape=(3, 17), seed=0):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 12, n)  # includes T = 0 rows: empty sets
    t[:6] = np.maximum(t[:6], 1)
    c = (rng.random((n,) + shape) * (t.reshape((-1,) + (1,) * len(shape)) + 1)).astype(np.int32)
    c = np.minimum(c, t.reshape((-1,) + (1,) * len(shape)))
    return t, c, [CATEGORIES[i % 6] for i in range(n)]


def test_chunked_lazy_equals_in_memory():
    t, c, cats = random_counts()
    lazy = LazyArray(c)
    eager = Counts(tokens=t, neuron_active=c, categories=cats)
    chunked = Counts(tokens=t, neuron_active=lazy, categories=cats)
    for cfg in (IdentifyConfig(eps=0.1), IdentifyConfig(eps=0.1, aggregation="pooled"),
                IdentifyConfig(rule="absolute", threshold=0.4, q=0.3)):
        a = identify(eager, "neuron_active", dataclasses.replace(cfg, chunk=1000))
        b = identify(chunked, "neuron_active", dataclasses.replace(cfg, chunk=4))
        assert np.array_equal(a.category_sets, b.category_sets)
        assert np.array_equal(a.instruction_sets(), b.instruction_sets())
        assert np.allclose(a.category_mean, b.category_mean)
    assert max(lazy.reads) <= 4 and sum(lazy.reads) >= 30


def test_packed_and_blocked_jaccard_equal_plain():
    t, c, cats = random_counts(n=36, shape=(2, 13), seed=1)  # 26 units: packing pads to 32 bits
    counts = Counts(tokens=t, neuron_active=c, categories=cats)
    cfg = IdentifyConfig(eps=0.15)
    plain = identify(counts, "neuron_active", cfg)
    packed = identify(counts, "neuron_active", cfg, packed=True)
    assert packed.instruction_bits.dtype == np.uint8 and packed.instruction_bits.shape == (36, 4)
    assert np.array_equal(plain.instruction_sets(), packed.instruction_sets())
    assert np.array_equal(np.packbits(plain.instruction_rows(), axis=1),
                          instruction_sets(counts, "neuron_active", cfg, packed=True))
    full = instruction_jaccard(plain)
    blocked = instruction_jaccard(packed, budget_bytes=4 * 26 * 5)  # 5 rows per block
    assert np.array_equal(np.isnan(full), np.isnan(blocked))
    assert np.allclose(np.nan_to_num(full), np.nan_to_num(blocked))
    # Brute force on a few pairs.
    s = plain.instruction_rows()
    for i, j in ((0, 1), (3, 17), (10, 35)):
        u = (s[i] | s[j]).sum()
        if u:
            assert full[i, j] == np.float32((s[i] & s[j]).sum() / u)


def test_analyze_model_lazy_equals_eager():
    t, c, cats = random_counts(n=24, shape=(3, 11), seed=2)
    kw = dict(n_boot=5, n_perm=19, seed=1)
    cfg = IdentifyConfig(eps=0.1, chunk=5)
    eager = analyze_model(Counts(tokens=t, neuron_active=c, categories=cats), cfg, **kw).summary()
    lazy = analyze_model(Counts(tokens=t, neuron_active=LazyArray(c), categories=cats), cfg,
                         packed=True, **kw).summary()
    assert eager == lazy


def test_analyze_field_packs_the_instruction_sets_above_the_size_limit(monkeypatch):
    # packed=None decides by the field's N x U size (as the memory plan assumes); nothing checked that it packs.
    from sparcom_jax.analysis import study

    t, c, cats = random_counts(n=12, shape=(2, 5))  # 12 x 10 = 120 unit-records
    counts = Counts(tokens=t, neuron_active=c, categories=cats)
    kw = dict(n_boot=0, n_perm=0, keep_instruction_sets=True, contrast=False, top_units=0)
    for limit, packed in ((119, True), (120, False)):
        monkeypatch.setattr(study, "_PACK_ABOVE", limit)
        ident = analyze_model(counts, IdentifyConfig(eps=0.1), **kw)["isn"].ident
        assert ident.packed is packed and ident.instruction_bits.dtype == (np.uint8 if packed else bool)
