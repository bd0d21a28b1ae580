"""Counts' own arithmetic (frequencies, mean activation on active tokens) against numpy by hand."""

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
