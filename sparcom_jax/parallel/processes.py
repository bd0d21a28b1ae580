"""What the processes of a multi-host run decide together.

The processes run one SPMD program: every collective (a jitted step over the global
mesh, an allgather, a barrier) must be reached by all of them, in the same order.
A process that decides on its own to skip a step, to stop early or to raise an error
leaves the others waiting at their next collective until the distributed runtime
gives up on them, minutes later and with a message that does not name the cause.
So decisions that can differ between processes (how many chunks each has to count,
whether its store is complete, whether its input is usable) are gathered first and
taken together. With one process every function here is a plain local answer.

Every process must call these functions at the same point of the program.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import jax

from sparcom_jax.errors import ConfigError, OtherProcessError


def gather(values) -> np.ndarray:
    """Every process's integers, in process order.

    Args:
      values: an int, or an int array of the same shape on every process.

    Returns:
      int64 [processes, *shape] (one process: [1, *shape]).
    """
    a = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return a[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a)).reshape(jax.process_count(), *a.shape)


def key_id(key) -> int:
    """`key` (JSON-able) as a 28-bit digest: equal keys give equal ids, different keys differ but for a
    1 in 2**28 chance. Integers of up to 31 bits cross processes intact (`gather`: the
    allgather holds 32-bit numbers)."""
    from sparcom_jax.fingerprint import digest

    return int(digest(key)[:7], 16)


def gather_keys(key) -> np.ndarray:
    """Every process's `key` as its `key_id`, in process order: int64 [processes]."""
    return gather(key_id(key)).reshape(-1)


def check_same(key, what: str, fix: str, parts: Mapping[str, Any] | None = None) -> None:
    """Refuse, on every process, a run whose processes hold different `key`s (a JSON-able
    value: the config, a digest of the records or of the weights).

    Each process reads its own config, records and weights (its host's files); a process
    whose files differ counts or evaluates other inputs, and its results would be merged
    with the others' as if they were one run's.

    Args:
      parts: `key` as named settings ({"identify.eps": 0.01, ...}): the refusal then names
        those that differ (`differing`).

    Raises:
      ConfigError: naming the processes whose `key` differs from process 0's.
    """
    keys = gather_keys(key)
    differ = np.flatnonzero(keys != keys[0])
    if len(differ):
        named = "" if parts is None else differing(parts)
        where = f" ({named})" if named else ""
        raise ConfigError(f"{what} of process(es) {', '.join(map(str, differ))} of {len(keys)} differ from "
                          f"process 0's{where}; {fix}")


# Ids per process in `differing`'s gather: one size whatever the settings, so that processes holding
# other settings (another version of sparcom_jax) still meet in it.
_PART_SLOTS = 1024


def _slot(name: str) -> int:
    return 1 + key_id(name) % (_PART_SLOTS - 1)


def part_ids(parts: Mapping[str, Any]) -> np.ndarray:
    """int64 [_PART_SLOTS]: slot 0 the id of the settings' names; each setting's (name, value) id
    added (modulo 2**28) into the slot its name falls in."""
    ids = np.zeros(_PART_SLOTS, np.int64)
    ids[0] = key_id(sorted(parts))
    for name, value in parts.items():
        ids[_slot(name)] = (ids[_slot(name)] + key_id([name, value])) % 2 ** 28
    return ids


def differing(parts: Mapping[str, Any]) -> str:
    """The settings of `parts` whose values differ between processes, comma-separated (a setting
    that shares its slot with one that differs is named too), or a note that the processes hold
    other settings. Every process must call it (a gather)."""
    every = gather(part_ids(parts))  # [P, slots]
    if (every[:, 0] != every[0, 0]).any():
        return "it has other settings: another version of sparcom_jax?"
    slots = set(np.flatnonzero((every != every[0]).any(axis=0)).tolist())
    return ", ".join(sorted(name for name in parts if _slot(name) in slots))


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """A block that every process runs, left by all of them together: an error in it on any
    process is raised on every process as the block ends (`raise_together`). The block
    must hold no collective (a process that raised would not reach it)."""
    error = None
    try:
        yield
    except Exception as e:  # raised again below, on every process
        error = e
    raise_together(error, what)


# The number of `raise_together` calls so far: the same on every process (they call it at the
# same points), so it names one call's messages in the coordination service.
_rounds = itertools.count()


def raise_together(error: BaseException | None, what: str) -> None:
    """Raise on every process when any process has an error.

    Each process has its own log (on a TPU pod, one per worker): the failed process
    leaves its error's message with jax.distributed's coordination service, and the
    others' error quotes it.

    Args:
      error: this process's error, or None.
      what: what the processes were doing, for the message of the others.

    Raises:
      `error` on the process that has it; `OtherProcessError`, naming the first failed
      process and its error, on the others.
    """
    key = f"sparcom/raise_together/{next(_rounds)}"
    if error is not None and jax.process_count() > 1:
        _post(f"{key}/{jax.process_index()}", f"{type(error).__name__}: {error}")
    failed = gather(error is not None).reshape(-1)
    if not failed.any():
        return
    k = int(np.flatnonzero(failed)[0])
    said = None if error is not None else _fetch(f"{key}/{k}")
    if jax.process_count() > 1:
        # The failed process leaves once the others have read its message: process 0 holds the
        # coordination service, which goes with it.
        gather(0)
    if error is not None:
        raise error
    raise OtherProcessError(f"{what}: process {k} of {jax.process_count()} stopped with an error (its log "
                            f"says why){': ' + said if said else ''}; every process stops with it")


def _coordination():
    """jax.distributed's key-value client, or None (one process; a jax without it). JAX has no
    public API for it: the private one is read defensively, and a message is only a courtesy."""
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def _post(key: str, message: str) -> None:
    """Leave `message` (as one line, at most 500 characters) under `key` for the other processes."""
    client = _coordination()
    if client is not None:
        line = " | ".join(part.strip() for part in message.splitlines() if part.strip())
        try:
            client.key_value_set(key, line[:500] + ("..." if len(line) > 500 else ""))
        except Exception:  # the caller raises the error itself either way
            pass


def _fetch(key: str) -> str | None:
    """The message another process left under `key` (`_post`); None when there is none. It was
    posted before the gather that told this process of the error, so it is there at once."""
    client = _coordination()
    if client is None:
        return None
    try:
        return client.blocking_key_value_get(key, 5_000)
    except Exception:  # without it the message says "its log says why"
        return None


def share_map(fn: Callable[[int], Sequence[float]], n: int, width: int, what: str) -> np.ndarray:
    """`fn(i)` for i in range(n), each i on one process (process k takes k, k+P, ...), the
    results on every process, bit for bit as the process that made them has them.

    For work whose items need no collective (each process runs them on its own devices):
    P processes take about 1/P of the time, and every process gets what one process
    running every item would.

    Args:
      fn: item index -> float [width]; it runs only this process's items.
      n: the number of items.
      width: floats per item.
      what: what the processes are doing, for the message when one of them fails.

    Returns:
      float64 [n, width], row i = fn(i).

    Raises:
      Any error of `fn` on every process together (`raise_together`).
    """
    p, k = jax.process_count(), jax.process_index()
    mine = range(k, n, p)
    rows = -(-n // p)
    out = np.full((rows, width), np.nan)
    with together(what):
        for j, i in enumerate(mine):
            out[j] = fn(i)
    if p == 1:
        return out[:n]
    # Carried as int32 bit patterns: the allgather goes through JAX, which holds 32-bit numbers only.
    every = gather(out.view(np.int32)).astype(np.int32).view(np.float64)  # [P, rows, width]
    return every.transpose(1, 0, 2).reshape(rows * p, width)[:n]  # process k's row j is item j*P + k
