"""Per-category response loss with neurons/experts switched off, against transformers with hooks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hf_fixtures import make_torch_model

import sparcom_jax as sj
from sparcom_jax.stats.losses import CategoryLoss


def encoded_set(n=8, vocab=96, seed=5):
    rng = np.random.default_rng(seed)
    ids, scopes, cats = [], [], []
    for i in range(n):
        T = int(rng.integers(5, 16))
        ids.append(rng.integers(3, vocab, T).astype(np.int32))
        sc = np.zeros(T, bool)
        sc[int(rng.integers(1, T - 2)):] = True  # response = a suffix
        scopes.append(sc)
        cats.append(sj.CATEGORIES[i % 3])
    return SimpleNamespace(ids=ids, scopes=scopes, categories=cats)


def torch_category_loss(model, enc):
    sums, counts = {}, {}
    with torch.no_grad():
        for ids, sc, c in zip(enc.ids, enc.scopes, enc.categories):
            logits = model(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:].astype(np.int64)), reduction="none")
            tgt = torch.tensor(sc[1:])
            sums[c] = sums.get(c, 0.0) + float(nll[tgt].sum())
            counts[c] = counts.get(c, 0) + int(tgt.sum())
    return {c: sums[c] / counts[c] for c in sums}


def test_neuron_ablation_matches_hooked_transformers(hf_checkpoint):
    enc = encoded_set()
    ours = CategoryLoss(sj.load_model(hf_checkpoint("llama")), enc, kind="neurons", batch_size=3)
    tm = make_torch_model("llama")
    base_ref = torch_category_loss(tm, enc)
    mask = np.random.default_rng(0).random((2, 48)) < 0.3
    keep = [torch.tensor(~mask[l], dtype=torch.float32) for l in range(2)]
    for l, layer in enumerate(tm.model.layers):
        layer.mlp.act_fn.register_forward_hook(lambda m, i, o, l=l: o * keep[l])
    abl_ref = torch_category_loss(tm, enc)
    base, abl = ours(None), ours(mask)
    for c in base_ref:
        assert base[c] == pytest.approx(base_ref[c], rel=1e-5)
        assert abl[c] == pytest.approx(abl_ref[c], rel=1e-5)
    assert any(abs(abl[c] - base[c]) > 1e-3 for c in base), "ablation changed nothing; the test is blind"


def test_expert_ablation_renormalises_remaining_experts(hf_checkpoint):
    enc = encoded_set()
    ours = CategoryLoss(sj.load_model(hf_checkpoint("qwen2_moe_norm")), enc, kind="experts", batch_size=4)
    tm = make_torch_model("qwen2_moe_norm")
    drop = np.zeros((2, 4), bool)
    drop[0, 1] = drop[1, 3] = True

    def reroute(l):
        def fn(module, inputs, output):
            logits = output[0].clone()
            logits[:, torch.tensor(drop[l])] = -torch.inf
            probs = torch.softmax(logits.float(), dim=-1)
            w, idx = torch.topk(probs, module.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)  # norm_topk_prob=True in this variant
            return output[0], w.to(output[1].dtype), idx
        return fn

    for l, layer in enumerate(tm.model.layers):
        layer.mlp.gate.register_forward_hook(reroute(l))
    ref = torch_category_loss(tm, enc)
    got = ours(drop)
    for c in ref:
        assert got[c] == pytest.approx(ref[c], rel=1e-5)
    assert any(abs(got[c] - ours(None)[c]) > 1e-4 for c in got)


def test_bad_mask_shape_is_named(hf_checkpoint):
    ours = CategoryLoss(sj.load_model(hf_checkpoint("llama")), encoded_set(), kind="neurons")
    with pytest.raises(ValueError, match=r"neurons ablation mask has shape \(2, 5\), this model needs \(2, 48\)"):
        ours(np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="ablation kind"):
        CategoryLoss(sj.load_model(hf_checkpoint("llama")), encoded_set(), kind="heads")


def test_fixed_buckets_do_not_change_the_losses(hf_checkpoint):
    enc = encoded_set()
    model = sj.load_model(hf_checkpoint("llama"))
    default = CategoryLoss(model, enc, kind="neurons", batch_size=3)
    fixed = CategoryLoss(model, enc, kind="neurons", batch_size=3, buckets=[32])
    assert fixed.runner.buckets == (32,) and default.runner.buckets is None
    mask = np.random.default_rng(1).random((2, 48)) < 0.3
    for m in (None, mask):
        a, b = default(m), fixed(m)
        assert set(a) == set(b) and len(a) == 3
        for c in a:
            assert b[c] == pytest.approx(a[c], rel=1e-5)
