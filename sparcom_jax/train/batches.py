"""Deterministic, resumable training batches from tokenized instruction records.

The data order is a pure function of (seed, epoch): every epoch, each length
bucket's members are shuffled with ``np.random.default_rng((seed, epoch))`` and
cut into batches, then the batches of all buckets are shuffled together. So the
batch of optimizer step `s` is known from `s` alone (no iterator state to
checkpoint), and a resumed run sees exactly the batches the uninterrupted run
would have seen.

Shapes are fixed per bucket (`batch_size` rows; a bucket's last batch is padded
with empty rows), so the train step compiles once per bucket length. Padding
within a row is limited by bucketing: a sequence is padded only up to the
smallest bucket that holds it. (Packing several records into one row would need
per-segment attention masks, which the model does not take.)

Axis letters: see `sparcom_jax.axes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from sparcom_jax.data.batching import default_buckets, pad_batch, plan_batches
from sparcom_jax.next_token import target_mask


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The host arrays of one optimizer step.

    Attributes:
      ids_ABT: int32 [A, B/A, T] token ids (right padded with pad_id).
      mask_ABT: bool [A, B/A, T] real tokens.
      targets_ABT: bool [A, B/A, T] loss targets: position t predicts token t+1,
        which must be a real response token (the last column is always False).
      epoch: the epoch this batch belongs to.
      tokens: real tokens in the batch.
    """

    ids_ABT: np.ndarray
    mask_ABT: np.ndarray
    targets_ABT: np.ndarray
    epoch: int
    tokens: int

    @property
    def n_targets(self) -> int:
        return int(self.targets_ABT.sum())


def pad_rows(seqs: Sequence[np.ndarray], scopes: Sequence[np.ndarray], rows: int, length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids int32 [rows, length], mask bool, targets bool; missing rows are empty."""
    ids, mask = pad_batch(seqs, length, pad_id, rows=rows)
    scope, _ = pad_batch([np.asarray(sc, bool) for sc in scopes], length, rows=rows)
    return ids, mask, target_mask(scope, mask)


def resolve_buckets(lengths: np.ndarray, max_length: int, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """The bucket lengths in use: the given ones (sorted) or a geometric ladder up to the longest sequence."""
    longest = int(lengths.max()) if lengths.size else 1
    if buckets is None:
        return default_buckets(min(max_length, max(longest, 16)))
    bks = sorted(set(int(b) for b in buckets))
    if longest > bks[-1]:
        raise ValueError(f"a sequence has {longest} tokens, more than the largest bucket {bks[-1]}")
    return tuple(bks)


class TrainBatches:
    """Step-indexed batches over a fixed set of tokenized sequences.

    Args:
      ids: N int32 arrays [T_n], each at most the largest bucket long.
      scopes: N bool arrays [T_n]: the tokens that are loss targets (the response).
      batch_size: rows per optimizer step (global).
      grad_accum: micro-batches per step; rows are split [A, B/A].
      buckets: increasing padded lengths.
      seed: data-order seed.
      pad_id: id written into padded slots.
    """

    def __init__(self, ids: Sequence[np.ndarray], scopes: Sequence[np.ndarray], *, batch_size: int,
                 grad_accum: int, buckets: Sequence[int], seed: int, pad_id: int = 0):
        if not ids:
            raise ValueError("no training sequences")
        self.ids = [np.asarray(x, np.int32) for x in ids]
        self.scopes = [np.asarray(x, bool) for x in scopes]
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.buckets = tuple(buckets)
        self.seed, self.pad_id = seed, pad_id
        self._lengths = np.array([len(x) for x in self.ids])
        # Shuffling moves sequences only within their bucket, so the batches per bucket (the
        # steps per epoch and the shapes) are the same in every epoch.
        fixed = plan_batches(self._lengths, batch_size, self.buckets, pad_rows=True)
        self.steps_per_epoch = len(fixed)
        self._cache: dict[int, list[tuple[int, np.ndarray]]] = {}

    def fingerprint(self) -> str:
        """Hash of the sequences, target masks and batching, to check a resumed run sees the same data."""
        h = hashlib.sha256()
        for x, s in zip(self.ids, self.scopes):
            h.update(x.tobytes())
            h.update(np.packbits(s).tobytes())
        h.update(repr((self.batch_size, self.grad_accum, self.buckets, self.seed, self.pad_id)).encode())
        return h.hexdigest()[:16]

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket length, member indices) for every step of `epoch`, in order (`plan_batches`
        shuffled by ``default_rng((seed, epoch))``)."""
        if epoch not in self._cache:
            plan = plan_batches(self._lengths, self.batch_size, self.buckets, pad_rows=True,
                                rng=np.random.default_rng((self.seed, epoch)))
            self._cache = {epoch: [(b.length, b.indices) for b in plan.batches]}  # one epoch in memory
        return self._cache[epoch]

    def batch(self, step: int) -> StepBatch:
        """The batch of optimizer step `step` (0-based: the batch that produces step+1)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        length, idx = self.epoch_plan(epoch)[pos]
        ids, mask, targets = pad_rows([self.ids[i] for i in idx], [self.scopes[i] for i in idx],
                                      self.batch_size, length, self.pad_id)
        a = self.grad_accum
        shape = (a, self.batch_size // a, length)
        return StepBatch(ids.reshape(shape), mask.reshape(shape), targets.reshape(shape), epoch,
                         int(mask.sum()))


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """One eval batch: ids/mask/targets [B, T] and, per row, the sequence index (-1 for empty rows)."""

    ids_BT: np.ndarray
    mask_BT: np.ndarray
    targets_BT: np.ndarray
    rows: np.ndarray


def eval_batches(ids: Sequence[np.ndarray], scopes: Sequence[np.ndarray], *, batch_size: int,
                 buckets: Sequence[int], pad_id: int = 0) -> list[EvalBatch]:
    """Fixed-shape eval batches in a fixed order (bucket, then length)."""
    out = []
    for b in plan_batches([len(x) for x in ids], batch_size, buckets, pad_rows=True).batches:
        i, m, t = pad_rows([ids[k] for k in b.indices], [scopes[k] for k in b.indices], batch_size, b.length,
                           pad_id)
        rows = np.full(batch_size, -1, np.int64)
        rows[:b.indices.size] = b.indices
        out.append(EvalBatch(i, m, t, rows))
    return out
