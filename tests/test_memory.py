"""Random initialisation on the device: peak memory, sharded creation, the seed's values.

The paper's largest model (Mixtral-8x7B, 87 GiB in bfloat16) must initialise on one
141 GB card. These tests check on CPU what makes that possible: the whole init is one
compiled program whose buffers are the weights plus one layer's sample, and a mesh
gives the same values as one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

import sparcom_jax as sj
from sparcom_jax.models.dispatch import Dispatch
from sparcom_jax.models.transformer import CausalLM, _init_program

MIXTRAL = dict(model_type="mixtral", vocab_size=64, hidden_size=64, intermediate_size=512, num_hidden_layers=32,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def test_init_peak_holds_no_float32_copy_of_a_stacked_expert_weight():
    """The init program's own buffers (XLA's buffer assignment: what the device holds while
    it runs, CPU has no allocator statistics) are the bfloat16 weights as outputs plus
    temporaries smaller than one float32 copy of one stacked expert weight. Drawing the
    stack in one batched float32 sample needs 8x that here."""
    cfg = sj.ModelConfig.from_hf_config(MIXTRAL)
    _, program = _init_program(cfg, "bfloat16", None, Dispatch.choose("auto", dtype="bfloat16"), None, None, None)
    mem = program.lower(jax.random.key(0)).compile().memory_analysis()
    L, E, D, G = 32, 4, 64, 512
    stacked_f32 = L * E * D * G * 4
    assert abs(mem.output_size_in_bytes - cfg.param_count() * 2) < 1024  # the weights, in bfloat16 (+ the key)
    assert mem.temp_size_in_bytes < stacked_f32, (mem.temp_size_in_bytes, stacked_f32)


def test_init_model_values_are_those_of_the_eager_constructor():
    """One compiled program per architecture, the values of constructing the model directly
    (the per-layer sampler draws exactly what a batched draw over the layers draws)."""
    cfg = sj.ModelConfig.from_hf_config(dict(MIXTRAL, num_hidden_layers=2, intermediate_size=16))
    for dtype in ("float32", "bfloat16"):
        fast = sj.init_model(cfg, seed=5, dtype=dtype)
        eager = CausalLM(cfg, rngs=nnx.Rngs(5), dtype=dtype)
        other = sj.init_model(cfg, seed=6, dtype=dtype)
        for (k, a), (_, b), (_, c) in zip(nnx.to_flat_state(nnx.state(fast)), nnx.to_flat_state(nnx.state(eager)),
                                          nnx.to_flat_state(nnx.state(other))):
            assert a.value.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(k))
            if k[-1] in ("gate_proj", "embed"):  # random, so the seed matters
                assert not np.array_equal(np.asarray(a.value), np.asarray(c.value)), k


SHARDED_INIT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import json
    import numpy as np, jax
    from flax import nnx
    import sparcom_jax as sj
    assert len(jax.devices()) == 8
    cfg = sj.ModelConfig.from_hf_config(json.loads(sys.argv[1]))
    mesh = sj.make_mesh(data=2, model=4)
    sharded = sj.init_model(cfg, seed=1, dtype="bfloat16", mesh=mesh)
    plain = sj.init_model(cfg, seed=1, dtype="bfloat16")
    gate = sharded.blocks.ffn.gate_proj.value
    assert tuple(gate.sharding.spec)[:2] == (None, "model"), gate.sharding.spec  # experts over the model axis
    assert len({s.device for s in gate.addressable_shards}) == 8
    assert gate.addressable_shards[0].data.shape == (2, 1, 32, 16)  # a quarter of the experts per device
    shared = sharded.blocks.ffn.shared_expert.gate_proj.value
    assert tuple(shared.sharding.spec)[-1] == "model", shared.sharding.spec
    n = 0
    for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(plain))):
        assert len(b.value.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(k))
        n += 1
    from sparcom_jax.pipeline.plan import param_plan
    dev0 = jax.devices()[0]
    held = sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(sharded)) for s in v.value.addressable_shards
               if s.device == dev0)
    assert held == param_plan(cfg, "bfloat16", 2, 4)["bytes_per_device"], held  # the dry run's per-device row
    print("EQUAL", n)
""")


def test_sharded_init_on_8_devices_equals_the_unsharded_one(tmp_path):
    import json

    hf = dict(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, shared_expert_intermediate_size=40)
    script = tmp_path / "run.py"
    script.write_text(SHARDED_INIT)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}  # 8 host devices
    r = subprocess.run([sys.executable, str(script), json.dumps(hf)], env=env, timeout=300, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    n = int(r.stdout.split("EQUAL")[1])
    assert n == len(nnx.to_flat_state(nnx.state(sj.abstract_model(sj.ModelConfig.from_hf_config(hf)))))


def _plan_config(hf: dict, batch: int, max_length: int, dtype: str):
    from sparcom_jax.config import ExperimentConfig, from_dict

    return from_dict(ExperimentConfig, {"name": "plan-test", "architecture": hf,
                                        "data": {"n_per_category": 2, "max_length": max_length},
                                        "collect": {"batch_size": batch, "dtype": dtype}, "mesh": {"devices": 1}},
                     source="test")


def test_plan_weight_bytes_are_the_initialised_weights():
    from sparcom_jax.pipeline.plan import memory_plan

    hf = dict(MIXTRAL, num_hidden_layers=2)
    plan = memory_plan(_plan_config(hf, 4, 32, "bfloat16"), "collect", devices=1)
    rows = {r[0]: r for r in plan["rows"]}
    model = sj.init_model(sj.ModelConfig.from_hf_config(hf), dtype="bfloat16")
    held = sum(v.value.nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    assert rows["parameters (analysis, bfloat16)"][2] == rows["parameters (analysis, bfloat16)"][3] == held
    assert rows["parameters (float32)"][2] == 2 * held


LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)
MOE = dict(MIXTRAL, num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_local_experts=8)


@pytest.mark.parametrize("hf, backend, attention, B, T", [
    (LLAMA, "gpu", "blocked", 8, 256),
    (dict(LLAMA, hidden_size=64, intermediate_size=128), "gpu", "blocked", 2, 768),  # attention the larger
    (dict(LLAMA, hidden_size=64, intermediate_size=128), "cpu", "xla", 4, 384),
    (MOE, "gpu", "blocked", 4, 512),
    (MOE, "cpu", "blocked", 8, 64),
])
def test_plan_activations_agree_with_the_compiled_counting_step(hf, backend, attention, B, T):
    """The plan's activation bytes against XLA's buffer assignment of the counting step itself
    (compiled here, float32: CPU computes bfloat16 through float32 copies of its own), with
    the program structure of `backend` (the capacity buffer on GPU, the expert loop on CPU)
    and of the attention kernel (cuDNN's, with no score matrix, only on a GPU)."""
    import jax.numpy as jnp

    from sparcom_jax.pipeline.plan import count_activation_bytes
    from sparcom_jax.stats.collect import _count_step

    cfg = sj.ModelConfig.from_hf_config(hf)
    dispatch = Dispatch.choose("auto", backend=backend, attention=attention)
    graphdef, state = nnx.split(sj.abstract_model(cfg, moe_impl=dispatch))
    ids, valid = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.bool_)
    mem = jax.jit(_count_step, static_argnums=0).lower(graphdef, state, ids, valid, valid).compile().memory_analysis()
    planned = count_activation_bytes(cfg, dispatch, B, T, "float32")
    assert 0.7 <= mem.temp_size_in_bytes / planned <= 1.3, (mem.temp_size_in_bytes, planned)


def test_plan_count_store_holds_the_sums_beside_the_counts():
    """collect.sums (on by default) stores a float32 sum beside each count: the plan's store
    is twice the counts, and is what an in-memory collection is checked against."""
    from sparcom_jax.pipeline.plan import memory_plan

    hf = dict(MIXTRAL, num_hidden_layers=2)  # L=2, E=4, G=512, no shared expert
    cfg = _plan_config(hf, 4, 32, "float32")
    assert cfg.collect.sums
    store = memory_plan(cfg, "collect", devices=1)["count_store"]
    assert store["bytes_per_instruction"] == 4 + 2 * 4 * (2 * 4 + 2 * 4 * 512)  # tokens + (counts + sums)
    assert set(store["fields"]) == {"expert_routed", "expert_neuron_active", "expert_weight_sum",
                                    "expert_neuron_act_sum"}
