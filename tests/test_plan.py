"""The dry run's numbers against what they plan, computed another way.

Each plan figure is checked against an independent computation: the compiled counting
program's own memory analysis on meshes that split the model and the batch (per device),
the arrays alive on the device while a collection runs, the parameters of a model built
with `abstract_model` and the shards jax lays out for them, the optimizer state optax
builds for them, and hand arithmetic from the config the test writes. Never against
numbers read off the plan itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparcom_jax as sj
from sparcom_jax.config import ExperimentConfig, from_dict

LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4)
MIXTRAL = dict(model_type="mixtral", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
QWEN2_MOE = dict(model_type="qwen2_moe", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=128, shared_expert_intermediate_size=4096)

# name -> (architecture, moe_impl, program structure of (backend, attention), B rows per device, T,
# meshes (data, model)): each makes one term the largest, so that a term planned wrong (or not
# split over the model axis, or split over the data axis where the program does not split it)
# moves the total.
CASES = {
    "dense FFN": (LLAMA, "auto", "gpu", "blocked", 8, 128, [(1, 1), (1, 4), (2, 2)]),
    "attention": (LLAMA, "auto", "gpu", "blocked", 2, 768, [(1, 1), (1, 4)]),
    "experts, capacity buffer": (MIXTRAL, "auto", "gpu", "blocked", 8, 128, [(1, 1), (1, 4), (4, 1)]),
    "experts, CPU expert loop": (MIXTRAL, "auto", "cpu", "blocked", 8, 128, [(1, 1), (1, 4), (2, 2)]),
    "experts, tiles": (MIXTRAL, "tiled", "cpu", "blocked", 8, 128, [(1, 1), (1, 4), (4, 1)]),
    "shared expert": (QWEN2_MOE, "auto", "gpu", "blocked", 8, 128, [(1, 1), (1, 4)]),
}
# The causal check's loss forward, as CASES: the float32 logits the largest (a vocabulary of
# 8,192, split over the model axis), and the MoE strategies of forwards that count nothing
# ("auto" on CPU: the tiles).
LOSS_CASES = {
    "logits": (dict(LLAMA, vocab_size=8192), "auto", "cpu", "blocked", 8, 128, [(1, 4)]),
    "experts, tiles": (MIXTRAL, "auto", "cpu", "blocked", 8, 128, [(1, 1), (1, 4), (4, 1)]),
    "experts, capacity buffer": (MIXTRAL, "auto", "gpu", "blocked", 8, 128, [(4, 1)]),
}

SHARDED_STEPS = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    import sparcom_jax as sj
    from sparcom_jax.models.dispatch import Dispatch
    from sparcom_jax.parallel.sharding import param_shardings
    from sparcom_jax.stats.collect import _count_sums_step
    from sparcom_jax.stats.losses import _loss_step
    from sparcom_jax.stats.runner import _compiled

    def memory(kind, hf, impl, backend, attention, B, T, data, model):
        cfg = sj.ModelConfig.from_hf_config(hf)
        dispatch = Dispatch.choose(impl, backend=backend, attention=attention)
        graphdef, state = nnx.split(sj.abstract_model(cfg, moe_impl=dispatch))
        mesh = sj.make_mesh(data=data, model=model, devices=jax.devices()[:data * model])
        shardings = param_shardings(state, mesh)  # as the collection lays the weights out (BatchRunner)
        state = nnx.from_flat_state([(k, v.replace(value=jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])))
                                     for k, v in nnx.to_flat_state(state)])
        rows = NamedSharding(mesh, P("data"))
        ids = jax.ShapeDtypeStruct((B * data, T), jnp.int32, sharding=rows)
        valid = jax.ShapeDtypeStruct((B * data, T), jnp.bool_, sharding=rows)
        # the program the collection (with the sums) or the causal check runs (BatchRunner: outputs
        # split over the data axis)
        if kind == "count":
            step = _compiled(graphdef, _count_sums_step, rows).lower(state, ids, valid, valid, None).compile()
        else:  # the loss step takes each token's code (scored / counted bits) and its extra inputs
            code = jax.ShapeDtypeStruct((B * data, T), jnp.int8, sharding=rows)  # as scope_codes makes them
            step = _compiled(graphdef, _loss_step, rows).lower(state, ids, valid, code, {"ablate": None}).compile()
        mem = step.memory_analysis()  # per device: the program each device runs
        return mem.temp_size_in_bytes, mem.output_size_in_bytes

    print("MEMORY", json.dumps({f"{kind}|{name}|{data}|{model}": memory(kind, *args[:6], data, model)
                                for kind, cases in json.loads(sys.argv[1]).items()
                                for name, args in cases.items() for data, model in args[6]}))
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(case, data axis, model axis): (temporary bytes, output bytes) per device of the counting
    step with the sums, as the collection compiles it; ("loss", case, data, model): the same of
    the causal check's loss step}, all compiled in one process of 4 CPU devices."""
    script = tmp_path_factory.mktemp("plan") / "steps.py"
    script.write_text(SHARDED_STEPS)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(script), json.dumps({"count": CASES, "loss": LOSS_CASES})], env=env,
                       timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = {}
    for key, v in json.loads(r.stdout.split("MEMORY")[1]).items():
        kind, name, data, model = key.split("|")
        out[(*(() if kind == "count" else ("loss",)), name, int(data), int(model))] = tuple(v)
    return out


def _dispatch(case, cases=CASES):
    from sparcom_jax.models.dispatch import Dispatch

    hf, impl, backend, attention = cases[case][:4]
    return sj.ModelConfig.from_hf_config(hf), Dispatch.choose(impl, backend=backend, attention=attention)


@pytest.mark.parametrize("case", sorted(CASES))
def test_activations_per_device_agree_with_the_compiled_step_on_model_and_data_axes(compiled, case):
    """The plan's activation bytes for one device, against XLA's buffer assignment of the
    counting step compiled on that mesh (per device): on one device, on a model axis of 4
    that splits heads, FFN neurons and experts, and on a data axis: within the plan's stated
    30%, the MoE strategies within 0.8-1.1x. Planned as on one device (the model split left
    out), each case's largest term is 4x too large. On a data axis each device holds the
    routed buffers of its own rows only (the MoE layer sorts each data shard's rows apart):
    planned for the whole batch's rows, the capacity buffer's case is 0.3x the compiled step
    on a data axis of 4. The expert loop and the tiles gather a layer's experts to every
    device of the model axis: planned as split, 1.16x too small."""
    from sparcom_jax.pipeline.plan import count_activation_bytes

    cfg, dispatch = _dispatch(case)
    B, T, meshes = CASES[case][4:]
    lo, hi = (0.8, 1.1) if cfg.is_moe else (0.7, 1.3)
    for data, model in meshes:
        planned = count_activation_bytes(cfg, dispatch, B, T, "float32", model)
        temp = compiled[case, data, model][0]
        assert lo <= temp / planned <= hi, (data, model, temp, planned)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_batch_s_counts_are_what_the_compiled_step_returns_to_each_device(compiled, case):
    """What one counting step leaves on each device until the host fetches it (`step_nbytes`)
    is the compiled step's output: the counts in 1 byte (T < 256) or 2 (the attention case's
    768), their float32 sums, tokens and non-finite flags, for the device's own rows and
    every unit: on a model axis the collection gathers the units' counts to every device
    (its outputs are split over the data axis only), so they are not split by the model axis.
    Within 64 bytes (XLA's table of the output tuple)."""
    from sparcom_jax.stats.collect import step_nbytes

    cfg, _ = _dispatch(case)
    B, T, meshes = CASES[case][4:]
    for data, model in meshes:
        out = compiled[case, data, model][1]
        assert 0 <= out - sum(step_nbytes(cfg, B, T, sums=True).values()) <= 64, (data, model, out)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_the_causal_check_s_activations_agree_with_its_compiled_loss_step(compiled, case):
    """The plan's loss-forward bytes (`loss_activation_bytes`) against the causal check's loss
    step compiled on that mesh, per device, within the stated 30%: its float32 logits and their
    log-probabilities (4x too large if planned unsplit on a model axis of 4; absent from the
    plan before), and the MoE forward's routed buffers with the strategy of forwards that count
    nothing, which keeps no activations in the tiles."""
    from sparcom_jax.pipeline.plan import loss_activation_bytes

    cfg, dispatch = _dispatch(case, LOSS_CASES)
    B, T, meshes = LOSS_CASES[case][4:]
    for data, model in meshes:
        planned = loss_activation_bytes(cfg, dispatch, B, T, "float32", model)
        temp = compiled["loss", case, data, model][0]
        assert 0.7 <= temp / planned <= 1.3, (data, model, temp, planned)


def test_the_causal_check_s_row_plans_each_process_s_own_devices(compiled):
    """The ablate stage plans its loss forward: each process runs its passes alone on its own
    devices, so 8 devices of 2 processes (data 8) run the passes on meshes of data 4, and
    ablation.batch_size 32 is 8 rows per device: the loss step compiled for 8 rows a device on
    a data axis of 4 (planned on the whole data axis of 8, 4 rows a device: half of it)."""
    from sparcom_jax.pipeline.plan import memory_plan

    assert LOSS_CASES["experts, tiles"][4:6] == (8, 128)
    plan = memory_plan(_config(architecture=MIXTRAL, data={"n_per_category": 2, "max_length": 128},
                               ablation={"batch_size": 32}, mesh={"devices": 8, "num_processes": 2}), "ablate")
    (name, _, total, per), = [r for r in plan["rows"] if r[0].startswith("forward activations")]
    assert "causal check, B=8/device" in name and "tiled" in name and total == 8 * per
    assert 0.7 <= compiled["loss", "experts, tiles", 4, 1][0] / per <= 1.3


def _config(**sections) -> ExperimentConfig:
    return from_dict(ExperimentConfig, {"name": "plan", "architecture": LLAMA, **sections}, source="test")


def _rows(plan) -> dict[str, tuple[int, int]]:
    """{row name up to its first "[" or " (": (total, per device)}."""
    return {name.split("[")[0].split(" (")[0].strip(): (total, per) for name, _, total, per in plan["rows"]}


def _counts_per_device(plan) -> int:
    return sum(per for name, _, _, per in plan["rows"] if name.startswith("counts "))


def test_collection_rows_on_a_data_and_model_mesh(compiled):
    """8 devices = data 2 x model 4, 16 sequences a batch: each device counts 8 rows, and its
    activations are the step compiled for 8 rows on the model axis (the "dense FFN" case); the
    total is the two data replicas'. The count rows are the step's outputs (less the tokens
    and flags) of the batches in flight: the runner fetches each batch's counts
    PIPELINE_DEPTH batches after it dispatched it, so that many wait on the device beside the
    one being counted (test_the_counts_of_the_batches_in_flight_are_those_alive_on_the_device)."""
    from sparcom_jax.pipeline.plan import memory_plan
    from sparcom_jax.stats.runner import PIPELINE_DEPTH

    assert CASES["dense FFN"][4:6] == (8, 128)
    plan = memory_plan(_config(data={"n_per_category": 2, "max_length": 128}, collect={"batch_size": 16},
                               mesh={"devices": 8, "model": 4}), "collect")
    assert (plan["mesh"]["data"], plan["mesh"]["model"]) == (2, 4)
    rows = _rows(plan)
    total, per = rows["forward activations"]
    temp, out = compiled["dense FFN", 1, 4]
    assert 0.7 <= temp / per <= 1.3 and total == 2 * per
    assert 0.99 <= _counts_per_device(plan) / ((PIPELINE_DEPTH + 1) * out) <= 1
    assert rows["counts neuron_active"][0] == 2 * rows["counts neuron_active"][1]
    # the store: N records of int32 token counts, counts and float32 sums [L, F] (collect.sums)
    L, F = LLAMA["num_hidden_layers"], LLAMA["intermediate_size"]
    store = plan["count_store"]
    assert store["n_instructions"] == 12 and store["bytes_per_model"] == 12 * (4 + 2 * L * F * 4)


def test_collection_rows_plan_the_moe_strategy_the_config_asks_for(compiled):
    """collect.moe_impl=capacity on this CPU: the plan is that of the capacity buffer (the step
    compiled with it, on the model axis and on the data axis), not of the expert loop "auto"
    picks here; its count rows are the batches in flight of the step's counts and sums."""
    from sparcom_jax.pipeline.plan import memory_plan
    from sparcom_jax.stats.runner import PIPELINE_DEPTH

    assert CASES["experts, capacity buffer"][0] is MIXTRAL and CASES["experts, capacity buffer"][4:6] == (8, 128)
    for data, model in ((1, 4), (4, 1)):
        plan = memory_plan(_config(architecture=MIXTRAL, data={"n_per_category": 2, "max_length": 128},
                                   collect={"batch_size": 8 * data, "moe_impl": "capacity"},
                                   mesh={"devices": 4, "model": model}), "collect")
        (name, _, total, per), = [r for r in plan["rows"] if r[0].startswith("forward activations")]
        temp, out = compiled["experts, capacity buffer", data, model]
        assert name.endswith("capacity)") and total == data * per
        assert 0.7 <= temp / per <= 1.3, (data, model, temp, per)
        assert 0.99 <= _counts_per_device(plan) / ((PIPELINE_DEPTH + 1) * out) <= 1, (data, model)


def test_count_rows_without_the_sums_are_the_counts_in_their_transfer_dtype():
    """collect.sums=false: the step returns the counts alone, 1 byte each below 256 tokens and
    2 up to 65,535 (the compiled step's output on one device, 8 rows); the plan's count rows
    are those of the batches in flight, named with the dtype."""
    from sparcom_jax.models.dispatch import Dispatch
    from sparcom_jax.pipeline.plan import memory_plan
    from sparcom_jax.stats.collect import _count_step
    from sparcom_jax.stats.runner import PIPELINE_DEPTH

    cfg = sj.ModelConfig.from_hf_config(LLAMA)
    graphdef, state = nnx.split(sj.abstract_model(cfg, moe_impl=Dispatch.choose("auto")))
    for T, dtype in ((128, "uint8"), (300, "uint16")):
        ids, valid = jax.ShapeDtypeStruct((8, T), jnp.int32), jax.ShapeDtypeStruct((8, T), jnp.bool_)
        out = jax.jit(_count_step, static_argnums=0).lower(graphdef, state, ids, valid, valid).compile()
        plan = memory_plan(_config(data={"n_per_category": 2, "max_length": T},
                                   collect={"batch_size": 8, "sums": False}, identify={"ties": "keep"},
                                   mesh={"devices": 1}), "collect")
        (name, *_), = [r for r in plan["rows"] if r[0].startswith("counts ")]
        assert f"] {dtype}" in name, name
        ratio = _counts_per_device(plan) / ((PIPELINE_DEPTH + 1) * out.memory_analysis().output_size_in_bytes)
        assert 0.99 <= ratio <= 1, (T, ratio)


def test_the_counts_of_the_batches_in_flight_are_those_alive_on_the_device():
    """While a collection runs, the count arrays alive on the device at once (jax.live_arrays,
    as each batch is fetched) are those of PIPELINE_DEPTH + 1 batches, the number the plan's
    count rows hold: one being fetched and those dispatched after it."""
    from sparcom_jax.stats.collect import _count_step
    from sparcom_jax.stats.runner import PIPELINE_DEPTH, BatchRunner

    cfg = sj.ModelConfig.from_hf_config(dict(LLAMA, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_key_value_heads=2))
    runner = BatchRunner(sj.init_model(cfg, seed=0), _count_step, batch_size=2, buckets=(16,))
    shape = (2, cfg.num_layers, cfg.intermediate_size)
    alive = []

    def on_batch(_):
        alive.append(sum(a.shape == shape for a in jax.live_arrays()))

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, 16) for _ in range(12)]
    batches = 0
    for _, res in runner.run(seqs, None, on_batch=on_batch):
        batches += 1
        del res  # on a CPU the fetched counts may view the device's buffer: as the collection, keep none
    assert batches == 6
    assert max(alive) == PIPELINE_DEPTH + 1, alive


def test_one_layer_s_weights_are_the_stacked_layers_over_their_count():
    """The activation plan adds one scanned layer's weights: the "blocks" parameters (stacked
    over the layers) divided by the layer count, without the embeddings, the final norm and
    the head. On one device the parameter rows count (and hold) every parameter."""
    from sparcom_jax.pipeline.plan import param_plan

    for hf in (LLAMA, QWEN2_MOE):
        for dtype in ("float32", "bfloat16"):
            params = nnx.to_flat_state(nnx.state(sj.abstract_model(sj.ModelConfig.from_hf_config(hf), dtype=dtype),
                                                 nnx.Param))
            stacked = sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for k, v in params if k[0] == "blocks")
            p = param_plan(sj.ModelConfig.from_hf_config(hf), dtype, 1, 1)
            assert p["layer_bytes_per_device"] == stacked / hf["num_hidden_layers"], (hf["model_type"], dtype)
            assert p["bytes"] == p["bytes_per_device"] == sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize
                                                              for _, v in params)
            assert p["params"] == p["params_per_device"] == sum(math.prod(v.shape) for _, v in params)


@pytest.mark.parametrize("optimizer,b1", [("adamw", 0.9), ("lion", 0.9), ("sgd", 0.9), ("sgd", 0.0)])
def test_training_rows_are_the_state_optax_builds_and_one_micro_batch_s_logits_and_activations(optimizer, b1):
    """The training state is float32 parameters, their gradients and the optimizer state that
    `make_optimizer` builds for them (jax.eval_shape of its init: Adam's two moments, Lion's
    one, SGD's momentum trace, none without momentum), split over the 8 devices by the FSDP
    rules (all but the norms divide). Each device runs batch_size / grad_accum / data rows:
    float32 logits and their gradient [B, T, V], and about 4 [B, T, D] activations per layer in
    the compute dtype."""
    from sparcom_jax.pipeline.plan import memory_plan
    from sparcom_jax.pipeline.stages import train_config
    from sparcom_jax.train.optim import make_optimizer

    cfg = _config(finetuned=None, data={"n_per_category": 2, "max_length": 128}, train_data={"n_per_category": 2},
                  train={"batch_size": 16, "grad_accum": 2, "max_length": 64, "optimizer": optimizer, "b1": b1,
                         "compute_dtype": "bfloat16", "allow_cut_responses": True},
                  mesh={"devices": 8, "model": 4})
    with pytest.warns(Warning):  # the shipped records cut at 64 tokens: said, and allowed
        rows = _rows(memory_plan(cfg, "finetune"))
    params = nnx.to_pure_dict(nnx.state(sj.abstract_model(sj.ModelConfig.from_hf_config(LLAMA)), nnx.Param))
    tx, _ = make_optimizer(train_config(cfg), 10)
    moments = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)) if x.ndim)
    weights = sum(x.size * 4 for x in jax.tree.leaves(params))
    total, per = rows["training state"]
    assert total == 2 * weights + moments
    assert abs(per * 8 / total - 1) < 0.01
    B, T, V, D, L = 16 // 2 // 2, 64, LLAMA["vocab_size"], LLAMA["hidden_size"], LLAMA["num_hidden_layers"]
    assert rows["logits+grad"] == (2 * 2 * B * T * V * 4, 2 * B * T * V * 4)
    assert rows["saved activations ~4x"] == (2 * 4 * B * T * D * L * 2, 4 * B * T * D * L * 2)


def test_every_process_holds_the_analysis_and_one_model_s_merged_counts(tmp_path):
    """16 processes analyse (evaluate, compare and report in full; identify the sets alone):
    each holds its analysis and one model's merged counts, the whole store of a model and
    the share of it one process read (rounded up). The store of N = 6 records (one per
    category of an absent data file) is N x (4 token bytes + int32 counts and float32 sums
    [L, F]); 16 does not divide it."""
    from sparcom_jax.pipeline.plan import memory_plan

    L, F = LLAMA["num_hidden_layers"], LLAMA["intermediate_size"]
    store = 6 * (4 + 2 * L * F * 4)
    assert store % 16
    cfg = _config(data={"path": str(tmp_path / "absent.jsonl"), "n_per_category": 1},
                  mesh={"devices": 16, "num_processes": 16})
    plans = {stage: memory_plan(cfg, stage)["analysis_host"] for stage in ("identify", "evaluate", "compare", "report")}
    for stage, a in plans.items():
        assert a["merged_counts"] == store + -(-store // 16)
        assert a["per_process"] == a["peak"] + store + -(-store // 16), stage
        assert a["full"] == (stage != "identify")
    assert plans["report"]["peak"] == plans["evaluate"]["peak"] == plans["compare"]["peak"] > plans["identify"]["peak"]
