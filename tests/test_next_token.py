"""The one next-token loss (sparcom_jax.next_token) against plain numpy loops."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sparcom_jax.next_token import next_token_loss, target_mask


def _brute_targets(scope, valid):
    B, T = scope.shape
    out = np.zeros((B, T), bool)
    for b in range(B):
        for t in range(T - 1):
            out[b, t] = bool(scope[b, t + 1] and valid[b, t + 1])
    return out


def test_target_mask_marks_the_position_before_each_real_scoped_token_on_host_and_device():
    rng = np.random.default_rng(0)
    for T in (1, 2, 7):
        scope, valid = rng.random((3, T)) < 0.6, rng.random((3, T)) < 0.8
        want = _brute_targets(scope, valid)
        got_np = target_mask(scope, valid)
        got_jnp = target_mask(jnp.asarray(scope), jnp.asarray(valid))
        assert isinstance(got_np, np.ndarray) and got_np.dtype == bool and got_np.shape == (3, T)
        np.testing.assert_array_equal(got_np, want)
        np.testing.assert_array_equal(np.asarray(got_jnp), want)


def test_next_token_loss_equals_numpy_cross_entropy_of_the_next_token():
    rng = np.random.default_rng(1)
    B, T, V = 3, 6, 11
    logits = rng.standard_normal((B, T, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, (B, T))
    targets = rng.random((B, T)) < 0.5
    targets[:, -1] = True  # the last position predicts nothing: ignored whatever it says
    want_l, want_n = np.zeros(B), np.zeros(B)
    for b in range(B):
        for t in range(T - 1):
            if targets[b, t]:
                z = logits[b, t].astype(np.float64)
                logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
                want_l[b] -= logp[ids[b, t + 1]]
                want_n[b] += 1
    loss, n = next_token_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(targets))
    assert loss.dtype == jnp.float32 and n.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), want_l, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(n), want_n)


def test_a_non_finite_logit_outside_the_targets_does_not_reach_the_loss():
    logits = np.zeros((1, 4, 5), np.float32)
    logits[0, 0] = np.nan  # a position that is not a target
    targets = np.array([[False, True, True, False]])
    loss, n = next_token_loss(jnp.asarray(logits), jnp.asarray([[1, 2, 3, 4]]), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(loss), [2 * np.log(5)], rtol=1e-6)
    assert float(n[0]) == 2


def test_target_mask_inside_jit_stays_a_jax_array():
    # The jitted train and loss steps build the mask from traced arrays: numpy cannot.
    import jax

    scope = jnp.asarray([[False, True, True, False]])
    got = jax.jit(target_mask)(scope, jnp.ones((1, 4), bool))
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), [[True, True, False, False]])
