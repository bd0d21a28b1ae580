"""Fast checks of the fine-tuning pieces: config validation, data order, loss targets, decay mask, schedule."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from sparcom_jax.models.config import ModelConfig
from sparcom_jax.models.transformer import abstract_model
from sparcom_jax.train import TrainConfig, TrainConfigError, decay_mask, lr_schedule
from sparcom_jax.train.batches import TrainBatches, eval_batches, target_mask
from sparcom_jax.train.loop import MetricsWriter, read_metrics


def test_unknown_optimizer_names_field_and_choices():
    with pytest.raises(TrainConfigError, match=r"optimizer='adam_typo'.*adamw, lion, sgd"):
        TrainConfig(optimizer="adam_typo")


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_size=10, grad_accum=4), r"batch_size=10 is not divisible by grad_accum=4"),
    (dict(compute_dtype="float16"), r"compute_dtype='float16'.*float32, bfloat16"),
    (dict(template="alpaca"), r"template='alpaca'"),
    (dict(total_steps=5, warmup_steps=5), r"warmup_steps=5 must be smaller than total_steps=5"),
    (dict(max_length=256, buckets=(64, 128)), r"largest bucket must be >= max_length=256"),
    (dict(learning_rate=0.0), r"learning_rate=0.0 must be > 0"),
])
def test_bad_config_is_rejected_on_construction(kwargs, pattern):
    with pytest.raises(TrainConfigError, match=pattern):
        TrainConfig(**kwargs)


def test_batch_split_over_devices_is_checked():
    cfg = TrainConfig(batch_size=12, grad_accum=2)  # 6 rows per micro-batch
    cfg.check_mesh(3)
    with pytest.raises(TrainConfigError, match=r"6 rows per micro-batch is not divisible by the 4 devices.*"
                                               r"multiple of grad_accum \* 4 = 8"):
        cfg.check_mesh(4)


def test_fingerprint_ignores_cadence_but_not_numbers():
    a = TrainConfig(save_every=10, log_every=1)
    assert a.fingerprint() == TrainConfig(save_every=7, log_every=5, keep_last=9).fingerprint()
    assert a.fingerprint() != TrainConfig(learning_rate=1e-3).fingerprint()
    assert TrainConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(TrainConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"lr": 1.0})


def test_target_mask_is_response_shifted_left_and_real_only():
    scope = np.array([[0, 0, 1, 1, 1, 0]], bool)  # response tokens at 2..4, position 5 is padding
    mask = np.array([[1, 1, 1, 1, 0, 0]], bool)   # ... and token 4 is padding too
    # position t is a target when token t+1 is a real response token: t=1 (->2) and t=2 (->3)
    np.testing.assert_array_equal(target_mask(scope, mask), [[0, 1, 1, 0, 0, 0]])


def _toy(n=23, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 40, n)
    ids = [rng.integers(3, 50, k).astype(np.int32) for k in lens]
    scopes = [np.arange(k) >= k // 2 for k in lens]
    return ids, scopes


def test_data_order_is_a_function_of_seed_and_step():
    ids, scopes = _toy()
    kw = dict(batch_size=4, grad_accum=2, buckets=(16, 32, 40), pad_id=0)
    a, b = TrainBatches(ids, scopes, seed=1, **kw), TrainBatches(ids, scopes, seed=1, **kw)
    c = TrainBatches(ids, scopes, seed=2, **kw)
    n = a.steps_per_epoch
    # Out-of-order access (as after a resume) gives the same batches as in-order access.
    for s in [2 * n + 1, 0, n + 3, 1]:
        np.testing.assert_array_equal(a.batch(s).ids_ABT, b.batch(s).ids_ABT)
    assert any(not np.array_equal(a.batch(s).ids_ABT, c.batch(s).ids_ABT) for s in range(n))
    # Epochs are reshuffled, yet every sequence appears exactly once per epoch.
    assert any(not np.array_equal(a.batch(s).ids_ABT, a.batch(s + n).ids_ABT) for s in range(n))
    for epoch in range(2):
        seen = np.concatenate([idx for _, idx in a.epoch_plan(epoch)])
        assert sorted(seen.tolist()) == list(range(len(ids)))
    # Fixed shapes: [A, B/A, T] with T a bucket; tokens counted from the mask.
    for s in range(n):
        bt = a.batch(s)
        assert bt.ids_ABT.shape[:2] == (2, 2) and bt.ids_ABT.shape[2] in (16, 32, 40)
        assert bt.tokens == int(bt.mask_ABT.sum())
        assert not bt.targets_ABT[..., -1].any()
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_eval_batches_cover_every_sequence_once():
    ids, scopes = _toy(n=11)
    bs = eval_batches(ids, scopes, batch_size=4, buckets=(16, 40))
    rows = np.concatenate([b.rows for b in bs])
    assert sorted(rows[rows >= 0].tolist()) == list(range(11))
    for b in bs:
        for r, m in zip(b.rows, b.mask_BT):
            assert m.sum() == (len(ids[r]) if r >= 0 else 0)


def test_weight_decay_mask_spares_norms_and_biases():
    cfg = ModelConfig.from_hf_config(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    params = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert flat["blocks/attn/q_bias"] is False and flat["blocks/attn/k_bias"] is False
    assert flat["blocks/input_norm/weight"] is False and flat["final_norm/weight"] is False
    assert flat["blocks/attn/q_proj"] is True and flat["blocks/ffn/down_proj"] is True
    assert flat["embed"] is True and flat["lm_head"] is True


def test_schedule_warms_up_then_decays_to_end_fraction():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=4, total_steps=20, end_lr_fraction=0.1)
    s = lr_schedule(cfg, 20)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(2)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(4)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(20)), 1e-4, rtol=1e-5)
    assert float(s(10)) > float(s(15)) > float(s(19))


def test_metrics_writer_drops_steps_after_the_resume_point(tmp_path):
    p = tmp_path / "m.jsonl"
    w = MetricsWriter(p, resume_step=None)
    for s in range(1, 6):
        w.write(type="train", step=s, loss=float(s))
    w.close()
    with open(p, "a") as f:
        f.write('{"type": "train", "st')  # a line cut by a kill
    w = MetricsWriter(p, resume_step=3)
    w.write(type="train", step=4, loss=40.0)
    w.close()
    assert [(d["step"], d["loss"]) for d in read_metrics(p)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_a_metrics_line_process_0_fails_to_write_stops_every_process(tmp_path, monkeypatch):
    """Process 0 alone writes metrics.jsonl; when a write failed (a full disk), the others went
    on to their next training step and waited there for it (on TPU / GPU until the heartbeat
    timeout). Seen from process 1 (it writes nothing): each write is where it learns of it."""
    from sparcom_jax.errors import OtherProcessError
    from sparcom_jax.parallel import processes

    p = tmp_path / "m.jsonl"
    real, failing = processes.raise_together, []

    def raise_together(error, what):  # process 0 fails at the calls listed in `failing`
        if what in failing:
            raise OtherProcessError(f"{what}: process 0 of 2 stopped with an error")
        real(error, what)

    monkeypatch.setattr(processes, "raise_together", raise_together)
    w = MetricsWriter(p, resume_step=None, enabled=False)
    w.write(type="train", step=1, loss=1.0)
    failing.append(f"finetune: writing {p}")
    with pytest.raises(OtherProcessError, match="^finetune: writing .*m.jsonl: process 0 of 2"):
        w.write(type="train", step=2, loss=2.0)
    with pytest.raises(OtherProcessError):
        MetricsWriter(p, resume_step=None, enabled=False)
    assert not p.exists()


def test_bench_writes_only_its_own_section(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_train", Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- collect:start -->\nother rows\n<!-- collect:end -->\n")
    bench.write_section(doc, "## Training\nfirst")
    bench.write_section(doc, "## Training\nsecond")
    text = doc.read_text()
    assert "other rows" in text and "second" in text and "first" not in text
    assert text.count("<!-- train:start -->") == 1 and text.count("<!-- train:end -->") == 1


def test_negative_seed_is_refused_before_a_run_starts():
    """A negative seed passed validation, then numpy's default_rng((seed, epoch)) failed at the
    first batch ("expected non-negative integer", no field named), after checkpoint 0 was written."""
    with pytest.raises(TrainConfigError, match=r"seed=-1 must be >= 0"):
        TrainConfig(seed=-1)


def _tiny_params():
    """float32 parameters (all 2.0) of a one-layer qwen2, which has biases and norms."""
    cfg_m = ModelConfig.from_hf_config(dict(model_type="qwen2", vocab_size=16, hidden_size=8, intermediate_size=8,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg_m), nnx.Param))
    return jax.tree.map(lambda s: np.full(s.shape, 2.0, np.float32), shapes)


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "sgd"])
def test_each_optimizer_decays_exactly_the_masked_parameters(optimizer):
    """A zero gradient leaves only the decoupled decay: -lr * wd * p on decayed parameters, nothing on
    norm scales and biases. Fails if an optimizer drops `mask=decay_mask` (the mask's own test does not
    see whether the optimizer uses it)."""
    from sparcom_jax.train import make_optimizer

    params = _tiny_params()
    cfg = TrainConfig(optimizer=optimizer, learning_rate=0.5, weight_decay=0.1, warmup_steps=0, end_lr_fraction=1.0,
                      total_steps=1, b1=0.0)
    tx, _ = make_optimizer(cfg, 1)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    mask = decay_mask(params)
    n_decayed = 0
    for (path, u), m in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(mask)):
        np.testing.assert_allclose(np.asarray(u), -0.5 * 0.1 * 2.0 if m else 0.0, rtol=1e-6,
                                   err_msg=f"{optimizer} {jax.tree_util.keystr(path)}")
        n_decayed += m
    assert 0 < n_decayed < len(jax.tree.leaves(mask))  # both kinds are present


def test_gradient_is_clipped_by_global_norm_before_the_optimizer():
    """SGD with lr 0.5: the update is -0.5 times the gradient scaled to norm clip_norm (a 3-4 gradient has
    norm 5); a gradient under the clip passes unchanged. Clipping the update instead (after the
    learning rate) would give norm 0.5, not 0.25."""
    from sparcom_jax.train import make_optimizer

    cfg = TrainConfig(optimizer="sgd", b1=0.0, weight_decay=0.0, learning_rate=0.5, warmup_steps=0,
                      end_lr_fraction=1.0, total_steps=1, clip_norm=0.5)
    tx, _ = make_optimizer(cfg, 1)
    params = _tiny_params()
    for size, want in ((1.0, [-0.15, -0.2]), (0.01, [-0.015, -0.02])):
        g = jax.tree.map(np.zeros_like, params)
        g["embed"][0, :2] = [3.0 * size, 4.0 * size]
        u, _ = tx.update(g, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(u["embed"][0, :2]), want, rtol=1e-6)
        assert not any(np.asarray(x).any() for x in jax.tree.leaves({k: x for k, x in u.items() if k != "embed"}))


def test_orbax_errors_are_held_until_the_block_ends_and_warnings_pass_at_once(caplog):
    import logging
    import os

    from sparcom_jax.train.checkpointing import orbax_errors_held

    def record(level, msg, where="/site-packages/orbax/checkpoint/_src/futures/future.py"):
        return logging.makeLogRecord({"name": "absl", "levelno": level, "levelname": logging.getLevelName(level),
                                      "pathname": where.replace("/", os.sep), "msg": msg})

    absl_log = logging.getLogger("absl")
    with caplog.at_level(logging.INFO):
        with orbax_errors_held():
            absl_log.handle(record(logging.WARNING, "a real orbax warning"))
            absl_log.handle(record(logging.ERROR, "an error of another library", where="/x/tensorstore/y.py"))
            assert [r.getMessage() for r in caplog.records] == ["a real orbax warning",
                                                                "an error of another library"]
            absl_log.handle(record(logging.ERROR, "thread failed"))
            assert len(caplog.records) == 2  # held...
        assert caplog.records[-1].getMessage() == "thread failed"  # ...and logged when nothing was raised
        caplog.clear()
        with pytest.raises(OSError) as e:
            with orbax_errors_held():
                absl_log.handle(record(logging.ERROR, "thread failed: No space left on device"))
                raise OSError(28, "No space left on device")
        assert caplog.records == [] and "  thread failed: No space left on device" in e.value.__notes__[0]
        absl_log.handle(record(logging.ERROR, "after the block"))  # the filter is gone
        assert [r.getMessage() for r in caplog.records] == ["after the block"]


def test_callbacks_into_closed_event_loops_are_held_with_the_orbax_errors(monkeypatch, capsys):
    # After a failed save orbax closes its event loops and tensorstore's callbacks into them fail
    # ("Event loop is closed", printed by sys.unraisablehook) ahead of the error the save raises.
    import sys
    import types

    from sparcom_jax.train.checkpointing import orbax_errors_held

    def unraisable(exc):
        return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None,
                                     object="callback")

    passed = []
    monkeypatch.setattr(sys, "unraisablehook", passed.append)
    with pytest.raises(OSError) as e:
        with orbax_errors_held():
            sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
            other = unraisable(ValueError("another library's"))
            sys.unraisablehook(other)
            other_runtime = unraisable(RuntimeError("another library's"))  # only the closed loops are held
            sys.unraisablehook(other_runtime)
            raise OSError(28, "No space left on device")
    assert passed == [other, other_runtime] and sys.unraisablehook == passed.append  # the others at once; the hook restored
    assert "1 callbacks into event loops orbax had closed" in e.value.__notes__[0]
    assert capsys.readouterr().err == ""
    with orbax_errors_held():  # nothing raised: reported when the block ends
        sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
        assert capsys.readouterr().err == ""
    assert "RuntimeError: Event loop is closed" in capsys.readouterr().err


def test_params_checksum_sees_one_bit_and_one_swap_but_not_the_storage():
    """The base-model check of a resumed run: equal values give one checksum whatever their dtype or
    placement; one ulp in one weight, or two weights swapped, give another. A checksum of plain sums
    misses the swap; one of the bfloat16 bits would refuse a base loaded in bfloat16 the first time."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.fingerprint import params_checksum

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32).astype(jax.numpy.bfloat16).astype(np.float32)
    params = {"a": {"w": x}, "b": np.ones(3, np.float32)}
    ref = params_checksum(params)
    assert len(ref) == 16
    as_bf16 = {"a": {"w": jax.numpy.asarray(x, jax.numpy.bfloat16)}, "b": params["b"]}
    placed = jax.device_put(params, NamedSharding(make_mesh(1, 1), P()))
    assert params_checksum(as_bf16) == params_checksum(placed) == ref
    ulp = x.copy()
    ulp[2, 3] = np.nextafter(ulp[2, 3], np.float32(np.inf))
    swapped = x.copy()
    swapped[0, 1], swapped[3, 2] = x[3, 2], x[0, 1]
    assert x[0, 1] != x[3, 2]
    renamed = {"a": {"v": x}, "b": params["b"]}
    others = [params_checksum({"a": {"w": w}, "b": params["b"]}) for w in (ulp, swapped)] + [params_checksum(renamed)]
    assert len({ref, *others}) == 4


def test_process_0_failing_to_write_the_run_directory_stops_every_process(tmp_path, monkeypatch):
    """Process 0 alone writes run.json and the tokenizer; when that failed (a full disk), the others
    went on to their first training step and met its exit there, with an error that did not name
    the cause. Seen from process 1 (it writes nothing): it stops there, naming process 0's write."""
    import re

    import sparcom_jax as sj
    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, load_instructions
    from sparcom_jax.errors import OtherProcessError
    from sparcom_jax.parallel import processes
    from sparcom_jax.train import finetune

    tok = default_tokenizer()
    model = sj.init_model(ModelConfig.from_hf_config(dict(
        model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)), seed=0)
    run = tmp_path / "run"
    at = f"finetune: writing {run / 'run.json'}"
    real = processes.raise_together

    def raise_together(error, what):  # process 0 fails in the block that writes the run directory
        if what.startswith(at):
            raise OtherProcessError(f"{what}: process 0 of 2 stopped with an error")
        real(error, what)

    def no_training(*a, **k):
        raise AssertionError("process 1 went on to train without process 0")

    monkeypatch.setattr(processes, "raise_together", raise_together)
    monkeypatch.setattr(loop.jax, "process_index", lambda: 1)
    monkeypatch.setattr(loop, "_programs", no_training)
    cfg = TrainConfig(batch_size=6, max_length=256, buckets=(256,), total_steps=2, warmup_steps=1)
    with pytest.raises(OtherProcessError, match=f"^{re.escape(at)}"):
        finetune(model, load_instructions(n_per_category=1), tok, cfg, run, progress=False)
    assert not run.exists()


def test_finetune_takes_records_and_tokenizer_as_collection_does(tmp_path):
    # finetune(model, a_dataframe, None, ...) failed with pandas' "truth value of a DataFrame is
    # ambiguous", and tokenizer=None with "object of type 'NoneType' has no len()", where
    # collect_instructions reads both. The refusal below comes after both are resolved, before any compute.
    import pandas as pd

    import sparcom_jax as sj

    model = sj.init_model(ModelConfig(model_type="llama", vocab_size=64, hidden_size=8, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=4, intermediate_size=8), seed=0)
    frame = pd.DataFrame({"id": ["a"], "category": ["math"], "instruction": ["Add 2 and 3."], "output": ["5"]})
    with pytest.raises(TrainConfigError, match="the tokenizer has 4096 tokens but the model's vocab_size is 64"):
        sj.finetune(model, frame, None, TrainConfig(total_steps=1, warmup_steps=0, max_length=32), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("warmup", [0, 1, 3, 8])
def test_schedule_matches_the_warmup_cosine_formula(warmup):
    """lr(t) = peak * t / W during warm-up, then end + (peak - end) * (1 + cos(pi (t - W) / (N - W))) / 2,
    written out here; W = 0 starts at the peak and W = 1 at 0 (a short warm-up is still a warm-up);
    W = N - 1, the longest warm-up a run accepts, decays to the end value in its one last step."""
    import math

    peak, frac, n = 2e-3, 0.25, 9
    s = lr_schedule(TrainConfig(learning_rate=peak, warmup_steps=warmup, total_steps=n, end_lr_fraction=frac), n)
    end = peak * frac
    for t in range(n + 2):
        want = peak * t / warmup if t < warmup else \
            end + (peak - end) * (1 + math.cos(math.pi * min(t - warmup, n - warmup) / (n - warmup))) / 2
        np.testing.assert_allclose(float(s(t)), want, rtol=1e-5, atol=1e-9, err_msg=f"step {t}")


def test_sgd_uses_b1_as_heavy_ball_momentum():
    """b1 is SGD's momentum: with a constant gradient g and lr 1 the updates are -g, -(1 + b1) g,
    -(1 + b1 + b1^2) g (the trace m_t = g + b1 m_{t-1}, written out); b1 = 0 is plain SGD."""
    from sparcom_jax.train import make_optimizer

    params = _tiny_params()
    g = jax.tree.map(np.zeros_like, params)
    g["embed"][0, :3] = [1.0, -2.0, 0.5]
    for b1, factors in ((0.5, (1.0, 1.5, 1.75)), (0.0, (1.0, 1.0, 1.0))):
        cfg = TrainConfig(optimizer="sgd", b1=b1, weight_decay=0.0, clip_norm=None, learning_rate=1.0,
                          warmup_steps=0, end_lr_fraction=1.0, total_steps=3)
        tx, _ = make_optimizer(cfg, 3)
        state = tx.init(params)
        for f in factors:
            u, state = tx.update(g, state, params)
            np.testing.assert_allclose(np.asarray(u["embed"]), -f * g["embed"], rtol=1e-6, err_msg=f"b1={b1}")


def _two_updates(cfg, g1, g2):
    """The updates of `cfg`'s optimizer for gradients g1 then g2 on embed[0, :2] (zero elsewhere)."""
    from sparcom_jax.train import make_optimizer

    tx, _ = make_optimizer(cfg, 2)
    params = _tiny_params()
    state, out = tx.init(params), []
    for g in (g1, g2):
        grads = jax.tree.map(np.zeros_like, params)
        grads["embed"][0, :2] = g
        u, state = tx.update(grads, state, params)
        out.append(np.asarray(u["embed"][0, :2], np.float64))
    return out


def test_adamw_updates_are_the_bias_corrected_moments_with_b1_b2_and_eps():
    """AdamW with lr 1 and no decay, written out: m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2,
    update = -(m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps). eps = 0.5 and b1 != b2 make each
    setting visible (the reference test's eps is optax's default, so dropping `eps` went unseen)."""
    b1, b2, eps = 0.5, 0.8, 0.5
    g1, g2 = np.array([1.0, -2.0]), np.array([3.0, 0.5])
    cfg = TrainConfig(optimizer="adamw", b1=b1, b2=b2, eps=eps, weight_decay=0.0, clip_norm=None, learning_rate=1.0,
                      warmup_steps=0, end_lr_fraction=1.0, total_steps=2)
    m = v = 0.0
    for t, (g, got) in enumerate(zip((g1, g2), _two_updates(cfg, g1, g2)), start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        want = -(m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"step {t}")


def test_lion_steps_by_the_sign_of_the_b1_blend_and_keeps_its_moment_with_b2():
    """Lion with lr 1 and no decay, written out: update = -sign(b1 m + (1 - b1) g), then
    m = b2 m + (1 - b2) g. The second gradient is chosen so that swapping b1 and b2 flips the signs."""
    b1, b2 = 0.9, 0.5
    g1, g2 = np.array([1.0, 1.0]), np.array([-0.5, -3.0])
    cfg = TrainConfig(optimizer="lion", b1=b1, b2=b2, weight_decay=0.0, clip_norm=None, learning_rate=1.0,
                      warmup_steps=0, end_lr_fraction=1.0, total_steps=2)
    m = 0.0
    for t, (g, got) in enumerate(zip((g1, g2), _two_updates(cfg, g1, g2)), start=1):
        np.testing.assert_array_equal(got, -np.sign(b1 * m + (1 - b1) * g), err_msg=f"step {t}")
        m = b2 * m + (1 - b2) * g
    assert (np.sign(b2 * (1 - b1) * g1 + (1 - b2) * g2) != np.sign(b1 * (1 - b2) * g1 + (1 - b1) * g2)).all()


def test_eval_loss_is_token_weighted_per_category_and_ignores_empty_rows():
    """`_evaluate` against sums written out by hand: a fake eval step gives sequence k the loss v_k on
    each of its targets, and garbage on padding rows (index -1). Category loss = sum_k v_k n_k / sum_k n_k
    over its sequences (token-weighted, not a mean of row means), none for a category without targets; "mean" pools every token; "tokens" counts
    the targets (t such that token t+1 is a response token)."""
    import types

    from sparcom_jax.train.loop import _evaluate

    lens, starts = [5, 9, 3, 12, 7, 4], [2, 4, 1, 6, 3, 4]  # response = tokens start..len-1 (none in the last)
    ids = [np.full(n, 10 + k, np.int32) for k, n in enumerate(lens)]  # the first token names the sequence
    scopes = [np.arange(n) >= s for n, s in zip(lens, starts)]
    cats = ["a", "b", "a", "a", "b", "c"]
    v = {10 + k: float(k + 1) for k in range(6)}

    def fake_step(params, ids_BT, mask_BT, targets_BT):
        n_B = targets_BT.sum(1).astype(np.float32)
        l_B = np.array([v[int(r[0])] * n if m.any() else 1e6 for r, m, n in zip(ids_BT, mask_BT, n_B)],
                       np.float32)
        return l_B, np.where(mask_BT.any(1), n_B, 7.0).astype(np.float32)

    bs = eval_batches(ids, scopes, batch_size=4, buckets=(8, 16))
    assert any((b.rows < 0).any() for b in bs)  # padding rows are present and must be skipped
    out = _evaluate(fake_step, None, bs, cats, types.SimpleNamespace(batch_BT=None))
    n = [n - s for n, s in zip(lens, starts)]  # targets per sequence: positions start-1 .. len-2
    assert out["tokens"] == {"a": n[0] + n[2] + n[3], "b": n[1] + n[4], "c": 0} == {"a": 3 + 2 + 6, "b": 5 + 4, "c": 0}
    assert sorted(out["loss"]) == ["a", "b"]  # a category without targets has no loss (not 0/0)
    np.testing.assert_allclose(out["loss"]["a"], (1 * 3 + 3 * 2 + 4 * 6) / 11, rtol=1e-12)
    np.testing.assert_allclose(out["loss"]["b"], (2 * 5 + 5 * 4) / 9, rtol=1e-12)
    np.testing.assert_allclose(out["mean"], (1 * 3 + 3 * 2 + 4 * 6 + 2 * 5 + 5 * 4) / 20, rtol=1e-12)


def test_a_fresh_metrics_file_replaces_an_old_one(tmp_path):
    """Without a resume step the file starts empty: lines of an earlier run left in it would read
    as steps of this one."""
    p = tmp_path / "m.jsonl"
    p.write_text('{"type": "train", "step": 9, "loss": 9.0}\n')
    w = MetricsWriter(p, resume_step=None)
    w.write(type="train", step=1, loss=1.0)
    w.close()
    assert [(d["step"], d["loss"]) for d in read_metrics(p)] == [(1, 1.0)]


def test_bucket_ladder_reaches_the_longest_sequence_and_given_buckets_must_hold_it():
    """Default: the documented ladder 16, 24, 32, 48, 64, 96, ... cut at the longest sequence (at least 16,
    at most max_length). Given buckets are sorted and deduplicated, and one shorter than a sequence is
    refused (a sequence of exactly the largest bucket fits)."""
    from sparcom_jax.train.batches import resolve_buckets

    assert resolve_buckets(np.array([5, 40]), 512, None) == (16, 24, 32, 40)
    assert resolve_buckets(np.array([5, 9]), 512, None) == (16,)
    assert resolve_buckets(np.array([5, 300]), 100, None) == (16, 24, 32, 48, 64, 96, 100)
    assert resolve_buckets(np.array([5, 32]), 512, (32, 16, 16)) == (16, 32)
    with pytest.raises(ValueError, match=r"a sequence has 33 tokens, more than the largest bucket 32"):
        resolve_buckets(np.array([5, 33]), 512, (32, 16))


def test_data_fingerprint_sees_one_token_and_one_target_flag():
    """A resumed run is refused when its data differ: one token id, or one response flag, changed."""
    ids, scopes = _toy(n=5)
    kw = dict(batch_size=2, grad_accum=1, buckets=(40,), seed=0)
    ref = TrainBatches(ids, scopes, **kw).fingerprint()
    assert TrainBatches([x.copy() for x in ids], [s.copy() for s in scopes], **kw).fingerprint() == ref
    tok = [x.copy() for x in ids]
    tok[3][1] += 1
    flag = [s.copy() for s in scopes]
    flag[2][0] = not flag[2][0]
    assert TrainBatches(tok, scopes, **kw).fingerprint() != ref
    assert TrainBatches(ids, flag, **kw).fingerprint() != ref


def test_checkpoints_are_kept_by_the_documented_rules_and_restore_what_was_saved(tmp_path):
    """save_every=2, keep_last=2 over 5 steps: saves at 0 (before), 2, 4 and 5 (the last step, not a
    multiple of 2); keeps 0 and 5 always plus the 2 latest (4, 5), so 2 is deleted. A restore gives
    back the values and meta of its own step."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.train.checkpointing import TrainCheckpointer
    from sparcom_jax.train.step import TrainState

    ck = TrainCheckpointer(tmp_path, save_every=2, keep_last=2, final_step=5, async_save=False)
    saved = []
    for s in range(6):  # as finetune asks after each step
        if ck.should_save(s):
            state = TrainState(jnp.int32(s), {"w": jnp.full(3, float(s))}, {"m": jnp.full(2, 10.0 * s)})
            assert ck.save(state, {"step": s, "tokens_seen": 7 * s})
            saved.append(s)
    ck.wait()
    assert saved == [0, 2, 4, 5]
    assert ck.all_steps() == [0, 4, 5] and ck.latest_step() == 5
    rep = NamedSharding(make_mesh(1, 1), P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          TrainState(jnp.int32(0), {"w": jnp.zeros(3)}, {"m": jnp.zeros(2)}))
    state, meta = ck.restore(4, target)
    ck.close()
    assert int(state.step) == 4 and meta == {"step": 4, "tokens_seen": 28}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), [4.0] * 3)
    np.testing.assert_array_equal(np.asarray(state.opt_state["m"]), [40.0] * 2)


# (settings at the edge of what is allowed, the same just past it); each bad one must name its field.
_EDGES = [
    (dict(learning_rate=1e-9), dict(learning_rate=-1e-9), "learning_rate"),
    (dict(end_lr_fraction=0.0), dict(end_lr_fraction=-0.01), "end_lr_fraction"),
    (dict(end_lr_fraction=1.0), dict(end_lr_fraction=1.01), "end_lr_fraction"),
    (dict(weight_decay=0.0), dict(weight_decay=-0.01), "weight_decay"),
    (dict(clip_norm=0.0), dict(clip_norm=-0.5), "clip_norm"),
    (dict(warmup_steps=0), dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=0, total_steps=1), dict(warmup_steps=0, total_steps=0), "total_steps"),
    (dict(warmup_steps=2, total_steps=3), dict(warmup_steps=3, total_steps=3), "warmup_steps"),
    (dict(epochs=1), dict(epochs=0), "epochs"),
    (dict(batch_size=1), dict(batch_size=0), "batch_size"),
    (dict(batch_size=6, grad_accum=6), dict(batch_size=6, grad_accum=0), "grad_accum"),
    (dict(b1=0.0, b2=0.0), dict(b1=-0.1), "b1"),
    (dict(b1=0.99, b2=0.99), dict(b2=1.0), "b1"),
    (dict(eps=1e-12), dict(eps=0.0), "eps"),
    (dict(seed=0), dict(seed=-1), "seed"),
    (dict(max_length=2), dict(max_length=1), "max_length"),
    (dict(max_length=8, buckets=(2, 8)), dict(max_length=8, buckets=(1, 8)), "buckets"),
    (dict(max_length=8, buckets=(4, 8)), dict(max_length=8, buckets=(4, 7)), "buckets"),
    (dict(save_every=1), dict(save_every=0), "save_every"),
    (dict(keep_last=1), dict(keep_last=0), "keep_last"),
    (dict(log_every=1), dict(log_every=0), "log_every"),
    (dict(eval_batch_size=1), dict(eval_batch_size=0), "eval_batch_size"),
    (dict(mesh_model=1, mesh_data=1), dict(mesh_model=0), "mesh_model"),
    (dict(mesh_data=1), dict(mesh_data=0), "mesh_data"),
]


@pytest.mark.parametrize("good, bad, field", _EDGES, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(_EDGES)])
def test_each_setting_is_accepted_up_to_its_limit_and_refused_past_it(good, bad, field):
    cfg = TrainConfig(**good)
    assert cfg.validate() is cfg  # validate() returns the config, so it can be chained
    with pytest.raises(TrainConfigError, match=rf"^{field}="):
        TrainConfig(**bad)


def test_the_eval_batch_and_max_length_are_checked_against_the_mesh_and_the_model():
    cfg = TrainConfig(batch_size=8, eval_batch_size=6, max_length=64)  # micro-batch 8, eval batch 6
    cfg.check_mesh(2)
    with pytest.raises(TrainConfigError, match=r"^eval_batch_size=6 is not divisible by the 4 devices"):
        cfg.check_mesh(4)
    cfg.check_model(64)
    with pytest.raises(TrainConfigError, match=r"^max_length=64 is longer than the model's max_position_embeddings=63"):
        cfg.check_model(63)


def test_a_base_and_the_run_it_became_are_checksummed_by_one_program(tmp_path, monkeypatch):
    """The demo fine-tunes the result of its pretraining: the first base lay on one device, the
    second in the train state's shardings, so the checksum of each base compiled a program of
    its own (one per placement). Both are checksummed in the train state's shardings now."""
    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, load_instructions
    from sparcom_jax.fingerprint import params_checksum
    from sparcom_jax.models.transformer import init_model
    from sparcom_jax.train import finetune

    seen = []

    def checksum(params):
        seen.append({x.sharding for x in jax.tree.leaves(params)})
        return params_checksum(params)

    monkeypatch.setattr(loop, "params_checksum", checksum)
    model = init_model(ModelConfig(model_type="llama", vocab_size=4096, hidden_size=16, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=8, intermediate_size=16), seed=0)
    before = params_checksum(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    cfg = TrainConfig(batch_size=6, max_length=64, buckets=(64,), total_steps=1, warmup_steps=0,
                      allow_cut_responses=True)
    records = load_instructions(n_per_category=1)
    first = finetune(model, records, default_tokenizer(), cfg, tmp_path / "a", progress=False)
    finetune(first.model, records, default_tokenizer(), cfg, tmp_path / "b", progress=False)
    assert len(seen) == 2 and seen[0] == seen[1], seen
    # The placement leaves the value alone: the run records the checksum of the base as it was.
    assert json.loads((tmp_path / "a" / "run.json").read_text())["base_checksum"] == before


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "sgd"])
def test_a_step_given_its_rate_updates_as_the_schedule_in_graph_and_shares_one_program(optimizer):
    """The demo's pretraining and fine-tuning differ only in their schedules (learning_rate,
    total_steps), which were constants of the train step: each compiled its own. Given the rate
    as an input, the step updates bit for bit as the step with the schedule in its program, and
    two schedules lower to one program."""
    from sparcom_jax.models.transformer import init_model
    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.train import make_optimizer
    from sparcom_jax.train.step import compute_graphdef, init_state, make_shardings, make_train_step, pure_params

    model = init_model(ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=8, intermediate_size=16), seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (1, 4, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    targets = rng.random(ids.shape) < 0.7
    graphdef, mesh = compute_graphdef(model.config, "float32"), make_mesh(1, 1)
    lowered = []
    for cfg, steps in ((TrainConfig(optimizer=optimizer, learning_rate=3e-3, warmup_steps=2, b1=0.9), 5),
                       (TrainConfig(optimizer=optimizer, learning_rate=1e-3, warmup_steps=1, b1=0.9), 3)):
        tx, sched = make_optimizer(cfg, steps)
        sh = make_shardings(model.config, tx, mesh)
        in_graph = make_train_step(graphdef, tx, sh, sched)
        given = make_train_step(graphdef, tx, sh, tx_at=lambda lr, cfg=cfg, steps=steps: make_optimizer(
            cfg, steps, learning_rate=lambda _: lr)[0])
        a, b = init_state(pure_params(model), tx, sh), init_state(pure_params(model), tx, sh)
        for s in range(steps):
            a, ma = in_graph(a, ids, mask, targets)
            b, mb = given(b, np.asarray(jax.jit(sched)(np.int32(s))), ids, mask, targets)
            assert float(ma["lr"]) == float(mb["lr"]) and float(ma["loss"]) == float(mb["loss"])
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        lowered.append(given.lower(b, np.float32(0), ids, mask, targets).as_text())
    assert lowered[0] == lowered[1]


# --- a run directory's checkpoints exported as Hugging Face directories -------------------------

def _saved_run(run_dir, *, save_every=3, keep_last=5):
    """A run directory as finetune leaves it (run.json, the tokenizer, checkpoints at 0, 3 and the last
    step 5 for save_every=3), each checkpoint holding a tiny model's weights plus its step number."""
    import jax.numpy as jnp

    from sparcom_jax.data.tokenizer import default_tokenizer
    from sparcom_jax.fileio import write_json
    from sparcom_jax.models.transformer import init_model
    from sparcom_jax.train.checkpointing import RUN_FILE, TOKENIZER_SUBDIR, TrainCheckpointer
    from sparcom_jax.train.step import TrainState, pure_params

    tok = default_tokenizer()
    cfg = ModelConfig.from_hf_config(dict(
        model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))
    params = pure_params(init_model(cfg, seed=0))
    write_json(run_dir / RUN_FILE, {"model_config": cfg.to_hf_config(), "total_steps": 5})
    tok.save_pretrained(str(run_dir / TOKENIZER_SUBDIR))
    ck = TrainCheckpointer(run_dir, save_every=save_every, keep_last=keep_last, final_step=5, async_save=False)
    for s in range(6):
        if ck.should_save(s):
            ck.save(TrainState(jnp.int32(s), jax.tree.map(lambda x: x + s, params), {"m": jnp.zeros(2)}),
                    {"step": s})
    ck.close()
    return params


def _safetensors_dtypes(path):
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_export_series_writes_every_checkpoint_under_its_series_name(tmp_path):
    from sparcom_jax.checkpoints.hf import load_model
    from sparcom_jax.train import checkpoint_steps, export_series, load_checkpoint_model, read_run
    from sparcom_jax.train.step import pure_params

    run, out = tmp_path / "run", tmp_path / "hf"
    params = _saved_run(run)
    assert checkpoint_steps(run) == [0, 3, 5] and checkpoint_steps(tmp_path / "none") == []
    series = export_series(run, out)
    assert [(n, p) for n, p in series] == [(n, out / n) for n in ("before", "step_000003", "after")]
    assert [(d["name"], d["step"], d["path"]) for d in json.loads((out / "series.json").read_text())] \
        == [("before", 0, str(out / "before")), ("step_000003", 3, str(out / "step_000003")), ("after", 5, str(out / "after"))]
    for (name, path), step in zip(series, (0, 3, 5)):  # each directory holds its own step's weights
        jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), np.asarray(want) + step),
                     pure_params(load_model(path)), params)
        assert (path / "tokenizer.json").exists() and _safetensors_dtypes(path) == {"F32"}
    # steps in any order are exported in step order; bfloat16 storage on request
    picked = export_series(run, tmp_path / "two", steps=[5, 0], dtype="bfloat16")
    assert [n for n, _ in picked] == ["before", "after"] and _safetensors_dtypes(picked[1][1]) == {"BF16"}
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step\(s\) \[4\]; available: \[0, 3, 5\]"):
        export_series(run, tmp_path / "bad", steps=[0, 4])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4; available: \[0, 3, 5\]"):
        load_checkpoint_model(run, 4)
    bf16 = load_checkpoint_model(run, 3, dtype="bfloat16")  # bfloat16 compute over the float32 master weights
    assert {x.dtype for x in jax.tree.leaves(pure_params(bf16))} == {np.dtype("float32")}
    with pytest.raises(FileNotFoundError, match=r"run\.json: not found; .* is not a fine-tuning run directory"):
        read_run(tmp_path / "hf")


def test_a_checkpoint_a_killed_run_left_unfinished_is_removed(tmp_path):
    # orbax writes a checkpoint under a temporary name and renames it when complete; a run killed
    # mid-save leaves the temporary directory, which a resumed run never reads and must not keep.
    import jax.numpy as jnp

    from sparcom_jax.train.checkpointing import TrainCheckpointer
    from sparcom_jax.train.step import TrainState

    left = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1010101"
    left.mkdir(parents=True)
    ck = TrainCheckpointer(tmp_path, save_every=2, keep_last=2, final_step=8, async_save=False)
    assert ck.save(TrainState(jnp.int32(0), {"w": jnp.zeros(3)}, {"m": jnp.zeros(2)}), {"step": 0})
    ck.wait()
    ck.close()
    assert sorted(p.name for p in left.parent.iterdir()) == ["0"]


def test_training_records_without_a_response_are_refused_or_warned_about():
    # Records with output "" (fine for counting prompts) were trained on their end-of-sequence token
    # alone: a category of them taught the model to stop at once, and nothing said so.
    from sparcom_jax.data import DataWarning, default_tokenizer, encode_records, load_instructions
    from sparcom_jax.train import TrainConfig, check_responses_cut

    tok, cfg = default_tokenizer(), TrainConfig(max_length=256)
    rows = [{"id": f"{c}{i}", "category": c, "instruction": f"Do the {c} task number {i}.", "output": "Done."}
            for c in ("MATH", "CODE") for i in range(2)]
    for i in (0, 1):  # every MATH record: refused
        rows[i]["output"] = ""
    records = load_instructions(rows)
    enc = encode_records(records, tok, template=cfg.template, scope="response", max_length=cfg.max_length)
    with pytest.raises(ValueError, match=r"^2 of 4 training records have no reference response \('output' is empty: "
                                         r"MATH 2 of 2; e\.g\. 'MATH0', 'MATH1'\): fine-tuning trains on the response "
                                         r"tokens, .*, and MATH \(math\) would be trained on nothing else; .* or leave "
                                         r"those records out of the training records$"):
        check_responses_cut(enc, records, tok, cfg)
    rows[1]["output"] = "Five."  # one of two: a warning
    records = load_instructions(rows)
    enc = encode_records(records, tok, template=cfg.template, scope="response", max_length=cfg.max_length)
    with pytest.warns(DataWarning, match=r"^1 of 4 training records .*MATH 1 of 2; e\.g\. 'MATH0'"):
        check_responses_cut(enc, records, tok, cfg)
