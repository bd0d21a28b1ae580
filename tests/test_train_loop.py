"""End-to-end fine-tuning on the shipped data with a tiny Llama.

One uninterrupted run (module fixture) is the reference. Two subprocesses repeat
it: one on 8 simulated CPU devices (then on a 4 x 2 data x model mesh; losses must
agree within float tolerance, and its checkpoint is resumed here on one device),
one that is killed with os._exit right after a step (no cleanup, an async
checkpoint possibly in flight) and then resumed here (losses must match the
reference exactly). The subprocess entry point is this file's __main__; the
tests that wait for the subprocesses come last, so the others overlap them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import run_processes

N_STEPS = 8
KILL_AFTER = 7
STOP_8 = 4  # the 8-device run is the slowest on a CPU; its first steps and two evals suffice
TRAIN = dict(learning_rate=1e-2, warmup_steps=2, total_steps=N_STEPS, batch_size=16, grad_accum=2,
             max_length=128, buckets=(128,), save_every=3, keep_last=2, eval_batch_size=48, seed=3,
             allow_cut_responses=True)
MODEL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _records():
    from sparcom_jax.data import load_instructions

    return load_instructions()


def _eval_records():
    """8 per category: one eval batch of 48 keeps the per-save eval cheap."""
    from sparcom_jax.data import sample_balanced

    return sample_balanced(_records(), 8, seed=0)


def _worker(args: dict) -> None:
    """Subprocess: fine-tune the saved base model; optionally die hard after a step."""
    from transformers import PreTrainedTokenizerFast  # AutoTokenizer would import torch: seconds per process

    from sparcom_jax.checkpoints.hf import load_model
    from sparcom_jax.train import TrainConfig, TrainConfigError, finetune

    model = load_model(args["base"], with_tokenizer=False)
    model.tokenizer = PreTrainedTokenizerFast.from_pretrained(args["base"])
    cfg = TrainConfig(**{**TRAIN, **args.get("train", {})})
    if args.get("bad_batch"):
        # 12 rows per micro-batch cannot be split over 8 devices: refused before anything runs.
        try:
            finetune(model, _records(), model.tokenizer, TrainConfig(**{**TRAIN, "batch_size": 12, "grad_accum": 1}),
                     args["out"] + "_bad", progress=False)
        except TrainConfigError as e:
            print("BAD_BATCH_ERROR:", e, flush=True)
        assert not Path(args["out"] + "_bad").exists(), "a bad config must fail before writing anything"

    def die(step, row):
        if step == args.get("kill_after"):
            os._exit(17)  # a kill: no finally blocks, no waiting for the async checkpoint
        return step == args.get("stop_after")  # a clean early stop

    finetune(model, _records(), model.tokenizer, cfg, args["out"], eval_records=_eval_records(), progress=False,
             callback=die)
    if args.get("model_axis_out"):
        # Tensor parallelism too (neurons, heads and vocab over a model axis of 2, batch over data=4),
        # and no gradient accumulation, against the reference's grad_accum=2.
        finetune(model, _records(), model.tokenizer,
                 TrainConfig(**{**cfg.to_dict(), "mesh_data": 4, "mesh_model": 2, "grad_accum": 1}),
                 args["model_axis_out"], eval_records=_eval_records(), progress=False, callback=lambda s, m: s == 2)


def _spawn(args: dict, devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, __file__, json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run (1 device, in-process); the two subprocess runs start first and run alongside."""
    from sparcom_jax.checkpoints.hf import save_model
    from sparcom_jax.data import default_tokenizer
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    tmp = tmp_path_factory.mktemp("train")
    tok = default_tokenizer()
    cfg_m = ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id})
    base = _random_model(cfg_m)
    save_model(base, tmp / "base", tokenizer=tok)
    # Subprocesses first, so their start-up overlaps the reference run.
    p8 = _spawn({"base": str(tmp / "base"), "out": str(tmp / "dev8"), "bad_batch": True,
                 "stop_after": STOP_8,
                 "model_axis_out": str(tmp / "dev4x2")}, devices=8)
    pk = _spawn({"base": str(tmp / "base"), "out": str(tmp / "killed"), "kill_after": KILL_AFTER})
    before = {k: np.asarray(v).copy() for k, v in _flat(base).items()}
    ref = finetune(base, _records(), tok, TrainConfig(**TRAIN), tmp / "ref", eval_records=_eval_records(),
                   progress=False)
    yield dict(tmp=tmp, ref=ref, base=base, before=before, tok=tok, p8=_Worker(p8), pk=_Worker(pk))
    for p in (p8, pk):
        if p.poll() is None:
            p.kill()
            p.wait()


class _Worker:
    """A subprocess whose (returncode, output) is collected on first use, so in-process tests overlap it."""

    def __init__(self, proc):
        self.proc, self._result = proc, None

    def result(self):
        if self._result is None:
            out, _ = self.proc.communicate(timeout=300)
            self._result = (self.proc.returncode, out)
        return self._result


def _random_model(cfg_m, seed=0):
    """A random CausalLM built from numpy draws (init_model's eager init takes seconds on a busy CPU)."""
    import jax
    from flax import nnx

    from sparcom_jax.models.transformer import abstract_model

    abstract = abstract_model(cfg_m)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(s.shape, np.float32)
        return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return nnx.merge(nnx.graphdef(abstract), nnx.State(jax.tree.map(jax.numpy.asarray, params)))


def _flat(model):
    import jax
    from flax import nnx

    return {"/".join(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def _losses(path, kind="train"):
    from sparcom_jax.train import read_metrics

    return {d["step"]: d for d in read_metrics(path, kind)}


def test_loss_falls_on_shipped_data(runs):
    ref = runs["ref"]
    train = _losses(ref.metrics_path)
    assert sorted(train) == list(range(1, N_STEPS + 1))
    for d in train.values():
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(d) and d["tokens_per_s"] > 0
    evals = _losses(ref.metrics_path, "eval")
    assert sorted(evals) == [0, 3, 6, 8]  # every save: before, every 3 steps, after
    first, last = evals[0], evals[N_STEPS]
    assert first["mean"] > 6.0  # ~ln(vocab) for a random model
    assert last["mean"] < first["mean"] - 1.0, (first["mean"], last["mean"])
    # Every category is evaluated and improves.
    assert len(first["loss"]) == 6
    for cat, loss in first["loss"].items():
        assert last["loss"][cat] < loss - 0.5, cat
    assert np.mean([train[s]["loss"] for s in (7, 8)]) < np.mean([train[s]["loss"] for s in (1, 2)]) - 0.5
    # Checkpoints: keep_last=2 plus the base (0) and the final step; 3 was rotated out.
    assert ref.checkpoint_steps == [0, 6, 8]
    # The caller's base model is untouched (the train state was donated, not the model's buffers).
    now = _flat(runs["base"])
    assert all(np.array_equal(np.asarray(now[k]), v) for k, v in runs["before"].items())
    assert not all(np.array_equal(np.asarray(v), runs["before"][k]) for k, v in _flat(ref.model).items())


def test_export_round_trip_ours_and_transformers(runs):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparcom_jax.checkpoints.hf import load_model
    from sparcom_jax.train import export_series

    ref = runs["ref"]
    series = export_series(ref.run_dir, runs["tmp"] / "hf")
    assert [n for n, _ in series] == ["before", "step_000006", "after"]
    listed = json.loads((runs["tmp"] / "hf" / "series.json").read_text())
    assert [(d["name"], d["step"]) for d in listed] == [("before", 0), ("step_000006", 6), ("after", 8)]
    paths = dict(series)
    # Our loader: "before" is the base model and "after" the returned model, exactly.
    for name, model in (("before", runs["base"]), ("after", ref.model)):
        loaded = _flat(load_model(paths[name]))
        for k, v in _flat(model).items():
            np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(v, np.float32), err_msg=f"{name} {k}")
    # transformers reads the same directory and computes the same logits.
    tok = AutoTokenizer.from_pretrained(str(paths["after"]))
    ids = np.array([tok("### Instruction:\nAdd 2 and 3.\n\n### Response:\n5")["input_ids"]], np.int32)
    with torch.no_grad():
        pt = AutoModelForCausalLM.from_pretrained(str(paths["after"])).eval()
        want = pt(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ref.model(jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_bad_settings_fail_before_any_compute(runs, tmp_path, monkeypatch):
    import sparcom_jax.train.loop as loop
    from sparcom_jax.train import TrainConfig, TrainConfigError, finetune

    def no_compute(*a, **k):
        raise AssertionError("compute started before the settings were checked")

    monkeypatch.setattr(loop, "init_state", no_compute)
    monkeypatch.setattr(loop, "_programs", no_compute)
    recs = _records()[:12]
    with pytest.raises(TrainConfigError, match=r"max_length=512 is longer than the model's max_position_embeddings"):
        finetune(runs["base"], recs, runs["tok"], TrainConfig(max_length=512), tmp_path / "a", progress=False)
    with pytest.raises(TrainConfigError, match=r"mesh_data=2"):
        finetune(runs["base"], recs, runs["tok"], TrainConfig(max_length=128, mesh_data=2), tmp_path / "b",
                 progress=False)
    with pytest.raises(TrainConfigError, match=r"already holds a fine-tuning run; pass resume=True"):
        finetune(runs["base"], recs, runs["tok"], TrainConfig(**TRAIN), runs["ref"].run_dir, resume=False,
                 progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bfloat16_compute_keeps_float32_master_weights(runs):
    from sparcom_jax.train import TrainConfig, finetune

    res = finetune(runs["base"], _records(), runs["tok"], TrainConfig(**{**TRAIN, "compute_dtype": "bfloat16",
                                                                         "save_every": 100}),
                   runs["tmp"] / "bf16", eval_records=_eval_records(), progress=False, callback=lambda s, m: s == 2)
    ref = _losses(runs["ref"].metrics_path)
    assert sorted(res.losses) == [1, 2]
    for s, loss in res.losses.items():  # same data, same start: bfloat16 matmuls change the loss only a little
        np.testing.assert_allclose(loss, ref[s]["loss"], rtol=1e-2)
        assert loss != ref[s]["loss"]  # ... but they do run in bfloat16
    leaves = _flat(res.model)
    assert all(v.dtype == np.float32 for v in leaves.values())
    moved = [k for k, v in leaves.items() if not np.array_equal(np.asarray(v), runs["before"][k])]
    assert len(moved) == len(leaves)  # every parameter was updated, in float32


def test_a_run_is_not_resumed_from_another_base_model(runs, monkeypatch):
    """The finished reference run called again with a model of the same architecture but other
    weights: it was reused (its steps and its "before", step 0, descend from the first base),
    and the caller's series silently started from a model it had not passed. Refused before any
    step, leaving the run as it was. (The same base, reloaded from disk or on other devices,
    resumes: test_kill_and_resume_continues_exactly, test_eight_devices_agree_with_one.)"""
    import sparcom_jax.train.loop as loop
    from sparcom_jax.train import TrainConfig, TrainConfigError, checkpoint_steps, finetune

    def no_compute(*a, **k):
        raise AssertionError("the run went on")

    monkeypatch.setattr(loop, "_programs", no_compute)
    ref = runs["ref"]
    run_json = (ref.run_dir / "run.json").read_text()
    other = _random_model(runs["base"].config, seed=5)
    with pytest.raises(TrainConfigError, match=r"holds a run that started from another base model \(same "
                                               r"architecture, other weights\)"):
        finetune(other, _records(), runs["tok"], TrainConfig(**TRAIN), ref.run_dir, progress=False)
    assert (ref.run_dir / "run.json").read_text() == run_json and checkpoint_steps(ref.run_dir) == [0, 6, 8]


# The tests below wait for the subprocesses; they run last so the ones above overlap them.

def test_eight_devices_agree_with_one(runs):
    """1 vs 8 devices (data axis), vs a 4 x 2 data x model mesh without gradient accumulation,
    and a resume on 1 device of the 8-device run: no split of the batch or the parameters
    changes the numbers beyond float rounding."""
    from sparcom_jax.train import TrainConfig, finetune

    code, out = runs["p8"].result()
    assert code == 0, out[-3000:]
    # The bad batch split was refused with a message naming the fix.
    assert "BAD_BATCH_ERROR: batch_size=12 / grad_accum=1 = 12 rows per micro-batch is not divisible by the 8" in out
    ref = _losses(runs["ref"].metrics_path)
    dev8_dir = runs["tmp"] / "dev8"
    dev8 = _losses(dev8_dir / "metrics.jsonl")
    assert sorted(dev8) == list(range(1, STOP_8 + 1))
    for s in dev8:
        np.testing.assert_allclose(dev8[s]["loss"], ref[s]["loss"], rtol=2e-5, err_msg=f"step {s}")
        np.testing.assert_allclose(dev8[s]["grad_norm"], ref[s]["grad_norm"], rtol=2e-4, err_msg=f"step {s}")
    ev_ref, ev8 = _losses(runs["ref"].metrics_path, "eval"), _losses(dev8_dir / "metrics.jsonl", "eval")
    assert sorted(ev8) == [0, 3]
    for s in ev8:
        for cat, loss in ev_ref[s]["loss"].items():
            np.testing.assert_allclose(ev8[s]["loss"][cat], loss, rtol=2e-5, err_msg=f"eval {s} {cat}")
    assert json.loads((dev8_dir / "run.json").read_text())["mesh"] == {"data": 8, "model": 1}
    # data=4 x model=2 with grad_accum=1: the same numbers again.
    tp = _losses(runs["tmp"] / "dev4x2" / "metrics.jsonl")
    assert sorted(tp) == [1, 2]
    for s in tp:
        np.testing.assert_allclose(tp[s]["loss"], ref[s]["loss"], rtol=2e-5, err_msg=f"4x2 step {s}")
    assert json.loads((runs["tmp"] / "dev4x2" / "run.json").read_text())["mesh"] == {"data": 4, "model": 2}
    # The 8-device run stopped after step 4 (last checkpoint 3); resumed here on one device, the
    # FSDP-sharded state is resharded on restore and the run ends where the reference ended.
    res = finetune(runs["base"], _records(), runs["tok"], TrainConfig(**TRAIN), dev8_dir,
                   eval_records=_eval_records(), progress=False)
    assert sorted(res.losses) == list(range(4, N_STEPS + 1))
    for s, loss in res.losses.items():
        np.testing.assert_allclose(loss, ref[s]["loss"], rtol=1e-4, err_msg=f"resumed step {s}")


def test_kill_and_resume_continues_exactly(runs):
    from sparcom_jax.train import TrainConfig, checkpoint_steps, finetune

    code, out = runs["pk"].result()
    assert code == 17, out[-3000:]
    killed = runs["tmp"] / "killed"
    ref = _losses(runs["ref"].metrics_path)
    before_kill = _losses(killed / "metrics.jsonl")
    # Same seed, fresh process: the same losses, bit for bit, up to the kill.
    assert sorted(before_kill) == list(range(1, KILL_AFTER + 1))
    assert all(before_kill[s]["loss"] == ref[s]["loss"] for s in before_kill)
    saved = checkpoint_steps(killed)
    assert saved and max(saved) in (3, 6), saved  # 6 may have been in flight when the process died
    res = finetune(runs["base"], _records(), runs["tok"], TrainConfig(**TRAIN), killed,
                   eval_records=_eval_records(), progress=False)
    resumed_from = max(saved)
    assert sorted(res.losses) == list(range(resumed_from + 1, N_STEPS + 1))
    for s, loss in res.losses.items():
        assert loss == ref[s]["loss"], (s, loss, ref[s]["loss"])
    # The metrics file reads as one run: each step once, ending with the reference's last loss.
    merged = _losses(killed / "metrics.jsonl")
    assert sorted(merged) == list(range(1, N_STEPS + 1))
    assert merged[N_STEPS]["loss"] == ref[N_STEPS]["loss"]
    assert res.checkpoint_steps == [0, 6, 8]
    # A different setting on the same directory is refused, naming the field.
    with pytest.raises(ValueError, match=r"learning_rate: 0.01 -> 0.02"):
        finetune(runs["base"], _records(), runs["tok"], TrainConfig(**{**TRAIN, "learning_rate": 2e-2}), killed,
                 progress=False)


def test_a_killed_and_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(runs):
    """The losses above are those of the parameters before each update, so the run's last update
    is not among them: the final weights ("after", and the checkpoint the series exports) must be
    the reference's, bit for bit. (Run alone, this call resumes the killed run; after the test
    above, it reuses the finished run.)"""
    from sparcom_jax.train import TrainConfig, finetune, load_checkpoint_model

    code, out = runs["pk"].result()
    assert code == 17, out[-3000:]
    killed = runs["tmp"] / "killed"
    res = finetune(runs["base"], _records(), runs["tok"], TrainConfig(**TRAIN), killed,
                   eval_records=_eval_records(), progress=False)
    want = _flat(runs["ref"].model)
    for got in (_flat(res.model), _flat(load_checkpoint_model(killed, N_STEPS))):
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))


def test_a_resumed_run_says_where_it_resumed(tmp_path, capfd):
    """A run stopped after step 1 (checkpoint 1), then run again: the user is told it resumes
    there rather than seeing a progress bar that starts part-way; a finished run says it is reused."""
    from sparcom_jax.data import default_tokenizer, sample_balanced
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import finetune, TrainConfig

    tok = default_tokenizer()
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}))
    records = sample_balanced(_records(), 1, seed=0)
    cfg = TrainConfig(batch_size=6, max_length=64, buckets=(64,), total_steps=2, warmup_steps=1, save_every=1,
                      allow_cut_responses=True)
    run = tmp_path / "run"
    finetune(model, records, tok, cfg, run, progress=False, callback=lambda step, row: step == 1)
    capfd.readouterr()
    res = finetune(model, records, tok, cfg, run, progress=True)
    assert sorted(res.losses) == [2]
    err = capfd.readouterr().err
    assert f"{run}: an earlier run with the same settings stopped after step 1 of 2; resuming" in err
    finetune(model, records, tok, cfg, run, progress=True)
    assert f"{run}: already trained to step 2 with the same settings; reusing it" in capfd.readouterr().err


# One process of a two-process fine-tuning run (1 CPU device each): the run of _two_steps.
TWO_PROCESS_STEPS = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, sys.argv[4])
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from test_train_loop import _two_steps
_, res = _two_steps(out)
params = nnx.state(res.model, nnx.Param)
whole = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
if pid == 0:
    np.savez(out + ".npz", *jax.tree.leaves(whole))
jax.distributed.shutdown()
"""


def _two_steps(out):
    """Two steps of a tiny Llama on 12 shipped records (max_length 128 cuts two before their response), batch 4
    (the same global batch however many processes): (the base model, the FinetuneResult)."""
    import sparcom_jax as sj
    from sparcom_jax.data import default_tokenizer, sample_balanced
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    tok = default_tokenizer()
    cfg = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    records = sample_balanced(_records(), 2, seed=0)
    tc = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=2, batch_size=4, grad_accum=1, max_length=128,
                     buckets=(128,), save_every=100, async_checkpointing=False, seed=3, allow_cut_responses=True)
    base = sj.init_model(cfg, seed=0)
    return base, finetune(base, records, tok, tc, out, progress=False, eval_records=records[:6])


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    """Two processes (one device each, the batch and the FSDP-sharded state split over both,
    orbax writing their checkpoints together) take the steps one process takes on the
    same global batch: the same parameters, to float rounding (one device sums the
    gradient in another order)."""

    import jax
    from flax import nnx

    (tmp_path / "run.py").write_text(TWO_PROCESS_STEPS)
    run_processes(lambda i, port: [str(tmp_path / "run.py"), str(i), port, str(tmp_path / "two"),
                                   str(Path(__file__).parent)])
    base, one = _two_steps(tmp_path / "one")
    leaves = [[np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))] for m in (base, one.model)]
    got = np.load(tmp_path / "two.npz")
    assert len(got.files) == len(leaves[1])
    for i, (b, r) in enumerate(zip(*leaves)):
        assert np.abs(r - b).max() > 1e-3  # two steps move every parameter far beyond the tolerance
        np.testing.assert_allclose(got[f"arr_{i}"], r, atol=1e-5, rtol=0, err_msg=f"parameter {i}")
    assert sorted(json.loads((tmp_path / "two" / "run.json").read_text())["mesh"].items()) == [("data", 2), ("model", 1)]
    assert {p.name for p in (tmp_path / "two" / "checkpoints").iterdir()} >= {"0", "2"}
