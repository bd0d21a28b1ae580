"""Model families against transformers (PyTorch) on tiny random checkpoints, loading, saving, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import MOE, VARIANTS, batch_with_padding, make_torch_model

import sparcom_jax as sj
from sparcom_jax.checkpoints.hf import CheckpointError
from sparcom_jax.models.config import ConfigError, ModelConfig


def torch_logits(path, ids, mask):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def assert_logits_close(ref, ours, mask):
    m = mask.astype(bool)[..., None]
    scale = np.abs(ref[np.broadcast_to(m, ref.shape)]).max()
    err = np.abs(np.where(m, ref - ours, 0.0)).max()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, hf_checkpoint):
    path = hf_checkpoint(variant)
    ids, mask = batch_with_padding()
    ours = np.asarray(sj.load_model(path)(ids, mask))
    assert ours.shape == (3, 9, 96)
    assert_logits_close(torch_logits(path, ids, mask), ours, mask)


@pytest.mark.parametrize("variant", MOE)
def test_fused_expert_layout_logits_match_transformers(variant, hf_checkpoint):
    """Checkpoints in the fused layout (experts.gate_up_proj / experts.down_proj) against the
    in-memory reference model: a gate/up mix-up in reading the fused halves changes the logits."""
    ids, mask = batch_with_padding()
    ours = np.asarray(sj.load_model(hf_checkpoint(variant, fused=True))(ids, mask))
    with torch.no_grad():
        ref = make_torch_model(variant)(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert_logits_close(ref, ours, mask)


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen3", "mixtral"])
def test_long_batch_logits_match_transformers(variant, hf_checkpoint):
    """120 tokens: attention runs in query blocks (causal, sliding window, padding)."""
    from sparcom_jax.models.dispatch import Dispatch

    rng = np.random.default_rng(3)
    T = 120
    assert T > Dispatch.attn_block
    ids = rng.integers(3, 96, size=(2, T)).astype(np.int64)
    mask = np.ones((2, T), np.int64)
    mask[1, 70:] = 0
    ids[mask == 0] = 0
    path = hf_checkpoint(variant)
    assert_logits_close(torch_logits(path, ids, mask), np.asarray(sj.load_model(path)(ids, mask)), mask)


_MOE_SMALL = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=40)
# transformers gives a sliding window to the layers its layer_types (or max_window_layers) pick.
SLIDING = {
    "qwen2_all_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    "qwen2_no_layer": ("qwen2", dict(use_sliding_window=True, sliding_window=4)),  # max_window_layers 28 > 2
    "qwen2_moe_all_layers": ("qwen2_moe", dict(_MOE_SMALL, use_sliding_window=True, sliding_window=4,
                                               layer_types=["sliding_attention"] * 2)),
    "llama_ignores_it": ("llama", dict(sliding_window=4)),
}


@pytest.mark.parametrize("variant", list(SLIDING))
def test_sliding_window_on_the_layers_transformers_gives_it(variant, tmp_path, monkeypatch):
    """12 tokens against a window of 4: a window on layers transformers leaves unwindowed
    (or missing where it windows) changes the logits; saving keeps the layers it applies to."""
    from hf_fixtures import write_checkpoint

    monkeypatch.setitem(VARIANTS, variant, SLIDING[variant])
    path = write_checkpoint(variant, tmp_path / "ck")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    model = sj.load_model(path)
    assert (model.config.sliding_window is None) == (variant.endswith(("no_layer", "ignores_it")))
    ours = np.asarray(model(ids, mask))
    assert_logits_close(torch_logits(path, ids, mask), ours, mask)
    if model.config.sliding_window:
        assert_logits_close(torch_logits(sj.save_model(model, tmp_path / "saved"), ids, mask), ours, mask)


OPTIONS = {  # options no fixture variant sets: old-style linear rope scaling, one kv head, clipped q/k/v
    "llama_linear_rope_one_kv_head": ("llama", dict(rope_scaling={"type": "linear", "factor": 4.0},
                                                     num_key_value_heads=1)),
    "olmoe_clip_qkv": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.3)),
}


@pytest.mark.parametrize("variant", list(OPTIONS))
def test_rarer_options_match_transformers(variant, tmp_path, monkeypatch):
    from hf_fixtures import write_checkpoint

    monkeypatch.setitem(VARIANTS, variant, OPTIONS[variant])
    path = write_checkpoint(variant, tmp_path / "ck")
    ids, mask = batch_with_padding()
    assert_logits_close(torch_logits(path, ids, mask), np.asarray(sj.load_model(path)(ids, mask)), mask)


@pytest.mark.parametrize("extra", [dict(max_window_layers=1), dict(layer_types=["full_attention", "sliding_attention"]),
                                   dict(_MOE_SMALL, model_type="qwen2_moe")])  # even layers below max_window_layers
def test_a_window_on_some_layers_only_is_refused(extra):
    hf = {**VARIANTS_CONFIG_LLAMA, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, **extra}
    with pytest.raises(ConfigError, match=r"sliding window on some layers only \(layers \[\d\] of 2"):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("window", [None, 5])
def test_blocked_attention_equals_plain_softmax_attention(window):
    """Query blocks against a plain numpy softmax over the whole masked score matrix."""
    from sparcom_jax.models import layers
    rng = np.random.default_rng(0)
    B, H, K, T, d = 2, 4, 2, 45, 8
    q = rng.standard_normal((B, H, T, d)).astype(np.float32)
    k, v = (rng.standard_normal((B, K, T, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((B, T), bool)
    valid[1, 30:] = False
    bias = layers.attention_bias(jnp.asarray(valid), window)
    # many uneven blocks (capped at max_blocks)
    got = np.asarray(layers.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias, block=7, max_blocks=8))
    kk, vv = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, kk) / np.sqrt(d)
    t, u = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (u <= t) & ((t - u < window) if window else True)
    s = np.where(allowed[None, None] & valid[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhts,bhsd->bhtd", p / p.sum(-1, keepdims=True), vv)
    # Padding queries past the window see no real key (NaN here); they feed nothing.
    real = np.broadcast_to(valid[:, None, :, None], got.shape)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


def _long_batch(T=120):
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 96, size=(3, T)).astype(np.int64)
    mask = np.ones((3, T), np.int64)
    mask[1, 70:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen3", "mixtral"])
def test_fused_attention_call_equals_blocked_attention(variant, hf_checkpoint):
    """`jax.nn.dot_product_attention` (XLA's implementation of the call cuDNN runs on GPU),
    with our masking mapped onto its arguments (causal, right padding as row lengths, the
    sliding window, grouped kv heads, q/k norms before it), against the blocked attention:
    the same logits within float32 rounding and identical counts, on 9 and on 120 tokens
    (several query blocks; Mistral's window of 4 far shorter than the rows)."""
    from sparcom_jax.models.dispatch import Dispatch

    path = hf_checkpoint(variant)
    blocked = sj.load_model(path)
    fused = sj.load_model(path, moe_impl=Dispatch.choose(attention="xla"))
    assert blocked.dispatch.attention == "blocked" and fused.dispatch.attention == "xla"
    for ids, mask in (batch_with_padding(), _long_batch()):
        real = mask.astype(bool)
        want, got = np.asarray(blocked(ids, mask))[real], np.asarray(fused(ids, mask))[real]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        seqs = [ids[b, : int(mask[b].sum())] for b in range(len(ids))]
        ref = sj.collect_counts(blocked, seqs, batch_size=4, progress=False)  # a fourth row of padding only
        out = sj.collect_counts(fused, seqs, batch_size=4, progress=False)
        assert out.meta["attention"] == "xla" and ref.meta["attention"] == "blocked"
        for field, arr in ref.arrays().items():
            np.testing.assert_array_equal(getattr(out, field), arr, err_msg=field)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen3", "mixtral"])
def test_cudnn_fused_attention_close_to_blocked_attention_in_bfloat16(variant, hf_checkpoint):
    """On GPU, bfloat16 models run cuDNN's flash attention by default: as close to the float32
    reference as the blocked attention in bfloat16 is, and close to it."""
    from sparcom_jax.models.dispatch import Dispatch

    path = hf_checkpoint(variant)
    ids, mask = _long_batch()
    real = mask.astype(bool)
    ref = np.asarray(sj.load_model(path)(ids, mask))[real]
    cudnn = sj.load_model(path, dtype="bfloat16")
    blocked = sj.load_model(path, dtype="bfloat16", moe_impl=Dispatch.choose(attention="blocked", dtype="bfloat16"))
    assert cudnn.dispatch.attention == "cudnn"
    scale = np.abs(ref).max()
    a, b = np.asarray(cudnn(ids, mask))[real], np.asarray(blocked(ids, mask))[real]
    assert np.abs(a - ref).max() < 0.05 * scale and np.abs(a - b).max() < 0.05 * scale


def test_attention_kernel_is_chosen_once_for_the_dtype_and_backend():
    from sparcom_jax.models.dispatch import Dispatch

    choose = Dispatch.choose
    assert choose(backend="gpu", dtype="bfloat16", head_dim=128).attention == "cudnn"
    assert choose(backend="gpu", dtype="float16", head_dim=64).attention == "cudnn"
    for backend, dtype, head_dim in (("gpu", "float32", 128), ("gpu", "bfloat16", 100), ("gpu", "bfloat16", 256),
                                     ("cpu", "bfloat16", 128), ("tpu", "bfloat16", 128)):
        assert choose(backend=backend, dtype=dtype, head_dim=head_dim).attention == "blocked", (backend, dtype)
    assert choose(backend="cpu", attention="xla").attention == "xla"  # float32 at full precision on CPU only
    with pytest.raises(ValueError, match="no float32 path"):
        choose(backend="gpu", attention="cudnn", dtype="float32")
    with pytest.raises(ValueError, match="TF32"):
        choose(backend="gpu", attention="xla", dtype="float32")
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
        choose(attention="flash")
    cfg = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=16,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    gpu_bf16 = choose(backend="gpu", dtype="bfloat16", head_dim=cfg.head_dim)
    with pytest.raises(ValueError, match="no float32 path"):  # a given Dispatch is checked against the dtype
        sj.abstract_model(cfg, dtype="float32", moe_impl=gpu_bf16)
    assert "attention='cudnn'" in repr(sj.abstract_model(cfg, dtype="bfloat16", moe_impl=gpu_bf16).dispatch)


@pytest.mark.parametrize("variant", ["llama", "qwen2_moe"])
def test_counts_only_forward_skips_nothing_that_is_counted(variant, hf_checkpoint):
    """with_hidden=False (the last block's FFN output skipped) gives the same counts."""
    model = sj.load_model(hf_checkpoint(variant))
    ids, mask = (jnp.asarray(a) for a in batch_with_padding())
    full = model.forward(ids, mask, count_mask=mask, with_logits=False)
    lean = model.forward(ids, mask, count_mask=mask, with_logits=False, with_hidden=False)
    assert full.hidden is not None and lean.hidden is None
    assert set(full.stats) == set(lean.stats)
    for key in full.stats:
        np.testing.assert_array_equal(np.asarray(lean.stats[key]), np.asarray(full.stats[key]), err_msg=key)


@pytest.mark.parametrize("variant", MOE)
def test_chosen_experts_match_transformers(variant, hf_checkpoint):
    """Per token and layer, the top-k expert set equals the reference router's."""
    path = hf_checkpoint(variant)
    ids, mask = batch_with_padding()
    tm = make_torch_model(variant)
    chosen = {}

    def hook(layer):
        def fn(module, inputs, output):
            chosen[layer] = output[2].reshape(ids.shape[0], ids.shape[1], -1).numpy()
        return fn

    for li, layer in enumerate(tm.model.layers):
        layer.mlp.gate.register_forward_hook(hook(li))
    with torch.no_grad():
        tm(torch.tensor(ids), attention_mask=torch.tensor(mask))
    # One copy of each sequence per real token, counting only that token: expert_routed
    # then holds exactly that token's chosen set.
    model = sj.load_model(path)
    seqs, scopes, where = [], [], []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            sc = np.zeros(n, bool)
            sc[t] = True
            seqs.append(ids[b, :n])
            scopes.append(sc)
            where.append((b, t))
    counts = sj.collect_counts(model, seqs, scopes, batch_size=5, progress=False)
    E = model.config.num_experts
    for row, (b, t) in enumerate(where):
        for li in range(model.config.num_layers):
            ref = np.zeros(E, np.int32)
            ref[chosen[li][b, t]] = 1
            np.testing.assert_array_equal(counts.expert_routed[row, li], ref, err_msg=f"token {b},{t} layer {li}")


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "olmoe"])
def test_fused_and_per_expert_layouts_load_identically(variant, hf_checkpoint):
    a = sj.load_model(hf_checkpoint(variant))
    b = sj.load_model(hf_checkpoint(variant, fused=True))
    for (ka, va), (kb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        assert ka == kb
        np.testing.assert_array_equal(np.asarray(va.value), np.asarray(vb.value), err_msg=str(ka))


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2_moe_norm", "mixtral", "qwen3"])
def test_save_roundtrip_through_transformers(variant, hf_checkpoint, tmp_path):
    model = sj.load_model(hf_checkpoint(variant))
    out = sj.save_model(model, tmp_path / "saved")
    ids, mask = batch_with_padding()
    ours = np.asarray(model(ids, mask))
    assert_logits_close(torch_logits(out, ids, mask), ours, mask)
    again = np.asarray(sj.load_model(out)(ids, mask))
    np.testing.assert_allclose(again, ours, rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".saved.tmp*")), "temporary directory left behind"


def test_padding_never_influences_real_tokens(hf_checkpoint):
    model = sj.load_model(hf_checkpoint("qwen2_moe"))
    ids, mask = batch_with_padding()
    other = ids.copy()
    other[mask == 0] = 7  # different pad ids
    a, b = np.asarray(model(ids, mask)), np.asarray(model(other, mask))
    m = mask.astype(bool)
    np.testing.assert_array_equal(a[m], b[m])
    # and a sequence alone gives the same logits as inside the padded batch
    alone = np.asarray(model(ids[2:3, :3], mask[2:3, :3]))
    np.testing.assert_allclose(alone[0], a[2, :3], atol=1e-5)


def test_jit_and_eager_forward_agree(hf_checkpoint):
    model = sj.load_model(hf_checkpoint("mixtral"))
    ids, mask = batch_with_padding()
    eager = np.asarray(model.forward(jnp.asarray(ids), jnp.asarray(mask)).logits)
    np.testing.assert_allclose(eager, np.asarray(model(ids, mask)), atol=1e-5)


def test_bfloat16_compute_close_to_float32(hf_checkpoint):
    path = hf_checkpoint("llama")
    ids, mask = batch_with_padding()
    f32 = np.asarray(sj.load_model(path)(ids, mask))
    m16 = sj.load_model(path, dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    b16 = np.asarray(m16(ids, mask))
    m = mask.astype(bool)
    rel = np.abs(b16[m] - f32[m]).max() / np.abs(f32[m]).max()
    assert rel < 0.05, rel
    # bf16 params with f32 master weights also works
    mixed = sj.load_model(path, dtype="bfloat16", param_dtype="float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(mixed, nnx.Param)))


def test_sharded_index_checkpoint_loads(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_checkpoint("qwen3")
    m = AutoModelForCausalLM.from_pretrained(str(src))
    m.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, mask = batch_with_padding()
    np.testing.assert_allclose(np.asarray(sj.load_model(tmp_path)(ids, mask)),
                               np.asarray(sj.load_model(src)(ids, mask)), atol=1e-6)


# ---------------------------------------------------------------- full-size shapes
PUBLISHED = {
    # name: (config.json fields, published parameter count)
    "Llama-2-7B": (dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32), 6_738_415_616),
    "Llama-3-8B": (dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        rope_theta=500000.0), 8_030_261_248),
    "Mistral-7B": (dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        sliding_window=4096), 7_241_732_096),
    "Qwen2.5-7B": (dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        tie_word_embeddings=False), 7_615_616_512),
    "Mixtral-8x7B": (dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          num_local_experts=8, num_experts_per_tok=2), 46_702_792_704),
    "Qwen1.5-MoE-A2.7B": (dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
                               intermediate_size=5632, moe_intermediate_size=1408,
                               shared_expert_intermediate_size=5632, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                               num_experts_per_tok=4), 14_315_784_192),
    "OLMoE-1B-7B": (dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                         num_experts=64, num_experts_per_tok=8), 6_919_161_856),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_parameter_counts_with_eval_shape(name):
    hf, published = PUBLISHED[name]
    cfg = ModelConfig.from_hf_config(hf)
    abstract = sj.abstract_model(cfg, dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    assert n == published, f"{name}: {n:,} != {published:,}"
    assert cfg.param_count() == n


# ---------------------------------------------------------------- errors
def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ConfigError, match=r"config.json.*'gpt2'.*supported: llama"):
        sj.load_model(tmp_path)


def test_remote_code_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "deepseek_v9", "auto_map": {"AutoModelForCausalLM": "modeling_x.Model"}}))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        sj.load_model(tmp_path)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    t = load_file(str(d / "model.safetensors"))
    t.pop("model.layers.1.mlp.up_proj.weight")
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        sj.load_model(d)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.5.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.5\.mlp\.up_proj\.weight"):
        sj.load_model(d)


def test_a_tied_checkpoint_may_carry_lm_head_but_no_other_stray_tensor(hf_checkpoint, tmp_path):
    """Some exporters write lm_head.weight for a tied model: it is the embedding again and is ignored.
    That exception is for lm_head.weight of a tied model alone: another stray tensor is still refused."""
    from safetensors.numpy import load_file, save_file

    src = hf_checkpoint("llama_tied")
    d = _copy(src, tmp_path / "ck")
    t = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in t
    t["lm_head.weight"] = np.full_like(t["model.embed_tokens.weight"], 7.0)
    save_file(t, str(d / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(sj.load_model(d).embed.value), t["model.embed_tokens.weight"])
    t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\).*model\.layers\.0\.mlp\.extra\.weight"):
        sj.load_model(d)


def test_config_disagreeing_with_weights_names_tensor_and_shape(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*gate_proj\.weight.*shape \(48, 32\).*\(64, 32\)"):
        sj.load_model(d)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(VARIANTS_CONFIG_LLAMA))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded.*safetensors"):
        sj.load_model(tmp_path)


VARIANTS_CONFIG_LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, r"config\.json: required field 'hidden_size' is missing \(or null\)"),
    ({"num_hidden_layers": "two"}, r"config\.json: field 'num_hidden_layers' must be an integer, got 'two'"),
    ({"quantization_config": {"quant_method": "fp8"}}, r"config\.json: a quantized checkpoint \(quantization_config: "
                                                       r"fp8\).*Use the model's unquantized release"),
])
def test_an_unusable_config_field_is_named(tmp_path, change, message):
    cfg = {k: v for k, v in {**VARIANTS_CONFIG_LLAMA, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        sj.load_model(tmp_path)


def test_a_misspelled_config_field_is_named_beside_the_missing_one(tmp_path):
    # A hand-edited config.json with 'num_hiden_layers' said only that 'num_hidden_layers' is missing
    # and to copy it from the published config.json.
    cfg = {k: v for k, v in VARIANTS_CONFIG_LLAMA.items() if k != "num_hidden_layers"}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hiden_layers": 2}))
    with pytest.raises(ConfigError, match=r"config\.json: required field 'num_hidden_layers' is missing \(or null\) "
                                          r"\(it has 'num_hiden_layers': a misspelling\? name it 'num_hidden_layers'\);"):
        sj.load_model(tmp_path)
    # A field named unlike it is no misspelling: the message is as before.
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 2}))
    with pytest.raises(ConfigError, match=r"required field 'num_hidden_layers' is missing \(or null\); copy it"):
        sj.load_model(tmp_path)


def test_numbers_written_as_text_still_read():
    # YAML 1.1 reads 1e-5 (no dot) as text: an `architecture:` block may hold it so
    cfg = ModelConfig.from_hf_config({**VARIANTS_CONFIG_LLAMA, "rms_norm_eps": "1e-5", "hidden_size": "32"})
    assert cfg.rms_norm_eps == 1e-5 and cfg.hidden_size == 32


def test_quantized_weights_are_refused_naming_the_tensor(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    t = load_file(str(d / "model.safetensors"))
    # int8 values (a quantized export without its quantization_config) were cast to float and loaded
    t["model.layers.0.mlp.up_proj.weight"] = (t["model.layers.0.mlp.up_proj.weight"] * 100).astype(np.int8)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                              r"is stored as I8, not as floating point"):
        sj.load_model(d)


def test_a_model_directory_without_a_tokenizer_is_refused(hf_checkpoint):
    # The shipped tokenizer used to stand in for it silently: its ids mean other tokens to the model.
    from sparcom_jax.config import ModelSpec
    from sparcom_jax.data import resolve_tokenizer
    from sparcom_jax.pipeline.provenance import spec_tokenizer

    path = hf_checkpoint("llama")
    model = sj.load_model(path)
    assert model.tokenizer is None
    for get in (lambda: resolve_tokenizer(model), lambda: spec_tokenizer(ModelSpec(path=str(path)))):
        with pytest.raises(ValueError, match=rf"{path}: no tokenizer beside the weights .*download the model's "
                                             "tokenizer files"):
            get()
    tok = sj.default_tokenizer()
    assert resolve_tokenizer(model, tok) is tok  # one given explicitly is the caller's choice


def test_bad_json_config_names_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n "model_type": "llama",\n oops\n}')
    with pytest.raises(ConfigError, match=r"config\.json:3"):
        sj.load_model(tmp_path)


# ---------------------------------------------------------------- sharded load
SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import numpy as np, jax
    import sparcom_jax as sj
    path, out = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8
    mesh = sj.make_mesh(data=2, model=4)
    model = sj.load_model(path, mesh=mesh)
    assert tuple(model.blocks.ffn.gate_proj.value.sharding.spec)[1] == "model"  # experts over model
    sh = model.blocks.ffn.shared_expert.gate_proj.value.sharding
    assert tuple(sh.spec)[-1] == "model", sh.spec  # shared-expert neurons over model
    assert len(model.blocks.ffn.gate_proj.value.addressable_shards) == 8
    ids = np.load(out + ".ids.npy"); mask = np.load(out + ".mask.npy")
    np.save(out, np.asarray(model(ids, mask)))
""")


def test_sharded_load_on_8_devices_matches_one_device(hf_checkpoint, tmp_path):
    path = hf_checkpoint("qwen2_moe")
    ids, mask = batch_with_padding()
    out = str(tmp_path / "logits.npy")
    np.save(out + ".ids.npy", ids)
    np.save(out + ".mask.npy", mask)
    script = tmp_path / "run.py"
    script.write_text(SHARDED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, str(script), str(path), out], check=True, env=env, timeout=300)
    np.testing.assert_allclose(np.load(out), np.asarray(sj.load_model(path)(ids, mask)), atol=2e-5)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_moe_dispatch_implementations_agree(variant, hf_checkpoint):
    """ragged_dot grouping, the tile scan, the expert loop and the capacity buffer (in its
    batched-matmul branch and in its ragged_dot fallback) give the same logits and counts."""
    from sparcom_jax.models.dispatch import Dispatch

    path = hf_checkpoint(variant)
    ids, mask = batch_with_padding()
    ragged = sj.load_model(path, moe_impl="ragged")
    seqs = [ids[b, : int(mask[b].sum())] for b in range(3)]
    ref = sj.collect_counts(ragged, seqs, progress=False)
    # Capacity factor E holds any group (always the matmul branch); 0.01 holds none (always
    # the fallback); the defaults decide per layer.
    default, default_tiles = Dispatch.capacity_factors, (Dispatch.loop_tile, Dispatch.loop_tail)
    # The expert loop with its real tiles (only tail tiles here) and with tiny ones (full
    # tiles and tail tiles both run).
    for impl, factors, tiles in (("tiled", None, None), ("looped", None, None), ("looped", None, (4, 2)),
                                 ("capacity", None, None), ("capacity", (64.0,), None),
                                 ("capacity", (0.01,), None), ("grouped", None, None)):
        other = sj.load_model(path, moe_impl=Dispatch.choose(impl, capacity_factors=factors or default,
                                                             loop_tile=(tiles or default_tiles)[0],
                                                             loop_tail=(tiles or default_tiles)[1]))
        real = mask.astype(bool)  # padding positions are undefined (the expert loop skips them)
        np.testing.assert_allclose(np.asarray(ragged(ids, mask))[real], np.asarray(other(ids, mask))[real],
                                   atol=1e-5)
        got = sj.collect_counts(other, seqs, progress=False)
        for field, arr in ref.arrays().items():
            np.testing.assert_array_equal(getattr(got, field), arr, err_msg=f"{impl} {field}")
    with pytest.raises(ValueError, match="moe_impl"):
        sj.load_model(path, moe_impl="dense")


def test_grouped_strategy_runs_tokamax_when_importable(hf_checkpoint, monkeypatch):
    """"grouped" resolves its kernel once, at construction: tokamax's `ragged_dot` when the
    package imports (a stand-in here, counting its calls), `jax.lax.ragged_dot` otherwise;
    the model's dispatch and the count store's metadata name it."""
    import types

    calls = []

    def ragged_dot(lhs, rhs, group_sizes, precision=None, **kw):
        calls.append(precision)
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision, **kw)

    path = hf_checkpoint("mixtral")
    ids, mask = batch_with_padding()
    seqs = [ids[b, : int(mask[b].sum())] for b in range(3)]
    monkeypatch.setitem(sys.modules, "tokamax", None)  # import fails
    lax = sj.load_model(path, moe_impl="grouped")
    assert lax.dispatch.grouped_dot == "lax" and lax.moe_dispatch.startswith("moe grouped (lax);")
    ref = sj.collect_counts(lax, seqs, progress=False)
    monkeypatch.setitem(sys.modules, "tokamax", types.SimpleNamespace(ragged_dot=ragged_dot))
    model = sj.load_model(path, moe_impl="grouped")
    assert model.dispatch.grouped_dot == "tokamax"
    got = sj.collect_counts(model, seqs, progress=False)
    assert got.meta["moe_dispatch"].startswith("moe grouped (tokamax);")
    assert len(calls) >= 3 and set(calls) == {jax.lax.Precision.HIGHEST}  # gate, up, down, at full precision
    for field, arr in ref.arrays().items():
        np.testing.assert_array_equal(getattr(got, field), arr, err_msg=field)


def test_every_public_name_resolves():
    for name in sj.__all__:
        assert getattr(sj, name) is not None, name
    with pytest.raises(AttributeError):
        sj.not_a_name  # noqa: B018


def test_loading_stages_one_layer_slice_at_a_time(tmp_path):
    """Host staging memory of a load stays flat in model size (one layer's slice at a time)."""
    import tracemalloc

    def staged_peak(layers: int) -> tuple[int, int]:
        cfg = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=64,
                                              intermediate_size=512, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=4))
        path = sj.save_model(sj.init_model(cfg), tmp_path / f"m{layers}")
        sj.load_model(path, with_tokenizer=False)  # warm caches (jit of the layer setter)
        tracemalloc.start()
        sj.load_model(path, with_tokenizer=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak, cfg.param_count() * 4

    small, small_total = staged_peak(8)
    big, big_total = staged_peak(32)
    assert big_total > 3.9 * small_total
    # Python-side allocations move the peak by about 1.5 slices from run to run (measured: 32 layers
    # at 0.9x-1.8x of 8); reading a whole stacked tensor at once would add 24 layers' slices (3 MB).
    layer_slice = 64 * 512 * 4  # one layer's gate, up or down weights, float32
    assert big - small < 8 * layer_slice, f"staging grew with depth: {small:,} -> {big:,} bytes"
    assert big < big_total / 10, f"staged {big:,} bytes for a {big_total:,}-byte model"


def test_two_checkpoints_of_one_architecture_share_compilations(hf_checkpoint, tmp_path):
    """Tokenizer and source path live outside the graph, so the graphdefs (jit cache keys) are equal."""
    from flax import nnx as _nnx

    a = sj.load_model(hf_checkpoint("llama"))
    b = sj.load_model(sj.save_model(a, tmp_path / "copy"))
    assert a.source_path != b.source_path
    assert _nnx.graphdef(a) == _nnx.graphdef(b)
    assert hash(_nnx.graphdef(a)) == hash(_nnx.graphdef(b))


@pytest.mark.parametrize("factors", [None, (0.01,)])
def test_capacity_path_gradients_match_the_tile_scan(factors, hf_checkpoint):
    """Training on GPU goes through the capacity path: its gradients (both the batched-matmul
    branch and the ragged_dot fallback) equal those of the differentiable tile scan."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparcom_jax.models.dispatch import Dispatch

    path = hf_checkpoint("mixtral")
    ids, mask = batch_with_padding()
    grads = {}
    for impl in ("tiled", "capacity"):
        g, state = nnx.split(sj.load_model(path, moe_impl=Dispatch.choose(impl, **({"capacity_factors": factors}
                                                                                    if factors else {}))))

        def loss(state):
            logits = nnx.merge(g, state).forward(jnp.asarray(ids), jnp.asarray(mask)).logits
            return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

        grads[impl] = jax.grad(loss)(state)
    flat_t = jax.tree.leaves(grads["tiled"])
    flat_c = jax.tree.leaves(grads["capacity"])
    assert len(flat_t) == len(flat_c)
    for a, b in zip(flat_t, flat_c):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors_file_is_named_with_the_fix(sharded, hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    if sharded:  # with an index, the files are opened only when read
        AutoModelForCausalLM.from_pretrained(str(hf_checkpoint("llama"))).save_pretrained(
            str(tmp_path / "ck"), max_shard_size="20KB")
        d = tmp_path / "ck"
    else:
        d = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    victim = sorted(d.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{victim}: not a readable safetensors file .*truncated or "
                                              r"corrupted.*Download it again, or re-save"):
        sj.load_model(d)


def _sharded(hf_checkpoint, tmp_path) -> Path:
    from transformers import AutoModelForCausalLM

    d = tmp_path / "ck"
    AutoModelForCausalLM.from_pretrained(str(hf_checkpoint("llama"))).save_pretrained(str(d), max_shard_size="20KB")
    return d


def test_a_safetensors_index_without_a_weight_map_is_named(hf_checkpoint, tmp_path):
    # A weight_map written as a list failed with "AttributeError: 'list' object has no attribute 'items'".
    d = _sharded(hf_checkpoint, tmp_path)
    index = d / "model.safetensors.index.json"
    names = list(json.loads(index.read_text())["weight_map"])
    for bad in ({"weight_map": names}, names, {"metadata": {}}):
        index.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=rf"{index}: not a valid safetensors index \(it needs \"weight_map\": "
                                                  r"\{tensor name: shard file name\}, .*download the model again"):
            sj.load_model(d)


def test_an_index_mapping_a_tensor_to_a_shard_without_it_is_named(hf_checkpoint, tmp_path):
    # The shard exists but does not hold the tensor (index and shards from different saves):
    # safetensors' own "File does not contain tensor ..." came with a traceback.
    d = _sharded(hf_checkpoint, tmp_path)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    assert len(shards) > 1
    data["weight_map"]["model.norm.weight"] = shards[0] if data["weight_map"]["model.norm.weight"] != shards[0] \
        else shards[1]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{index}: maps 'model\.norm\.weight' to .*safetensors, which does "
                                              r"not hold it; .*download the model again"):
        sj.load_model(d)


@pytest.mark.parametrize("damaged, what", [("tokenizer.json", "{"), ("config.json", "{bad")])
def test_a_damaged_tokenizer_is_named_with_the_fix(hf_checkpoint, tmp_path, damaged, what):
    # A damaged tokenizer.json said only "Expecting property name ...: line 2 column 1", naming no
    # file; a damaged config.json (read by AutoTokenizer first) was transformers' OSError with a traceback.
    import shutil

    from sparcom_jax.checkpoints.hf import load_tokenizer
    from sparcom_jax.data.tokenizer import TOKENIZER_DIR

    d = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, d / f.name)
    assert load_tokenizer(d) is not None  # intact, it loads
    (d / damaged).write_text(what)
    with pytest.raises(CheckpointError, match=rf"{d}: its tokenizer cannot be loaded \(.*\); a tokenizer file .*"
                                              r"download the model's tokenizer files again"):
        load_tokenizer(d)
