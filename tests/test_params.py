"""Parameter declarations: the one place a parameter is described, and what is derived from it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import COMMON, VARIANTS, batch_with_padding

import sparcom_jax as sj
from sparcom_jax.models.config import FAMILIES, Family, ModelConfig
from sparcom_jax.models.params import entries
from sparcom_jax.parallel.sharding import param_shardings
from sparcom_jax.train import decay_mask


def _model(variant: str):
    mt, extra = VARIANTS[variant]
    return sj.abstract_model(ModelConfig.from_hf_config(dict(model_type=mt, **COMMON, **extra)))


def _read_back(layout, hf: dict, names, shape, idx):
    return layout.read(lambda name, hf_idx: hf[name][hf_idx], names, shape, idx)


@pytest.mark.parametrize("variant", ["qwen2_moe", "olmoe", "llama_tied"])
def test_every_declared_layout_reads_back_what_it_writes(variant):
    """our value -> HF tensor(s) -> our value, whole and for a shard of every axis (as a
    mesh device reads it); a fused block sits at its declared offset of a zeroed tensor."""
    model = _model(variant)
    rng = np.random.default_rng(0)
    seen = 0
    for e in entries(model):
        full = model
        for k in e.key:
            full = getattr(full, k)
        shape = tuple(full.shape[1:] if e.stacked else full.shape)
        value = rng.standard_normal(shape).astype(np.float32)
        for layout in e.decl.hf:
            names = [layout.name.replace("{e}", str(i)) for i in range(shape[layout.split])] \
                if layout.split is not None else [layout.name]
            tensors = layout.to_hf(value)
            assert len(tensors) == len(names)
            if layout.part is not None:
                axis, index, count = layout.part
                whole = np.zeros(layout.hf_shape(shape), np.float32)
                size = whole.shape[axis] // count
                sl = [slice(None)] * whole.ndim
                sl[axis] = slice(index * size, (index + 1) * size)
                whole[tuple(sl)] = tensors[0]
                tensors = [whole]
            else:
                assert all(t.shape == layout.hf_shape(shape) for t in tensors)
            hf = dict(zip(names, tensors))
            whole_idx = tuple(slice(0, n) for n in shape)
            np.testing.assert_array_equal(_read_back(layout, hf, names, shape, whole_idx), value, err_msg=str(e.key))
            shard = tuple(slice(n // 2, n) if n > 1 else slice(0, 1) for n in shape)
            np.testing.assert_array_equal(_read_back(layout, hf, names, shape, shard), value[shard],
                                          err_msg=str(e.key))
            seen += 1
    assert seen > 10


def test_decay_mask_follows_the_declarations():
    for variant in ("qwen2_moe", "olmoe", "qwen3", "llama"):
        model = _model(variant)
        mask = decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        for e in entries(model):
            leaf = mask
            for k in e.key:
                leaf = leaf[k]
            assert leaf is e.decl.decay, e.key
    # a norm, a bias and a weight of one model, stated plainly
    model = _model("olmoe")
    declared = {e.key: e.decl.decay for e in entries(model)}
    assert declared[("blocks", "attn", "q_norm")] is False and declared[("blocks", "ffn", "gate_proj")] is True


def test_an_undeclared_parameter_is_an_error_not_replicated():
    model = _model("llama")
    model.blocks.attn.extra = nnx.Param(jax.ShapeDtypeStruct((2, 3), np.float32))
    with pytest.raises(KeyError, match=r"blocks\.attn\.extra has no declared logical axes"):
        param_shardings(nnx.state(model, nnx.Param))
    with pytest.raises(KeyError, match=r"no declaration for parameter blocks\.attn\.extra"):
        decay_mask({"blocks": {"attn": {"extra": np.zeros(3)}}})


def _torch_llama_with_biases(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tm = LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True)).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            p.normal_(0.0, 0.15 if p.dim() > 1 else 0.3) if "norm" not in name else p.uniform_(0.5, 1.5)
    return tm


def test_a_family_declared_by_a_table_row_alone_matches_transformers(tmp_path, monkeypatch):
    """A Llama variant whose attention has biases (q/k/v and o) by default: one row of data,
    no code; logits against transformers, then save -> transformers and save -> load."""
    monkeypatch.setitem(FAMILIES, "llama_biased", Family("LlamaForCausalLM", bias_default=True))
    tm = _torch_llama_with_biases()
    tm.save_pretrained(str(tmp_path / "ck"))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model_type"] = "llama_biased"
    del cfg["attention_bias"]  # the row's default must switch the biases on
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))

    ids, mask = batch_with_padding()
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = sj.load_model(tmp_path / "ck")
    assert model.config.attention_bias and model.config.attention_out_bias
    assert model.config.param_count() == sum(p.numel() for p in tm.parameters())
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4 * scale
    # the biases move the logits far more than the tolerance: a dropped bias would be seen
    unbiased = sj.load_model(tmp_path / "ck")
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        getattr(unbiased.blocks.attn, name).value *= 0
    assert np.abs(np.asarray(unbiased(ids, mask))[real] - ref[real]).max() > 1e-2 * scale

    out = sj.save_model(model, tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    from transformers import LlamaForCausalLM

    back = LlamaForCausalLM.from_pretrained(str(out), config=tm.config).eval()
    with torch.no_grad():
        again = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(again[real], ref[real], rtol=0, atol=1e-6 * scale)
    np.testing.assert_array_equal(np.asarray(sj.load_model(out)(ids, mask)), ours)


def test_family_rows_round_trip_their_configs():
    """Every family row reads and writes its own config.json keys back to the same config."""
    for name, (mt, extra) in VARIANTS.items():
        cfg = ModelConfig.from_hf_config(dict(model_type=mt, **COMMON, **extra))
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg, name


def test_a_child_that_may_hold_two_classes_must_agree_on_decay():
    """declaration() finds a parameter through every class a child may hold (a dense or an MoE FFN);
    two candidates that disagree on weight decay are an error, agreeing ones give the declaration."""
    from sparcom_jax.models.params import ParamDecl, declaration, linear

    class Dense:
        PARAMS = {"w": ParamDecl(("embed", "mlp"), (linear("w"),), decay=True)}

    class Sparse:
        PARAMS = {"w": ParamDecl(("embed", "mlp"), (linear("w2"),), decay=True),
                  "b": ParamDecl(("mlp",), (linear("b"),), decay=False)}

    class Odd:
        PARAMS = {"w": ParamDecl(("embed", "mlp"), (linear("w"),), decay=False)}

    class Root:
        CHILDREN = {"ffn": ("mlp", Dense, Sparse), "odd": ("odd", Dense, Odd)}

    assert declaration(Root, ("ffn", "w")).decay is True
    assert declaration(Root, ("ffn", "b")).decay is False  # declared by one of the two only
    with pytest.raises(KeyError, match=r"odd\.w: its possible declarations disagree on weight decay"):
        declaration(Root, ("odd", "w"))
    with pytest.raises(KeyError, match=r"no declaration for parameter ffn\.v"):
        declaration(Root, ("ffn", "v"))
