"""Feeding length-bucketed batches through a jitted, sharded function, on one or many processes.

The runner owns what collection and loss evaluation share: the mesh, putting
each padded batch on the devices (each process contributes its own rows,
`sparcom_jax.runtime.put_batch`), agreeing on a common schedule of
batch shapes across processes, and bringing per-row results back to the host
of the process that owns the rows.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Callable, Collection, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sparcom_jax.data.batching import fit_buckets, pad_batch, plan_batches
from sparcom_jax.parallel.mesh import check_mesh, check_rows_in_one_process
from sparcom_jax.parallel.sharding import state_shardings, with_mesh
from sparcom_jax.runtime import put_batch


def unpad(sequences):
    """The sequences of a tokenizer's padded output (a mapping with ``input_ids`` and
    ``attention_mask`` [B, T], e.g. a `BatchEncoding`): each row without its padding, on
    either side. Anything else is returned as it is.

    Raises:
      ValueError: for one padded [B, T] array without its mask: its padding would be
        counted as tokens (and, padded on the left, seen by every real token).
    """
    if isinstance(sequences, Mapping) and "input_ids" in sequences:
        ids = np.asarray(sequences["input_ids"])
        if "attention_mask" not in sequences:
            if ids.ndim == 2:
                raise ValueError("sequences: input_ids [B, T] without an attention_mask; pass the tokenizer's "
                                 "whole output (input_ids and attention_mask), or a list of unpadded 1-D arrays")
            return [ids] if ids.ndim == 1 else ids
        mask = np.asarray(sequences["attention_mask"]).astype(bool)
        if mask.shape != ids.shape or ids.ndim not in (1, 2):
            raise ValueError(f"sequences: input_ids {ids.shape} and attention_mask {mask.shape} must be one "
                             "[B, T] shape")
        return [ids[mask]] if ids.ndim == 1 else [row[keep] for row, keep in zip(ids, mask)]
    if getattr(sequences, "ndim", None) == 2:
        raise ValueError(
            f"sequences: one {list(sequences.shape)} array; if it is padded, the padding would be counted as "
            "tokens. Pass the tokenizer's output itself (input_ids with its attention_mask, e.g. "
            "tokenizer(texts, padding=True, return_tensors='np')), or a list of unpadded 1-D arrays "
            "(list(array) when no row is padded)")
    return sequences


def validate_sequences(sequences, scopes, vocab_size: int):
    """Check and normalise inputs: 1-D int sequences, matching bool scopes, ids < vocab.

    Raises:
      ValueError: naming the sequence index and what is wrong.
    """
    seqs = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"sequence {i}: expected a non-empty 1-D array of token ids, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"sequence {i}: token ids must be integers, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= vocab_size:
            raise ValueError(f"sequence {i}: token id {int(a.max() if a.max() >= vocab_size else a.min())} is "
                             f"outside the model's vocabulary [0, {vocab_size}); was it tokenised with another "
                             "tokenizer?")
        seqs.append(a.astype(np.int32))
    if scopes is None:
        return seqs, None
    if len(scopes) != len(seqs):
        raise ValueError(f"scopes has {len(scopes)} entries but sequences has {len(seqs)}; give one mask per sequence")
    out = []
    for i, (s, m) in enumerate(zip(seqs, scopes)):
        m = np.asarray(m)
        if m.shape != s.shape:
            raise ValueError(f"scope {i}: shape {m.shape} does not match its sequence's {s.shape}")
        out.append(m.astype(bool))
    return seqs, out


def position_error(cfg, lengths, ids: Sequence[str] | None = None) -> ValueError | None:
    """The error for sequences longer than the model's context (`max_position_embeddings`).

    A model computes outputs at positions it was never trained on without complaint, so
    counts or losses there would look normal and mean something else; fine-tuning refuses
    such lengths too (`TrainConfig.check_model`).

    Args:
      cfg: the model's ModelConfig.
      lengths: int [N] sequence lengths.
      ids: optional record ids, to name the longest sequence.

    Returns:
      None, or a ValueError naming how many sequences are too long, the longest (by id
      when given), the model's limit and the fix (the caller raises it before any
      collective, as it does validate_sequences' errors).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    limit = cfg.max_position_embeddings
    over = np.flatnonzero(lengths > limit)
    if not over.size:
        return None
    i = int(over[np.argmax(lengths[over])])
    name = f"record {ids[i]!r}" if ids is not None else f"sequence {i}"
    return ValueError(f"{over.size} of {lengths.size} sequences are longer than the model's context "
                      f"(max_position_embeddings={limit} in its config; {name} has {int(lengths[i])} "
                      "tokens): the model was never trained on those positions, so what it computes there "
                      f"means nothing; cut the records to max_length={limit} or less (collect_instructions "
                      "and make_loss_fn take max_length=, a config data.max_length)")


# Batches in flight on the device while the host fetches the oldest one's results.
PIPELINE_DEPTH = 2
# The most distinct padded lengths (compilations) per run when no buckets are given.
MAX_BUCKETS = 8


def fitted_buckets(lengths, rows: int) -> tuple[int, ...]:
    """The buckets a run uses by default: fitted to its lengths (`fit_buckets`), at most
    `MAX_BUCKETS` of them, multiples of 8 on accelerators."""
    return fit_buckets(lengths, rows, MAX_BUCKETS, align=1 if jax.default_backend() == "cpu" else 8)


def _allgather_ragged(a: np.ndarray) -> np.ndarray:
    """Every process's 1-D int array, zero-padded to the longest: [processes, longest]."""
    from jax.experimental import multihost_utils

    n = int(np.max(multihost_utils.process_allgather(np.array([len(a)]))))
    padded = np.zeros(n, np.int64)
    padded[: len(a)] = a
    return np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), n)


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, step: Callable, out_sharding):
    """One jitted function per (model structure, step, output sharding), reused across calls;
    traced under the output sharding's mesh (`with_mesh`: an MoE layer sorts each data
    shard's rows apart)."""
    fn = with_mesh(functools.partial(step, graphdef), None if out_sharding is None else out_sharding.mesh)
    return jax.jit(fn, out_shardings=out_sharding)


class BatchRunner:
    """Runs `step(graphdef, state, ids, valid, scope, extra) -> dict of [B, ...] arrays` over bucketed batches.

    Args:
      model: the nnx model whose state is passed to `step`.
      step: a pure function of (graphdef, state, ids [B,T], valid [B,T], scope [B,T], extra), where
        `extra` is a replicated pytree (or None) passed to `run`, e.g. ablation masks.
      batch_size: rows per process per batch (rounded up to a multiple of the local data shards).
      mesh: optional ("data", "model") mesh; None runs on the default device.
      buckets: fixed bucket lengths (None: at most `MAX_BUCKETS` lengths fitted to the
        sequences of each run for the least padding, see `fitted_buckets`).
      coded_scopes: the scopes are small non-negative int codes (e.g. bit flags of several
        token sets) that `step` decodes, passed as int32 [B, T] (0 on padding); False (default):
        bool masks, passed as bool [B, T].
    """

    def __init__(self, model, step: Callable, batch_size: int, mesh=None, buckets: Sequence[int] | None = None,
                 coded_scopes: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_mesh(mesh, "collect_counts / make_loss_fn")
        self.mesh = mesh
        self.buckets = tuple(buckets) if buckets is not None else None
        graphdef, state = nnx.split(model)
        # A mesh over several processes' devices makes every run one program of all of them
        # (they agree on its shapes); on one process's devices, the process runs alone.
        processes = 1 if mesh is None else len({d.process_index for d in mesh.devices.flat})
        self.shared = processes > 1
        if mesh is not None:
            check_rows_in_one_process(mesh)  # each process brings its own rows
            # Inputs arrive committed to their shardings (state here, batches in `run`),
            # so jit takes them as they are; outputs stay split over the data axis.
            state = jax.device_put(state, state_shardings(state, mesh))
            local_data = max(1, mesh.shape["data"] // processes)
            self.rows = int(math.ceil(batch_size / local_data) * local_data)
            self.batch_sharding = NamedSharding(mesh, P("data"))
            self.replicated = NamedSharding(mesh, P())
        else:
            self.rows = batch_size
            self.batch_sharding = self.replicated = None
        self._fn = _compiled(graphdef, step, self.batch_sharding)
        self.state = state
        self.padding_fraction = 0.0
        self.coded_scopes = coded_scopes

    def fit_to(self, lengths) -> tuple[int, ...] | None:
        """Fix the buckets of every later `run` (unless given) by fitting them to these lengths.

        Call it once with all the lengths a series of runs will see (e.g. every chunk of
        a collection), so that all runs share one small set of compiled shapes. In a
        multi-process run every process must call it; the buckets are fitted to the
        lengths of all processes, so every process gets the same ones.
        """
        if self.buckets is None:
            every = np.asarray(lengths, np.int64).reshape(-1)
            if self.shared:
                every = _allgather_ragged(every).reshape(-1)
                every = every[every > 0]
            if len(every):
                self.buckets = fitted_buckets(every, self.rows)
        return self.buckets

    def _schedule(self, lengths: np.ndarray):
        # Length-sorted batches padded to at most MAX_BUCKETS lengths fitted to the data:
        # full batches, little padding, and a small known number of compiled shapes (each
        # compiled once per process and cached across calls with the same buckets).
        buckets = self.fit_to(lengths)
        plan = (plan_batches(lengths, self.rows, buckets, pad_rows=True, group="sorted")
                if len(lengths) else None)
        sched = [(b.indices, b.length) for b in plan.batches] if plan else []
        if self.shared:
            # Every process must run the same sequence of shapes (SPMD): agree on the
            # number of steps and take the longest bucket of each step.
            lens = np.max(_allgather_ragged(np.array([t for _, t in sched], np.int64)), axis=0)
            sched = sched + [(np.zeros(0, np.int64), 0)] * (len(lens) - len(sched))
            sched = [(idx, int(max(t, 1))) for (idx, _), t in zip(sched, lens)]
        slots = sum(self.rows * t for _, t in sched)
        self.padding_fraction = 1.0 - float(np.sum(lengths)) / slots if slots else 0.0
        return sched

    def _get(self, tree):
        if not self.shared:
            return jax.tree.map(np.asarray, tree)
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(tree, self.mesh, P("data")))

    def run(self, seqs: list[np.ndarray], scopes: list[np.ndarray] | None, on_batch=None, extra=None,
            fetch: Collection[str] | None = None):
        """Yield (row indices, result dict of numpy [R, ...]) for every batch, in schedule order.

        `fetch`: the result keys brought to the host (None: all); the others never leave the
        device (a pass that does not need a large output does not pay for its transfer).
        """
        if extra is not None and self.mesh is not None:
            extra = jax.device_put(extra, self.replicated)
        lengths = np.array([len(s) for s in seqs], np.int64)
        pending: collections.deque = collections.deque()
        for idx, T in self._schedule(lengths):
            ids, valid = pad_batch([seqs[i] for i in idx], T, rows=self.rows)
            # bool (int32 codes) even for a padding-only step (no scope to take the dtype from):
            # every process runs the same program.
            scope = valid if scopes is None else pad_batch([scopes[i] for i in idx], T, rows=self.rows)[0]
            scope = scope.astype(np.int32) if self.coded_scopes else scope > 0
            out = self._fn(self.state, *(put_batch(x, self.batch_sharding, global_batch=False)
                                         for x in (ids, valid, scope)), extra)
            if fetch is not None:
                out = {k: v for k, v in out.items() if k in fetch}
            pending.append((idx, out, int(valid.sum())))
            # Results are fetched PIPELINE_DEPTH batches behind the dispatch, so the device
            # always has queued work while the host copies counts out and prepares batches.
            if len(pending) > PIPELINE_DEPTH:
                yield self._finish(*pending.popleft(), on_batch)
        while pending:
            yield self._finish(*pending.popleft(), on_batch)

    def _finish(self, idx, out, n_tokens, on_batch):
        res = self._get(out)
        if on_batch is not None:
            on_batch(n_tokens)
        return idx, {k: v[: len(idx)] for k, v in res.items()}
