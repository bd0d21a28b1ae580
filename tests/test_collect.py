"""The statistics engine against a plain PyTorch-hooks computation, invariances, stores, devices."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hf_fixtures import DENSE, VARIANTS, make_torch_model
from launch import clean_env, run_processes
from torch_reference import torch_counts

import sparcom_jax as sj
from sparcom_jax.errors import HostMemoryError


def make_inputs(n=7, vocab=96, seed=3, with_scopes=True):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, vocab, size=int(rng.integers(2, 21))) for _ in range(n)]
    scopes = None
    if with_scopes:
        scopes = [rng.random(len(s)) < 0.6 for s in seqs]
        scopes[0][:] = False  # a sequence with nothing in scope counts zero tokens
    return seqs, scopes


def _tiny_llama():
    """A random one-layer Llama for `make_inputs`' vocabulary, for what needs a model, not its numbers."""
    return sj.init_model(sj.ModelConfig.from_hf_config(dict(
        model_type="llama", vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)), seed=0)


def assert_counts_equal(ours, ref, tol_fraction=1e-3):
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref["tokens"])
    for field in ("neuron_active", "expert_routed", "expert_neuron_active"):
        a, b = getattr(ours, field), ref[field]
        if b is None:
            assert a is None, field
            continue
        a = np.asarray(a[:])
        assert a.shape == b.shape, (field, a.shape, b.shape)
        bad = np.mean(a != b)
        # Exact up to rare sign ties of activations within float rounding of zero.
        assert bad <= tol_fraction, f"{field}: {bad:.2%} of entries differ"
        assert a.sum() > 0, f"{field}: nothing counted; the test would prove nothing"


@pytest.mark.parametrize("with_scopes", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_counts_match_pytorch_hooks(variant, with_scopes, hf_checkpoint):
    seqs, scopes = make_inputs(with_scopes=with_scopes)
    ref = torch_counts(make_torch_model(variant), seqs, scopes)
    ours = sj.collect_counts(sj.load_model(hf_checkpoint(variant)), seqs, scopes, batch_size=3, progress=False)
    assert_counts_equal(ours, ref)
    cfg = sj.ModelConfig.from_pretrained(hf_checkpoint(variant))
    if variant in DENSE:
        assert ours.expert_routed is None and ours.expert_neuron_active is None
    else:
        # every counted token is routed to exactly k experts
        np.testing.assert_array_equal(ours.expert_routed.sum(-1),
                                      np.broadcast_to(ours.tokens[:, None] * cfg.top_k, ours.expert_routed.shape[:2]))


@pytest.mark.parametrize("variant", ["llama", "qwen2_moe"])
def test_counts_do_not_depend_on_batching_buckets_or_order(variant, hf_checkpoint):
    model = sj.load_model(hf_checkpoint(variant))
    seqs, scopes = make_inputs(n=9)
    base = sj.collect_counts(model, seqs, scopes, batch_size=4, progress=False)
    variants = [
        sj.collect_counts(model, seqs, scopes, batch_size=1, progress=False),
        sj.collect_counts(model, seqs, scopes, batch_size=9, buckets=[32], progress=False),
        sj.collect_counts(model, seqs, scopes, batch_size=2, buckets=[8, 12, 16, 24], progress=False),
    ]
    perm = np.random.default_rng(0).permutation(len(seqs))
    shuffled = sj.collect_counts(model, [seqs[i] for i in perm], [scopes[i] for i in perm], batch_size=4,
                                 progress=False)
    for field, arr in base.arrays().items():
        for other in variants:
            np.testing.assert_array_equal(getattr(other, field), arr)
        np.testing.assert_array_equal(getattr(shuffled, field), arr[perm])


def test_store_streams_and_reads_back_lazily(hf_checkpoint, tmp_path):
    model = sj.load_model(hf_checkpoint("mixtral"))
    seqs, scopes = make_inputs(n=11)
    ids = [f"r{i}" for i in range(11)]
    cats = [sj.CATEGORIES[i % 6] for i in range(11)]
    mem = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False)
    stored = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False, out=tmp_path / "s",
                               chunk_rows=4, ids=ids, categories=cats)
    from sparcom_jax.stats.store import LazyArray

    assert isinstance(stored.expert_neuron_active, LazyArray)
    assert stored.ids == ids and stored.categories == cats
    again = sj.open_counts(tmp_path / "s")
    for field, arr in mem.arrays().items():
        np.testing.assert_array_equal(getattr(again, field)[:], arr)
        np.testing.assert_array_equal(getattr(again, field)[4:9], arr[4:9])


def test_interrupted_collection_resumes_to_the_same_result(hf_checkpoint, tmp_path):
    model = sj.load_model(hf_checkpoint("qwen2_moe"))
    seqs, scopes = make_inputs(n=10)
    full = sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=out, chunk_rows=3,
                          _stop_after_chunks=2)
    assert json.loads((out / "progress.json").read_text())["done_chunks"] == 2
    with pytest.raises(ValueError, match="has not finished"):
        sj.open_counts(out)
    resumed = sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=out, chunk_rows=3)
    for field, arr in full.arrays().items():
        np.testing.assert_array_equal(getattr(resumed, field)[:], arr)
    # a store made for other inputs is never silently mixed in
    with pytest.raises(ValueError, match="different inputs"):
        sj.collect_counts(model, seqs[:5], None, out=out, chunk_rows=3, progress=False)


def faked_jax(monkeypatch, version):
    """`environment()` as under another jax (what a resume after an upgrade records)."""
    import sparcom_jax.fingerprint as F

    real = F._package_versions()
    monkeypatch.setattr(F, "_package_versions", lambda: {**real, "jax": version})


def test_a_store_resumed_under_another_environment_records_both_and_the_chunks_each_made(
        hf_checkpoint, tmp_path, monkeypatch):
    from sparcom_jax.fingerprint import environment, environment_parts, part_ranges, parts_line

    model = sj.load_model(hf_checkpoint("llama"))
    seqs, scopes = make_inputs(n=10)
    out = tmp_path / "store"
    with monkeypatch.context() as m:
        faked_jax(m, "0.0.1")
        old = environment()
        with pytest.raises(KeyboardInterrupt):
            sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=out, chunk_rows=3,
                              _stop_after_chunks=2)
    assert "environments" not in json.loads((out / "meta.json").read_text())["meta"]  # one run: one environment
    new = environment()
    with pytest.raises(KeyboardInterrupt):  # a resume that makes no chunk: its environment made nothing yet
        sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=out, chunk_rows=3,
                          _stop_after_chunks=0)
    sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=out, chunk_rows=3)
    meta = sj.open_counts(out).meta
    assert meta["environment"] == old  # the first, as readers of one environment take it
    parts = environment_parts(meta)
    assert parts == [{"environment": old, "from": 0, "unit": "chunk"}, {"environment": new, "from": 2, "unit": "chunk"}]
    assert part_ranges(parts, 4) == ["chunks 0-1", "chunks 2-3"]
    assert parts_line("counts", parts, part_ranges(parts, 4)) == (
        f"counts made under jax 0.0.1 (chunks 0-1) and jax {new['packages']['jax']} (chunks 2-3)")
    # a store made in one go, or before the list was kept, reads as one part
    assert environment_parts({"environment": new}) == [{"environment": new, "from": 0}]
    assert environment_parts({}) == []


def test_bad_inputs_are_named(hf_checkpoint):
    model = sj.load_model(hf_checkpoint("llama"))
    with pytest.raises(ValueError, match=r"sequence 1: token id 500 is outside"):
        sj.collect_counts(model, [np.array([1, 2]), np.array([3, 500])], progress=False)
    with pytest.raises(ValueError, match=r"scope 0: shape \(3,\) does not match"):
        sj.collect_counts(model, [np.array([1, 2])], [np.ones(3, bool)], progress=False)
    with pytest.raises(ValueError, match="sequence 0: expected a non-empty"):
        sj.collect_counts(model, [np.array([], np.int32)], progress=False)


@pytest.mark.parametrize("method", ["segment", "matmul"])
def test_expert_neuron_count_methods_match_brute_force(method):
    # Both in-graph reductions (segment sum for CPU, one-hot matmul for accelerators)
    # against a plain loop, on random routing with repeated experts across sequences.
    import jax.numpy as jnp

    from sparcom_jax.models.moe import expert_neuron_counts

    rng = np.random.default_rng(3)
    B, T, k, E, G = 3, 7, 2, 5, 11
    e_Nk = np.stack([rng.choice(E, k, replace=False) for _ in range(B * T)]).astype(np.int32)
    e_M = e_Nk.reshape(-1)
    tok_M = np.repeat(np.arange(B * T), k)
    seg_M = e_M * B + tok_M // T
    order = np.argsort(seg_M, kind="stable")
    inv = np.argsort(order)
    active_M = rng.random((B * T * k, G)) < 0.4  # in token order
    want = np.zeros((B, E, G), np.int64)
    for m in range(B * T * k):
        want[tok_M[m] // T, e_M[m]] += active_M[m]
    got = expert_neuron_counts(jnp.asarray(active_M[order]), jnp.asarray(seg_M[order]), jnp.asarray(inv),
                               jnp.asarray(e_Nk), B, E, method=method)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_counts_leave_the_device_in_the_narrowest_dtype_that_holds_them():
    from sparcom_jax.stats.collect import transfer_dtype

    assert [np.dtype(transfer_dtype(T)).name for T in (1, 255, 256, 65535, 65536)] == \
        ["uint8", "uint8", "uint16", "uint16", "int32"]


def _tiny_llama_and_records(per_category, *, hidden, ffn, layers, heads, kv_heads):
    """The shipped tokenizer, `per_category` shipped records of each category, and a random tiny Llama."""
    from sparcom_jax.data import default_tokenizer, load_instructions, sample_balanced
    from sparcom_jax.models.config import ModelConfig

    tok = default_tokenizer()
    records = sample_balanced(load_instructions(), per_category, seed=0)
    cfg = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden,
                                          intermediate_size=ffn, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=kv_heads))
    return tok, records, sj.init_model(cfg, seed=0)


def test_collect_instructions_attaches_ids_categories_and_scope(hf_checkpoint):
    tok, records, model = _tiny_llama_and_records(2, hidden=32, ffn=48, layers=2, heads=4, kv_heads=2)
    prompt = sj.collect_instructions(model, records, tok, scope="prompt", progress=False)
    allc = sj.collect_instructions(model, records, tok, scope="all", progress=False)
    assert prompt.ids == [r.id for r in records]
    assert prompt.categories == [r.category for r in records]
    assert prompt.meta["scope"] == "prompt"
    assert np.all(prompt.tokens < allc.tokens) and np.all(prompt.tokens > 0)
    assert np.all(prompt.neuron_active <= allc.neuron_active)
    # straight from an instruction file
    from sparcom_jax.data import SHIPPED_PATH

    from_file = sj.collect_instructions(model, SHIPPED_PATH, tok, scope="prompt", progress=False, max_length=64)
    assert len(from_file.ids) == 360 and from_file.categories.count("math") == 60


# ---------------------------------------------------------------- devices and processes
EIGHT_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import numpy as np, jax
    import sparcom_jax as sj
    path, inp, out, impl = sys.argv[1:5]
    d = np.load(inp, allow_pickle=True)
    seqs, scopes = list(d["seqs"]), list(d["scopes"])
    mesh = sj.make_mesh(data=4, model=2)
    model = sj.load_model(path, mesh=mesh, moe_impl=impl)
    c = sj.collect_counts(model, seqs, scopes, batch_size=3, mesh=mesh, progress=False)
    np.savez(out, tokens=c.tokens, **c.arrays())
""")


def _save_inputs(path, seqs, scopes):
    arr = np.empty(len(seqs), object)
    arr[:] = seqs
    sc = np.empty(len(scopes), object)
    sc[:] = scopes
    np.savez(path, seqs=arr, scopes=sc)


@pytest.mark.parametrize("variant, impl", [("qwen2_moe", "auto"), ("qwen2_moe", "capacity"), ("llama", "auto")])
def test_eight_simulated_devices_match_one(variant, impl, hf_checkpoint, tmp_path):
    # Experts sharded over the model axis: the CPU expert loop and the GPU capacity path.
    path = hf_checkpoint(variant)
    seqs, scopes = make_inputs(n=10)
    _save_inputs(tmp_path / "in.npz", seqs, scopes)
    (tmp_path / "run.py").write_text(EIGHT_DEVICES)
    subprocess.run([sys.executable, str(tmp_path / "run.py"), str(path), str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz"), impl], check=True, env=clean_env(), timeout=300)
    got = np.load(tmp_path / "out.npz")
    one = sj.collect_counts(sj.load_model(path), seqs, scopes, batch_size=4, progress=False)
    np.testing.assert_array_equal(got["tokens"], one.tokens)
    for field, arr in one.arrays().items():
        np.testing.assert_array_equal(got[field], arr)


TWO_PROCESSES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    import numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, path, inp, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import sparcom_jax as sj
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    d = np.load(inp, allow_pickle=True)
    seqs, scopes = list(d["seqs"]), list(d["scopes"])
    # each process feeds its own share (uneven on purpose)
    mine = slice(0, 4) if pid == 0 else slice(4, None)
    mesh = sj.make_mesh(data=2, model=2)
    c = sj.collect_counts(sj.load_model(path, mesh=mesh), seqs[mine], scopes[mine], batch_size=2, mesh=mesh,
                          progress=False)
    np.savez(out, tokens=c.tokens, **c.arrays())
    jax.distributed.shutdown()
""")


@pytest.mark.parametrize("variant", ["qwen2_moe"])
def test_two_process_distributed_run_matches_single_process(variant, hf_checkpoint, tmp_path):
    path = hf_checkpoint(variant)
    seqs, scopes = make_inputs(n=11)
    _save_inputs(tmp_path / "in.npz", seqs, scopes)
    (tmp_path / "run.py").write_text(TWO_PROCESSES)
    run_processes(lambda i, port: [str(tmp_path / "run.py"), str(i), port, str(path), str(tmp_path / "in.npz"),
                                   str(tmp_path / f"out{i}.npz")])
    parts = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    one = sj.collect_counts(sj.load_model(path), seqs, scopes, batch_size=4, progress=False)
    np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), one.tokens)
    for field, arr in one.arrays().items():
        np.testing.assert_array_equal(np.concatenate([p[field] for p in parts]), arr)


# max_length 48: every held-out category keeps response tokens, so the causal check the
# processes share scores real losses (at 24 every response was cut and both runs wrote None).
POD_CONFIG = """\
name: pod
base:
  name: moe
  init: {model_type: mixtral, hidden_size: 32, intermediate_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
         num_key_value_heads: 1, max_position_embeddings: 48, num_local_experts: 4, num_experts_per_tok: 2}
data: {n_per_category: 1, max_length: 48}
collect: {batch_size: 4, buckets: [48], template_control: false}
ablation: {n_random: 1, max_records: 2, batch_size: 4, kinds: [experts, expert_neurons]}
"""

# The causal check's passes (calls of CategoryLoss) and their seconds, the first of each (compiling) apart.
TIMED_PASSES = """
def timed_ablation(cfg, out):
    import time
    from sparcom_jax.pipeline import ablate_stage
    from sparcom_jax.stats import losses
    seconds, real = [], losses.CategoryLoss.__call__
    def call(self, mask=None):
        start = time.perf_counter()
        try:
            return real(self, mask)
        finally:
            seconds.append(time.perf_counter() - start)
    losses.CategoryLoss.__call__ = call
    start = time.perf_counter()
    ablate_stage(cfg, out)
    return {"passes": len(seconds), "seconds": time.perf_counter() - start, "first": seconds[0],
            "rest": sum(seconds[1:])}
"""

# One process of 2 devices: the causal check every process of TWO_PROCESS_CASES runs a share of.
ONE_PROCESS_ABLATION = TIMED_PASSES + textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    from pathlib import Path
    from sparcom_jax.config import load_config
    from sparcom_jax.pipeline import collect_stage
    cfg, out = load_config(sys.argv[1]), Path(sys.argv[2])
    collect_stage(cfg, out, progress=False)
    (out / "passes.json").write_text(json.dumps(timed_ablation(cfg, out)))
""")

# Two processes of 2 devices: the cases where processes have different amounts of work.
TWO_PROCESS_CASES = TIMED_PASSES + textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    from pathlib import Path
    import numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, cfg_path, inp, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental.multihost_utils import sync_global_devices
    import sparcom_jax as sj
    from sparcom_jax.config import load_config
    from sparcom_jax.errors import ConfigError
    from sparcom_jax.pipeline import collect_stage, load_spec_model
    from sparcom_jax.pipeline.common import check_shared

    def interrupt(store):  # process 1's store as if it stopped before its first chunk; process 0's is complete
        sync_global_devices("before")
        if pid == 1:
            (store / "progress.json").write_text(json.dumps({"done_chunks": 0}))
        sync_global_devices("after")

    def error(run):  # what stops this process, if anything
        try:
            run()
            return None
        except ValueError as e:
            return f"{type(e).__name__}: {e}"

    cfg = load_config(cfg_path)
    mesh = sj.make_mesh(data=4, model=1)
    model = load_spec_model(cfg.base, mesh=mesh)
    d = np.load(inp, allow_pickle=True)
    seqs, scopes = list(d["seqs"])[pid::2], list(d["scopes"])[pid::2]  # shares of 3 and 2 sequences
    kw = dict(batch_size=4, mesh=mesh, progress=False, buckets=[24])
    res = {}
    # chunks of 2 rows: process 0 has two chunks, process 1 one
    sj.collect_counts(model, seqs, scopes, out=tmp / "a", chunk_rows=2, **kw)
    interrupt(tmp / "a" / f"process_{pid}")
    c = sj.collect_counts(model, seqs, scopes, out=tmp / "a", chunk_rows=2, **kw)
    res["a"] = {"tokens": c.tokens[:], **{k: v[:] for k, v in c.arrays().items()}}
    res["programs"] = sum(c.meta["compilations"][k] for k in ("compilations", "cache_hits"))
    # the same seen by collect_counts: process 1's store made for other inputs
    res["store"] = error(lambda: sj.collect_counts(model, seqs, scopes, out=tmp / "a", chunk_rows=2,
                                                   fingerprint={"template": "other"} if pid else None, **kw))
    c = sj.collect_counts(model, seqs[:1] if pid == 0 else [], scopes[:1] if pid == 0 else [], **kw)  # 1 has none
    res["one"] = {"tokens": c.tokens, **c.arrays()}
    try:  # a model axis over both processes' devices: one batch row on two processes
        sj.collect_counts(model, seqs, scopes, **dict(kw, mesh=sj.make_mesh(data=1, model=4)))
        res["spanning"] = "counted"
    except ConfigError as e:
        res["spanning"] = str(e)
    shared = {}
    for name, where in (("own", tmp / f"own{pid}"), ("shared", tmp)):
        where.mkdir(exist_ok=True)
        try:
            check_shared(where)
            shared[name] = "ok"
        except ConfigError as e:
            shared[name] = str(e)
    res["shared"] = shared
    collect_stage(cfg, tmp / "run", progress=False)
    interrupt(tmp / "run" / "counts" / "moe" / f"process_{pid}")
    collect_stage(cfg, tmp / "run", progress=False)

    sync_global_devices("stale")
    meta = tmp / "run" / "counts" / "moe" / "process_1" / "meta.json"
    kept = meta.read_text()
    if pid == 1:  # process 1's store made with other settings: the processes stop together
        header = json.loads(kept)
        # counted at another max_length, which cut its records elsewhere (other tokens)
        header["fingerprint"].update(max_length=99, tokens="0" * 16)
        meta.write_text(json.dumps(header))
    sync_global_devices("stale written")
    res["stale"] = error(lambda: collect_stage(cfg, tmp / "run", progress=False))
    sync_global_devices("stale checked")
    if pid == 1:
        meta.write_text(kept)
    sync_global_devices("restored")
    res["ablation"] = timed_ablation(cfg, tmp / "run")  # the processes share its passes
    # an infinite embedding of a token only process 1's share has: its counts are refused on both
    every = list(d["seqs"])
    token = next(int(t) for t in every[1] if all(t not in s for s in every[0::2]))
    model.embed.value = model.embed.value.at[token].set(np.inf)  # (NaN != NaN: device_put would refuse it)
    res["nan"] = error(lambda: sj.collect_counts(model, seqs, scopes, **kw))
    np.save(tmp / f"res{pid}.npy", res, allow_pickle=True)
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_processes_with_uneven_empty_or_resumed_shares_count_what_one_process_counts(tmp_path):
    """Every chunk and every batch is a step of one program over all processes: a process with
    fewer chunks (uneven shares), none (no records), or fewer left to do (its store resumed
    further) must still take part, and decisions (a complete store, a usable mesh, a shared
    output directory) are taken by all together. Each of these hung, or counted wrongly,
    when a process decided alone."""
    from sparcom_jax.config import load_config
    from sparcom_jax.pipeline import load_spec_model, open_model_counts

    (tmp_path / "pod.yaml").write_text(POD_CONFIG)
    cfg = load_config(tmp_path / "pod.yaml")
    model = load_spec_model(cfg.base)
    seqs, scopes = make_inputs(n=5, vocab=model.config.vocab_size)
    seqs = [s[:24] for s in seqs]
    scopes = [m[:24] for m in scopes]
    _save_inputs(tmp_path / "in.npz", seqs, scopes)
    # what runs with three processes, and with one, left in the count directory
    left = tmp_path / "run" / "counts" / "moe"
    (left / "process_2").mkdir(parents=True)
    (left / "meta.json").write_text("{}")
    (tmp_path / "run.py").write_text(TWO_PROCESS_CASES)
    run_processes(lambda i, port: [str(tmp_path / "run.py"), str(i), port, str(tmp_path / "pod.yaml"),
                                   str(tmp_path / "in.npz"), str(tmp_path)])
    res = [np.load(tmp_path / f"res{i}.npy", allow_pickle=True).item() for i in range(2)]
    one = sj.collect_counts(model, seqs, scopes, batch_size=4, progress=False, buckets=[24])
    whole = {"tokens": one.tokens, **one.arrays()}
    for field, arr in whole.items():
        merged = np.empty_like(arr)
        merged[0::2], merged[1::2] = res[0]["a"][field], res[1]["a"][field]
        np.testing.assert_array_equal(merged, arr, err_msg=field)
        np.testing.assert_array_equal(res[0]["one"][field], arr[:1], err_msg=field)
        assert len(res[1]["one"][field]) == 0
    assert whole["tokens"].sum() > 0 and all(v.sum() > 0 for v in one.arrays().values())
    for r in res:
        # process 0's first padding-only steps (resumed) run the program it already has: the same on every process
        assert r["programs"] == 0
        assert r["spanning"].startswith("mesh.model=4 spans processes (2 processes of 2 devices)"), r["spanning"]
        assert r["shared"]["shared"] == "ok"
        assert "process(es) 1 of 2 do not see the files process 0 writes there" in r["shared"]["own"]
    assert not list(tmp_path.glob(".sparcom-shared-*"))  # the probe is removed
    other = "OtherProcessError: {}: process 1 of 2 stopped with an error (its log says why)"
    assert res[1]["store"].startswith("StaleResultError: ") and "template" in res[1]["store"], res[1]["store"]
    opening = f"collect: opening the count store {tmp_path / 'a' / 'process_0'}"
    assert res[0]["store"].startswith(other.format(opening)), res[0]["store"]
    assert res[1]["stale"].startswith("StaleResultError: ") and "data.max_length" in res[1]["stale"]
    assert res[0]["stale"].startswith(other.format("collect moe")), res[0]["stale"]
    assert res[1]["nan"].startswith("ValueError: the model: non-finite activations"), res[1]["nan"]
    assert res[0]["nan"].startswith(other.format("collect: non-finite activations")), res[0]["nan"]
    # One process (of 2 devices, as each of the two has) counts every record and runs every pass of the
    # causal check; the two shared the passes: the same numbers and the same fingerprint (that of the
    # counts does not depend on how many processes counted them).
    (tmp_path / "one.py").write_text(ONE_PROCESS_ABLATION)
    subprocess.run([sys.executable, str(tmp_path / "one.py"), str(tmp_path / "pod.yaml"), str(tmp_path / "single")],
                   check=True, env=clean_env(), timeout=300)
    made = sorted(p.name for p in (tmp_path / "run" / "ablate").iterdir())
    assert made == sorted(p.name for p in (tmp_path / "single" / "ablate").iterdir()) == [
        "moe_expert_neurons.json", "moe_experts.json"]
    for name in made:
        run, single = (json.loads((tmp_path / d / "ablate" / name).read_text()) for d in ("run", "single"))
        # the environment each ran under names its processes and devices; all else is the same
        envs = run.pop("environment"), single.pop("environment")
        assert run == single and [(e["process_count"], e["device_count"]) for e in envs] == [(2, 4), (1, 2)]
    scored = json.loads((tmp_path / "single" / "ablate" / "moe_experts.json").read_text())
    assert all(isinstance(v, float) for v in scored["baseline"].values()) and len(scored["baseline"]) == 6  # not all None
    alone = json.loads((tmp_path / "single" / "passes.json").read_text())
    two = [r["ablation"] for r in res]
    # Each kind's baseline pass (it measures the experts' masses, the expert neurons' firing) runs on
    # process 0 alone and is shared; the rounds after it split evenly (an odd pass on process 0).
    assert sum(t["passes"] for t in two) == alone["passes"] and two[0]["passes"] - two[1]["passes"] in (0, 1, 2)
    print(f"causal check, {alone['passes']} passes: one process {alone['seconds']:.1f} s "
          f"(first pass {alone['first']:.1f} s, the others {alone['rest']:.1f} s); two processes "
          + ", ".join(f"{t['seconds']:.1f} s ({t['first']:.1f} s, {t['rest']:.1f} s)" for t in two))
    ref = open_model_counts(cfg, tmp_path / "single", cfg.base)
    got = open_model_counts(cfg, tmp_path / "run", cfg.base)  # the two processes' stores, merged
    assert sorted(p.name for p in (tmp_path / "run" / "counts" / "moe").iterdir()) == ["process_0", "process_1"]
    assert got.ids == ref.ids and got.n == 6
    for field in ("tokens", *ref.arrays()):
        np.testing.assert_array_equal(getattr(got, field), np.asarray(getattr(ref, field)[:]), err_msg=field)


def test_each_process_devices_fill_whole_rows_of_the_data_axis():
    """Whatever order the platform lists devices in (TPU ids follow the chips' coordinates, not
    the hosts), make_mesh's rows lie within one process when the model axis divides a
    process's device count: each process fills its rows with its own records."""
    import types

    from sparcom_jax.errors import ConfigError
    from sparcom_jax.parallel.mesh import check_process_rows, process_order

    owners = [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]  # a 4x4 grid of 4 hosts' 2x2 blocks, by id
    devices = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(owners)]
    for model in (1, 2, 4):
        rows = np.asarray(process_order(devices)).reshape(-1, model)
        assert all(len({d.process_index for d in row}) == 1 for row in rows), model
    assert [d.id for d in process_order(devices)][:4] == [0, 1, 4, 5]  # in platform order within a process
    check_process_rows(16, 4, 4)
    check_process_rows(16, 8, 1)  # one process: any model axis
    with pytest.raises(ConfigError, match=r"mesh.model=8 spans processes .*one of \[1, 2, 4\]"):
        check_process_rows(16, 8, 4)


class _Encoded:
    """What `check_scope_coverage` reads of an EncodedSet: one token per record, in scope or not."""

    def __init__(self, categories, in_scope):
        self.categories, self.scope = list(categories), "response"
        self.scopes = [np.array([x]) for x in in_scope]
        self.record_ids = [f"r{i}" for i in range(len(self.categories))]

    def __len__(self):
        return len(self.categories)


@pytest.mark.parametrize("here, other, error", [
    ((["math", "code"], [False, True]), (["math"], [True]), None),  # math in scope on the other process
    (([], []), (["math", "code"], [True, True]), None),  # this process has no records; the other has
    ((["math", "code"], [False, True]), (["math"], [False]), r"no record of MATH \(math, 2 record\(s\)\)"),
    (([], []), ([], []), "no records to collect counts for"),
])
def test_scope_coverage_is_decided_on_the_records_of_every_process(here, other, error, monkeypatch):
    """Each process checks its own share; a refusal on one process alone would leave the others
    waiting, and a category may have its in-scope records in another process's share."""
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.stats import collect

    theirs = _Encoded(*other)
    per = [[theirs.categories.count(c) for c in CATEGORIES],
           [sum(1 for k, s in zip(theirs.categories, theirs.scopes) if k == c and not s.any()) for c in CATEGORIES]]
    monkeypatch.setattr(collect, "gather", lambda mine: np.stack([np.asarray(mine), np.asarray(per)]))
    enc = _Encoded(*here)
    if error is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = collect.check_scope_coverage(enc, 24)
        assert got == {c: n for c, n in (("code", 0), ("math", 1)) if c in enc.categories}
    else:
        with pytest.raises(ValueError, match=error):
            collect.check_scope_coverage(enc, 24)


def test_the_content_cut_log_counts_the_records_of_every_share(monkeypatch, capsys):
    """Each process's store summarises its own share: the collect log said "X of N records" with
    N (and X) one process's, and each host's log said something else."""
    from sparcom_jax.parallel import processes
    from sparcom_jax.pipeline.stages import _log_content_cut

    theirs = [4, 1, 2, 5, 4, 1, 1]  # process 1: 4 records, 2 cut (5 tokens, at most 4), 1 capped (1 token)
    monkeypatch.setattr(processes, "gather", lambda mine: np.stack([np.asarray(mine), np.asarray(theirs)]))
    cut = {"records": 1, "tokens": 3, "max_tokens": 3, "capped_records": 1, "capped_tokens": 2}
    _log_content_cut("m", {"content_cut": cut}, 3, 24)
    assert ("collect m: 3 of 7 records have instruction/input tokens that are not counted (8 tokens, at most 4 "
            "of one record), cut by data.max_length=24; 2 of these records lost 3 of them only") in capsys.readouterr().err
    _log_content_cut("m", {}, 3, 24)  # a share without its summary: the whole count is not known
    assert capsys.readouterr().err == ""


def test_merged_shares_count_the_records_of_every_share():
    """The record counts in the meta (truncated records, instruction/input tokens cut, records with
    nothing in scope) of merged per-process shares are those of one collection of every record:
    the report prints them."""
    from sparcom_jax.pipeline.stages import merge_shares
    from sparcom_jax.stats.collect import merge_meta

    tok, records, model = _tiny_llama_and_records(3, hidden=16, ffn=24, layers=1, heads=2, kv_heads=1)
    kw = dict(scope="content", max_length=24, progress=False, buckets=[24])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = sj.collect_instructions(model, records, tok, **kw)
        parts = [sj.collect_instructions(model, records[k::2], tok, **kw) for k in range(2)]
    merged = merge_shares(parts, "root").meta
    assert whole.meta["content_cut"]["records"] > max(p.meta["content_cut"]["records"] for p in parts)
    for key in ("n_truncated", "content_cut", "n_empty_scope", "template", "scope", "max_length"):
        assert merged[key] == whole.meta[key], key
    # records with nothing in scope add up per category, over the categories of any share
    metas = [{"n_empty_scope": {"code": 1, "math": 0}}, {"n_empty_scope": {"math": 2, "summarization": 0}}]
    assert merge_meta(metas)["n_empty_scope"] == {"code": 1, "math": 2, "summarization": 0}


@pytest.mark.parametrize("n, processes", [(7, 2), (5, 3), (2, 3)])
def test_per_process_stores_merge_back_in_the_records_order(n, processes, monkeypatch):
    """Process k of a multi-process collection counts the records k, k+P, ... (its share);
    the merged counts hold every record's row where a one-process run has it."""
    import jax

    from sparcom_jax.pipeline.stages import _process_share, merge_shares

    rng = np.random.default_rng(0)
    records = [f"r{i}" for i in range(n)]
    whole = sj.Counts(tokens=np.arange(n) + 1, neuron_active=rng.integers(0, 9, (n, 2, 3)), ids=records,
                      categories=[sj.CATEGORIES[i % 6] for i in range(n)], sources=[f"s{i}" for i in range(n)],
                      neuron_act_sum=rng.random((n, 2, 3)).astype(np.float32))
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    parts = []
    for k in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda k=k: k)
        rows = [records.index(r) for r in _process_share(records)]
        parts.append(sj.Counts(tokens=whole.tokens[rows], neuron_active=whole.neuron_active[rows],
                               neuron_act_sum=whole.neuron_act_sum[rows], ids=[whole.ids[i] for i in rows],
                               categories=[whole.categories[i] for i in rows],
                               sources=[whole.sources[i] for i in rows], meta={"fingerprint": k}))
    merged = merge_shares(parts, "root")
    assert (merged.ids, merged.categories, merged.sources) == (whole.ids, whole.categories, whole.sources)
    for field in ("tokens", "neuron_active", "neuron_act_sum"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(whole, field))
    assert merged.meta["fingerprint"] == {f"process_{k}": k for k in range(processes)}


def test_merging_the_shares_holds_one_copy_of_the_counts():
    """Every process merges every process's share for the analysis (on a GPU host, one process
    per GPU): concatenating the shares and then reordering them held two copies of the counts
    beside the shares; each share now lands in its rows k, k+P, ... of the one merged copy."""
    import tracemalloc

    from sparcom_jax.pipeline.stages import merge_shares

    parts = [sj.Counts(tokens=np.full(32, k + 1, np.int32), neuron_active=np.full((32, 32, 1024), k, np.int32),
                       meta={}) for k in range(2)]
    tracemalloc.start()
    try:
        merged = merge_shares(parts, "root")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert merged.tokens.tolist() == [1, 2] * 32 and (merged.neuron_active[1::2] == 1).all()
    # (the margin: allocations of other threads while it runs; two copies would be 2x)
    assert peak < 1.5 * (merged.tokens.nbytes + merged.neuron_active.nbytes), peak


def test_a_multi_host_run_checks_that_every_host_sees_collect_store(tmp_path, monkeypatch):
    """With collect.store outside OUT, each host wrote its share into its own directory; process 0
    merged the one share it saw and, after the whole collection, refused it as 'records changed;
    run sparcom collect --overwrite', which changed nothing. The store directory is probed at the
    start like --out, and the refusal names the setting."""
    import jax
    from jax.experimental import multihost_utils

    from sparcom_jax.config import ConfigError, apply_overrides, load_config
    from sparcom_jax.parallel import processes
    from sparcom_jax.pipeline import common, stages

    (tmp_path / "pod.yaml").write_text(POD_CONFIG)
    cfg = apply_overrides(load_config(tmp_path / "pod.yaml"), [f"collect.store={tmp_path / 'store'}"])
    probed = []

    def stop(*args):
        raise ConfigError("stopped")

    with monkeypatch.context() as m:
        m.setattr(stages, "check_shared", lambda d, what="--out": probed.append((d, what)))
        m.setattr(stages, "preflight", stop)  # once the directories are checked
        with pytest.raises(ConfigError, match="stopped"):
            stages.run_stage("collect", cfg, tmp_path / "out")
    assert probed == [(tmp_path / "out", "--out"), (tmp_path / "store", "collect.store")]
    # process 0 of two, process 1 not seeing its probe file
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
    monkeypatch.setattr(common, "barrier", lambda name: None)
    monkeypatch.setattr(processes, "gather", lambda seen: np.array([[int(seen)], [0]]))
    with pytest.raises(ConfigError, match=r"^collect.store .*/new: process\(es\) 1 of 2 do not see the files .* "
                                          r"needs collect.store on a file system every host mounts"):
        common.check_shared(tmp_path / "new", "collect.store")
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())  # made, and the probe removed


def test_shares_of_which_one_has_no_group_keys_merge_without_them():
    """A store resumed from before group keys were kept has none, while another process's store,
    new, has them: the merge iterated the missing list (TypeError). Without keys in every share
    the merged counts carry none, and open_model_counts takes them from the records."""
    from sparcom_jax.pipeline.stages import merge_shares

    parts = [sj.Counts(tokens=np.array([1, 2][k:k + 1]), ids=[f"r{k}"], categories=["code"], sources=None,
                       groups=[f"g{k}"] if k == 0 else None, meta={}) for k in range(2)]
    merged = merge_shares(parts, "root")
    assert merged.groups is None and merged.ids == ["r0", "r1"]
    assert merge_shares(parts[:1] * 2, "root").groups == ["g0", "g0"]


# ---------------------------------------------------------------- exact zeros
ZEROED = {"llama": [("mlp.gate_proj.weight", 0, 5), ("mlp.gate_proj.weight", 1, 17)],
          "qwen2_moe": [("mlp.experts.gate_up_proj", 0, (2, 3)), ("mlp.experts.gate_up_proj", 1, (1, 9)),
                        ("mlp.shared_expert.gate_proj.weight", 1, 7)]}
STRATEGIES = [("auto", {}), ("ragged", {}), ("capacity", {}), ("capacity", {"capacity_factors": (64.0,)}),
              ("capacity", {"capacity_factors": (0.01,)}), ("tiled", {}), ("looped", {}),
              ("looped", {"loop_tile": 4, "loop_tail": 2})]


@pytest.mark.parametrize("variant", ["llama", "qwen2_moe"])
def test_activations_of_exactly_zero_are_not_counted(variant, tmp_path):
    """A zeroed gate row makes that neuron's activation exactly 0 on every token: active
    means A > 0, so it is never counted, by every dispatch strategy (A >= 0 would count it)."""
    import torch

    from sparcom_jax.models.dispatch import Dispatch

    tm = make_torch_model(variant)
    zeroed = []
    with torch.no_grad():
        for name, layer, row in ZEROED[variant]:
            w = tm.model.layers[layer].get_parameter(name)
            w[row] = 0.0  # a tuple is (expert, neuron): a row of the gate half of the fused rows
            zeroed.append(("expert_neuron_active" if isinstance(row, tuple) else "neuron_active", layer, row))
    tm.save_pretrained(str(tmp_path / "ck"))
    seqs, scopes = make_inputs()
    ref = torch_counts(tm, seqs, scopes)

    def unit_counts(arr, layer, unit):
        return np.asarray(arr)[(slice(None), layer) + tuple(np.atleast_1d(unit))]

    assert all(unit_counts(ref[field], layer, unit).sum() == 0 for field, layer, unit in zeroed)
    for impl, tuning in (STRATEGIES if variant != "llama" else STRATEGIES[:1]):
        model = sj.load_model(tmp_path / "ck", moe_impl=Dispatch.choose(impl, **tuning))
        # One bucket: one compiled program per strategy instead of three (bucketing has its own test).
        ours = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False, buckets=[max(map(len, seqs))])
        assert_counts_equal(ours, ref)
        for field, layer, unit in zeroed:
            assert unit_counts(getattr(ours, field), layer, unit).sum() == 0, (impl, tuning, field, layer, unit)


def test_strategies_agree_when_two_experts_take_every_token(hf_checkpoint):
    """A zero router ties every expert, so top-2 sends every token to experts 0 and 1 and none
    to 2 and 3: groups of twice the mean (past the smallest capacity, or every capacity,
    which falls back) and empty ones. Counts are equal and the activation sums equal to
    rounding across strategies."""
    from sparcom_jax.models.dispatch import Dispatch

    seqs, scopes = make_inputs(n=5)
    runs = {}
    for impl, tuning in (("ragged", {}), ("looped", {"loop_tile": 4, "loop_tail": 2}), ("capacity", {}),
                         ("capacity", {"capacity_factors": (1.25,)})):
        model = sj.load_model(hf_checkpoint("mixtral"), moe_impl=Dispatch.choose(impl, **tuning))
        model.blocks.ffn.router[...] = 0.0
        runs[impl, str(tuning)] = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False, sums=True)
    ref = runs.pop(("ragged", "{}"))
    per_expert = ref.expert_routed.sum((0, 1))
    every = ref.tokens.sum() * ref.expert_routed.shape[1]  # each counted token of each layer
    assert per_expert[0] == per_expert[1] == every and per_expert[2:].sum() == 0
    assert ref.expert_neuron_active[:, :, :2].sum() > 0
    for name, c in runs.items():
        for field, arr in ref.arrays().items():
            np.testing.assert_array_equal(getattr(c, field), arr, err_msg=f"{name} {field}")
        for field, arr in ref.sums().items():
            np.testing.assert_allclose(getattr(c, field), arr, rtol=1e-5, atol=1e-6, err_msg=f"{name} {field}")


def test_store_records_what_the_moe_ran(tmp_path):
    from sparcom_jax.models.dispatch import Dispatch

    cfg = sj.ModelConfig.from_hf_config(dict(model_type="mixtral", vocab_size=96, hidden_size=16, intermediate_size=8,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             num_local_experts=4, num_experts_per_tok=2))
    seqs, _ = make_inputs(n=3, with_scopes=False)
    for impl in ("auto", "ragged"):
        model = sj.init_model(cfg, moe_impl=Dispatch.choose(impl, backend="cpu"))
        sj.collect_counts(model, seqs, progress=False, out=tmp_path / impl)
        assert sj.open_counts(tmp_path / impl).meta["moe_dispatch"] == str(model.dispatch)
    assert "looped when counting, tiled otherwise" in sj.open_counts(tmp_path / "auto").meta["moe_dispatch"]
    assert sj.open_counts(tmp_path / "ragged").meta["moe_dispatch"].startswith("moe ragged;")


@pytest.mark.parametrize("variant, param, where, layer", [
    ("llama", ("ffn", "gate_proj"), (1, 3, 5), 1),  # the counted activations of the last layer
    ("llama", ("ffn", "down_proj"), (0, 5, 3), 0),  # only the block's output (then every later layer)
    ("qwen2_moe", ("ffn", "gate_proj"), (1, 2, 3, 4), 1),  # one expert's weight
    ("qwen2_moe", ("attn", "o_proj"), (1, 0, 0, 0), 1),
])
def test_a_nan_weight_stops_collection_naming_the_layer(variant, param, where, layer, hf_checkpoint, tmp_path):
    import jax.numpy as jnp

    from sparcom_jax.models.dispatch import Dispatch

    seqs, scopes = make_inputs(n=5)
    for impl in ("auto", "ragged") if variant != "llama" else ("auto",):
        model = sj.load_model(hf_checkpoint(variant), moe_impl=Dispatch.choose(impl))
        var = getattr(getattr(model.blocks, param[0]), param[1])
        var.value = var.value.at[where].set(jnp.nan)
        with pytest.raises(ValueError, match=rf"{hf_checkpoint(variant)}: non-finite activations .* in layer {layer} "):
            sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=tmp_path / impl, chunk_rows=2)
        assert json.loads((tmp_path / impl / "progress.json").read_text())["done_chunks"] == 0


def test_a_given_model_digest_is_not_computed_again(tmp_path, monkeypatch):
    """The pipeline passes the digest of the model's files in the fingerprint; collect_counts hashed
    the weights again for its own and dropped it, so with the digest cache off every collection read
    all the weights twice."""
    from sparcom_jax import fingerprint

    monkeypatch.setenv(fingerprint.DIGEST_CACHE_ENV, "off")
    sj.save_model(_tiny_llama(), tmp_path / "m")
    model = sj.load_model(tmp_path / "m", with_tokenizer=False)
    hashed, sha256 = [], fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: hashed.append(path) or sha256(path))
    c = sj.collect_counts(model, [], None, out=tmp_path / "given", progress=False, fingerprint={"model": "given"})
    assert hashed == [] and c.meta["fingerprint"]["model"] == "given"
    c = sj.collect_counts(model, [], None, out=tmp_path / "own", progress=False)  # none given: its files'
    assert len(hashed) == 2 and c.meta["fingerprint"]["model"] == fingerprint.model_files_fingerprint(tmp_path / "m")


def test_one_process_stops_at_the_first_batch_with_non_finite_activations(monkeypatch):
    """The multi-host merge runs a chunk's remaining steps before a non-finite error is raised
    (the other processes take part in each); one process has nobody to wait for, yet it ran
    them all: an in-memory collection (one chunk) counted every record of a broken model first."""
    import jax.numpy as jnp

    from sparcom_jax.stats import runner

    model = _tiny_llama()
    model.blocks.ffn.gate_proj[0, 3, 5] = jnp.nan
    seqs, scopes = make_inputs(n=24)
    batches, run = [], runner.BatchRunner.run

    def counted(self, *args, **kw):
        for item in run(self, *args, **kw):
            batches.append(item[0])
            yield item

    monkeypatch.setattr(runner.BatchRunner, "run", counted)
    with pytest.raises(ValueError, match="non-finite activations .* in layer 0"):
        sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, buckets=[24])
    assert len(batches) == 1  # of 12


def test_a_non_finite_error_names_the_record_id_and_category():
    """A process's sequences are its share of the records (here process 1 of 2's: records 1, 3, 5):
    the error named the row within the share, not the record the user can look up."""
    model = _tiny_llama()
    seqs, scopes = make_inputs(n=3)
    token = next(int(t) for t in seqs[1] if all(t not in s for s in (seqs[0], seqs[2])))
    model.embed.value = model.embed.value.at[token].set(np.inf)  # only sequence 1 meets it
    with pytest.raises(ValueError, match=r"e\.g\. on record 'rec-3' \(category 'code'\); "):
        sj.collect_counts(model, seqs, scopes, batch_size=4, progress=False, buckets=[24],
                          ids=["rec-1", "rec-3", "rec-5"], categories=["math", "code", "math"])


@pytest.mark.parametrize("variant", ["llama", "qwen2_moe", "mixtral"])
def test_activation_sums_match_pytorch_hooks(variant, hf_checkpoint, tmp_path):
    """sums=True: A summed over counted tokens where A > 0 (neurons, expert neurons) and the
    router's softmax probability (before renormalisation) over counted routed tokens."""
    seqs, scopes = make_inputs()
    ref = torch_counts(make_torch_model(variant), seqs, scopes, sums=True)
    model = sj.load_model(hf_checkpoint(variant))
    ours = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False, sums=True)
    stored = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False, sums=True, out=tmp_path / "s",
                               chunk_rows=4)
    assert_counts_equal(ours, ref)
    names = set(sj.Counts.SUM_FIELDS.values())
    assert set(ours.sums()) == {k for k in names if ref[k] is not None}
    for field, arr in ours.sums().items():
        assert arr.dtype == np.float32 and stored.sums()[field].dtype == np.float32
        # other chunks give other batch shapes: float sums equal up to rounding
        np.testing.assert_allclose(stored.sums()[field][:], arr, rtol=1e-5, atol=1e-6)
        want = ref[field]
        assert np.abs(want).max() > 0.1, f"{field}: nothing summed; the test would prove nothing"
        np.testing.assert_allclose(arr, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=field)
    if model.config.is_moe:  # the sums of the probabilities of one token's chosen experts are <= 1
        assert np.all(ours.expert_weight_sum.sum(-1) <= ours.tokens[:, None] + 1e-4)
    plain = sj.collect_counts(model, seqs, scopes, batch_size=3, progress=False)
    assert plain.sums() == {}


def test_a_store_opened_while_another_process_fails_to_open_its_own_is_released(tmp_path, monkeypatch):
    """When another process cannot open its count store, every process stops together; one whose
    store had opened kept its lock (the pid of a process now gone), and its next collection
    into that store, in the same session or from another host, was refused as 'being written'."""
    from sparcom_jax.errors import OtherProcessError
    from sparcom_jax.fileio import LOCK_NAME
    from sparcom_jax.parallel import processes

    model = _tiny_llama()
    seqs, scopes = make_inputs(n=3)
    # what two processes gather when the other one (process 1) failed to open its store
    monkeypatch.setattr(processes, "gather", lambda failed: np.array([int(failed), 1]))
    with pytest.raises(OtherProcessError, match="opening the count store"):
        sj.collect_counts(model, seqs, scopes, out=tmp_path / "store", progress=False, buckets=[24])
    assert (tmp_path / "store" / "meta.json").is_file() and not (tmp_path / "store" / LOCK_NAME).exists()


_TINY_MIXTRAL = dict(model_type="mixtral", vocab_size=96, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("moe, sums", [(False, False), (True, True)])
def test_the_memory_estimate_is_the_size_of_the_in_memory_result(moe, sums):
    from sparcom_jax.stats.collect import result_nbytes

    model = sj.init_model(sj.ModelConfig.from_hf_config(_TINY_MIXTRAL), seed=0) if moe else _tiny_llama()
    seqs, scopes = make_inputs(n=3)
    c = sj.collect_counts(model, seqs, scopes, progress=False, sums=sums)
    held = c.tokens.nbytes + sum(a.nbytes for a in {**c.arrays(), **c.sums()}.values())
    assert len(c.arrays()) == (2 if moe else 1) and len(c.sums()) == (2 if sums else 0)
    assert result_nbytes(model.config, 3, sums) == held


def _refused_before_the_model_runs(monkeypatch, sums):
    """collect_counts' error and the number of batches it ran, with 'available' memory just
    under what the result needs."""
    from sparcom_jax.stats import collect, runner

    model = _tiny_llama()
    need = collect.result_nbytes(model.config, 5, sums)
    monkeypatch.setattr(collect, "available_memory", lambda: int(need / collect.MEMORY_FRACTION) - 1)
    ran = []
    monkeypatch.setattr(runner.BatchRunner, "run", lambda self, *a, **k: ran.append(1) or iter(()))
    with pytest.raises(HostMemoryError) as e:
        collect.collect_counts(model, make_inputs(n=5)[0], progress=False, sums=sums)
    return str(e.value), ran


@pytest.mark.parametrize("sums", [False, True])
def test_an_in_memory_result_too_large_for_the_host_is_refused_before_the_model_runs(monkeypatch, sums):
    msg, ran = _refused_before_the_model_runs(monkeypatch, sums)
    assert not ran
    assert "out=<dir>" in msg and "SPARCOM_JAX_MEMORY_CHECK=off" in msg and "check_memory=False" in msg
    assert ("sums=False" in msg) == sums


def test_the_memory_check_counts_the_results_of_every_process_on_this_host(monkeypatch):
    """Processes on one host (one per GPU) allocate their results from the same memory: each
    result alone fitting is not enough. Processes on other hosts do not count."""
    from sparcom_jax.stats import collect

    mib, me = 1 << 20, collect.key_id(collect.host_key())
    # this process (0), process 1 on this host with 4 MiB, process 2 on another host with 50 MiB
    monkeypatch.setattr(collect, "gather", lambda v: np.array([v, [me, 4], [me + 1, 50]]))
    monkeypatch.setattr(collect, "available_memory", lambda: 10 * mib)  # 8 MiB may be taken
    assert collect.host_results(3 * mib) == (7 * mib, 2)
    assert collect.check_result_memory(3 * mib, 5, False) is None
    e = collect.check_result_memory(5 * mib, 5, False)  # 5 MiB alone would fit
    assert isinstance(e, HostMemoryError)
    assert "take 5.00 MiB here and 9.00 MiB with those of the other 1 process(es) on this host" in str(e), str(e)


def test_the_memory_check_can_be_turned_off_and_notes_a_large_result(monkeypatch, caplog):
    from sparcom_jax.stats import collect

    monkeypatch.setattr(collect, "available_memory", lambda: 1000)
    assert isinstance(collect.check_result_memory(801, 5, False), HostMemoryError)
    assert collect.check_result_memory(800, 5, False) is None  # fits with margin
    monkeypatch.setenv(collect.MEMORY_CHECK_ENV, "off")
    assert collect.check_result_memory(10**9, 5, False) is None
    monkeypatch.delenv(collect.MEMORY_CHECK_ENV)
    with caplog.at_level("WARNING", logger=collect.__name__):
        caplog.clear()
        assert collect.check_result_memory(250, 5, False) is None
        assert not caplog.records  # a quarter of the memory is not worth a note
        assert collect.check_result_memory(600, 5, False) is None
    assert "600 B, 60% of the 1000 B" in caplog.text and "out=<dir>" in caplog.text
    monkeypatch.setattr(collect, "available_memory", lambda: 1)
    seqs, scopes = make_inputs(n=3)
    c = sj.collect_counts(_tiny_llama(), seqs, scopes, progress=False, check_memory=False)
    assert c.neuron_active.shape == (3, 1, 24)


def test_the_memory_check_takes_the_container_s_memory_limit(tmp_path, monkeypatch):
    """A job in a 16 GB container on a 128 GB host passed the check on the host's MemAvailable
    and was killed past 16 GB: the cgroup limit, less what the group uses, bounds it."""
    from sparcom_jax.stats import collect

    gib = 1 << 30

    def group(d, limit, used, inactive=0, v1=False):
        d.mkdir(parents=True, exist_ok=True)
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1 else \
            ("memory.max", "memory.current", "inactive_file")
        (d / names[0]).write_text(f"{limit}\n")
        (d / names[1]).write_text(f"{used}\n")
        (d / "memory.stat").write_text(f"active_file 5\n{names[2]} {inactive}\n")

    def free(membership, root):
        (tmp_path / "cgroup").write_text(membership)
        return collect.cgroup_memory(root, tmp_path / "cgroup")

    v2 = tmp_path / "v2"
    group(v2, 16 * gib, 6 * gib, inactive=gib)  # a container: its group is the mount's root
    assert free("0::/\n", v2) == 11 * gib  # the inactive page cache is reclaimed before a kill
    assert free("0::/docker/abc\n", v2) == 11 * gib  # a path the container's view does not have
    group(v2 / "job" / "step", "max", 3 * gib)
    assert free("0::/job/step\n", v2) == 11 * gib  # no limit of its own: the one above it
    group(v2 / "job", 4 * gib, 3 * gib)
    assert free("0::/job/step\n", v2) == gib  # the least over the groups above
    v1 = tmp_path / "v1"
    group(v1 / "memory" / "k8s", 2 * gib, gib // 2, v1=True)
    assert free("9:name=systemd:/\n4:memory:/k8s\n0::/\n", v1) == 3 * gib // 2
    group(v1 / "memory" / "k8s", 9223372036854771712, gib, v1=True)  # v1's "no limit"
    assert free("4:cpu,memory:/k8s\n", v1) is None
    assert free("0::/\n", tmp_path / "absent") is None
    monkeypatch.setattr(collect, "cgroup_memory", lambda: 1000)
    assert collect.available_memory() == 1000
    monkeypatch.setattr(collect, "cgroup_memory", lambda: None)
    assert collect.available_memory() > 1000  # the host's


def test_counts_above_255_leave_the_device_whole():
    # Counts travel in the narrowest dtype for the padded length T (not for the B rows): one
    # sequence of 600 tokens counts, over all of them, what its three thirds count apart.
    seq = np.random.default_rng(4).integers(3, 96, 600)
    third = np.arange(600) // 200
    scopes = [np.ones(600, bool)] + [third == k for k in range(3)]
    c = sj.collect_counts(_tiny_llama(), [seq] * 4, scopes, batch_size=4, progress=False)
    assert c.tokens.tolist() == [600, 200, 200, 200] and c.neuron_active[0].max() > 255
    np.testing.assert_array_equal(c.neuron_active[0], c.neuron_active[1:].sum(0))


def test_a_store_with_the_sums_serves_a_collection_without_them(tmp_path):
    """collect_counts(sums=False) refused a store made with sums=True as "made for different
    inputs", though it holds the same counts and the pipeline reuses it (`served_by`). Now it
    is reused (or an unfinished one finished, with its sums), and the result is what a
    collection without the sums gives; a store of other tokens is still refused."""
    model = _tiny_llama()
    seqs, scopes = make_inputs(n=10)
    plain = sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False)
    done, part = tmp_path / "done", tmp_path / "part"
    sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=done, chunk_rows=3, sums=True)
    # _stop_after_chunks=0 stops any chunk that would run: a reused store runs none.
    reused = sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=done, chunk_rows=3,
                               _stop_after_chunks=0)
    assert reused.sums() == {} and reused.meta["fingerprint"]["sums"] is True
    np.testing.assert_array_equal(reused.neuron_active[:], plain.neuron_active)
    with pytest.raises(KeyboardInterrupt):
        sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=part, chunk_rows=3, sums=True,
                          _stop_after_chunks=1)
    finished = sj.collect_counts(model, seqs, scopes, batch_size=2, progress=False, out=part, chunk_rows=3)
    np.testing.assert_array_equal(finished.neuron_active[:], plain.neuron_active)
    assert finished.sums() == {} and set(sj.open_counts(part).sums()) == {"neuron_act_sum"}
    np.testing.assert_allclose(sj.open_counts(part).neuron_act_sum[:], sj.open_counts(done).neuron_act_sum[:],
                               rtol=1e-5)
    # Less than asked, or other inputs, is refused as before.
    sj.collect_counts(model, seqs, scopes, progress=False, out=tmp_path / "bare")
    with pytest.raises(ValueError, match=r"different inputs .*sums"):
        sj.collect_counts(model, seqs, scopes, progress=False, out=tmp_path / "bare", sums=True)
    with pytest.raises(ValueError, match=r"different inputs .*tokens"):
        sj.collect_counts(model, seqs[:9] + seqs[:1], scopes[:9] + scopes[:1], progress=False, out=done, chunk_rows=3)
    # Replaced for other inputs, the store is counted as asked: without the sums.
    sj.collect_counts(model, seqs[:9] + seqs[:1], scopes[:9] + scopes[:1], progress=False, out=done, chunk_rows=3,
                      overwrite=True)
    assert sj.open_counts(done).sums() == {}
