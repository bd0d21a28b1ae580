"""Fine-tuning scores the response, shifted by one: the first step against a plain numpy cross-entropy.

The reference is computed from the records alone: the response tokens (checked to
decode to the record's output), the model's logits of each unpadded sequence, and a
float64 log-softmax. It fails if the training encode scored the prompt or all tokens,
or if the targets or the logits were shifted by one position too many or too few.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from test_train_loop import MODEL, _random_model

ROWS = 6


class Stop(Exception):
    pass


def _stop(*a, **k):
    """Stands in for the compiled programs: everything before them is host work."""
    raise Stop


def test_first_step_scores_exactly_the_shifted_response_tokens(tmp_path, monkeypatch):
    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, encode_records, load_instructions
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    tok = default_tokenizer()
    # The shortest record of each category: whole prompts and responses fit max_length.
    size = lambda r: len(r.instruction + r.input + r.output)  # noqa: E731
    shortest = {}
    for r in load_instructions():
        if r.category not in shortest or size(r) < size(shortest[r.category]):
            shortest[r.category] = r
    records = list(shortest.values())
    assert len(records) == ROWS
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok),
                                                      "pad_token_id": tok.pad_token_id}), seed=1)

    built = []  # the loop's batches, to read the first step's targets

    class Recorded(loop.TrainBatches):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(loop, "TrainBatches", Recorded)
    cfg = TrainConfig(batch_size=ROWS, grad_accum=2, max_length=128, buckets=(128,), total_steps=2, warmup_steps=1,
                      save_every=100, seed=0)
    rows = {}

    def stop_after_first(step, row):
        rows[step] = row
        return step == 1

    res = finetune(model, records, tok, cfg, tmp_path / "run", eval_records=records[:1], progress=False,
                   callback=stop_after_first)
    assert sorted(res.losses) == [1] and len(built) == 1

    # The reference: response tokens of each record and the numpy loss on them.
    ref = encode_records(records, tok, scope="response", max_length=128)
    want_sum, want_n, want_rows = 0.0, 0, {}
    for r, ids, resp in zip(records, ref.ids, ref.scopes):
        text = tok.decode(ids[resp])
        assert text and (r.output + tok.eos_token).startswith(text), (r.id, text)
        assert not resp[0] and resp[-1]  # a non-empty response after a non-empty prompt
        logits = np.asarray(model(jnp.asarray(ids[None])), np.float64)[0]
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        for t in range(len(ids) - 1):
            if resp[t + 1]:  # the logits at t predict token t+1
                want_sum -= logp[t, ids[t + 1]]
                want_n += 1
        want_rows[ids.tobytes()] = np.concatenate([resp[1:], [False]])

    # Step 1's batch holds every record once; its targets are the shifted response masks.
    batch = built[0].batch(0)
    ids_BT = batch.ids_ABT.reshape(ROWS, -1)
    tgt_BT = batch.targets_ABT.reshape(ROWS, -1)
    real_BT = batch.mask_ABT.reshape(ROWS, -1)
    seen = set()
    for ids_T, tgt_T, real_T in zip(ids_BT, tgt_BT, real_BT):
        key = ids_T[real_T].tobytes()
        assert key in want_rows and key not in seen
        seen.add(key)
        want = np.zeros_like(tgt_T)
        want[:real_T.sum()] = want_rows[key]
        np.testing.assert_array_equal(tgt_T, want)
    assert len(seen) == ROWS and batch.n_targets == want_n == rows[1]["target_tokens"]
    # The step's reported loss (computed on the initial parameters) is the per-token mean.
    np.testing.assert_allclose(res.losses[1], want_sum / want_n, rtol=2e-5)


def _plain_mean_token_loss(model, ids_BT, valid_BT, scope_BT):
    """Reference: -mean over every (row, t) with t+1 a real scoped token of log p(ids[t+1]), written
    out with jax.nn.log_softmax (not the package's loss), on the whole batch at once."""
    import jax

    def loss(params):
        from flax import nnx

        gd, _ = nnx.split(model, nnx.Param)
        logits = nnx.merge(gd, params).forward(jnp.asarray(ids_BT), jnp.asarray(valid_BT)).logits
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(ids_BT[:, 1:])[..., None], axis=-1)[..., 0]
        on = jnp.asarray(scope_BT[:, 1:] & valid_BT[:, 1:])
        return -jnp.sum(jnp.where(on, picked, 0.0)) / on.sum()

    return loss


def test_step_gradient_is_that_of_the_global_per_token_mean(hf_checkpoint):
    """One SGD step with lr 1 and nothing else moves the parameters by exactly minus the gradient
    of the per-token mean loss over the whole batch. The two micro-batches hold 5 and 21 targets,
    so accumulating micro-batch means (or not dividing the summed gradient by the target count)
    gives another update; Adam and clipping in the end-to-end tests hide the gradient's scale."""
    import jax
    from flax import nnx

    import sparcom_jax as sj
    from sparcom_jax.next_token import target_mask
    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.train import TrainConfig, make_optimizer
    from sparcom_jax.train.step import (compute_graphdef, init_state, make_shardings, make_train_step,
                                        pure_params)

    model = sj.load_model(hf_checkpoint("llama"))
    rng = np.random.default_rng(0)
    A, R, T = 2, 2, 12
    ids = rng.integers(3, 96, (A * R, T)).astype(np.int32)
    valid = np.ones((A * R, T), bool)
    valid[1, 8:] = False  # padding inside the scope: never a target
    scope = np.zeros((A * R, T), bool)
    scope[0, 10:], scope[1, 5:], scope[2, 2:], scope[3, 1:] = True, True, True, True
    targets = target_mask(scope, valid)
    assert [int(targets[:R].sum()), int(targets[R:].sum())] == [5, 21]

    params0 = pure_params(model)
    want_loss, want_grad = jax.value_and_grad(_plain_mean_token_loss(model, ids, valid, scope))(
        nnx.state(model, nnx.Param))
    want_grad = nnx.to_pure_dict(want_grad)

    cfg = TrainConfig(optimizer="sgd", b1=0.0, weight_decay=0.0, clip_norm=None, learning_rate=1.0,
                      warmup_steps=0, end_lr_fraction=1.0, total_steps=1, batch_size=A * R, grad_accum=A)
    tx, sched = make_optimizer(cfg, 1)
    sh = make_shardings(model.config, tx, make_mesh(1, 1))
    step = make_train_step(compute_graphdef(model.config, "float32"), tx, sh, sched)
    state, metrics = step(init_state(params0, tx, sh), *(x.reshape(A, R, T) for x in (ids, valid, targets)))

    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-6)
    assert float(metrics["targets"]) == 26 and float(metrics["lr"]) == 1.0
    flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))  # noqa: E731
    got, before, want = flat(state.params), flat(params0), flat(want_grad)
    for k in want:
        scale = np.abs(np.asarray(want[k])).max()
        np.testing.assert_allclose(np.asarray(before[k]) - np.asarray(got[k]), np.asarray(want[k]),
                                   atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(k))
    norm = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in want.values()))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)


def test_eval_records_change_neither_the_training_batches_nor_the_run_identity(tmp_path, monkeypatch):
    """The same training records with a held-out set that holds a longer sequence: the padded
    training lengths and the data fingerprint are those of the training records alone. (When the
    bucket ladder was cut from train + eval lengths, the longer eval record raised the top bucket:
    training shapes, hence the float sums, changed, and resuming with another eval set was refused
    as "a run on other data".) The eval batches still take the long record."""
    import json

    import pytest

    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, encode_records, load_instructions
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    monkeypatch.setattr(loop, "_programs", _stop)
    tok = default_tokenizer()
    records = load_instructions()
    lengths = encode_records(records, tok, scope="response", max_length=None).lengths
    order = np.argsort(lengths)
    train, short, long = [records[i] for i in order[:8]], [records[order[8]]], [records[order[-1]]]
    assert lengths[order[-1]] > 2 * lengths[order[7]]
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}))
    cfg = TrainConfig(batch_size=4, max_length=256, total_steps=2, warmup_steps=1)
    runs = {}
    for name, ev in (("short", short), ("long", long)):
        with pytest.raises(Stop):
            finetune(model, train, tok, cfg, tmp_path / name, eval_records=ev, progress=False)
        runs[name] = json.loads((tmp_path / name / "run.json").read_text())
    assert runs["long"]["buckets"] == runs["short"]["buckets"]
    assert max(runs["long"]["buckets"]) == int(lengths[order[7]])  # the longest training sequence
    assert runs["long"]["data_fingerprint"] == runs["short"]["data_fingerprint"]


def test_records_cut_before_their_response_are_reported_by_category(tmp_path, monkeypatch):
    """A summary whose prompt alone fills max_length has no loss target: it is trained on nothing.
    The demo's fine-tuning (chat template, max_length 128) lost 21 of its 31 SUM records so, with no
    word of it, and its "after" model was barely tuned on SUM. The warning names the category, the
    count and the max_length that keeps a response token; a record whose response is only
    shortened is not reported."""
    import warnings

    import pytest

    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import DataWarning, default_tokenizer, encode_records, load_instructions
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    monkeypatch.setattr(loop, "_programs", _stop)
    tok = default_tokenizer()
    records = load_instructions()
    enc = encode_records(records, tok, scope="response", max_length=None)
    prompts = {r.id: int(p) for r, p in zip(records, enc.prompt_lens)}
    summary = max((r for r in records if r.category == "summarization"), key=lambda r: prompts[r.id])
    short = min(records, key=lambda r: prompts[r.id])
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}))
    max_length = prompts[summary.id]  # the prompt fits; its response does not begin
    assert prompts[short.id] + 2 < max_length
    cfg = TrainConfig(batch_size=2, max_length=max_length, buckets=(max_length,), total_steps=2, warmup_steps=1,
                      allow_cut_responses=True)
    with pytest.warns(DataWarning, match=rf"max_length={max_length} cuts 1 of 2 training records before their "
                                         rf"response begins \(summarization 1 of 1; e\.g\. {summary.id}\).* at least "
                                         rf"{max_length + 1} "):
        with pytest.raises(Stop):
            finetune(model, [summary, short], tok, cfg, tmp_path / "cut", progress=False)
    # One token more keeps a response token: shortened (the truncation notice), not lost.
    cfg = TrainConfig(batch_size=2, max_length=max_length + 1, buckets=(max_length + 1,), total_steps=2,
                      warmup_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        with pytest.raises(Stop):
            finetune(model, [summary, short], tok, cfg, tmp_path / "kept", progress=False)


def test_records_cut_before_their_response_are_refused_by_default(tmp_path, monkeypatch):
    """Trained on nothing, they left a category under-tuned behind a warning that scrolls by (the
    fast demo lost most SUM records so); without allow_cut_responses the run stops before any
    compute or write, naming the category, the records and the fix."""
    import pytest

    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, encode_records, load_instructions
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, TrainConfigError, finetune

    monkeypatch.setattr(loop, "_programs", _stop)
    tok = default_tokenizer()
    records = [r for r in load_instructions() if r.category in ("summarization", "math")]
    enc = encode_records(records, tok, scope="response", max_length=None)
    prompts = {r.id: int(p) for r, p in zip(records, enc.prompt_lens)}
    summary = max((r for r in records if r.category == "summarization"), key=lambda r: prompts[r.id])
    short = min(records, key=lambda r: prompts[r.id])
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}))
    max_length = prompts[summary.id]
    cfg = TrainConfig(batch_size=2, max_length=max_length, buckets=(max_length,), total_steps=2, warmup_steps=1)
    with pytest.raises(TrainConfigError, match=rf"^max_length={max_length} cuts 1 of 2 training records before their "
                                               rf"response begins \(summarization 1 of 1; e\.g\. {summary.id}\): they "
                                               rf"would be trained on nothing.* at least {max_length + 1} .*; or set "
                                               r"allow_cut_responses=true"):
        finetune(model, [summary, short], tok, cfg, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut").exists()


def test_the_cut_warning_counts_each_category_of_every_record():
    """Per category, the records cut out of that category's records in the set (not out of the
    cut ones only): two summaries, one of which loses its response, read "1 of 2"."""
    import warnings

    import pytest

    from sparcom_jax.data import DataWarning, default_tokenizer, encode_records, load_instructions
    from sparcom_jax.train import TrainConfig
    from sparcom_jax.train.loop import check_responses_cut

    tok = default_tokenizer()
    records = load_instructions()
    prompts = dict(zip([r.id for r in records], encode_records(records, tok, scope="response",
                                                               max_length=None).prompt_lens.tolist()))
    summaries = sorted((r for r in records if r.category == "summarization"), key=lambda r: prompts[r.id])
    chosen = [summaries[-1], summaries[0]]
    max_length = prompts[summaries[-1].id]
    assert prompts[summaries[0].id] + 2 < max_length
    cfg = TrainConfig(max_length=max_length, allow_cut_responses=True)
    with warnings.catch_warnings():  # the truncation notice, tested elsewhere
        warnings.simplefilter("ignore", DataWarning)
        enc = encode_records(chosen, tok, scope="response", max_length=max_length)
    with pytest.warns(DataWarning, match=r"cuts 1 of 2 training records before their response begins "
                                         r"\(summarization 1 of 2; "):
        check_responses_cut(enc, chosen, tok, cfg)
