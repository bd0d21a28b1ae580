"""Per-category response loss with neurons/experts switched off, against transformers with hooks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hf_fixtures import make_torch_model

import sparcom_jax as sj
from sparcom_jax.stats.counts import Counts
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


def _np_route(logits, k, norm, drop, pre):
    """Routing with experts removed, written out in numpy (float64)."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    full = softmax(logits)
    probs = softmax(np.where(drop, -np.inf, logits)) if pre else np.where(drop, 0.0, full)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    p = np.take_along_axis(probs, idx, -1)
    w = p / p.sum(-1, keepdims=True) if norm else p
    return w, idx, p, full[:, drop].sum(-1)


def test_routing_with_removed_experts_matches_numpy():
    from sparcom_jax.models.moe import route

    logits = np.array([[2.0, 1.0, 0.5, -1.0], [0.1, 3.0, 0.2, 0.3], [-0.5, 0.0, 2.5, 1.5]], np.float32)
    drop = np.array([False, True, False, False])
    got = {}
    for norm in (False, True):
        for pre in (False, True):
            w, idx, p, full = (np.asarray(a) for a in route(logits, 2, norm, drop, np.bool_(pre)))
            dropped = (full * drop).sum(-1)
            ww, ii, pp, dd = _np_route(logits.astype(np.float64), 2, norm, drop, pre)
            np.testing.assert_array_equal(idx, ii)
            np.testing.assert_allclose(w, ww, rtol=1e-6)
            np.testing.assert_allclose(p, pp, rtol=1e-6)
            np.testing.assert_allclose(dropped, dd, rtol=1e-6)
            got[norm, pre] = w
    # Post-softmax without renormalisation: token 2 never used expert 1, so keeps its weights.
    plain = np.asarray(route(logits, 2, False)[0])
    np.testing.assert_allclose(got[False, False][2], plain[2], rtol=1e-6)
    assert not np.allclose(got[False, True][2], plain[2])  # pre-softmax rescales it
    # With the model's own renormalisation the two variants coincide.
    np.testing.assert_allclose(got[True, False], got[True, True], rtol=1e-6)
    assert (np.asarray(route(logits, 2, False, drop)[3]) * drop).sum(-1).min() > 0.01  # the default is post


@pytest.mark.parametrize("mode", ["post", "pre"])
def test_expert_ablation_modes_and_dropped_mass_match_hooked_transformers(mode, hf_checkpoint):
    """qwen2_moe with norm_topk_prob=False, where the two modes differ."""
    enc = encoded_set()
    ours = CategoryLoss(sj.load_model(hf_checkpoint("qwen2_moe")), enc, kind="experts", batch_size=4,
                        expert_mode=mode)
    tm = make_torch_model("qwen2_moe")
    drop = np.zeros((2, 4), bool)
    drop[0, 1] = drop[1, 3] = drop[1, 0] = True
    masses = []

    def reroute(l):
        def fn(module, inputs, output):
            full = torch.softmax(output[0].float(), dim=-1)
            masses.append((l, full[:, torch.tensor(drop[l])].sum(-1)))
            if mode == "pre":
                logits = output[0].clone()
                logits[:, torch.tensor(drop[l])] = -torch.inf
                probs = torch.softmax(logits.float(), dim=-1)
            else:
                probs = full.clone()
                probs[:, torch.tensor(drop[l])] = 0.0
            w, idx = torch.topk(probs, module.top_k, dim=-1)  # norm_topk_prob=False: no renormalisation
            return output[0], w.to(output[1].dtype), idx
        return fn

    for l, layer in enumerate(tm.model.layers):
        layer.mlp.gate.register_forward_hook(reroute(l))
    mass, n_mass = 0.0, 0
    sums, counts = {}, {}
    with torch.no_grad():
        for ids, sc, c in zip(enc.ids, enc.scopes, enc.categories):
            masses.clear()
            logits = tm(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:].astype(np.int64)), reduction="none")
            tgt = torch.tensor(sc[1:])
            sums[c] = sums.get(c, 0.0) + float(nll[tgt].sum())
            counts[c] = counts.get(c, 0) + int(tgt.sum())
            mass += float(sum(m[:-1][tgt].sum() for _, m in masses))  # positions whose next token is a target
            n_mass += int(tgt.sum()) * len(masses)
    got = ours(drop)
    for c in sums:
        assert got[c] == pytest.approx(sums[c] / counts[c], rel=1e-5)
    assert ours.last_dropped_mass == pytest.approx(mass / n_mass, rel=1e-5)
    assert 0.05 < ours.last_dropped_mass < 0.95
    base = ours(None)
    assert ours.last_dropped_mass is None
    assert any(abs(got[c] - base[c]) > 1e-4 for c in got)


def test_pre_and_post_expert_ablation_differ_without_renormalisation(hf_checkpoint):
    enc = encoded_set()
    model = sj.load_model(hf_checkpoint("qwen2_moe"))
    drop = np.zeros((2, 4), bool)
    drop[0, 2] = True
    post = CategoryLoss(model, enc, kind="experts", batch_size=4)(drop)
    pre = CategoryLoss(model, enc, kind="experts", batch_size=4, expert_mode="pre")(drop)
    assert any(abs(post[c] - pre[c]) > 1e-4 for c in post)
    with pytest.raises(ValueError, match="expert_mode 'mid'"):
        CategoryLoss(model, enc, kind="experts", expert_mode="mid")


def cut_records():
    """A one-layer model and three held-out records, two of whose responses a short max_length cuts.

    Plain template: CLS's response is tokens 15..21 of 22, MATH's 38..44 of 45 and 40..46 of 47.
    """
    model = sj.init_model(sj.ModelConfig(model_type="llama", vocab_size=4096, hidden_size=16, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16), seed=0)
    long = "Please sort these words alphabetically: pear apple fig kiwi plum lime date."
    return model, [{"id": "c1", "category": "CLS", "instruction": "Is it positive?", "output": "Yes, it is."},
                   {"id": "m1", "category": "MATH", "instruction": long, "output": "apple date fig."},
                   {"id": "m2", "category": "MATH", "instruction": long + " Now.", "output": "apple date fig."}]


def test_held_out_records_whose_prompts_fill_max_length_are_refused():
    # data.max_length=12 cut every held-out response away: `sparcom run` wrote a causal-check
    # matrix of None (baseline {}) after only a truncation warning.
    from sparcom_jax.data import DataWarning
    from sparcom_jax.stats.losses import make_loss_fn

    model, recs = cut_records()
    with pytest.warns(DataWarning, match="truncated 2 of 3"), \
            pytest.raises(ValueError, match=r"^no held-out record of MATH \(math\) keeps a response token within "
                                            r"max_length=24: .* raise max_length \(data\.max_length\)$"):
        make_loss_fn(model, recs, max_length=24)
    with pytest.warns(DataWarning, match="truncated 2 of 3"):
        scored = make_loss_fn(model, recs, max_length=40)  # m1 keeps 2 response tokens, m2 none: MATH is scored
    assert sorted(set(scored.encoded.categories)) == ["classification", "math"]


def test_loss_fn_counts_the_records_and_tokens_each_category_rests_on():
    from sparcom_jax.data import DataWarning
    from sparcom_jax.stats.losses import make_loss_fn

    model, recs = cut_records()
    # cut at 40, m1 keeps tokens 38 and 39 and m2 none
    with pytest.warns(DataWarning, match="truncated 2 of 3"):
        fn = make_loss_fn(model, recs, max_length=40)
    assert fn.coverage == {"classification": {"records": 1, "scored_records": 1, "response_tokens": 7},
                           "math": {"records": 2, "scored_records": 1, "response_tokens": 2}}


def test_loss_fn_scores_the_encoding_it_is_given_without_encoding_again():
    # The pipeline fingerprints the held-out tokens and passes that very encoding: the loss
    # is measured on it, not on a second encoding of the records (here max_length=24 would
    # have cut every MATH response and been refused).
    import warnings

    from sparcom_jax.data import DataWarning
    from sparcom_jax.stats.losses import encode_held_out, make_loss_fn

    model, recs = cut_records()
    with pytest.warns(DataWarning, match="truncated 2 of 3"):
        enc = encode_held_out(recs, sj.default_tokenizer(), max_length=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second encoding, so no second truncation warning
        fn = make_loss_fn(model, recs, max_length=24, encoded=enc)
    assert fn.encoded is enc and fn.coverage["math"] == {"records": 2, "scored_records": 1, "response_tokens": 2}


def test_response_coverage_counts_the_scored_targets_by_hand():
    # A target is a scope token at t >= 1 (the first token is never predicted): a record whose
    # scope is its first token only scores nothing, one with a single target at t = 1 is scored.
    from sparcom_jax.stats.losses import response_coverage

    enc = SimpleNamespace(categories=["math", "math", "code", "code"],
                          scopes=[np.array([True, False, False]), np.array([False, True]),
                                  np.array([True, True, True, False]), np.array([False, False, False])])
    assert response_coverage(enc) == {"math": {"records": 2, "scored_records": 1, "response_tokens": 1},
                                      "code": {"records": 2, "scored_records": 1, "response_tokens": 2}}


def test_a_category_without_targets_is_left_out_and_one_target_is_scored(hf_checkpoint):
    # A category is in the result when it has a target token (the mean of one target is that
    # token's loss), and absent, not a division by zero, when its records score nothing.
    enc = encoded_set(n=3)
    enc.scopes[1] = np.eye(len(enc.ids[1]), dtype=bool)[0]  # its first token only: never predicted
    enc.scopes[2] = np.eye(len(enc.ids[2]), dtype=bool)[-1]  # one target, the last token
    got = CategoryLoss(sj.load_model(hf_checkpoint("llama")), enc, kind="neurons", batch_size=3)(None)
    ref = torch_category_loss(make_torch_model("llama"), SimpleNamespace(
        ids=enc.ids[::2], scopes=enc.scopes[::2], categories=enc.categories[::2]))
    assert set(got) == {enc.categories[0], enc.categories[2]} == set(ref)
    for c in ref:
        assert got[c] == pytest.approx(ref[c], rel=1e-5)


def test_expert_neuron_ablation_matches_transformers_with_their_output_weights_zeroed(hf_checkpoint):
    # An expert neuron forced to 0 drops its term from the expert's output, as a zero column of the
    # expert's down_proj does: an independent reference for kind="expert_neurons".
    enc = encoded_set()
    ours = CategoryLoss(sj.load_model(hf_checkpoint("qwen2_moe")), enc, kind="expert_neurons", batch_size=4)
    mask = np.random.default_rng(2).random((2, 4, 16)) < 0.3  # [L, E, G]
    tm = make_torch_model("qwen2_moe")
    with torch.no_grad():
        for l, layer in enumerate(tm.model.layers):
            layer.mlp.experts.down_proj.mul_(torch.tensor(~mask[l], dtype=torch.float32)[:, None, :])
    ref, base, abl = torch_category_loss(tm, enc), ours(None), ours(mask)
    assert set(abl) == set(ref)
    for c in ref:
        assert abl[c] == pytest.approx(ref[c], rel=1e-5)
    assert any(abs(abl[c] - base[c]) > 1e-3 for c in base), "ablation changed nothing; the test is blind"
    assert ours(mask.astype(np.int64)) == abl  # a 0/1 mask means the same (not ~1 = -2 as a weight)


def test_mass_matched_expert_draws_drop_about_the_sets_measured_mass(hf_checkpoint):
    """End to end on qwen2_moe (norm_topk_prob=False): each category's busiest expert per layer
    (what top-eps ISEs hold), against random experts outside it carrying as much baseline mass."""
    from sparcom_jax.analysis.ablate import ablation_matrix, baseline_expert_mass

    enc = encoded_set()
    loss = CategoryLoss(sj.load_model(hf_checkpoint("qwen2_moe")), enc, kind="experts", batch_size=4)
    _, mass = baseline_expert_mass(loss)
    assert loss.last_dropped_mass is None and loss.last_category_mass is None
    for m in mass.values():  # a softmax per token and layer, over L = 2 layers
        np.testing.assert_allclose(m.sum(1), 0.5, rtol=1e-5)
    sets = {c: np.eye(4, dtype=bool)[m.argmax(1)] for c, m in mass.items()}
    r = ablation_matrix(sets, loss, n_random=3, seed=0, kind="experts", expert_mass=mass)
    for c, s in sets.items():
        a = sj.CATEGORIES.index(c)
        # The set's mass on its own tokens, as measured with it removed: layer 0 as the baseline had it.
        assert r.set_category_mass[a] >= mass[c][0][s[0]].sum() > 0.1
        assert (r.mass_random_sizes[:, a] >= 2).all()
        got = r.mass_random_mass[:, a]
        assert abs(got.mean() - r.set_category_mass[a]) < 0.25 * r.set_category_mass[a], (c, got, r.set_category_mass)
    # The per-category masses weigh into the overall one by the categories' target tokens.
    loss(sets["code"])
    n = {c: sum(int(sc[1:].sum()) for sc, cc in zip(enc.scopes, enc.categories) if cc == c) for c in mass}
    assert loss.last_dropped_mass == pytest.approx(
        sum(loss.last_category_mass[c] * n[c] for c in n) / sum(n.values()), rel=1e-9)


def prompt_scopes(enc):
    """The tokens before each record's response: where the identification counts (scope "prompt")."""
    return [~sc for sc in enc.scopes]


@pytest.mark.parametrize("name, kind, field", [("llama", "neurons", "neuron_active"),
                                               ("qwen2_moe", "expert_neurons", "expert_neuron_active")])
def test_baseline_counts_each_units_held_out_firing_as_hooked_transformers(hf_checkpoint, name, kind, field):
    from torch_reference import torch_counts

    enc = encoded_set()
    fire = prompt_scopes(enc)
    loss = CategoryLoss(sj.load_model(hf_checkpoint(name)), enc, kind=kind, batch_size=3, firing_scopes=fire)
    plain = CategoryLoss(sj.load_model(hf_checkpoint(name)), enc, kind=kind, batch_size=3)
    base = loss(None)
    ref = torch_counts(make_torch_model(name), enc.ids, fire, sums=True)
    per_token = ref["tokens"].reshape((-1,) + (1,) * (ref[field].ndim - 1))  # every record has a prompt
    freq = ref[field] / per_token
    # The magnitude: A summed where A > 0 on the same tokens (float64 in the hooks, float32 in-graph).
    magnitude = ref[Counts.SUM_FIELDS[field]] / per_token
    cats = np.array(enc.categories)
    assert set(loss.last_unit_firing) == set(cats) == set(loss.last_unit_magnitude)
    for c, got in loss.last_unit_firing.items():
        np.testing.assert_allclose(got, freq[cats == c].mean(0), rtol=1e-12, atol=0)
        np.testing.assert_allclose(loss.last_unit_magnitude[c], magnitude[cats == c].mean(0), rtol=1e-5, atol=1e-7)
        assert loss.firing_records[c] == (cats == c).sum()
    assert len({float(v.sum()) for v in loss.last_unit_firing.values()}) == 3, "one firing for all: the test is blind"
    # Not the firing under another name: a unit's magnitude is its strength times its frequency.
    mag = np.concatenate([v.ravel() for v in loss.last_unit_magnitude.values()])
    fr = np.concatenate([v.ravel() for v in loss.last_unit_firing.values()])
    assert mag.max() > 0 and not np.allclose(mag[fr > 0] / fr[fr > 0], (mag[fr > 0] / fr[fr > 0]).mean())
    assert base == plain(None)  # counting leaves the losses as they were, bit for bit
    assert plain.last_unit_firing is None and plain.last_unit_magnitude is None
    mask = np.zeros(next(iter(loss.last_unit_firing.values())).shape, bool)
    mask[:, 0] = True
    # an ablated pass counts nothing
    assert loss(mask) == plain(mask) and loss.last_unit_firing is None and loss.last_unit_magnitude is None


def test_firing_records_count_the_records_with_a_counted_token_and_the_rest_count_0(hf_checkpoint):
    """`firing_records`: per category, the records whose firing scope holds a token, known before any
    pass (every process has it); the baseline's mean firing counts the others as 0."""
    enc = encoded_set()
    fire = prompt_scopes(enc)
    for i in (0, 4, 6):  # no counted token: two of the first category's three records, one of the second's
        fire[i] = np.zeros_like(fire[i])
    by_hand = {}
    for c, f in zip(enc.categories, fire):
        by_hand[c] = by_hand.get(c, 0) + int(f.any())
    assert sorted(by_hand.values()) == [1, 2, 2]
    model = sj.load_model(hf_checkpoint("llama"))
    loss = CategoryLoss(model, enc, kind="neurons", batch_size=3, firing_scopes=fire)
    assert loss.firing_records == by_hand and loss.last_unit_firing is None  # (before any pass)
    assert CategoryLoss(model, enc, kind="neurons", batch_size=3).firing_records is None
    loss(None)
    assert loss.firing_records == by_hand
    # The first category's firing is its one counted record's, over its three records.
    keep = [3]
    alone = CategoryLoss(model, SimpleNamespace(ids=[enc.ids[i] for i in keep], scopes=[enc.scopes[i] for i in keep],
                                                categories=[enc.categories[i] for i in keep]),
                         kind="neurons", batch_size=3, firing_scopes=[fire[i] for i in keep])
    alone(None)
    c = enc.categories[3]
    assert alone.firing_records == {c: 1}
    np.testing.assert_allclose(loss.last_unit_firing[c] * 3, alone.last_unit_firing[c], rtol=1e-12)


def test_scope_codes_mark_both_scopes_and_refuse_firing_scopes_that_do_not_fit():
    """One code per token: SCORED on the response, FIRING on the firing scope (both where they
    overlap); firing scopes one short, of another length, or for experts are refused, not cut."""
    from sparcom_jax.stats.losses import FIRING, SCORED, scope_codes

    enc = encoded_set()
    fire = [np.ones_like(sc) if i % 2 else ~sc for i, sc in enumerate(enc.scopes)]
    codes = scope_codes(enc, fire, "neurons")
    assert len(codes) == len(enc.ids)
    for c, sc, f in zip(codes, enc.scopes, fire, strict=True):
        np.testing.assert_array_equal(c, sc * SCORED + f * FIRING)
    assert all(np.array_equal(c, sc * SCORED) for c, sc in zip(scope_codes(enc, None, "experts"), enc.scopes))
    with pytest.raises(ValueError, match=r"^firing_scopes has 7 masks for 8 sequences$"):
        scope_codes(enc, fire[:-1], "neurons")
    short = [*fire[:2], fire[2][:-1], *fire[3:]]
    with pytest.raises(ValueError, match=rf"^firing_scopes\[2\] has shape \({len(fire[2]) - 1},\), its sequence "):
        scope_codes(enc, short, "expert_neurons")
    with pytest.raises(ValueError, match="kind 'experts' has none"):
        scope_codes(enc, fire, "experts")


def test_the_firing_count_and_the_ablated_passes_share_one_compiled_program(hf_checkpoint):
    from sparcom_jax.runtime import compile_stats, track_compilations

    track_compilations()
    enc = encoded_set()
    # A bucket and batch no other test uses, so that no program is compiled already.
    loss = CategoryLoss(sj.load_model(hf_checkpoint("llama")), enc, kind="neurons", batch_size=5, buckets=(29,),
                        firing_scopes=prompt_scopes(enc))
    before = compile_stats()
    loss(None)
    first = compile_stats(since=before)
    loss(np.eye(2, 48, dtype=bool))
    again = compile_stats(since=before)
    programs = [d["compilations"] + d["cache_hits"] for d in (first, again)]
    assert programs[0] >= 1 and programs[1] == programs[0], programs


@pytest.mark.filterwarnings("ignore::sparcom_jax.data.DataWarning")  # (records cut at 64 tokens, on purpose)
def test_held_out_firing_scopes_follow_the_prompt_length_and_content_matches_a_fresh_encoding():
    from sparcom_jax.data import encode_records, load_instructions, resolve_tokenizer
    from sparcom_jax.stats.losses import encode_held_out, held_out_firing_scopes

    recs = load_instructions(n_per_category=2, seed=0)
    tok = resolve_tokenizer()
    enc = encode_held_out(recs, tok, max_length=64)
    for scope in ("prompt", "response", "all", "content"):
        got = held_out_firing_scopes(enc, scope, recs, tok, max_length=64)
        ref = encode_records(recs, tok, scope=scope, max_length=64)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref.scopes, strict=True)), scope
    with pytest.raises(ValueError, match="firing scope 'prompts'"):
        held_out_firing_scopes(enc, "prompts")


@pytest.mark.filterwarnings("ignore::sparcom_jax.data.DataWarning")  # (the mismatched encodings are cut too)
def test_content_firing_scopes_of_other_records_than_the_scored_ones_are_refused():
    """"content" encodes the records again: one record of another sequence (not all of them), or a
    record fewer, would count firing on tokens the scored sequences do not have."""
    import dataclasses
    import warnings

    from sparcom_jax.data import DataWarning, load_instructions, resolve_tokenizer
    from sparcom_jax.stats.losses import encode_held_out, held_out_firing_scopes

    recs = load_instructions(n_per_category=2, seed=0)
    tok = resolve_tokenizer()
    with pytest.warns(DataWarning, match="^truncated "):
        enc = encode_held_out(recs, tok, max_length=64)
    with warnings.catch_warnings():  # the cut records were reported once, when `enc` was made
        warnings.simplefilter("error", DataWarning)
        held_out_firing_scopes(enc, "content", recs, tok, max_length=64)
    one_other = [*recs[:-1], dataclasses.replace(recs[-1], instruction=recs[-1].instruction + " Briefly.")]
    with pytest.raises(ValueError, match="^the held-out records' content tokens come from other sequences than the "
                                         "scored ones: encode both with the same records"):
        held_out_firing_scopes(enc, "content", one_other, tok, max_length=64)
    with pytest.raises(ValueError, match="longer than"):  # (zip's strict check: no scope list one sequence short)
        held_out_firing_scopes(enc, "content", recs[:-1], tok, max_length=64)


def test_a_loss_fn_on_a_given_encoding_counts_firing_on_the_scope_asked_for_and_none_without_one():
    """The pipeline passes its fingerprinted encoding: "content" encodes the records again with the
    tokenizer (the other scopes read the prompt lengths); no firing scope, or experts, count none."""
    from sparcom_jax.data import as_records, encode_records, resolve_tokenizer
    from sparcom_jax.stats.losses import FIRING, encode_held_out, make_loss_fn

    model, recs = cut_records()
    tok = resolve_tokenizer(model)
    enc = encode_held_out(recs, tok, max_length=None)
    content = list(encode_records(as_records(recs), tok, scope="content", max_length=None).scopes)
    prompt = [np.arange(len(ids)) < n for ids, n in zip(enc.ids, enc.prompt_lens)]
    assert not all(np.array_equal(a, b) for a, b in zip(content, prompt))  # (the test tells them apart)
    for scope, want in (("content", content), ("prompt", prompt)):
        fn = make_loss_fn(model, recs, tok, encoded=enc, firing_scope=scope, max_length=None)
        assert fn.encoded is enc
        got = [(c & FIRING) > 0 for c in fn.codes]
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), scope
        assert fn.firing_records == {"classification": 1, "math": 2}
    for kw in ({"firing_scope": None}, {"kind": "experts", "firing_scope": "prompt"}):
        fn = make_loss_fn(model, recs, tok, encoded=enc, max_length=None, **kw)
        assert fn.firing_records is None and not any((c & FIRING).any() for c in fn.codes), kw


def test_held_out_records_without_a_response_are_refused_or_warned_about():
    # `output` may be "" for counting prompts (docs/notebook.md), but the causal check scored such a
    # record on its end-of-sequence token alone: a file without responses gave a causal check of
    # end-of-sequence losses, with a warning that asked for more held-out records.
    from sparcom_jax.data import DataWarning
    from sparcom_jax.stats.losses import make_loss_fn, response_targets

    model, recs = cut_records()
    no_cls = [dict(recs[0], output="  "), *recs[1:]]
    with pytest.raises(ValueError, match=r"^1 of 3 held-out records have no reference response \('output' is empty: "
                                         r"CLS 1 of 1; e\.g\. 'c1'\): .*, and CLS \(classification\) would be scored "
                                         r"on nothing else; .*ablation\.enabled: false in a config\)$"):
        make_loss_fn(model, no_cls, max_length=None)
    blank_m2 = [*recs[:2], dict(recs[2], output="")]
    with pytest.warns(DataWarning, match=r"^1 of 3 held-out records have no reference response \('output' is "
                                         r"empty: MATH 1 of 2; e\.g\. 'm2'\).*end-of-sequence token alone .*; give them"):
        fn = make_loss_fn(model, blank_m2, max_length=None)
    # What the message says: the record without a response is scored on one token, the end of sequence.
    targets = response_targets(fn.encoded).tolist()
    assert targets[2] == 1 and targets[1] > 1
