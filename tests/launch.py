"""Launching the processes of a multi-process (`jax.distributed`, 127.0.0.1) test run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Callable


def clean_env() -> dict[str, str]:
    """The environment without XLA_FLAGS: each process sets up its own devices."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv: Callable[[int, str], list[str]], n: int = 2, timeout: float = 300,
                  status: Callable[[int], bool] = lambda code: code == 0) -> list[str]:
    """Run `python *argv(i, port)` for processes i = 0..n-1 on one free coordinator port and
    assert that every one exits within `timeout` seconds with a status `status` accepts (0 by
    default; its output's tail in the failure); all are killed on the way out.

    Returns:
      Each process's output (stdout and stderr).
    """
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, *argv(i, port)], env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    outs = []
    try:
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=timeout)
            assert status(p.returncode), f"process {i} exited {p.returncode}:\n{out[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    return outs


def simulate_process(monkeypatch, k: int, p: int, sent: dict) -> None:
    """Make this process act as process `k` of `p` without jax.distributed: `jax.process_index`
    and `process_count` answer so, and `sparcom_jax.parallel.processes.gather` answers its j-th
    call with the rows every process sent in its own j-th call so far (`sent`, shared by the
    simulated processes; zeros for one not yet run), as the allgather would. Run the processes
    in turn, and again until every one has the others' rows. Error-flag gathers (1-D, from
    `raise_together`) report that nobody failed."""
    import jax
    import numpy as np

    from sparcom_jax.parallel import processes

    monkeypatch.setattr(jax, "process_count", lambda: p)
    monkeypatch.setattr(jax, "process_index", lambda: k)
    calls = iter(range(1 << 30))

    def gather(values):
        a = np.asarray(values, np.int64)
        if a.ndim < 2:
            return np.stack([a] * p)
        j = next(calls)
        sent[k, j] = a
        return np.stack([a if i == k else sent.get((i, j), np.zeros_like(a)) for i in range(p)])

    monkeypatch.setattr(processes, "gather", gather)
