"""Length-bucketed batching: invariants, padding fraction, padding helper."""

from __future__ import annotations

import numpy as np
import pytest

from sparcom_jax.data import default_buckets, pad_batch, plan_batches


def test_default_buckets():
    assert default_buckets(300) == (16, 24, 32, 48, 64, 96, 128, 192, 256, 300)
    assert default_buckets(64) == (16, 24, 32, 48, 64)
    assert default_buckets(10) == (10,)
    assert default_buckets(100, min_len=32, steps_per_octave=1) == (32, 64, 100)


@pytest.mark.parametrize("batch_size,pad_rows", [(1, False), (4, False), (7, True)])
def test_plan_invariants(batch_size, pad_rows):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=103)
    plan = plan_batches(lengths, batch_size, pad_rows=pad_rows)
    all_idx = np.concatenate([b.indices for b in plan.batches])
    assert sorted(all_idx.tolist()) == list(range(103))  # each index exactly once
    for b in plan.batches:
        assert 1 <= len(b.indices) <= batch_size
        assert b.length in plan.buckets
        assert lengths[b.indices].max() <= b.length
        # The smallest bucket that fits: no member would fit the next smaller one.
        smaller = [x for x in plan.buckets if x < b.length]
        if smaller:
            assert lengths[b.indices].min() > max(smaller)
        assert np.all(np.diff(lengths[b.indices]) >= 0)  # sorted by length
        assert b.rows == (batch_size if pad_rows else len(b.indices))
    # At most one short batch per bucket, so at most two shapes per bucket.
    assert len(plan.shapes) <= 2 * len(plan.buckets)
    if pad_rows:
        assert {r for r, _ in plan.shapes} == {batch_size}
    slots = sum(b.rows * b.length for b in plan.batches)
    assert plan.padding_fraction == pytest.approx(1 - lengths.sum() / slots)


def test_padding_fraction_known_values():
    plan = plan_batches([16, 16, 10, 20], batch_size=2, buckets=[16, 32])
    # bucket 16: [10, 16] and [16]; bucket 32: [20]  -> 4 rows, slots 16*2 + 16 + 32 = 80
    assert [b.indices.tolist() for b in plan.batches] == [[2, 0], [1], [3]]
    assert plan.shapes == {(2, 16), (1, 16), (1, 32)}
    assert plan.padding_fraction == pytest.approx(1 - 62 / 80)
    full = plan_batches([16, 16, 10, 20], batch_size=2, buckets=[16, 32], pad_rows=True)
    assert full.padding_fraction == pytest.approx(1 - 62 / 128)  # 2x16 + 2x16 + 2x32
    assert full.shapes == {(2, 16), (2, 32)}


def test_bucketing_pads_less_than_one_shape():
    rng = np.random.default_rng(1)
    lengths = rng.integers(8, 512, size=400)
    bucketed = plan_batches(lengths, 16)
    one_shape = plan_batches(lengths, 16, buckets=[int(lengths.max())])
    assert bucketed.padding_fraction < 0.2 < one_shape.padding_fraction
    assert len(bucketed.shapes) <= 2 * len(bucketed.buckets)


def test_plan_errors():
    with pytest.raises(ValueError, match="more than the largest bucket"):
        plan_batches([5, 40], 2, buckets=[16, 32])
    with pytest.raises(ValueError, match="at least one token"):
        plan_batches([0, 3], 2)
    assert len(plan_batches([], 4)) == 0


def test_pad_batch():
    seqs = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    ids, mask = pad_batch(seqs, 4, pad_id=0, rows=3)
    assert ids.dtype == np.int32 and ids.shape == (3, 4)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scopes, _ = pad_batch([np.array([True, False, True])], 4)
    assert scopes.dtype == np.bool_ and scopes.tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="more than length=2"):
        pad_batch(seqs, 2)


def test_sorted_grouping_fills_batches_and_rounds_lengths_up():
    from sparcom_jax.data.batching import default_buckets, plan_batches

    rng = np.random.default_rng(1)
    lens = rng.integers(5, 300, 101)
    buckets = default_buckets(300, steps_per_octave=4)
    plan = plan_batches(lens, 8, buckets, pad_rows=True, group="sorted")
    seen = np.concatenate([b.indices for b in plan.batches])
    assert sorted(seen.tolist()) == list(range(101))
    assert [b.indices.size for b in plan.batches[:-1]] == [8] * 12 and plan.batches[-1].indices.size == 5
    for b in plan.batches:
        longest = lens[b.indices].max()
        assert b.length in buckets and b.length >= longest
        assert b.length == min(x for x in buckets if x >= longest)
    by_bucket = plan_batches(lens, 8, buckets, pad_rows=True, group="bucket")
    assert plan.padding_fraction < by_bucket.padding_fraction
    with pytest.raises(ValueError, match="group must be"):
        plan_batches(lens, 8, buckets, group="random")


def test_fitted_buckets_are_the_least_padding_choice():
    # The dynamic programme against trying every subset of the batches' needs.
    import itertools

    from sparcom_jax.data.batching import fit_buckets

    rng = np.random.default_rng(0)
    for _ in range(60):
        n, bs, k, align = int(rng.integers(1, 50)), int(rng.integers(1, 6)), int(rng.integers(1, 5)), \
            int(rng.choice([1, 8]))
        lens = rng.integers(1, 200, n)
        got = fit_buckets(lens, bs, k, align)
        assert len(got) <= k and got[-1] >= lens.max() and all(b % align == 0 for b in got)
        srt = np.sort(lens)
        need = -(-srt[np.minimum(np.arange(bs, n + bs, bs), n) - 1] // align) * align
        values = np.unique(need)
        best = min(plan_batches(lens, bs, tuple(c) + (values[-1],), pad_rows=True, group="sorted").n_slots
                   for r in range(k) for c in itertools.combinations(values[:-1], r))
        assert plan_batches(lens, bs, got, pad_rows=True, group="sorted").n_slots == best


def test_fitted_buckets_bound_the_shapes_of_long_varied_inputs():
    from sparcom_jax.data.batching import fit_buckets

    lens = np.random.default_rng(1).integers(1, 8192, 20000)
    got = fit_buckets(lens, 8, max_buckets=8, align=1)
    plan = plan_batches(lens, 8, got, pad_rows=True, group="sorted")
    assert len(plan.shapes) <= 8 and got[-1] >= lens.max()
    ladder = plan_batches(lens, 8, None, pad_rows=True, group="sorted")  # 2-per-octave ladder
    assert plan.padding_fraction < ladder.padding_fraction


def test_shuffled_bucket_plan_follows_the_documented_draws():
    # Training's data order (and so every resumed run) depends on these exact draws:
    # per bucket (ascending), its members in input order permuted by rng.permutation,
    # cut into batches; then all batches permuted by one more rng.permutation.
    rng = np.random.default_rng(3)
    lens = rng.integers(1, 60, 37)
    buckets = (16, 32, 60)
    plan = plan_batches(lens, 4, buckets, pad_rows=True, rng=np.random.default_rng((7, 2)))
    draw = np.random.default_rng((7, 2))
    which = np.searchsorted(buckets, lens)
    want = []
    for b in range(len(buckets)):
        members = np.flatnonzero(which == b)
        members = members[draw.permutation(members.size)]
        want += [(buckets[b], members[s:s + 4]) for s in range(0, members.size, 4)]
    want = [want[i] for i in draw.permutation(len(want))]
    assert [(b.length, b.indices.tolist()) for b in plan.batches] == [(t, m.tolist()) for t, m in want]
    assert all(b.rows == 4 for b in plan.batches)
    # The same batches as the unshuffled plan, in another order and with other members.
    fixed = plan_batches(lens, 4, buckets, pad_rows=True)
    assert sorted(b.length for b in fixed.batches) == sorted(b.length for b in plan.batches)
    assert [b.indices.tolist() for b in fixed.batches] != [b.indices.tolist() for b in plan.batches]
    with pytest.raises(ValueError, match="rng shuffles only the 'bucket' grouping"):
        plan_batches(lens, 4, buckets, group="sorted", rng=np.random.default_rng(0))


def test_bucket_ladders_are_strictly_increasing_and_bad_settings_are_refused():
    # Rounding up to multiples of 8 maps several ladder steps to one length (8 + 2 and 8 + 4 both
    # give 16): each length is one bucket, listed once.
    from sparcom_jax.data.batching import fit_buckets

    assert default_buckets(64, min_len=8, steps_per_octave=4) == (8, 16, 24, 32, 40, 48, 56, 64)
    assert default_buckets(1) == (1,) and default_buckets(2, min_len=1, steps_per_octave=1) == (1, 2)  # 1 is valid
    assert default_buckets(48) == (16, 24, 32, 48)  # a step equal to max_len is the last bucket, once
    assert default_buckets(16, min_len=7, steps_per_octave=1) == (7, 16)  # below 8: not rounded up
    for bad in (dict(max_len=0), dict(max_len=8, min_len=0), dict(max_len=8, steps_per_octave=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            default_buckets(**bad)
    for bad in (dict(batch_size=0), dict(batch_size=2, max_buckets=0), dict(batch_size=2, align=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            fit_buckets([3, 5], **bad)
    assert fit_buckets([], 4, align=8) == (8,)  # nothing to fit: one bucket, a valid length
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        plan_batches([3], 0)


def test_fitted_buckets_are_distinct_needs_of_the_batches():
    # Each fitted bucket is the need of some batch (its longest member rounded up to `align`), listed
    # once: a bucket walked twice in the programme's back-pointers would be a repeated length.
    from sparcom_jax.data.batching import fit_buckets

    rng = np.random.default_rng(4)
    for _ in range(40):
        n, bs, k, align = int(rng.integers(1, 40)), int(rng.integers(1, 5)), int(rng.integers(1, 4)), \
            int(rng.choice([1, 4]))
        lens = np.sort(rng.integers(1, 100, n))
        needs = {int(-(-lens[min(e, n) - 1] // align) * align) for e in range(bs, n + bs, bs)}
        got = fit_buckets(lens, bs, k, align)
        assert list(got) == sorted(set(got)) and set(got) <= needs and max(got) == max(needs), (got, needs)


def test_pad_batch_takes_a_sequence_of_exactly_the_length_and_refuses_too_few_rows():
    ids, mask = pad_batch([np.array([4, 5, 6], np.int32)], 3, pad_id=9)  # a bucket's longest member fits it
    assert ids.tolist() == [[4, 5, 6]] and mask.all() and mask.dtype == np.bool_  # as documented
    with pytest.raises(ValueError, match="rows=1 is smaller than the 2 sequences given"):
        pad_batch([np.array([1]), np.array([2])], 2, rows=1)


def test_an_empty_plan_has_nothing_padded():
    plan = plan_batches([], 4)
    assert len(plan) == 0 and plan.n_slots == 0 and plan.padding_fraction == 0.0
