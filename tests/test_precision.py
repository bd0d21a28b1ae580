"""Every product carries the model's precision explicitly, whatever context the caller is in.

The forward, the counting step, the loss step and training gradients are traced with
`jax.make_jaxpr` outside any `jax.default_matmul_precision` context; every
dot_general and ragged_dot_general, inside scans, loops, conditionals, pjit and
custom-derivative calls too, must carry HIGHEST (float32 models) or DEFAULT (bfloat16).
A product left to the backend's default runs as TF32 on GPUs and in bfloat16 passes on
TPUs (an H200 gave 1.1e-3 errors in float32 attention this way).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import COMMON, VARIANTS

import sparcom_jax as sj
from sparcom_jax.models.dispatch import Dispatch
from sparcom_jax.models.layers import attend, attention_bias
from sparcom_jax.stats.collect import _count_step, _count_sums_step
from sparcom_jax.stats.losses import _loss_step, ablation_arrays

PRODUCTS = ("dot_general", "ragged_dot_general")
HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
DEFAULT = (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)


def _subjaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def products(jaxpr, inside=()):
    """(primitive, precision, enclosing primitives) of every product, recursively."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in PRODUCTS:
            yield eqn.primitive.name, eqn.params["precision"], inside
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from products(sub, inside + (eqn.primitive.name,))


def assert_all(closed, want, min_count=1) -> collections.Counter:
    found = list(products(closed.jaxpr))
    assert len(found) >= min_count, f"only {len(found)} products found; the walk is blind"
    bad = [(p, prec, inside) for p, prec, inside in found if prec != want]
    assert not bad, f"{len(bad)} of {len(found)} products without {want[0]}: {bad[:5]}"
    return collections.Counter(name for _, _, inside in found for name in inside)


def _model(variant, impl="auto", dtype="float32", backend="cpu"):
    mt, extra = VARIANTS[variant]
    cfg = sj.ModelConfig.from_hf_config(dict(model_type=mt, **COMMON, **extra))
    return sj.init_model(cfg, dtype=dtype, moe_impl=Dispatch.choose(impl, backend=backend))


def _batch(B=2, T=11):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 96, (B, T)), jnp.int32)
    valid = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [T - 4]]))
    return ids, valid


def test_direct_attention_call_is_full_precision():
    q = jnp.ones((1, 4, 130, 8))
    k = v = jnp.ones((1, 2, 130, 8))
    bias = attention_bias(jnp.ones((1, 130), bool), None)
    closed = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, bias, block=40, max_blocks=8))(q, k, v)
    assert_all(closed, HIGHEST, min_count=8)  # 4 query blocks x 2 products


@pytest.mark.parametrize("variant, impl, backend", [
    ("llama", "auto", "cpu"), ("qwen2_moe", "ragged", "cpu"), ("qwen2_moe", "capacity", "cpu"),
    ("qwen2_moe", "tiled", "cpu"), ("qwen2_moe", "looped", "cpu"), ("qwen2_moe", "grouped", "cpu"),
    ("mixtral", "auto", "cpu"),
    ("qwen2_moe", "auto", "gpu"),  # traced here with the accelerators' one-hot matmul count reducer
])
def test_forward_and_counting_carry_highest_precision(variant, impl, backend):
    model = _model(variant, impl, backend=backend)
    graphdef, state = nnx.split(model)
    ids, valid = _batch()

    def logits(state):
        return nnx.merge(graphdef, state).forward(ids, valid).logits

    inside = assert_all(jax.make_jaxpr(logits)(state), HIGHEST, min_count=10)
    assert inside["scan"] > 0  # the layer scan was walked into
    count = jax.make_jaxpr(lambda s: _count_sums_step(graphdef, s, ids, valid, valid))(state)
    inside = assert_all(count, HIGHEST, min_count=8)
    if impl == "looped":
        assert inside["while"] > 0  # the expert loop's products were seen
    if impl == "capacity":
        assert inside["cond"] > 0  # the capacity branches and the ragged fallback


@pytest.mark.parametrize("kind", ["neurons", "experts", "expert_neurons"])
def test_loss_step_carries_highest_precision(kind):
    model = _model("qwen2_moe")
    graphdef, state = nnx.split(model)
    ids, valid = _batch()
    L, E, G, F = 2, 4, 16, 40
    mask = {"neurons": np.zeros((L, F), bool), "experts": np.eye(L, E, dtype=bool),
            "expert_neurons": np.zeros((L, E, G), bool)}[kind]
    abl = ablation_arrays(model, mask, kind)
    closed = jax.make_jaxpr(lambda s: _loss_step(graphdef, s, ids, valid, valid, abl))(state)
    assert_all(closed, HIGHEST, min_count=10)


@pytest.mark.parametrize("impl", ["tiled", "capacity"])
def test_training_gradients_carry_highest_precision(impl):
    model = _model("mixtral", impl)
    graphdef, state = nnx.split(model)
    ids, valid = _batch()

    def loss(state):
        logits = nnx.merge(graphdef, state).forward(ids, valid).logits
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * valid)

    assert_all(jax.make_jaxpr(jax.grad(loss))(state), HIGHEST, min_count=30)


def test_bfloat16_model_keeps_the_default_precision_explicitly():
    model = _model("qwen2_moe", "capacity", dtype="bfloat16")
    graphdef, state = nnx.split(model)
    ids, valid = _batch()
    closed = jax.make_jaxpr(lambda s: _count_step(graphdef, s, ids, valid, valid))(state)
    assert_all(closed, DEFAULT, min_count=8)
