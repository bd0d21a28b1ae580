"""`collect_counts`: per-instruction neuron and expert activation counts, reduced in-graph.

What leaves the device per batch is at most [B, L, F] (or [B, L, E, G]) int32:
the model's blocks reduce over tokens inside the jitted forward, and the LM
head is skipped. Definitions are METHOD.md's step 1.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparcom_jax.console import fmt_bytes
from sparcom_jax.errors import HostMemoryError
from sparcom_jax.fingerprint import (
    digest, digest_arrays, environment, model_fingerprint, record_digests, served_by, stale_keys,
)
from sparcom_jax.parallel.processes import gather, key_id, raise_together
from sparcom_jax.runtime import compile_stats, ensure_compilation_cache
from sparcom_jax.stats.counts import Counts
from sparcom_jax.stats.runner import BatchRunner, position_error, unpad, validate_sequences
from sparcom_jax.stats.store import CHUNK_ROWS, STORE_VERSION, CountStore, open_counts, read_header

log = logging.getLogger(__name__)


def count_fields(cfg, sums: bool = False) -> dict[str, tuple[int, ...]]:
    """Per-sequence shapes of the count arrays this model produces (and, with `sums`, of the
    float sums beside them, `Counts.SUM_FIELDS`)."""
    L = cfg.num_layers
    out: dict[str, tuple[int, ...]] = {}
    if cfg.neuron_width:
        out["neuron_active"] = (L, cfg.neuron_width)
    if cfg.is_moe:
        out["expert_routed"] = (L, cfg.num_experts)
        out["expert_neuron_active"] = (L, cfg.num_experts, cfg.moe_intermediate_size)
    if sums:
        out.update({Counts.SUM_FIELDS[k]: shape for k, shape in out.items()})
    return out


def _field_dtype(name: str):
    return np.float32 if name in Counts.SUM_FIELDS.values() else np.int32


def result_nbytes(cfg, n: int, sums: bool = False) -> int:
    """Bytes of the arrays `collect_counts` returns in memory for `n` sequences: tokens [N]
    int32 and each `count_fields` array [N, ...] (int32 counts, float32 sums). A count store
    on disk holds the same arrays, so this is also its size."""
    per_row = 4 + sum(math.prod(s) * np.dtype(_field_dtype(k)).itemsize for k, s in count_fields(cfg, sums).items())
    return n * per_row


MEMORY_CHECK_ENV = "SPARCOM_JAX_MEMORY_CHECK"
# The in-memory results of the processes on one host may take at most this share of its
# available memory: each process needs room besides its result (the model's weights on a
# CPU backend, the forward's batches, the compiled programs). What the analysis takes
# afterwards is not in it: see `check_result_memory`. A result over NOTE_FRACTION of it is logged.
MEMORY_FRACTION = 0.8
NOTE_FRACTION = 0.25
_AVAILABLE = "memory available now (the host's, or a container's memory limit when lower)"


def available_memory() -> int | None:
    """Bytes of memory a new allocation can take without swapping or being killed: the
    host's (Linux MemAvailable, else the free physical pages of `os.sysconf`), or less when
    this process's control groups leave it less (`cgroup_memory`); None when nothing is known."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            host = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            pass
    known = [b for b in (host, cgroup_memory()) if b is not None]
    return min(known) if known else None


# cgroup v2 and v1 (memory controller) files: the limit, the usage, and the memory.stat key of
# the inactive file cache. v1 writes "no limit" as a number near 2**63, v2 as "max".
_CGROUP_FILES = {"": ("memory.max", "memory.current", "inactive_file"),
                 "memory": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
_NO_LIMIT = 1 << 60


def cgroup_memory(root: str | os.PathLike = "/sys/fs/cgroup", membership: str | os.PathLike = "/proc/self/cgroup"
                  ) -> int | None:
    """Bytes the memory limits of this process's control groups still leave it: a job in a
    16 GB container on a 128 GB host is killed past 16 GB while the host's MemAvailable says
    128. The least, over its group and every group above it that sets a limit, of the limit
    less what the group uses, its inactive file cache not counted (page cache the kernel
    reclaims before it kills).

    Args:
      root: where the cgroup file systems are mounted: v2 at `root`, v1's memory controller
        at `root`/memory.
      membership: the process's groups, one `id:controllers:path` line each. In a container
        its own group is the mount's root, whatever path the line names.

    Returns:
      The bytes, or None when no group sets a limit or none can be read.
    """
    root = Path(root)
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    least = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = parts[1].split(",")
        # cgroup v2 lists no controllers ("0::/path"); v1 lists its memory controller by name
        version = "" if parts[0] == "0" and controllers == [""] else "memory" if "memory" in controllers else None
        if version is None:
            continue
        mount = root / version
        group = mount / parts[2].lstrip("/")
        if not group.is_dir():  # a container's namespaced view: its group is the mount
            group = mount
        limit_file, usage_file, inactive_key = _CGROUP_FILES[version]
        for d in (group, *group.parents):
            limit = _cgroup_number(d / limit_file)
            if limit is not None and limit < _NO_LIMIT:
                used = (_cgroup_number(d / usage_file) or 0) - _cgroup_stat(d / "memory.stat", inactive_key)
                room = max(limit - max(used, 0), 0)
                least = room if least is None else min(least, room)
            if d == mount:
                break
    return least


def _cgroup_number(path: Path) -> int | None:
    """The integer in a cgroup file; None when it is missing, unreadable or "max"."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup_stat(path: Path, key: str) -> int:
    """The value of `key` in a cgroup memory.stat file (`key value` lines); 0 when absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_key() -> str:
    """What names the memory this process allocates from: the running kernel's boot id
    (Linux; one per machine, the same in every container on it), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return "boot " + f.read().strip()
    except OSError:
        import socket

        return "host " + socket.gethostname()


def host_results(nbytes: int) -> tuple[int, int]:
    """(bytes, processes): the in-memory results of every process on this host together,
    `nbytes` being this process's, and how many processes hold them.

    Several processes often share a host (one per GPU; the tests' processes on 127.0.0.1):
    each allocates its result from the same memory. Every process must call this at the
    same point (a collective); with one process it returns (nbytes, 1). The other processes'
    results are counted in whole MiB (rounded up): an allgather carries 32-bit integers.
    """
    mib = 1 << 20
    every = gather([key_id(host_key()), -(-nbytes // mib)])  # [P, 2]
    here = every[:, 0] == every[jax.process_index(), 0]
    here[jax.process_index()] = False
    return nbytes + int(every[here, 1].sum()) * mib, 1 + int(here.sum())


def check_result_memory(nbytes: int, n: int, sums: bool) -> HostMemoryError | None:
    """The error that stops an in-memory collection whose result (`result_nbytes`), with those
    of the other processes on this host (`host_results`), would not fit in the host memory
    available now with margin (`MEMORY_FRACTION`), or None; logs a note when it fits but
    is large. Numpy allocates the result's pages as rows are written, so without this check
    a collection too large for the machine fails (or swaps) only late in the run. Off with
    ``SPARCOM_JAX_MEMORY_CHECK=off``. Every process calls it at the same point.

    Only the collection is checked. An analysis of the result in memory (`analyze_model`)
    holds more beside it: `sparcom_jax.analysis.memory` sizes it step by step (the dry run
    prints it); `Counts.frequencies(field)` of every row at once is a float32 array as large
    as the field's counts.
    """
    from sparcom_jax.fileio import env_off

    host, procs = host_results(nbytes)
    if env_off(MEMORY_CHECK_ENV):
        return None
    avail = available_memory()
    if avail is None:
        return None
    what = f"the in-memory counts of {n} sequence(s) take {fmt_bytes(nbytes)}"
    if procs > 1:
        what += f" here and {fmt_bytes(host)} with those of the other {procs - 1} process(es) on this host"
    if host > MEMORY_FRACTION * avail:
        shrink = "; or collect fewer sequences" + (", or without sums (sums=False halves it)" if sums else "")
        return HostMemoryError(
            f"collect: {what}, more than {MEMORY_FRACTION:.0%} of the {fmt_bytes(avail)} of {_AVAILABLE}. "
            f"Pass out=<dir> to keep them in a count store on disk (read back in chunks; the `sparcom` "
            f"command does this){shrink}. To collect in memory anyway, pass check_memory=False or set "
            f"{MEMORY_CHECK_ENV}=off")
    if host > NOTE_FRACTION * avail:
        log.warning("%s, %.0f%% of the %s of %s; out=<dir> keeps them on disk", what, 100 * host / avail,
                    fmt_bytes(avail), _AVAILABLE)
    return None


def transfer_dtype(T: int):
    """The narrowest unsigned dtype that holds a count of at most T tokens."""
    return jnp.uint8 if T < 2 ** 8 else jnp.uint16 if T < 2 ** 16 else jnp.int32


def step_dtypes(cfg, T: int, sums: bool = False) -> dict[str, np.dtype]:
    """The dtype each `count_fields` array leaves a counting step (`_count_step`) in, for
    sequences padded to T: counts in `transfer_dtype(T)`, sums in float32."""
    return {k: np.dtype(_field_dtype(k) if k in Counts.SUM_FIELDS.values() else transfer_dtype(T))
            for k in count_fields(cfg, sums)}


def step_nbytes(cfg, rows: int, T: int, sums: bool = False) -> dict[str, int]:
    """Bytes of each array one counting step returns for `rows` sequences padded to T, as
    they sit on the device until the host fetches them: each `count_fields` array in its
    `step_dtypes` dtype, the counted tokens int32 and the non-finite flags bool [rows, L]."""
    dtypes = step_dtypes(cfg, T, sums)
    out = {k: rows * math.prod(s) * dtypes[k].itemsize for k, s in count_fields(cfg, sums).items()}
    return {**out, "tokens": rows * 4, "nonfinite": rows * cfg.num_layers}


def _count_step(graphdef, state, ids_BT, valid_BT, scope_BT, extra=None, sums: bool = False):
    model = nnx.merge(graphdef, state)
    count_BT = scope_BT & valid_BT
    out = model.forward(ids_BT, valid_BT, count_mask=count_BT, with_logits=False, with_hidden=False, sums=sums)
    stats = dict(out.stats)
    stats["tokens"] = jnp.sum(count_BT, axis=1, dtype=jnp.int32)
    # Counts never exceed the padded length T, so they leave the device in 1 or 2 bytes
    # (a quarter or half of the int32 traffic); the host accumulates them as int32.
    dt = transfer_dtype(ids_BT.shape[1])
    as_is = ("nonfinite", *Counts.SUM_FIELDS.values())
    return {k: v if k in as_is else v.astype(dt) for k, v in stats.items()}


# A second module-level step (not a fresh partial per call) keeps the compilation cache warm.
_count_sums_step = functools.partial(_count_step, sums=True)


def _check_finite(model, res: dict, idx, ids=None, categories=None) -> ValueError | None:
    """The error that stops counts computed from non-finite activations from being kept
    (`res["nonfinite"]` [R, L]; `idx` [R]: the rows' sequences), or None when every
    activation is finite.

    A NaN is never > 0, so one NaN weight would silently zero every later layer's counts.
    The error names the record (`ids`, `categories`: per sequence, when given): in a
    multi-process run a sequence's index is within the process's share (records k, k+P,
    ...), which the user cannot look up.
    """
    bad = np.asarray(res.pop("nonfinite"), bool)
    if bad.any():
        rows, layers = np.nonzero(bad)
        layer = int(layers.min())
        seq = int(np.asarray(idx)[rows[layers == layer][0]])
        where = getattr(model, "source_path", None) or "the model"
        on = f"sequence {seq}" if ids is None else f"record {ids[seq]!r}"
        if categories is not None:
            on += f" (category {categories[seq]!r})"
        return ValueError(
            f"{where}: non-finite activations (NaN or Inf) in layer {layer} (first of "
            f"{sorted(set(layers.tolist()))}), e.g. on {on}; counts from them would be wrong, so none "
            f"are kept. Check the weights of layer {layer} (a corrupted or badly converted checkpoint) or, in "
            "bfloat16/float16, collect in float32 (an overflow)")
    return None


def _agreed_chunks(start: int, n_chunks: int) -> tuple[int, int]:
    """The chunks [first, last) every process runs: from the earliest chunk any process still has
    to count to the last chunk any process has.

    Each process counts its own share, so shares of different sizes, or stores resumed after
    an interruption that left them at different chunks, give the processes different chunks
    to run; but each chunk's batches are steps of one program over every process's devices,
    which all must take. A process without rows in a chunk runs its steps on padding rows.
    """
    spans = gather([start, n_chunks])
    todo = spans[spans[:, 0] < spans[:, 1]]
    if not len(todo):
        return 0, 0
    return int(todo[:, 0].min()), int(todo[:, 1].max())


def _scatter_rows(rows: dict, idx, res: dict) -> None:
    for key, arr in rows.items():
        arr[idx] = res[key]


class _Progress:
    """A tqdm bar in tokens with tokens/s, shown on process 0 only."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        self.done = 0
        self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True,
                        disable=not enabled or jax.process_index() != 0)
        # A first call sits at 0 % while XLA compiles (seconds to minutes): say why.
        self.bar.set_postfix_str(self.WAITING)

    WAITING = "first batch: compiling the forward for new shapes"

    def __call__(self, n: int):
        if not self.done and n:
            self.bar.set_postfix_str("", refresh=False)
        self.done += n
        self.bar.update(n)

    def close(self, padding_fraction: float):
        self.bar.set_postfix(padding=f"{padding_fraction:.1%}")
        self.bar.close()

    @property
    def tokens_per_s(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)


def check_batch_size(batch_size) -> None:
    """Refuse a batch size that is not an integer (2.5, "8", True) by name, before it
    becomes an obscure indexing error deep in the batching (the runner checks >= 1)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be a positive integer, got {batch_size!r} "
                        f"({type(batch_size).__name__})")


def collect_counts(model, sequences: Sequence, scopes: Sequence | None = None, batch_size: int = 8, *,
                   mesh=None, buckets: Sequence[int] | None = None, progress: bool = True,
                   out: str | Path | None = None, chunk_rows: int = CHUNK_ROWS, ids: Sequence[str] | None = None,
                   categories: Sequence[str] | None = None, meta: dict | None = None,
                   sources: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                   fingerprint: dict | None = None,
                   overwrite: bool = False, sums: bool = False, check_memory: bool = True,
                   _stop_after_chunks: int | None = None) -> Counts:
    """Count, per sequence, how often each neuron is active and each expert is chosen.

    Args:
      model: a `CausalLM` (from `load_model` or `init_model`).
      sequences: N 1-D int arrays of token ids, or a tokenizer's padded output (a mapping
        with input_ids and attention_mask [N, T]; each row is taken without its padding).
        One [N, T] array is refused: its padding would be counted as tokens.
      scopes: optional N 1-D bool arrays (same lengths); only True tokens count.
        Default: every real token.
      batch_size: rows per batch (per process); batches are length-bucketed.
      mesh: optional ("data", "model") mesh. In a multi-process run every process
        passes its own share of the sequences and gets back the counts of those.
      buckets: fixed bucket lengths (compilations = number of buckets used).
      progress: show a progress bar with tokens/s.
      out: a directory for a tensorstore count store; rows are streamed to it in
        chunks of `chunk_rows` and an interrupted run resumes where it stopped.
        In a multi-process run each process writes ``out/process_<k>``.
      ids, categories, sources, groups, meta: stored with the counts (a non-finite
        error names a record by its id and category); meta gets the model, its numerics
        and the `environment` computed under where it does not give them.
      fingerprint: components that identify the inputs (`sparcom_jax.fingerprint`);
        merged over the ones computed here (model, dtype, tokens). A store is
        resumed or reused only for the same fingerprint and labels (`CountStore`); one
        made with the sums serves a collection without them (`served_by`: reused, or
        finished with its sums; the result leaves them out).
      overwrite: replace a store made for other inputs instead of refusing (one that holds
        no counts yet, stopped before its first chunk, is replaced without it).
      sums: also collect, in-graph, the float32 sums beside the counts (`Counts`
        ``neuron_act_sum``, ``expert_weight_sum``, ``expert_neuron_act_sum``): the
        strength of a unit on the tokens where it fires, e.g. to break ties.
      check_memory: without `out`, refuse before the model runs when the result
        (`result_nbytes`) would not fit in the available host memory with margin
        (`check_result_memory`; also off with ``SPARCOM_JAX_MEMORY_CHECK=off``).

    Raises:
      ValueError: when a layer produced non-finite activations on a real token (naming
        the first such layer and a record); the chunk holding it is not written.
      HostMemoryError: without `out`, when the result would not fit in host memory.

    Returns:
      Counts with tokens [N], neuron_active [N, L, F] (dense FFN or shared expert),
      expert_routed [N, L, E] and expert_neuron_active [N, L, E, G] (MoE), and the
      sums with `sums`; lazily read arrays when `out` is given.
    """
    check_batch_size(batch_size)
    ensure_compilation_cache()
    compiled_before = compile_stats()
    cfg = model.config
    seqs, scps = validate_sequences(unpad(sequences), scopes, cfg.vocab_size)
    n = len(seqs)
    labels = {"ids": ids, "categories": categories, "sources": sources, "groups": groups}
    for name, v in labels.items():
        if v is not None and len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries but there are {n} sequences")
    labels = {name: None if v is None else list(v) for name, v in labels.items()}
    too_long = position_error(cfg, [len(s) for s in seqs], labels["ids"])
    if too_long is not None:  # raised here, like validate_sequences' errors: before any collective
        raise too_long
    asked = sums
    if out is not None:
        out = Path(out)
        if jax.process_count() > 1:
            out = out / f"process_{jax.process_index()}"
        fp = _as_served(out, _store_fingerprint(model, seqs, scps, sums, fingerprint))
        sums = sums or fp["sums"] is True  # a store with the sums serves a collection without them
    fields = count_fields(cfg, sums)
    shapes = {"tokens": (n,), **{k: (n,) + s for k, s in fields.items()}}
    if out is None and check_memory:  # before any model work: the result's pages fill late in the run
        raise_together(check_result_memory(result_nbytes(cfg, n, sums), n, sums), "collect: checking host memory")
    meta = dict(meta or {})
    for key, value in (("model", getattr(model, "source_path", None)), ("model_type", cfg.model_type),
                       ("moe_dispatch", model.moe_dispatch), ("attention", model.dispatch.attention),
                       ("dtype", jnp.dtype(model.dtype).name), ("gate_dtype", model.gate_dtype),
                       ("environment", environment())):  # (a resumed store adds this run's: note_environment)
        meta.setdefault(key, value)

    runner = BatchRunner(model, _count_sums_step if sums else _count_step, batch_size, mesh=mesh, buckets=buckets)
    runner.fit_to([len(s) for s in seqs])  # one bucket set for every chunk (and a resumed run)
    bar = _Progress(sum(len(s) for s in seqs), progress, "collect")
    if out is not None:
        store = error = None
        try:
            store = CountStore(out, shapes, **labels, meta=meta, chunk_rows=chunk_rows, fingerprint=fp,
                               overwrite=overwrite, dtypes={k: _field_dtype(k) for k in shapes},
                               token_digests=record_digests(seqs, scps))
        except Exception as e:  # e.g. made for other inputs: every process stops, not this one alone
            error = e
        try:
            raise_together(error, f"collect: opening the count store {out}")
        except BaseException:
            if store is not None:  # opened here while another process failed: its lock must not outlive this
                store.close()
            raise
        chunk = store.chunk_rows
        start = store.done_chunks
        if start * chunk < n:  # chunks to make here: under this run's environment
            store.note_environment(environment())
        # Tokens of chunks already done count as progress.
        bar(sum(len(s) for s in seqs[:start * chunk]))
    else:
        chunk, start, store = max(n, 1), 0, None
        result = {k: np.zeros(s, _field_dtype(k)) for k, s in shapes.items()}

    n_chunks = -(-n // chunk) if n else 0
    first, last = _agreed_chunks(start, n_chunks)
    pads = []
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="sparcom-collect-writer") as writer:
            for k in range(first, last):
                if _stop_after_chunks is not None and k - first >= _stop_after_chunks:
                    raise KeyboardInterrupt(f"stopped after {_stop_after_chunks} chunk(s) (test hook)")
                # A chunk this process has no rows of (done before, or beyond its share): it runs the
                # chunk's steps with padding rows only, which are never counted.
                mine = start <= k < n_chunks
                lo, hi = (k * chunk, min((k + 1) * chunk, n)) if mine else (0, 0)
                # In memory the batches land straight in the result (one chunk); a store gets chunk buffers.
                rows = ({key: np.zeros((hi - lo,) + s[1:], _field_dtype(key)) for key, s in shapes.items()}
                        if store is not None else {key: result[key][lo:hi] for key in shapes})
                # Rows are scattered into place on a writer thread (numpy copies release the GIL),
                # so the dispatch loop gets back to the device while the host copies counts out.
                pending: list = []
                bad = None
                for idx, res in runner.run(seqs[lo:hi], None if scps is None else scps[lo:hi], on_batch=bar):
                    if bad is None:
                        bad = _check_finite(model, res, lo + np.asarray(idx), labels["ids"], labels["categories"])
                    if bad is None:
                        pending.append(writer.submit(_scatter_rows, rows, idx, res))
                    elif jax.process_count() == 1:
                        break  # no other process waits for this one in the chunk's remaining steps
                    if len(pending) > 2:  # bounds the results waiting on the host
                        pending.pop(0).result()
                for f in pending:
                    f.result()
                # The chunk's steps are all run (other processes take part in each) before any stops.
                raise_together(bad, "collect: non-finite activations")
                if mine:
                    pads.append(runner.padding_fraction)
                    if store is not None:
                        store.write_chunk(k, rows)
    finally:
        if store is not None:
            store.close()  # the lock; an interrupted store stays resumable
    padding = float(np.mean(pads)) if pads else 0.0
    bar.close(padding)
    if store is not None:
        counts = open_counts(out)
        if sums and not asked:  # the sums of a store that served the collection: left out, as not asked for
            counts = dataclasses.replace(counts, **dict.fromkeys(Counts.SUM_FIELDS.values()))
    else:
        counts = Counts(tokens=result.pop("tokens"), **labels, meta=meta, **result)
    counts.meta.update(padding_fraction=padding, tokens_per_s=bar.tokens_per_s,
                       compilations=compile_stats(since=compiled_before))
    return counts


def _store_fingerprint(model, seqs, scps, sums: bool, given: Mapping | None) -> dict:
    """The fingerprint of a count store of `seqs` (and `scps`) counted by `model`: the model,
    dtype, gate dtype, tokens and `sums`, under the caller's components (`given`)."""
    given = dict(given or {})
    # A caller's model digest (the pipeline's, of the model's files) stands; computing it again
    # here read every byte of the weights a second time when the digest cache is off.
    fp = {"model": given["model"] if "model" in given else model_fingerprint(model),
          "dtype": jnp.dtype(model.dtype).name, "tokens": digest_arrays(seqs, scps), "sums": bool(sums)}
    if model.gate_dtype != fp["dtype"]:  # the gate's precision changes counts (absent: as the dtype)
        fp["gate_dtype"] = model.gate_dtype
    fp.update(given)
    return fp


def _as_served(path: Path, fp: dict) -> dict:
    """`fp`, the fingerprint of a collection into the store at `path`, with "sums": True when
    that store holds the activation sums beside counts of the same inputs (`served_by`: it is
    reused, or finished as it was made, with its sums).

    Decided by every process together: the sums choose the program they all run. A store
    of other inputs, or one without the sums when they are asked for, is refused (or
    replaced) by `CountStore` as before.
    """
    header = read_header(path)
    stored = (header or {}).get("fingerprint")
    served = served_by(fp, stored)
    serves = served is not fp and header.get("version") == STORE_VERSION and not stale_keys(stored, served)
    return {**fp, "sums": True} if gather(serves).any() else fp


def check_scope_coverage(enc, max_length: int | None) -> dict[str, int]:
    """Count the records with no token in scope, per category; warn about them and refuse
    a category left with none.

    Such a record (e.g. scope="response" when the prompt fills max_length) is counted
    as an all-zero row; it is kept so rows stay aligned with the records, but it
    weighs on consensus sets like a record that activated nothing, so it is never silent.

    In a multi-process run `enc` is this process's share; the refusals are decided on the
    records of all processes together (a category may lie in one process's share only),
    so every process stops or none does.

    Args:
      enc: an `EncodedSet` (N scope masks bool [T_n], categories, record ids).
      max_length: the cut the sequences were encoded with (for the message).

    Returns:
      {category: records of `enc` with no token in scope}, for every category of
      `enc`, in canonical order.

    Raises:
      ValueError: when there are no records, or a category has no record with a token
        in scope (naming the categories and the fix).
    """
    import warnings

    from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
    from sparcom_jax.data import DataWarning

    total = collections.Counter(enc.categories)
    none_in_scope = [not np.any(scope_T) for scope_T in enc.scopes]
    empty = collections.Counter(cat for cat, e in zip(enc.categories, none_in_scope) if e)
    empty_ids = [rid for rid, e in zip(enc.record_ids, none_in_scope) if e]
    present = [c for c in CATEGORIES if total[c]]
    # [2, C]: records and records with none in scope, per category, over every process.
    every = gather([[total[c] for c in CATEGORIES], [empty[c] for c in CATEGORIES]]).sum(axis=0)
    if not every[0].any():
        raise ValueError("no records to collect counts for; load at least one record per category")
    fix = (f"raise max_length (data.max_length, now {max_length}) or change the scope "
           f"(data.scope, now {enc.scope!r})")
    dead = [(c, int(n)) for c, n, e in zip(CATEGORIES, *every) if n and e == n]
    if dead:
        names = ", ".join(f"{SHORT_NAMES[c]} ({c}, {n} record(s))" for c, n in dead)
        raise ValueError(f"no record of {names} has a token in scope={enc.scope!r} with "
                         f"max_length={max_length}, so nothing of that category would be counted; {fix}")
    if empty_ids:
        per = ", ".join(f"{SHORT_NAMES[c]} {empty[c]} of {total[c]}" for c in present if empty[c])
        shown = ", ".join(map(repr, empty_ids[:5])) + (", ..." if len(empty_ids) > 5 else "")
        warnings.warn(f"{len(empty_ids)} of {len(enc)} record(s) have no token in scope={enc.scope!r} "
                      f"with max_length={max_length} and count as empty rows ({per}; first: {shown}); {fix}",
                      DataWarning, stacklevel=3)
    return {c: empty[c] for c in present}


def content_cut_summary(enc) -> dict[str, int]:
    """How much instruction/input text an `EncodedSet` made with scope="content" leaves out.

    Returns:
      {"records": records with content tokens left out, "tokens": those tokens in all,
      "max_tokens": the most of one record, "capped_records"/"capped_tokens": the same
      for the tokens left out only by the content caps (to match the study's other
      templates; see `sparcom_jax.data.content_caps`)}.
    """
    cut, capped = np.asarray(enc.content_cut), np.asarray(enc.capped)
    return {"records": int((cut > 0).sum()), "tokens": int(cut.sum()), "max_tokens": int(cut.max(initial=0)),
            "capped_records": int((capped > 0).sum()), "capped_tokens": int(capped.sum())}


def merge_meta(metas: Sequence[Mapping]) -> dict:
    """The meta of counts collected in parts (a multi-process run's shares) as one collection's.

    The counts of records add up over the parts (`collect_instructions`' "n_truncated",
    "n_empty_scope" per category, "content_cut"; its "max_tokens" is the largest); every
    other entry is a setting, the same in every part, and is taken from the first.
    """
    from sparcom_jax.categories import CATEGORIES

    out = dict(metas[0])
    if all("n_truncated" in m for m in metas):
        out["n_truncated"] = sum(int(m["n_truncated"]) for m in metas)
    if all("n_empty_scope" in m for m in metas):
        out["n_empty_scope"] = {c: sum(int(m["n_empty_scope"].get(c, 0)) for m in metas) for c in CATEGORIES
                                if any(c in m["n_empty_scope"] for m in metas)}
    if all(m.get("content_cut") for m in metas):
        cuts = [m["content_cut"] for m in metas]
        out["content_cut"] = {k: (max if k == "max_tokens" else sum)(int(c[k]) for c in cuts) for k in cuts[0]}
    return out


def content_caps_fingerprint(enc, content_caps: Mapping[str, int] | None) -> dict[str, str]:
    """The fingerprint component of the content caps an `EncodedSet` was made with:
    {"content_caps": digest} when the caps left out a token of it, else {} (the counted
    tokens are then those of no caps, so stores counted before caps existed, or with
    caps that cut nothing here, are reused; the "tokens" digest covers the rest)."""
    if content_caps is None or not np.asarray(enc.capped).any():
        return {}
    return {"content_caps": digest([int(content_caps[r]) for r in enc.record_ids])}


def collect_instructions(model, records, tokenizer=None, *, template: str = "plain", scope: str = "prompt",
                         batch_size: int = 8, max_length: int | None = 512, out: str | Path | None = None,
                         mesh=None, progress: bool = True, content_caps: Mapping[str, int] | None = None,
                         groups: Sequence[str] | None = None, **kwargs) -> Counts:
    """Encode instruction records and collect their counts (ids and categories attached).

    Args:
      model: a `CausalLM`.
      records: `Record`s (e.g. from `load_instructions`), or anything `load_instructions`
        reads (a path to an instruction file / `datasets` directory, a list of dicts, a
        pandas DataFrame), read and checked with `load_instructions(records)`.
      tokenizer: defaults to the model directory's tokenizer, else the shipped one.
      template: "plain" or "chat"; scope: "prompt" (default, as in the paper),
        "content" (instruction and input only), "response" (teacher forcing) or "all".
      content_caps: {record id: K} with scope="content": count only the first K content
        tokens of each record (`sparcom_jax.data.content_caps`). Needed only when counts
        made under different templates or tokenizers are compared and `max_length` may
        cut content: a longer template header keeps fewer content tokens. The pipeline
        passes the caps of the whole study.
      groups: the records' group keys, kept with the counts for the analysis (default
        `group_ids(records, DEFAULT_GROUP_BY)` of `sparcom_jax.data.splits`: near-duplicate
        instructions). Pass them when `records` is a share of a larger set: near-duplicate
        groups are found over the whole set.
      Other arguments as in `collect_counts`.

    Records with no token in scope are reported per category (a `DataWarning`,
    and meta["n_empty_scope"] = {category: count}); a category with no record
    in scope is a ValueError before the model runs (see `check_scope_coverage`).
    With scope="content", meta["content_cut"] says how much instruction/input text
    truncation and the caps left out (`content_cut_summary`).
    """
    from sparcom_jax.data import as_records, encode_records, resolve_tokenizer
    from sparcom_jax.data.splits import DEFAULT_GROUP_BY, group_ids

    records = as_records(records, "collect_instructions")
    tok = resolve_tokenizer(model, tokenizer)
    enc = encode_records(records, tok, template=template, scope=scope, max_length=max_length,
                         content_caps=content_caps)
    n_empty = check_scope_coverage(enc, max_length)
    meta = {"template": template, "scope": scope, "max_length": max_length, "n_truncated": int(enc.n_truncated),
            "n_empty_scope": n_empty}
    if scope == "content":
        meta["content_cut"] = content_cut_summary(enc)
    # The settings by name, so a store made with others says which one differs.
    fingerprint = {"records": digest(enc.record_ids), "template": template, "scope": scope,
                   "max_length": max_length, **content_caps_fingerprint(enc, content_caps),
                   **(kwargs.pop("fingerprint", None) or {})}
    return collect_counts(model, enc.ids, enc.scopes, batch_size, mesh=mesh, progress=progress, out=out,
                          ids=enc.record_ids, categories=enc.categories, sources=[r.source for r in records],
                          groups=group_ids(records, DEFAULT_GROUP_BY) if groups is None else list(groups),
                          meta=meta, fingerprint=fingerprint, **kwargs)
