"""On-disk count stores: tensorstore zarr3 arrays chunked along N, read back lazily.

Layout of a store directory::

    meta.json          n, fields and shapes, record ids, categories, sources and group keys
                       (absent in stores written before they were kept), provenance (with the
                       environment of each run that wrote chunks: `CountStore.note_environment`), the
                       fingerprint of the inputs (model, records, tokens, settings) and a short
                       digest of each record's tokens (names the records that changed)
    progress.json      {"done_chunks": k}: rows [0, k * chunk_rows) are complete
    .sparcom.lock      while a collection writes the store: its pid and host
    tokens/            zarr3 int32 [N]
    neuron_active/     zarr3 int32 [N, L, F]          (when present)
    expert_routed/     zarr3 int32 [N, L, E]          (when present)
    expert_neuron_active/ zarr3 int32 [N, L, E, G]    (when present)
    *_sum/             zarr3 float32, like their counts (``collect_counts(sums=True)``)

Chunks are written in order and `progress.json` is replaced atomically after
each, so an interrupted collection resumes from the last completed chunk, and only
when the resuming run has the same fingerprint: a half-finished store is never
completed with counts of other inputs or settings (one stopped before its first chunk
holds no counts: a collection of other inputs makes it again). One writer at a time holds
the store's lock.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorstore as ts

from sparcom_jax.console import log
from sparcom_jax.errors import StaleResultError
from sparcom_jax.fileio import DirLock, atomic_write
from sparcom_jax.fingerprint import changed_records, describe, stale_keys, with_environment
from sparcom_jax.stats.counts import Counts, array_text

# The layout of a store (meta.json's keys, the arrays and their meaning). Bump it when that
# changes: a store of another version is refused (`check_version`), never read as this one.
STORE_VERSION = 1

# Rows per chunk of a store (the zarr chunk along N, and the unit of progress): a lazy read of
# a few rows reads only their chunks, and a write holds one chunk of every array in memory.
CHUNK_ROWS = 256


def check_version(header: Mapping[str, Any], path: str | Path, fix: str) -> None:
    """Refuse a store whose meta.json `header` has another format version than `STORE_VERSION`.

    Raises:
      StaleResultError: naming both versions and `fix`.
    """
    if header.get("version") != STORE_VERSION:
        raise StaleResultError(f"{Path(path) / 'meta.json'}: a count store of {_other_version(header)}; {fix}")


def _other_version(header: Mapping[str, Any]) -> str:
    """How a refusal names the format version of a store (meta.json `header`) of another version."""
    return f"format version {header.get('version')}, written by another sparcom_jax; this one reads version {STORE_VERSION}"


def _spec(path: Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


class LazyArray:
    """A read-only, lazily-read view of a tensorstore array (numpy out of every slice)."""

    def __init__(self, store):
        self._ts = store
        self.shape = tuple(int(d) for d in store.shape)
        self.dtype = store.dtype.numpy_dtype
        self.ndim = len(self.shape)

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self._ts[idx].read().result())

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray({array_text(self)}, on disk)"

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype)


class CountStore:
    """Writer for a count store; `open_counts` reads it.

    Args:
      path: the store directory.
      shapes: {field: shape} of every array, "tokens" [N] included.
      ids, categories, sources, groups: per-row record ids, categories, sources and group
        keys (or None; stores written before group keys existed have none).
      meta: provenance stored in meta.json.
      chunk_rows: rows per chunk (the unit of progress and resumption).
      fingerprint: components of the inputs' fingerprint (`sparcom_jax.fingerprint`);
        an existing store is resumed only when it has the same fingerprint, and the same
        record ids and categories, and sources and group keys where both sides have them.
      overwrite: replace an existing store made for other inputs instead of refusing (one that
        holds no counts yet, `holds_work`, is replaced without it).
      replace: replace any existing store, even one made for these inputs (which would
        otherwise be resumed); cleared under this writer's lock, so no other writer gets in
        between.
      dtypes: {field: numpy dtype} where it is not int32 (the float sums).
      token_digests: `sparcom_jax.fingerprint.record_digests` of the rows' tokens, kept so
        that a refusal can name the records whose tokens changed (`changed_records`).

    Raises:
      StaleResultError: the directory holds a store with counts made for other inputs (and not
        `overwrite`).
      LockedError: another live process is writing this store.
    """

    def __init__(self, path: str | Path, shapes: dict[str, tuple[int, ...]], *, ids, categories, meta: dict,
                 chunk_rows: int, sources=None, groups=None, fingerprint: Mapping[str, Any] | None = None,
                 overwrite: bool = False, replace: bool = False, dtypes: Mapping[str, Any] | None = None,
                 token_digests: str | None = None):
        self.path = Path(path)
        self.chunk_rows = int(chunk_rows)
        self.lock = DirLock(self.path, "count store").acquire()
        try:
            self._open(shapes, dict(ids=ids, categories=categories, sources=sources, groups=groups), meta,
                       dict(fingerprint or {}), overwrite, replace, dict(dtypes or {}), token_digests)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, shapes, labels, meta, fingerprint, overwrite, replace, dtypes, token_digests):
        n = shapes["tokens"][0]
        header = {"version": STORE_VERSION, "n": n, "chunk_rows": self.chunk_rows,
                  "shapes": {k: list(v) for k, v in shapes.items()},
                  "dtypes": {k: np.dtype(dtypes.get(k, np.int32)).name for k in shapes},
                  **{k: None if v is None else list(v) for k, v in labels.items()},
                  "fingerprint": fingerprint, "token_digests": token_digests,
                  "meta": meta}
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            mismatch = [k for k in ("n", "chunk_rows", "shapes", "ids", "categories") if old.get(k) != header[k]]
            if old.get("version") != STORE_VERSION:
                mismatch.insert(0, _other_version(old))
            # Labels that are not in every fingerprint (collect_instructions' has the ids only); a label
            # the store or the caller lacks (written before group keys were kept) has none to compare.
            mismatch += [k for k in ("sources", "groups")
                         if None not in (old.get(k), header[k]) and old[k] != header[k]]
            old_model = (old.get("meta") or {}).get("model")
            if old_model != meta.get("model"):
                mismatch.append("meta.model")
            changed = stale_keys(old.get("fingerprint"), fingerprint)
            if replace or mismatch or changed:
                if not (overwrite or replace):
                    what = ", ".join(mismatch + ([describe(changed, old.get("fingerprint"), fingerprint,
                                                          details={"tokens": changed_records(old, header)})]
                                                 if changed else []))
                    if holds_work(self.path):
                        raise StaleResultError(
                            f"{meta_path}: this store was made for different inputs ({what}), so it cannot be "
                            "resumed or reused; choose a new output directory, or overwrite it (overwrite=True, "
                            "or --overwrite on the command line)")
                    log(f"{self.path}: a collection for different inputs ({what}) stopped here before it "
                        "finished a chunk; the store holds no counts, so it is made again for these")
                _clear(self.path)
            else:
                self.done_chunks = _done_chunks(self.path) or 0
        if not meta_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            for name, shape in shapes.items():
                chunk = (min(self.chunk_rows, max(n, 1)),) + tuple(shape[1:])
                ts.open(_spec(self.path / name), create=True, delete_existing=True,
                        dtype=ts.dtype(header["dtypes"][name]),
                        shape=list(shape), chunk_layout=ts.ChunkLayout(chunk_shape=list(chunk))).result()
            atomic_write(self.path / "progress.json", json.dumps({"done_chunks": 0}))
            atomic_write(meta_path, json.dumps(header))
            self.done_chunks = 0
        self.dtypes = {name: np.dtype(header["dtypes"][name]) for name in shapes}
        self._arrays = {name: ts.open(_spec(self.path / name), open=True).result() for name in shapes}

    def note_environment(self, env: Mapping[str, Any]) -> None:
        """Record that `env` (`sparcom_jax.fingerprint.environment`) makes the chunks from the next
        one on: a collection resumed under other software keeps every environment and the chunks
        each made (meta.json's meta.environments, `with_environment`), rewritten atomically."""
        meta_path = self.path / "meta.json"
        header = json.loads(meta_path.read_text())
        meta = with_environment(header.get("meta") or {}, env, self.done_chunks, "chunk")
        if meta is not None:
            atomic_write(meta_path, json.dumps({**header, "meta": meta}))

    def close(self) -> None:
        """Release the store's lock (the files stay)."""
        self.lock.release()

    def write_chunk(self, k: int, rows: dict[str, np.ndarray]) -> None:
        """Write chunk k (rows [k*chunk_rows, ...)) of every array, then mark it done."""
        if k != self.done_chunks:
            raise RuntimeError(f"chunks must be written in order: expected {self.done_chunks}, got {k}")
        start = k * self.chunk_rows
        futures = [self._arrays[name][start:start + len(v)].write(np.asarray(v, self.dtypes[name]))
                   for name, v in rows.items()]
        for f in futures:
            f.result()
        self.done_chunks = k + 1
        atomic_write(self.path / "progress.json", json.dumps({"done_chunks": self.done_chunks}))


def _clear(path: Path) -> None:
    """Remove the store's files at `path` (not its lock): meta first, so a crash leaves no store."""
    (path / "meta.json").unlink(missing_ok=True)
    (path / "progress.json").unlink(missing_ok=True)
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child)


def _done_chunks(path: Path) -> int | None:
    """Chunks written so far (progress.json), or None when there is no progress file."""
    p = path / "progress.json"
    return int(json.loads(p.read_text())["done_chunks"]) if p.exists() else None


def read_header(path: str | Path) -> dict | None:
    """The store's meta.json (n, shapes, ids, fingerprint, meta, ...), or None when there is no store."""
    p = Path(path) / "meta.json"
    return json.loads(p.read_text()) if p.exists() else None


def rows_done(path: str | Path) -> int:
    """Rows of the store at `path` written so far (0 when there is no store)."""
    p = Path(path)
    header, done = read_header(p), _done_chunks(p)
    return 0 if header is None or done is None else min(done * header["chunk_rows"], header["n"])


def holds_work(path: str | Path) -> bool:
    """Whether `path` holds a store with finished work: a finished chunk, or all of them (a store
    of no records is finished as it is made), or a store of another format version (whose
    progress is not read). A collection stopped before it finished its first chunk leaves a store
    without any: replacing it loses nothing, so it is not protected as one with counts is (a rerun
    with other inputs makes it again instead of asking for overwrite)."""
    header = read_header(path)
    return header is not None and (header.get("version") != STORE_VERSION or rows_done(path) > 0
                                   or is_complete(path))


def is_complete(path: str | Path) -> bool:
    """Whether `path` holds a store whose every chunk is written."""
    p = Path(path)
    header, done = read_header(p), _done_chunks(p)
    return header is not None and done is not None and done * header["chunk_rows"] >= header["n"]


def _stores_below(p: Path) -> str:
    """"the stores ... are below it: open one, ..." when count stores lie in `p` or in `p`/counts (a
    run's output directory, or its counts/ folder, given for one of its stores), else ""."""
    found = sorted(d for root in (p, p / "counts") if root.is_dir() for d in root.iterdir()
                   if read_header(d) is not None)
    if not found:
        return ""
    run = f", or the whole run: sj.open_run({str(p)!r})" if (p / "config.yaml").is_file() else ""
    return (f"the stores {', '.join(str(d) for d in found)} are below it: open one, "
            f"sj.open_counts({str(found[0])!r}){run}")


def open_counts(path: str | Path, *, in_memory: bool = False) -> Counts:
    """Open a count store lazily (arrays are read slice by slice).

    Raises:
      ValueError: when the store is missing or incomplete (an interrupted run: resume it).
      StaleResultError: the store has another format version (`check_version`).
    """
    p = Path(path)
    meta = read_header(p)
    if meta is None:
        raise ValueError(f"{p}: no count store here (meta.json missing); "
                         + (_stores_below(p) or "make one with sj.collect_instructions(model, records, out=...) "
                            "or `sparcom collect`"))
    if not is_complete(p):
        raise ValueError(f"{p}: the collection that writes this store has not finished; run the same "
                         "sj.collect_instructions or collect_counts call (same out=) or `sparcom collect` command again "
                         "to resume it")
    check_version(meta, p, "count the records again (`sparcom collect --overwrite`, or collect_instructions "
                           "with overwrite=True)")
    arrays: dict[str, Any] = {name: LazyArray(ts.open(_spec(p / name), open=True).result())
                              for name in meta["shapes"]}
    counts = Counts(
        tokens=arrays.pop("tokens"),
        ids=meta.get("ids"),
        categories=meta.get("categories"),
        sources=meta.get("sources"),
        groups=meta.get("groups"),
        meta=dict(meta.get("meta") or {}, store=str(p), fingerprint=meta.get("fingerprint") or {}),
        **arrays,
    )
    return counts.to_numpy() if in_memory else counts


def save_counts(counts: Counts, path: str | Path, *, overwrite: bool = False,
                chunk_rows: int = CHUNK_ROWS) -> Path:
    """Write counts held in memory (a collection made without `out=`) to a count store.

    The store is the one `collect_instructions(..., out=path)` writes, read back with
    `open_counts(path)`, so an hour of collection in a notebook need not be repeated to
    keep it. It carries the counts' labels, meta and, for counts read from a store, that
    store's input fingerprint; counts collected in memory have none (only a collection
    with `out=` records its inputs), so a collection pointed at their store refuses to reuse it.
    It is written `chunk_rows` rows at a time, so counts read lazily from another store are
    never held whole in memory.

    Args:
      counts: any Counts (arrays in memory, or lazily read from another store).
      path: the store directory; it must not hold a store already unless `overwrite`.
      overwrite: replace a store there (removed before the new one is written).
      chunk_rows: rows per chunk, as `collect_instructions(..., chunk_rows=)`.

    Returns:
      The store directory.

    Raises:
      StaleResultError: `path` holds a store (and not `overwrite`).
      ValueError: `overwrite` and the counts are read from the store at `path` itself (it
        would be removed before they are read).
      LockedError: another live process is writing the store at `path`.
    """
    p = Path(path)
    if read_header(p) is not None:
        if not overwrite:
            raise StaleResultError(f"{p}: a count store is already here; choose a new directory, or pass "
                                   "overwrite=True to replace it")
        source = (counts.meta or {}).get("store")
        if source is not None and Path(source).resolve() == p.resolve():
            raise ValueError(f"{p}: these counts are read from this store, which overwrite=True would remove "
                             "before reading them; save them to another directory")
    arrays = {"tokens": counts.tokens, **counts.arrays(), **counts.sums()}
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    meta = {k: v for k, v in (counts.meta or {}).items() if k not in ("store", "fingerprint")}
    store = CountStore(p, shapes, ids=counts.ids, categories=counts.categories, sources=counts.sources,
                       groups=counts.groups, meta=meta, chunk_rows=chunk_rows,
                       fingerprint=(counts.meta or {}).get("fingerprint"),
                       # A store of the same counts would be resumed as complete, not written again:
                       # replaced, under the writer's own lock (a store another process is writing is
                       # refused, not removed, and no writer gets in between).
                       replace=overwrite, dtypes={k: np.asarray(v[:0]).dtype for k, v in arrays.items()})
    try:
        for k, start in enumerate(range(0, counts.n, store.chunk_rows)):
            stop = min(start + store.chunk_rows, counts.n)  # a tensorstore slice may not pass the end
            store.write_chunk(k, {name: v[start:stop] for name, v in arrays.items()})
    finally:
        store.close()
    return p
