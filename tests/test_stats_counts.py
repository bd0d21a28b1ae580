"""Counts' own arithmetic (frequencies, mean activation on active tokens) against numpy by hand."""

import re

import numpy as np
import pytest

from sparcom_jax.stats.counts import Counts


class Lazy:
    """Slices along N only, like a tensorstore view (no __array__)."""

    def __init__(self, arr):
        self._arr, self.shape, self.dtype = arr, arr.shape, arr.dtype

    def __getitem__(self, idx):
        assert isinstance(idx, slice)
        return self._arr[idx]


def test_mean_active_is_sum_over_count_and_zero_where_never_fired():
    count = np.array([[[0, 1, 4]], [[2, 0, 3]]], np.int32)  # [N=2, L=1, F=3]
    act = np.array([[[0.0, 0.7, 2.0]], [[1.0, 0.0, 0.3]]], np.float32)
    c = Counts(tokens=np.array([4, 3]), neuron_active=count, neuron_act_sum=act)
    np.testing.assert_allclose(c.mean_active("neuron_active"), [[[0.0, 0.7, 0.5]], [[0.5, 0.0, 0.1]]], rtol=1e-6)
    np.testing.assert_allclose(c.mean_active("neuron_active", 1), [[[0.5, 0.0, 0.1]]], rtol=1e-6)
    assert Counts(tokens=np.array([4, 3]), neuron_active=count).mean_active("neuron_active") is None


def test_frequencies_per_row_and_missing_field():
    count = np.array([[[0, 1, 4]], [[2, 0, 3]], [[5, 5, 5]]], np.int32)
    c = Counts(tokens=np.array([4, 3, 0]), neuron_active=count)  # T = 0: frequency 0
    np.testing.assert_allclose(c.frequencies("neuron_active"), [[[0, 0.25, 1]], [[2 / 3, 0, 1]], [[0, 0, 0]]])
    np.testing.assert_allclose(c.frequencies("neuron_active", 1, 2), [[[2 / 3, 0, 1]]])
    with pytest.raises(ValueError, match="no 'expert_routed'"):
        c.frequencies("expert_routed")


def test_row_ranges_and_chunks_cover_exactly_the_rows_asked_for():
    """The analysis reads counts in row ranges (`mean_active(field, s, stop)`) and chunks
    (`iter_frequencies`); a range that ran past `stop`, or chunks that skipped or repeated a
    row, would misalign frequencies with their records."""
    rng = np.random.default_rng(2)
    count = rng.integers(0, 6, (5, 2, 3)).astype(np.int32)  # [N=5, L=2, F=3]
    tokens = np.array([5, 6, 0, 7, 5])
    act = rng.random((5, 2, 3)).astype(np.float32)
    c = Counts(tokens=Lazy(tokens), neuron_active=Lazy(count), neuron_act_sum=Lazy(act))
    assert c.n == 5
    want = np.zeros(count.shape, np.float64)  # brute force, row by row
    for i in range(5):
        if tokens[i]:
            want[i] = count[i] / tokens[i]
    np.testing.assert_allclose(c.frequencies("neuron_active", 1, 3), want[1:3], rtol=1e-6)
    mean = np.where(count > 0, act / np.maximum(count, 1), 0)
    np.testing.assert_allclose(c.mean_active("neuron_active", 1, 3), mean[1:3], rtol=1e-6)
    chunks = list(c.iter_frequencies("neuron_active", chunk=2))
    assert [s for s, _ in chunks] == [0, 2, 4] and [f.shape[0] for _, f in chunks] == [2, 2, 1]
    np.testing.assert_allclose(np.concatenate([f for _, f in chunks]), want, rtol=1e-6)


def test_frequencies_of_every_row_take_one_float32_array_of_their_size():
    """`frequencies(field)` over all N rows (the notebook's call) holds the quotient only: a
    second float32 array of the field's size doubled the peak next to the counts."""
    import tracemalloc

    count = np.ones((64, 32, 1024), np.int32)
    c = Counts(tokens=np.full(64, 2), neuron_active=count)
    tracemalloc.start()
    try:
        freq = c.frequencies("neuron_active")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.all(freq == 0.5)
    assert peak < 1.5 * freq.nbytes, (peak, freq.nbytes)  # (the margin: other threads' allocations)


def test_sums_and_to_numpy_read_every_array():
    rng = np.random.default_rng(0)
    arrays = dict(neuron_active=rng.integers(0, 5, (3, 2, 4)), expert_routed=rng.integers(0, 5, (3, 2, 2)),
                  neuron_act_sum=rng.random((3, 2, 4)), expert_weight_sum=rng.random((3, 2, 2)))
    lazy = Counts(tokens=Lazy(np.array([5, 6, 7])), **{k: Lazy(v) for k, v in arrays.items()})
    assert set(lazy.sums()) == {"neuron_act_sum", "expert_weight_sum"}
    assert set(lazy.arrays()) == {"neuron_active", "expert_routed"}
    eager = lazy.to_numpy()
    assert isinstance(eager.tokens, np.ndarray) and eager.tokens.tolist() == [5, 6, 7]
    for k, v in arrays.items():
        got = getattr(eager, k)
        assert isinstance(got, np.ndarray) and np.array_equal(got, v), k
    assert eager.expert_neuron_active is None and eager.expert_neuron_act_sum is None


# ---------------------------------------------------------------- collection helpers (no model)

def test_count_fields_per_model_kind():
    from types import SimpleNamespace

    from sparcom_jax.stats.collect import _field_dtype, count_fields

    dense = SimpleNamespace(num_layers=2, neuron_width=5, is_moe=False)
    assert count_fields(dense) == {"neuron_active": (2, 5)}
    moe = SimpleNamespace(num_layers=3, neuron_width=0, is_moe=True, num_experts=4, moe_intermediate_size=6)
    assert count_fields(moe) == {"expert_routed": (3, 4), "expert_neuron_active": (3, 4, 6)}
    shared = SimpleNamespace(num_layers=3, neuron_width=7, is_moe=True, num_experts=4, moe_intermediate_size=6)
    assert count_fields(shared, sums=True) == {
        "neuron_active": (3, 7), "expert_routed": (3, 4), "expert_neuron_active": (3, 4, 6),
        "neuron_act_sum": (3, 7), "expert_weight_sum": (3, 4), "expert_neuron_act_sum": (3, 4, 6)}
    assert _field_dtype("neuron_act_sum") == np.float32
    assert _field_dtype("neuron_active") == _field_dtype("tokens") == np.int32


def test_nonfinite_activations_name_the_first_layer_and_a_sequence():
    from types import SimpleNamespace

    from sparcom_jax.stats.collect import _check_finite

    # Rows are sequences 7 and 3; sequence 7 is bad in layer 2, sequence 3 in layers 1 and 2.
    # The error is returned, not raised: the processes of a run raise it together.
    res = {"nonfinite": np.array([[False, False, True], [False, True, True]]), "tokens": np.array([4, 5])}
    err = _check_finite(SimpleNamespace(source_path="ckpt"), res, np.array([7, 3]))
    assert isinstance(err, ValueError) and re.match(
        r"ckpt: non-finite activations \(NaN or Inf\) in layer 1 \(first of \[1, 2\]\), e\.g\. on sequence 3; ",
        str(err))
    res = {"nonfinite": np.array([[False, True, False]])}
    assert re.match(r"the model: .* in layer 1 ", str(_check_finite(SimpleNamespace(), res, np.array([0]))))
    res = {"nonfinite": np.zeros((2, 3), bool), "tokens": np.array([4, 5])}
    assert _check_finite(SimpleNamespace(), res, np.array([0, 1])) is None  # all finite,
    assert list(res) == ["tokens"]  # and the flag is taken out of the results


def test_nonfinite_activations_name_the_record_not_its_row_in_a_process_share():
    # With P processes a sequence's index is within the process's share (records k, k+P, ...):
    # "sequence 1" on process 1 of 2 is the run's fourth record, which the user cannot find.
    from types import SimpleNamespace

    from sparcom_jax.stats.collect import _check_finite

    res = {"nonfinite": np.array([[False], [True]])}
    err = _check_finite(SimpleNamespace(), res, np.array([0, 1]), ["r1", "r3"], ["math", "code"])
    assert "e.g. on record 'r3' (category 'code'); " in str(err) and "sequence" not in str(err)


def _encoded(scopes, categories, content_cut=None, capped=None):
    from sparcom_jax.data.templates import EncodedSet

    n = len(scopes)
    zeros = np.zeros(n, np.int64)
    return EncodedSet(ids=[np.zeros(len(s), np.int32) for s in scopes], scopes=[np.asarray(s, bool) for s in scopes],
                      prompt_lens=zeros, record_ids=[f"r{i}" for i in range(n)], categories=categories,
                      n_truncated=0, truncated_ids=[], template="plain", scope="content",
                      content_cut=zeros if content_cut is None else np.asarray(content_cut),
                      capped=zeros if capped is None else np.asarray(capped))


def test_scope_coverage_is_silent_when_every_record_has_a_token_in_scope():
    import warnings

    from sparcom_jax.stats.collect import check_scope_coverage

    enc = _encoded([[True, False], [False, True]], ["math", "code"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_scope_coverage(enc, 8) == {"code": 0, "math": 0}


def test_content_cut_summary_and_caps_fingerprint():
    from sparcom_jax.stats.collect import content_caps_fingerprint, content_cut_summary

    enc = _encoded([[True]] * 4, ["math"] * 4, content_cut=[0, 3, 1, 5], capped=[0, 2, 0, 1])
    assert content_cut_summary(enc) == {"records": 3, "tokens": 9, "max_tokens": 5,
                                        "capped_records": 2, "capped_tokens": 3}
    assert content_cut_summary(_encoded([], [])) == {"records": 0, "tokens": 0, "max_tokens": 0,
                                                     "capped_records": 0, "capped_tokens": 0}
    caps = {"r0": 4, "r1": 2, "r2": 9, "r3": 7}
    fp = content_caps_fingerprint(enc, caps)
    assert list(fp) == ["content_caps"]
    assert content_caps_fingerprint(enc, dict(caps)) == fp != content_caps_fingerprint(enc, dict(caps, r3=6))
    # No caps, or caps that left out no token here: nothing to tell the counts apart by.
    assert content_caps_fingerprint(enc, None) == {}
    assert content_caps_fingerprint(_encoded([[True]] * 4, ["math"] * 4), caps) == {}


@pytest.mark.parametrize("label", ["groups", "sources"])
def test_a_store_is_not_reused_for_records_with_other_labels(label, tmp_path):
    """collect_counts reuses a complete store made with the same fingerprint; group keys are in no
    fingerprint and sources not in collect_instructions', so a store of records since regrouped or
    relabelled came back with its old labels, which the analysis clustered and stratified by without
    a word. A store written before group keys were kept (none stored) still opens."""
    from sparcom_jax.errors import StaleResultError
    from sparcom_jax.stats.store import CountStore, read_header

    def store(labels, **kw):  # finished: a store without a finished chunk is made again, not refused
        s = CountStore(tmp_path, {"tokens": (2,)}, ids=["a", "b"], categories=["code", "math"],
                       **{label: labels}, meta={}, chunk_rows=2, **kw)
        s.write_chunk(0, {"tokens": np.array([3, 4])}) if s.done_chunks == 0 else None
        s.close()
        return s

    store(["g1", "g2"])
    with pytest.raises(StaleResultError, match=f"made for different inputs \\({label}\\)"):
        store(["g1", "g1"])
    assert store(None).done_chunks == 1 and read_header(tmp_path)[label] == ["g1", "g2"]  # reused
    store(["g1", "g1"], overwrite=True)
    assert read_header(tmp_path)[label] == ["g1", "g1"]


def test_a_store_of_another_format_version_is_neither_resumed_nor_read(tmp_path):
    """meta.json's version was written and never read: a store laid out by another sparcom_jax
    would be resumed or read as this one's. Overwriting replaces it with this version's."""
    import json

    from sparcom_jax.errors import StaleResultError
    from sparcom_jax.stats.store import STORE_VERSION, CountStore, open_counts, read_header

    def store(**kw):
        s = CountStore(tmp_path, {"tokens": (2,)}, ids=["a", "b"], categories=["code", "math"], meta={},
                       chunk_rows=2, **kw)
        s.write_chunk(0, {"tokens": np.array([3, 4])}) if s.done_chunks == 0 else None
        s.close()

    store()
    assert open_counts(tmp_path).ids == ["a", "b"]
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": STORE_VERSION + 1}))
    both = f"format version {STORE_VERSION + 1}, written by another sparcom_jax; this one reads version {STORE_VERSION}"
    with pytest.raises(StaleResultError, match=f"{both}\\), so it cannot be resumed .*overwrite"):
        store()
    with pytest.raises(StaleResultError, match=f"format version {STORE_VERSION + 1}, .* reads version "
                                               f"{STORE_VERSION}; count the records again .*--overwrite"):
        open_counts(tmp_path)
    store(overwrite=True)
    assert read_header(tmp_path)["version"] == STORE_VERSION and open_counts(tmp_path).ids == ["a", "b"]


def test_a_store_written_chunk_by_chunk_reports_its_progress_resumes_and_reads_back(tmp_path):
    """5 rows in chunks of 2 (the last one short), without a model: progress after each chunk,
    an interrupted store resumed where it stopped, chunks refused out of order, a half-written
    store refused for reading, and the rows read back lazily as written."""
    from sparcom_jax.errors import StaleResultError
    from sparcom_jax.fileio import LOCK_NAME
    from sparcom_jax.stats.store import CountStore, LazyArray, is_complete, open_counts, rows_done

    tokens = np.array([3, 1, 4, 1, 5])
    active = np.arange(5 * 2 * 3).reshape(5, 2, 3) % 7
    sums = active * 0.5
    shapes = {"tokens": (5,), "neuron_active": (5, 2, 3), "neuron_act_sum": (5, 2, 3)}

    def store(**kw):
        return CountStore(tmp_path, shapes, ids=list("abcde"), categories=["code"] * 5, meta={"model": "m"},
                          chunk_rows=2, dtypes={"neuron_act_sum": np.float32}, **kw)

    def chunk(k):
        rows = slice(2 * k, 2 * k + 2)
        return {"tokens": tokens[rows], "neuron_active": active[rows], "neuron_act_sum": sums[rows]}

    assert rows_done(tmp_path) == 0 and not is_complete(tmp_path)  # no store yet
    with pytest.raises(ValueError, match="no count store here"):
        open_counts(tmp_path)
    s = store()
    assert (rows_done(tmp_path), is_complete(tmp_path)) == (0, False)
    bad = {**chunk(0), "neuron_active": np.zeros((2, 2, 4))}  # tensorstore reports this one when waited for
    with pytest.raises(ValueError, match="mismatch"):
        s.write_chunk(0, bad)
    assert s.done_chunks == 0 and rows_done(tmp_path) == 0  # a chunk that failed is not marked done
    s.write_chunk(0, chunk(0))
    with pytest.raises(RuntimeError, match="expected 1, got 2"):
        s.write_chunk(2, chunk(2))
    s.write_chunk(1, chunk(1))
    s.close()
    assert not (tmp_path / LOCK_NAME).exists()
    assert (rows_done(tmp_path), is_complete(tmp_path)) == (4, False)
    with pytest.raises(ValueError, match="has not finished"):
        open_counts(tmp_path)
    s = store()  # the same inputs: resumed after chunk 1
    assert s.done_chunks == 2
    with pytest.raises(RuntimeError, match="expected 2, got 0"):
        s.write_chunk(0, chunk(0))
    s.write_chunk(2, chunk(2))
    s.close()
    assert (rows_done(tmp_path), is_complete(tmp_path)) == (5, True)
    got = open_counts(tmp_path)
    assert isinstance(got.neuron_active, LazyArray) and len(got.neuron_active) == 5
    assert got.neuron_active.shape == (5, 2, 3) and got.neuron_active.ndim == 3
    assert repr(got.neuron_active) == "LazyArray(int32 [5, 2, 3], on disk)"
    np.testing.assert_array_equal(got.neuron_active[1:4], active[1:4])
    np.testing.assert_array_equal(np.asarray(got.tokens), tokens)
    as_float = np.asarray(got.neuron_active, dtype=np.float64)
    assert as_float.dtype == np.float64 and (as_float == active).all()
    assert got.neuron_act_sum.dtype == np.float32 and (got.neuron_act_sum[...] == sums).all()
    assert got.ids == list("abcde") and got.meta["model"] == "m" and got.meta["store"] == str(tmp_path)
    mem = open_counts(tmp_path, in_memory=True)
    assert isinstance(mem.neuron_active, np.ndarray) and (mem.neuron_active == active).all()
    s = store()  # complete: reopened as it is
    assert s.done_chunks == 3
    s.close()
    with pytest.raises(StaleResultError, match=r"made for different inputs \(meta.model\)"):
        CountStore(tmp_path, shapes, ids=list("abcde"), categories=["code"] * 5, meta={"model": "other"},
                   chunk_rows=2, dtypes={"neuron_act_sum": np.float32})
    # Other shapes are other inputs: refused, or replaced from scratch when told to overwrite.
    del shapes["neuron_act_sum"]
    shapes["neuron_active"] = (5, 2, 4)
    with pytest.raises(StaleResultError, match=r"made for different inputs \(shapes\)"):
        store()
    s = store(overwrite=True)
    assert s.done_chunks == 0 and rows_done(tmp_path) == 0 and not is_complete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["neuron_active", "tokens"]
    s.close()
    with pytest.raises(ValueError, match="has not finished"):
        open_counts(tmp_path)


def test_a_store_of_no_records_is_complete_and_reads_back_empty(tmp_path):
    """A process whose share of the records is empty still writes (and merges) a store."""
    from sparcom_jax.stats.store import CountStore, is_complete, open_counts, rows_done

    CountStore(tmp_path, {"tokens": (0,), "neuron_active": (0, 2, 3)}, ids=[], categories=[], meta={},
               chunk_rows=4).close()
    assert rows_done(tmp_path) == 0 and is_complete(tmp_path)
    got = open_counts(tmp_path, in_memory=True)
    assert got.neuron_active.shape == (0, 2, 3) and got.tokens.shape == (0,)
    # Finished as it was made (no chunk to write): kept for other inputs like any finished store,
    # not made again as an unstarted one is.
    from sparcom_jax.errors import StaleResultError

    with pytest.raises(StaleResultError, match="made for different inputs"):
        CountStore(tmp_path, {"tokens": (0,), "neuron_active": (0, 2, 3)}, ids=[], categories=[],
                   meta={"model": "other"}, chunk_rows=4)
