"""Length-bucketed batching: little padding, few distinct shapes.

Every jitted forward compiles once per input shape, so sequences are padded up to
one of a few bucket lengths fixed in advance (`default_buckets`), not to the
longest sequence of each batch. Within a bucket sequences are sorted by length,
so each batch holds similar lengths. Padding is on the right; the mask marks real
tokens (ARCHITECTURE.md).

`BatchPlan.padding_fraction` is padded slots / all slots over the planned
batches. Without `pad_rows` a batch has only its member rows (the last batch of a
bucket may be short, which adds one shape for that bucket); with `pad_rows=True`
every batch is meant to be padded to `batch_size` rows (one shape per bucket) and
the empty rows count as padding.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of the plan.

    Attributes:
      indices: int [R] positions of the member sequences in the input.
      length: the bucket length every member is padded to (>= each member's length).
      rows: rows the batch is padded to (R, or batch_size with pad_rows=True).
    """

    indices: np.ndarray
    length: int
    rows: int

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, length) of the padded batch."""
        return (self.rows, self.length)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Batches covering every sequence exactly once.

    Attributes:
      batches: ordered by bucket length, then by member length (or shuffled, see
        `plan_batches`).
      buckets: the bucket lengths used.
      n_tokens: real tokens over all batches.
      n_slots: slots over all padded batches (sum of rows * length).
    """

    batches: list[Batch]
    buckets: tuple[int, ...]
    n_tokens: int
    n_slots: int

    @property
    def padding_fraction(self) -> float:
        """Padded slots / all slots (0 when there is nothing to pad)."""
        return 0.0 if self.n_slots == 0 else 1.0 - self.n_tokens / self.n_slots

    @property
    def shapes(self) -> set[tuple[int, int]]:
        """The distinct (rows, length) shapes; one compilation each."""
        return {b.shape for b in self.batches}

    def __len__(self) -> int:
        return len(self.batches)


def default_buckets(max_len: int, min_len: int = 16, steps_per_octave: int = 2) -> tuple[int, ...]:
    """Bucket lengths fixed in advance: a geometric ladder up to `max_len`.

    With two steps per octave the ladder is 16, 24, 32, 48, 64, 96, 128, 192, ...
    (multiples of 8), so a sequence is padded by less than a third of its bucket,
    and the number of shapes grows with log(max_len). `max_len` itself is the
    last bucket.

    Args:
      max_len: the longest sequence length to allow.
      min_len: the shortest bucket.
      steps_per_octave: buckets per doubling of length.

    Returns:
      Increasing bucket lengths, the last one equal to max_len.
    """
    if max_len < 1 or min_len < 1 or steps_per_octave < 1:
        raise ValueError("max_len, min_len and steps_per_octave must be >= 1")
    out: list[int] = []
    base = min_len
    while base < max_len:
        for k in range(steps_per_octave):
            v = base + (base * k) // steps_per_octave
            if v >= 8:  # round up to a multiple of 8, friendlier to accelerators
                v = -(-v // 8) * 8
            if v < max_len and (not out or v > out[-1]):
                out.append(v)
        base *= 2
    out.append(max_len)
    return tuple(out)


def fit_buckets(lengths: Sequence[int] | np.ndarray, batch_size: int, max_buckets: int = 8,
                align: int = 1) -> tuple[int, ...]:
    """At most `max_buckets` bucket lengths that minimise padding for length-sorted batches.

    The sequences are known before anything runs, so the buckets can be fitted to
    them instead of taken from a fixed ladder: with the "sorted" grouping of
    `plan_batches` (consecutive runs of `batch_size` in length order, every batch
    `batch_size` rows), batch j needs a bucket of at least its longest member m_j,
    and the best buckets are a subset of the m_j (rounded up to `align`). An exact
    dynamic programme over the distinct m_j picks the subset with the fewest padded
    slots. The number of compiled shapes stays bounded by `max_buckets`, known in
    advance, however long or varied the sequences are.

    Args:
      lengths: sequence lengths (each >= 1).
      batch_size: rows per batch.
      max_buckets: the most distinct bucket lengths (compilations).
      align: round buckets up to a multiple of this (e.g. 8 on accelerators).

    Returns:
      Increasing bucket lengths; the last one holds the longest sequence.
    """
    if batch_size < 1 or max_buckets < 1 or align < 1:
        raise ValueError("batch_size, max_buckets and align must be >= 1")
    lens = np.sort(np.asarray(lengths, dtype=np.int64).reshape(-1))
    if lens.size == 0:
        return (align,)
    ends = np.minimum(np.arange(batch_size, lens.size + batch_size, batch_size), lens.size) - 1
    while True:
        need = -(-lens[ends] // align) * align  # each batch's smallest admissible bucket, nondecreasing
        values, counts = np.unique(need, return_counts=True)
        if values.size <= 1024:  # keeps the [D, D] tables of the programme small
            break
        align *= 2
    D = values.size
    if D <= max_buckets:
        return tuple(int(v) for v in values)
    # f[d]: fewest slots per row covering every batch with need <= values[d], top bucket values[d],
    # using at most k buckets; parents[k][d]: the next bucket down (-1: the k-1 solution is kept).
    cum = np.cumsum(counts)
    f = values * cum
    above = cum[None, :] - cum[:, None]  # [e, d]: batches with need in (values[e], values[d]]
    lower = np.tril(np.ones((D, D), bool))  # e >= d is not a bucket below d
    parents = []
    for _ in range(max_buckets - 1):
        cand = np.where(lower, np.inf, f[:, None] + values[None, :] * above)
        e_best = np.argmin(cand, axis=0)
        v = cand[e_best, np.arange(D)]
        take = v < f
        parents.append(np.where(take, e_best, -1))
        f = np.where(take, v, f)
    d = D - 1
    out = [int(values[d])]
    for par in reversed(parents):
        if par[d] >= 0:
            d = int(par[d])
            out.append(int(values[d]))
    return tuple(sorted(out))


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    buckets: Sequence[int] | None = None,
    pad_rows: bool = False,
    group: str = "bucket",
    rng: np.random.Generator | None = None,
) -> BatchPlan:
    """Cut sequences into batches whose padded lengths come from fixed buckets.

    Two groupings:
      * "bucket": group sequences by bucket, then cut each bucket into batches
        (a batch never mixes buckets; the last batch of every bucket may be short).
      * "sorted": sort all sequences by length, cut consecutive runs of
        `batch_size`, and pad each batch to the smallest bucket that holds its
        longest member. Only the very last batch can be short, so with
        `pad_rows=True` far fewer empty rows are padded when there are many buckets.

    With `rng` (only for "bucket"), the order is random instead of by length: each
    bucket's members, taken in input order, are permuted by `rng` before they are
    cut, then the batches of all buckets are permuted together. The plan is then a
    function of the generator's state alone (training's data order: a generator
    seeded with (seed, epoch) gives the same batches in every process and run).

    Args:
      lengths: int [N] sequence lengths (each >= 1).
      batch_size: the most rows per batch.
      buckets: increasing bucket lengths; default `default_buckets(max(lengths))`.
      pad_rows: plan every batch as padded to `batch_size` rows.
      group: "bucket" or "sorted".
      rng: shuffle the "bucket" plan with this generator (see above).

    Returns:
      The plan; each index 0..N-1 is in exactly one batch.

    Raises:
      ValueError: a length is < 1 or longer than the largest bucket.
    """
    if group not in ("bucket", "sorted"):
        raise ValueError(f"group must be 'bucket' or 'sorted', got {group!r}")
    if rng is not None and group != "bucket":
        raise ValueError("rng shuffles only the 'bucket' grouping; 'sorted' is ordered by length")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lens.size and lens.min() < 1:
        raise ValueError("every sequence needs at least one token")
    if buckets is None:
        buckets = default_buckets(int(lens.max())) if lens.size else (1,)
    bks = np.asarray(sorted(set(int(b) for b in buckets)), dtype=np.int64)
    if lens.size and lens.max() > bks[-1]:
        raise ValueError(
            f"a sequence has {int(lens.max())} tokens, more than the largest bucket "
            f"({int(bks[-1])}); truncate the sequences (max_length=) or add a bucket"
        )
    which = np.searchsorted(bks, lens, side="left")  # smallest bucket >= length
    if group == "sorted":
        order = np.lexsort((np.arange(lens.size), lens))
        runs = [order[s:s + batch_size] for s in range(0, order.size, batch_size)]
    else:
        runs = []
        for b in np.unique(which):
            members = np.flatnonzero(which == b)  # input order
            if rng is None:  # by (length, index): stable and deterministic
                members = members[np.lexsort((members, lens[members]))]
            else:
                members = members[rng.permutation(members.size)]
            runs += [members[s:s + batch_size] for s in range(0, members.size, batch_size)]
        if rng is not None:
            runs = [runs[i] for i in rng.permutation(len(runs))]
    batches = [Batch(indices=idx, length=int(bks[which[idx].max()]), rows=batch_size if pad_rows else idx.size)
               for idx in runs]
    return BatchPlan(batches=batches, buckets=tuple(int(x) for x in bks), n_tokens=int(lens.sum()),
                     n_slots=sum(b.rows * b.length for b in batches))


def pad_batch(
    seqs: Sequence[np.ndarray],
    length: int,
    pad_id: int = 0,
    rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences into one array.

    Args:
      seqs: R 1-D arrays, each at most `length` long (ids or bool scopes).
      length: T, the padded length.
      pad_id: fill value for padded slots.
      rows: pad to this many rows (B >= R); the extra rows are all padding.

    Returns:
      ids int32 [B, T] (same dtype as a bool input) and mask bool [B, T], True on
      real tokens.
    """
    n = len(seqs)
    b = n if rows is None else rows
    if b < n:
        raise ValueError(f"rows={rows} is smaller than the {n} sequences given")
    dtype = np.bool_ if n and np.asarray(seqs[0]).dtype == np.bool_ else np.int32
    out = np.full((b, length), pad_id, dtype=dtype)
    mask = np.zeros((b, length), dtype=np.bool_)
    for i, s in enumerate(seqs):
        s = np.asarray(s)
        if s.shape[0] > length:
            raise ValueError(f"sequence {i} has {s.shape[0]} tokens, more than length={length}")
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask
