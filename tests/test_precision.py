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
from sparcom_jax.stats.losses import FIRING, FIRING_FIELDS, SCORED, _loss_step, ablation_arrays

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
    # Every token scored and (neuron kinds) counted: the firing count's program is the ablated passes' too.
    codes = np.asarray(valid, np.int32) * (SCORED | FIRING)
    extra = {"ablate": abl, **({"count": jnp.asarray(True)} if kind in FIRING_FIELDS else {})}
    closed = jax.make_jaxpr(lambda s: _loss_step(graphdef, s, ids, valid, codes, extra))(state)
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


# ---------------------------------------------------------------- the gate in float32
def _gate_case(model_type: str, **extra):
    """A one-layer model whose bfloat16 gate flips float32 signs, and its float32 weights.

    Every FFN input row is exactly +-1 (embeddings +-1024, attention output 0, unit
    norms), so float32 and bfloat16 forwards feed the gates the same values up to one
    common positive factor. Each gate column is (1 + delta, -1, 0, ...) with |delta| <=
    2**-10: the float32 gate is +-delta on rows with x0 = x1, exactly 0 after rounding the
    weights to bfloat16, so every neuron flips on those rows. The router scores expert e
    (e + 1) * x2 (integers: the same top-k in both precisions).
    """
    cfg = sj.ModelConfig.from_hf_config(dict(model_type=model_type, vocab_size=16, hidden_size=16,
                                             intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, **extra))
    model = sj.init_model(cfg, dtype="float32")
    rng = np.random.default_rng(0)
    embed = np.full((16, 16), 1024.0, np.float32)
    for v in range(16):
        embed[v, :3] = [1024.0 if v >> b & 1 else -1024.0 for b in range(3)]
    model.embed.value = jnp.asarray(embed)
    model.blocks.attn.o_proj.value = jnp.zeros_like(model.blocks.attn.o_proj.value)

    def gate(shape):  # [..., D, G]: column j is (1 + delta_j, -1, 0, ...)
        w = np.zeros(shape, np.float32)
        G = shape[-1]
        delta = rng.choice([-1, 1], size=shape[:-2] + (G,)) * rng.integers(1, 5, size=shape[:-2] + (G,)) * 2.0 ** -12
        w[..., 0, :] = 1 + delta
        w[..., 1, :] = -1
        assert np.all(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)[..., 0, :] == 1)  # rounding removes delta
        return jnp.asarray(w)

    ffn = model.blocks.ffn
    ffn.gate_proj.value = gate(ffn.gate_proj.value.shape)
    if cfg.is_moe:
        router = np.zeros(ffn.router.value.shape, np.float32)
        router[:, 2, :] = np.arange(1, cfg.num_experts + 1)
        ffn.router.value = jnp.asarray(router)
        if cfg.has_shared_expert:
            ffn.shared_expert.gate_proj.value = gate(ffn.shared_expert.gate_proj.value.shape)
    return cfg, model


def _as(cfg, reference, **kw):
    model = sj.abstract_model(cfg, **kw)
    nnx.update(model, jax.tree.map(lambda s, d: jnp.asarray(s, d.dtype), nnx.state(reference, nnx.Param),
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.mark.parametrize("variant, impls", [
    ("llama", ("auto",)),
    ("qwen2_moe", ("ragged", "grouped", "capacity", "tiled", "looped")),  # routed experts and a shared expert
])
def test_gate_dtype_float32_gives_float32_counts_where_bfloat16_flips_them(variant, impls):
    extra = {} if variant == "llama" else dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                               shared_expert_intermediate_size=8)
    cfg, f32 = _gate_case(VARIANTS[variant][0], **extra)
    seqs = [np.arange(8), np.arange(7, -1, -1), np.array([3, 0, 7, 4, 4, 0])]  # every sign pattern
    ref = sj.collect_counts(f32, seqs, progress=False)
    for impl in impls:
        kw = dict(dtype="bfloat16", moe_impl=Dispatch.choose(impl, backend="cpu"))
        plain = sj.collect_counts(_as(cfg, f32, param_dtype="float32", **kw), seqs, progress=False)
        gated = _as(cfg, f32, param_dtype="float32", gate_dtype="float32", **kw)
        assert gated.gate_dtype == "float32" and plain.meta["gate_dtype"] == "bfloat16"
        got = sj.collect_counts(gated, seqs, progress=False)
        assert got.meta["gate_dtype"] == "float32"
        # bfloat16 weights: the rounding is done before any float32 gate sees them
        rounded = sj.collect_counts(_as(cfg, f32, gate_dtype="float32", **kw), seqs, progress=False)
        for field, want in ref.arrays().items():
            np.testing.assert_array_equal(getattr(got, field), want, err_msg=f"{impl} {field}")
            np.testing.assert_array_equal(getattr(rounded, field), getattr(plain, field), err_msg=f"{impl} {field}")
            if field != "expert_routed":  # the flipped gates (routing is the same in both)
                assert (getattr(plain, field) != want).mean() > 0.2, (impl, field)
            else:
                np.testing.assert_array_equal(plain.expert_routed, want)


def test_gate_dtype_float32_products_are_float32_at_full_precision():
    """In a bfloat16 model with a float32 gate, the gate products (one per dense FFN, per
    capacity branch and fallback, per shared expert) take float32 operands at HIGHEST; every
    other product is that of the plain bfloat16 model."""
    def products_of(model):
        graphdef, state = nnx.split(model)
        ids, valid = _batch()
        closed = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).forward(ids, valid).logits)(state)
        found = collections.Counter()

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name in PRODUCTS:
                    dtypes = tuple(sorted({str(v.aval.dtype) for v in eqn.invars[:2]}))
                    found[(eqn.params["precision"], dtypes)] += 1
                for value in eqn.params.values():
                    for sub in _subjaxprs(value):
                        walk(sub)

        walk(closed.jaxpr)
        return found

    for variant, gates in (("llama", 1), ("qwen2_moe", 5)):  # qwen2_moe: 3 capacities + the fallback, shared
        mt, extra = VARIANTS[variant]
        cfg = sj.ModelConfig.from_hf_config(dict(model_type=mt, **COMMON, **extra))
        kw = dict(dtype="bfloat16", moe_impl=Dispatch.choose("capacity", backend="cpu"))
        plain = products_of(sj.init_model(cfg, **kw))
        gated = products_of(sj.init_model(cfg, gate_dtype="float32", **kw))
        gate32, bf16 = (HIGHEST, ("float32",)), (DEFAULT, ("bfloat16",))
        assert plain[gate32] == 0 and gated[gate32] == gates, (plain, gated)
        assert gated[bf16] == plain[bf16] - gates
        assert all(gated[k] == n for k, n in plain.items() if k not in (gate32, bf16)), (plain, gated)
    with pytest.raises(ValueError, match="gate_dtype 'bfloat16' must be 'float32' or the compute dtype"):
        sj.abstract_model(cfg, dtype="float32", gate_dtype="bfloat16")


def test_a_store_counted_with_a_bfloat16_gate_is_not_resumed_with_a_float32_gate(tmp_path):
    """The gate's precision changes counts, so it is part of the store's fingerprint (a store
    made with the compute dtype's gate keeps its old fingerprint: no gate_dtype entry)."""
    from sparcom_jax.errors import StaleResultError

    mt, extra = VARIANTS["llama"]
    cfg = sj.ModelConfig.from_hf_config(dict(model_type=mt, **COMMON, **extra))
    plain = sj.init_model(cfg, dtype="bfloat16")
    seqs = [np.arange(3, 12)]
    stored = sj.collect_counts(plain, seqs, progress=False, out=tmp_path / "s")
    assert "gate_dtype" not in stored.meta["fingerprint"] and stored.meta["gate_dtype"] == "bfloat16"
    with pytest.raises(StaleResultError, match="gate_dtype: unset -> 'float32'"):
        sj.collect_counts(_as(cfg, plain, dtype="bfloat16", gate_dtype="float32"), seqs, progress=False,
                          out=tmp_path / "s")


def test_compare_refuses_models_counted_in_different_precisions():
    # bfloat16 flips the gates of this case (see above): a float32 base compared with a bfloat16
    # tuned model would report those flips as units fine-tuning gained and lost.
    from sparcom_jax.analysis import IdentifyConfig, compare_models
    from sparcom_jax.categories import CATEGORIES

    cfg, f32 = _gate_case(VARIANTS["llama"][0])
    seqs = [np.roll(np.arange(8), k) for k in range(6)]
    kw = dict(categories=list(CATEGORIES), ids=[f"r{k}" for k in range(6)], progress=False)
    ref = sj.collect_counts(f32, seqs, **kw)
    bf = sj.collect_counts(_as(cfg, f32, dtype="bfloat16", param_dtype="float32"), seqs, **kw)
    gated = sj.collect_counts(_as(cfg, f32, dtype="bfloat16", param_dtype="float32", gate_dtype="float32"), seqs,
                              **kw)
    assert (ref.meta["dtype"], bf.meta["dtype"], gated.meta["dtype"]) == ("float32", "bfloat16", "bfloat16")
    rule, an = IdentifyConfig(eps=0.2), dict(n_boot=0, n_perm=0, top_units=0)
    with pytest.raises(ValueError, match=r"'before' and 'after' were counted with different dtype \('float32' vs "
                                         r"'bfloat16'\); compare models counted with the same dtype"):
        compare_models(ref, bf, rule, **an)
    with pytest.raises(ValueError, match=r"different gate_dtype \('bfloat16' vs 'float32'\)"):
        compare_models(bf, gated, rule, **an)
    assert compare_models(ref, ref, rule, **an)["isn"]["code"]["jaccard"] == 1.0
