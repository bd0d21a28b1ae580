"""sparcom_jax.runtime: host batches onto devices across processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

PUT_TWO_PROCESSES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_put_batch_whole_batch_and_own_rows_on_two_processes(tmp_path):
    """Training gives every process the whole batch, collection each its own rows: both
    must assemble the same global [8, 3] array (one process alone cannot tell them apart)."""
    (tmp_path / "run.py").write_text(PUT_TWO_PROCESSES)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(i), port, str(tmp_path / f"{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    whole = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    for i in range(2):
        r = np.load(tmp_path / f"{i}.npz")
        assert tuple(r["g_shape"]) == (8, 3) and tuple(r["l_shape"]) == (8, 3)
        np.testing.assert_array_equal(r["g"], whole)
        np.testing.assert_array_equal(r["l"], whole + 100)
