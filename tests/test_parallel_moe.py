"""An MoE layer on a data axis: each data shard routes, sorts and computes only its own rows.

The layer sorts its token-expert assignments to give every expert one contiguous group.
Sorted over the whole batch, that made XLA gather every data device's rows to every
device, which then did the routed experts' work of the whole batch (FLOPs per device
3.84x at a data axis of 4 with fixed rows per device). Each data shard now sorts its own
rows (`jax.shard_map` over "data", the model axis left to XLA). Checked here on 4
simulated CPU devices: the counts of every strategy equal, integer for integer, those of
one device on data axes of 2 and 4, a model axis of 2 and both; the logits to float
rounding; and the compiled step's FLOPs per device do not grow with the data axis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from launch import clean_env

STRATEGIES = ("looped", "tiled", "capacity", "ragged", "grouped")
MESHES = ((2, 1), (4, 1), (1, 2), (2, 2))

# What every script below starts with: 4 simulated CPU devices, set before jax is imported.
PRELUDE = textwrap.dedent("""
    import os, sys, json, warnings
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    import sparcom_jax as sj
""")

SHARDED_RUNS = PRELUDE + textwrap.dedent("""
    from sparcom_jax.stats.runner import BatchRunner

    def logits_step(graphdef, state, ids, valid, scope, extra):
        return {"logits": nnx.merge(graphdef, state).forward(ids, valid).logits}

    # A shared expert beside 8 routed experts (4 per device on a model axis of 2).
    cfg = sj.ModelConfig.from_hf_config(dict(
        model_type="qwen2_moe", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=32))
    rng = np.random.default_rng(5)
    seqs = [rng.integers(3, 96, size=int(rng.integers(2, 30))) for _ in range(11)]
    scopes = [rng.random(len(s)) < 0.6 for s in seqs]
    out = {}
    for impl in sys.argv[2].split(","):
        model = sj.init_model(cfg, seed=1, moe_impl=impl)
        for data, model_axis in [(0, 0)] + [tuple(m) for m in eval(sys.argv[3])]:
            mesh = None if data == 0 else sj.make_mesh(data=data, model=model_axis,
                                                       devices=jax.devices()[:data * model_axis])
            c = sj.collect_counts(model, seqs, scopes, batch_size=4, mesh=mesh, progress=False, sums=True,
                                  buckets=[32])
            runner = BatchRunner(model, logits_step, 4, mesh=mesh, buckets=[32])
            logits = np.zeros((len(seqs), 32, 96), np.float32)
            for idx, res in runner.run(seqs, None):
                logits[idx] = res["logits"]
            for name, arr in {"tokens": c.tokens, **c.arrays(), **c.sums(), "logits": logits}.items():
                out[f"{impl}|{data}|{model_axis}|{name}"] = np.asarray(arr)
    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """{(strategy, data, model, field): array} from one process of 4 CPU devices; (0, 0) is
    the run without a mesh (one device)."""
    tmp = tmp_path_factory.mktemp("moe_shards")
    (tmp / "run.py").write_text(SHARDED_RUNS)
    r = subprocess.run([sys.executable, str(tmp / "run.py"), str(tmp / "out.npz"), ",".join(STRATEGIES),
                        json.dumps(MESHES)], env=clean_env(), timeout=900, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = np.load(tmp / "out.npz")
    out = {}
    for key in got.files:
        impl, data, model, name = key.split("|")
        out[impl, int(data), int(model), name] = got[key]
    return out


@pytest.mark.parametrize("impl", STRATEGIES)
def test_counts_on_data_and_model_axes_equal_one_device_s(sharded, impl):
    """Every count (tokens, routed tokens per expert, active neurons per expert and of the
    shared expert) is the same integer on one device and on data axes of 2 and 4, a model
    axis of 2 and data 2 x model 2; the float sums and the logits agree to float rounding."""
    one = {name: v for (i, d, m, name), v in sharded.items() if i == impl and d == 0}
    assert {"tokens", "expert_routed", "expert_neuron_active", "neuron_active", "logits"} <= set(one)
    assert one["expert_routed"].sum() > 0 and one["expert_neuron_active"].sum() > 0
    for data, model in MESHES:
        for name, want in one.items():
            got = sharded[impl, data, model, name]
            if np.issubdtype(want.dtype, np.integer):
                np.testing.assert_array_equal(got, want, err_msg=f"{impl} {name} on data {data} x model {model}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{impl} {name} on data {data} x model {model}")


COMPILED_WORK = PRELUDE + textwrap.dedent("""
    from jax.sharding import NamedSharding, PartitionSpec as P
    import sparcom_jax as sj
    from sparcom_jax.models.dispatch import Dispatch
    from sparcom_jax.parallel.sharding import param_shardings
    from sparcom_jax.stats.collect import _count_sums_step
    from sparcom_jax.stats.runner import _compiled

    cfg = sj.ModelConfig.from_hf_config(dict(
        model_type="mixtral", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2))

    def work(impl, backend, data, B=4, T=128):
        # The counting step as the collection compiles it (BatchRunner), B rows per device.
        graphdef, state = nnx.split(sj.abstract_model(cfg, moe_impl=Dispatch.choose(impl, backend=backend)))
        mesh = sj.make_mesh(data=data, model=1, devices=jax.devices()[:data])
        sh = param_shardings(state, mesh)
        state = nnx.from_flat_state([(k, v.replace(value=jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k])))
                                     for k, v in nnx.to_flat_state(state)])
        rows = NamedSharding(mesh, P("data"))
        ids, valid = (jax.ShapeDtypeStruct((B * data, T), dt, sharding=rows) for dt in (jnp.int32, jnp.bool_))
        step = _compiled(graphdef, _count_sums_step, rows).lower(state, ids, valid, valid, None).compile()
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"], step.memory_analysis().temp_size_in_bytes

    print("WORK", json.dumps({f"{impl}|{data}": work(impl, backend, data)
                              for impl, backend in (("capacity", "gpu"), ("ragged", "tpu")) for data in (1, 4)}))
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """{(strategy, data axis): (FLOPs, temporary bytes) per device of the compiled counting
    step, 4 rows of 128 tokens per device}."""
    tmp = tmp_path_factory.mktemp("moe_work")
    (tmp / "work.py").write_text(COMPILED_WORK)
    r = subprocess.run([sys.executable, str(tmp / "work.py")], env=clean_env(), timeout=600, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return {(k.split("|")[0], int(k.split("|")[1])): tuple(v)
            for k, v in json.loads(r.stdout.split("WORK")[1]).items()}


@pytest.mark.parametrize("impl", ["capacity", "ragged"])
def test_a_data_axis_splits_the_routed_experts_work(work, impl):
    """With the same rows per device, a device of a data axis of 4 does the FLOPs of one
    device alone and holds the same temporaries, not the whole batch's (sorted over the
    whole batch: 3.84x the FLOPs and 3.3x the temporaries)."""
    flops1, temp1 = work[impl, 1]
    flops4, temp4 = work[impl, 4]
    assert flops1 > 0 and temp1 > 0
    assert flops4 / flops1 < 1.1, (flops4, flops1)
    assert temp4 / temp1 < 1.1, (temp4, temp1)


TRAIN_STEPS = PRELUDE + textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp, optax
    from flax import nnx, traverse_util
    import sparcom_jax as sj
    from sparcom_jax.train.step import init_state, make_shardings, make_train_step, pure_params

    cfg = sj.ModelConfig.from_hf_config(dict(
        model_type="qwen2_moe", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=32))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 96, size=(2, 8, 24)), jnp.int32)  # 2 micro-batches of 8 rows
    mask = jnp.asarray(np.arange(24) < rng.integers(5, 25, size=(2, 8, 1)))
    targets = mask & jnp.asarray(np.arange(24) > 0)
    params = pure_params(sj.init_model(cfg, seed=1))
    tx = optax.sgd(0.5)
    out = {}
    for impl in sys.argv[2].split(","):
        graphdef = nnx.graphdef(sj.abstract_model(cfg, param_dtype="float32", moe_impl=impl))
        for data, model in [(1, 1)] + [tuple(m) for m in eval(sys.argv[3])]:
            mesh = sj.make_mesh(data=data, model=model, devices=jax.devices()[:data * model])
            sh = make_shardings(cfg, tx, mesh)
            state, metrics = make_train_step(graphdef, tx, sh)(init_state(params, tx, sh), ids, mask, targets)
            out[f"{impl}|{data}|{model}|loss"] = np.asarray(metrics["loss"])
            out[f"{impl}|{data}|{model}|grad_norm"] = np.asarray(metrics["grad_norm"])
            for k, v in traverse_util.flatten_dict(state.params, sep="/").items():
                out[f"{impl}|{data}|{model}|{k}"] = np.asarray(v)
    np.savez(sys.argv[1], **out)
""")


@pytest.mark.parametrize("impl", ["tiled", "capacity"])
def test_a_training_step_on_data_and_model_axes_equals_one_device_s(tmp_path, impl):
    """The fine-tuning step (gradients through each data shard's routed experts, FSDP
    weights over the data axis) gives one device's loss, gradient norm and updated weights
    on data axes of 2 and 4 and data 2 x model 2, to float rounding: "tiled" (CPU training)
    and "capacity" (GPU)."""
    (tmp_path / "train.py").write_text(TRAIN_STEPS)
    r = subprocess.run([sys.executable, str(tmp_path / "train.py"), str(tmp_path / "out.npz"), impl,
                        json.dumps([(2, 1), (4, 1), (2, 2)])], env=clean_env(), timeout=600, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    one = {k.split("|", 3)[3]: got[k] for k in got.files if k.startswith(f"{impl}|1|1|")}
    assert len(one) > 10 and one["grad_norm"] > 0
    for data, model in [(2, 1), (4, 1), (2, 2)]:
        for name, want in one.items():
            np.testing.assert_allclose(got[f"{impl}|{data}|{model}|{name}"], want, rtol=2e-5, atol=1e-6,
                                       err_msg=f"{impl} {name} on data {data} x model {model}")


UNSPLIT_ROWS = PRELUDE + textwrap.dedent("""

    # A library user's own mesh: the model called under jax.set_mesh, not through BatchRunner.
    cfg = sj.ModelConfig.from_hf_config(dict(
        model_type="mixtral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))
    model = sj.init_model(cfg, seed=0, moe_impl="looped")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, valid: nnx.merge(graphdef, state).forward(ids, valid).logits)
    other = jax.jit(lambda state, ids, valid: nnx.merge(graphdef, state).forward(ids, valid).logits.sum())
    mesh = sj.make_mesh(data=4, model=1, devices=jax.devices()[:4])
    out = []
    with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in sys.argv[1].split(","):  # "6b": 6 rows through another program (a new trace)
            rows = int(call.rstrip("b"))
            ids = jnp.full((rows, 8), 5, jnp.int32)
            (other if call.endswith("b") else forward)(state, ids, jnp.ones((rows, 8), bool)).block_until_ready()
            out.append([rows, [str(w.message) for w in caught if "MoE layer" in str(w.message)]])
            caught.clear()
    print("WARNED", json.dumps(out))
""")


def test_rows_the_data_axis_does_not_divide_warn_once_per_shape(tmp_path):
    """A batch of 6 rows under a user's mesh with a data axis of 4 is sorted whole on every
    device (correct, up to 4x the work): one warning per shape, not per layer or call,
    naming the rows, the axis size and the fix; 8 rows (split) say nothing, nor do 6 rows
    again, in the same program or traced anew in another."""
    (tmp_path / "run.py").write_text(UNSPLIT_ROWS)
    r = subprocess.run([sys.executable, str(tmp_path / "run.py"), "8,6,6,6b,7"], env=clean_env(), timeout=600,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    calls = json.loads(r.stdout.split("WARNED")[1])
    assert [rows for rows, _ in calls] == [8, 6, 6, 6, 7]
    assert [len(msgs) for _, msgs in calls] == [0, 1, 0, 0, 1], calls
    for (rows, (msg,)), pad in ((calls[1], 8), (calls[4], 8)):
        for part in (f"{rows} rows", "'data' axis has 4 devices", "pad the batch to a multiple of 4",
                     f"(e.g. {pad})"):
            assert part in msg, msg
