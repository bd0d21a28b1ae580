"""sparcom_jax.runtime: the persistent compilation cache, compile counting, host batches onto devices.

Each case runs in fresh processes: the cache is process-wide JAX state, and "a second
process starts faster" is the claim under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import json
from pathlib import Path

import numpy as np
import pytest
from launch import run_processes

PUT_TWO_PROCESSES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    import numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.runtime import put_batch

    sharding = NamedSharding(make_mesh(data=4, model=1), P("data"))
    whole = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)  # the same on both processes
    g = put_batch(whole, sharding, global_batch=True)
    mine = whole[4 * pid:4 * pid + 4] + 100  # this process's rows only
    l = put_batch(mine, sharding, global_batch=False)
    np.savez(out, g_shape=g.shape, l_shape=l.shape,
             g=multihost_utils.process_allgather(g, tiled=True), l=multihost_utils.process_allgather(l, tiled=True))
    jax.distributed.shutdown()
""")


def test_put_batch_whole_batch_and_own_rows_on_two_processes(tmp_path):
    """Training gives every process the whole batch, collection each its own rows: both
    must assemble the same global [8, 3] array (one process alone cannot tell them apart)."""
    (tmp_path / "run.py").write_text(PUT_TWO_PROCESSES)
    run_processes(lambda i, port: [str(tmp_path / "run.py"), str(i), port, str(tmp_path / f"{i}.npz")])
    whole = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    for i in range(2):
        r = np.load(tmp_path / f"{i}.npz")
        assert tuple(r["g_shape"]) == (8, 3) and tuple(r["l_shape"]) == (8, 3)
        np.testing.assert_array_equal(r["g"], whole)
        np.testing.assert_array_equal(r["l"], whole + 100)


# A fresh process: load a tiny checkpoint and count one batch through the library's entry
# points (neither turns the cache on explicitly: they must do it by default).
COUNT_ONE_BATCH = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    import sparcom_jax as sj
    from sparcom_jax.runtime import compile_stats

    jax.numpy.arange(3).block_until_ready()  # the user compiled something first: the cache must still start
    model = sj.load_model(sys.argv[1], with_tokenizer=False)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 96, 12) for _ in range(2)]
    c = sj.collect_counts(model, seqs, batch_size=2, buckets=[16], progress=False)
    assert int(c.tokens.sum()) == 24
    print("RESULT", json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                                "min_secs": jax.config.jax_persistent_cache_min_compile_time_secs,
                                "max_size": jax.config.jax_compilation_cache_max_size,
                                **compile_stats()}))
""")


def _count_once(tmp_path, ckpt, **env):
    script = tmp_path / "count.py"
    script.write_text(COUNT_ONE_BATCH)
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "SPARCOM_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    r = subprocess.run([sys.executable, str(script), str(ckpt)], env={**base, **env}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def _entries(d: Path) -> set[str]:
    return {p.name for p in d.rglob("*") if p.is_file()} if d.exists() else set()


@pytest.fixture(scope="module")
def cold_and_warm(hf_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    ckpt = hf_checkpoint("llama")
    cache = tmp / "jax_cache"
    cold = _count_once(tmp, ckpt, SPARCOM_JAX_CACHE=str(cache))
    written = _entries(cache)
    warm = _count_once(tmp, ckpt, SPARCOM_JAX_CACHE=str(cache))
    return dict(tmp=tmp, ckpt=ckpt, cache=cache, cold=cold, warm=warm, written=written)


def test_second_process_loads_the_compiled_steps_from_the_cache(cold_and_warm):
    cold, warm, cache = cold_and_warm["cold"], cold_and_warm["warm"], cold_and_warm["cache"]
    assert cold["dir"] == warm["dir"] == str(cache) and cold["min_secs"] == 0.0
    # A bounded cache (it cannot fill the user's disk), which JAX reads and writes under a file
    # lock, so processes sharing it do not write or evict one entry at once.
    assert cold["max_size"] > 0 and (cache / ".lockfile").is_file()
    # The cold process compiled everything it ran and wrote it to the cache.
    assert cold["compilations"] >= 1 and cold["cache_hits"] == 0 and cold["compile_seconds"] > 0
    assert len(cold_and_warm["written"]) >= cold["compilations"]
    # The second process found every program there: nothing compiled again.
    assert warm["cache_hits"] == cold["compilations"] and warm["compilations"] == 0
    assert _entries(cache) == cold_and_warm["written"]


def test_cache_off_and_the_users_own_dir(cold_and_warm, tmp_path):
    tmp, ckpt = cold_and_warm["tmp"], cold_and_warm["ckpt"]
    for off in ("off", "0"):
        r = _count_once(tmp, ckpt, SPARCOM_JAX_CACHE=off, XDG_CACHE_HOME=str(tmp_path / "xdg"))
        assert r["dir"] is None and r["cache_hits"] == 0 and r["compilations"] == cold_and_warm["cold"]["compilations"]
    assert not (tmp_path / "xdg").exists()
    # Default: the user's cache directory, per jax version.
    r = _count_once(tmp, ckpt, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    import jax

    default = tmp_path / "xdg" / "sparcom_jax" / f"jax-{jax.__version__}"
    assert r["dir"] == str(default) and _entries(default)
    # A jax_compilation_cache_dir the user set wins, with jax's own threshold left alone.
    r = _count_once(tmp, ckpt, SPARCOM_JAX_CACHE=str(tmp_path / "ours"),
                    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "user"))
    assert r["dir"] == str(tmp_path / "user") and r["min_secs"] == 1.0 and not (tmp_path / "ours").exists()


def test_compile_stats_since_counts_one_new_program():
    import time

    import jax

    from sparcom_jax.runtime import compile_stats, track_compilations

    track_compilations()
    k = time.time_ns() % 1_000_003  # a constant no earlier run compiled: never a cache hit
    before = compile_stats()
    f = jax.jit(lambda x: x * k + 1)
    f(np.arange(3))
    f(np.arange(3))  # the same shape again: no new program
    d = compile_stats(since=before)
    assert d["compilations"] == 1 and d["cache_hits"] == 0 and d["compile_seconds"] > 0
    f(np.arange(4))  # a new shape is a new program
    assert compile_stats(since=before)["compilations"] == 2


# Each entry point, called first in a fresh process (with input it rejects, so nothing
# else runs), turns the cache on before it does anything.
ENTRY_POINT = textwrap.dedent("""
    import sys, jax
    which = sys.argv[1]
    try:
        if which == "load_model":
            from sparcom_jax import load_model
            load_model("/nonexistent/model")
        elif which == "collect_counts":
            from sparcom_jax import collect_counts
            collect_counts(None, [])
        elif which == "finetune":
            from sparcom_jax.train import TrainConfig, finetune
            finetune(None, [], None, TrainConfig(), "/nonexistent/run")
        elif which == "cli":
            from sparcom_jax.cli import main
            # a real config whose weights are not on this machine: the command starts jax (and with
            # it the cache), then stops at the missing model (a config error stops before jax)
            main(["collect", "--config", sys.argv[2], "--out", sys.argv[3]])
    except Exception:
        pass
    print("DIR", jax.config.jax_compilation_cache_dir)
""")


@pytest.mark.parametrize("entry", ["load_model", "collect_counts", "finetune", "cli"])
def test_every_entry_point_turns_the_cache_on(entry, tmp_path):
    (tmp_path / "entry.py").write_text(ENTRY_POINT)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    env["SPARCOM_JAX_CACHE"] = str(tmp_path / "c")
    config = Path(__file__).resolve().parents[1] / "configs" / "llama2_7b.yaml"
    r = subprocess.run([sys.executable, str(tmp_path / "entry.py"), entry, str(config), str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"DIR {tmp_path / 'c'}" in r.stdout.splitlines(), r.stdout + r.stderr[-2000:]


# In one process: the cache follows SPARCOM_JAX_CACHE when it changes (as between tests or
# notebook cells), including after JAX has opened the first directory, and "off" stops it.
SWITCH = textwrap.dedent("""
    import os, sys, jax
    from sparcom_jax.runtime import ensure_compilation_cache
    a, b = sys.argv[1:3]
    for i, setting in enumerate([a, b, "off"]):
        os.environ["SPARCOM_JAX_CACHE"] = setting
        ensure_compilation_cache()
        jax.jit(lambda x: x * (i + 7) - 3)(jax.numpy.arange(5)).block_until_ready()
        print("FILES", i, len(os.listdir(a)) if os.path.isdir(a) else 0, len(os.listdir(b)) if os.path.isdir(b) else 0)
""")


def test_cache_follows_the_setting_within_one_process(tmp_path):
    (tmp_path / "switch.py").write_text(SWITCH)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    r = subprocess.run([sys.executable, str(tmp_path / "switch.py"), str(tmp_path / "a"), str(tmp_path / "b")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = [tuple(int(x) for x in ln.split()[2:]) for ln in r.stdout.splitlines() if ln.startswith("FILES")]
    (a0, b0), (a1, b1), (a2, b2) = files
    assert a0 >= 1 and b0 == 0  # the first program went to a
    assert a1 == a0 and b1 >= 1  # the second to b, none to a
    assert (a2, b2) == (a1, b1)  # off: nothing written anywhere


# A cache directory that an unbounded cache wrote to (an earlier sparcom_jax, a process
# without filelock) holds entries without the access-time file JAX's bounded cache reads
# for every entry when it makes room: each later write failed with a warning, nothing new
# was cached.
UNBOUNDED_LEFTOVER = textwrap.dedent("""
    import sys, warnings, jax
    warnings.filterwarnings("error", message=".*persistent compilation cache")  # how JAX reports a failed write
    from sparcom_jax.runtime import ensure_compilation_cache
    ensure_compilation_cache()
    jax.jit(lambda x: x * 5 - 2)(jax.numpy.arange(3)).block_until_ready()
""")


def test_entries_an_unbounded_cache_left_do_not_stop_new_writes(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "jit_old-0123-cache").write_bytes(b"x")  # as an unbounded cache writes it: no -atime
    (tmp_path / "leftover.py").write_text(UNBOUNDED_LEFTOVER)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    r = subprocess.run([sys.executable, str(tmp_path / "leftover.py")], env={**env, "SPARCOM_JAX_CACHE": str(cache)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = _entries(cache)
    assert "jit_old-0123-atime" in names  # adopted, with its modification time
    assert int.from_bytes((cache / "jit_old-0123-atime").read_bytes(), "little") == \
        (cache / "jit_old-0123-cache").stat().st_mtime_ns
    new = {n for n in names if n.endswith("-cache")} - {"jit_old-0123-cache"}
    assert new and all(n[:-len("-cache")] + "-atime" in names for n in new)  # the program was cached


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
def test_released_programs_give_back_their_memory_mappings():
    """Compiled programs hold mappings until released; release gives them back (the guard the
    test suite's conftest and the compile listener's advice rely on)."""
    import jax
    import jax.numpy as jnp

    from sparcom_jax import runtime

    runtime.release_compiled_programs()
    held, cap = runtime.memory_maps()
    assert 0 < held < cap and cap == int(Path("/proc/sys/vm/max_map_count").read_text())
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + jnp.exp(x).max())
    for n in range(1, 31):  # 30 programs (one per shape), kept by f's cache
        f(jnp.ones((n, 4))).block_until_ready()
    grown = runtime.memory_maps()[0]
    assert grown > held + 30, (held, grown)
    runtime.release_compiled_programs()
    assert runtime.memory_maps()[0] < held + (grown - held) / 3, (held, grown)


def test_compilations_near_the_map_cap_warn_once(monkeypatch):
    import warnings

    from sparcom_jax import runtime

    seen = {"maps": (1000, 65530)}
    monkeypatch.setattr(runtime, "memory_maps", lambda: seen["maps"])
    monkeypatch.setattr(runtime, "_maps_warned", False)
    monkeypatch.setattr(runtime, "_programs", 0)
    compile_event = lambda: runtime._on_duration(runtime.BACKEND_COMPILE_EVENT, 0.01)  # noqa: E731
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(2 * runtime.MAPS_CHECK_EVERY):
            compile_event()
        assert got == [] and not runtime.warn_near_map_limit()  # 1.5% of the cap: quiet
        seen["maps"] = (int(runtime.MAPS_WARN_FRACTION * 65530) - 1, 65530)
        assert not runtime.warn_near_map_limit() and got == []  # just below the fraction
        seen["maps"] = (50_000, 65530)
        for _ in range(runtime.MAPS_CHECK_EVERY):  # the next check falls within these
            compile_event()
        assert len(got) == 1 and issubclass(got[0].category, RuntimeWarning)
        msg = str(got[0].message)
        assert "50,000 of the 65,530" in msg and "vm.max_map_count" in msg and "release_compiled_programs" in msg
        for _ in range(3 * runtime.MAPS_CHECK_EVERY):
            compile_event()
        assert runtime.warn_near_map_limit() and len(got) == 1  # near, but said once per process
    monkeypatch.setattr(runtime, "memory_maps", lambda: None)  # not Linux: nothing to say
    assert not runtime.warn_near_map_limit(fraction=0.0)
