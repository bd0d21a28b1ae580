"""On-disk count stores: tensorstore zarr3 arrays chunked along N, read back lazily.

Layout of a store directory::

    meta.json          n, fields and shapes, record ids, categories, provenance
    progress.json      {"done_chunks": k}: rows [0, k * chunk_rows) are complete
    tokens/            zarr3 int32 [N]
    neuron_active/     zarr3 int32 [N, L, F]          (when present)
    expert_routed/     zarr3 int32 [N, L, E]          (when present)
    expert_neuron_active/ zarr3 int32 [N, L, E, G]    (when present)

Chunks are written in order and `progress.json` is replaced atomically after
each, so an interrupted collection resumes from the last completed chunk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from sparcom_jax.fileio import atomic_write
from sparcom_jax.stats.counts import Counts

STORE_VERSION = 1


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

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype)


class CountStore:
    """Writer for a count store; `open_counts` reads it."""

    def __init__(self, path: str | Path, shapes: dict[str, tuple[int, ...]], *, ids, categories, meta: dict,
                 chunk_rows: int):
        self.path = Path(path)
        self.chunk_rows = int(chunk_rows)
        n = shapes["tokens"][0]
        header = {"version": STORE_VERSION, "n": n, "chunk_rows": self.chunk_rows,
                  "shapes": {k: list(v) for k, v in shapes.items()},
                  "ids": list(ids) if ids is not None else None,
                  "categories": list(categories) if categories is not None else None,
                  "meta": meta}
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            mismatch = [k for k in ("n", "chunk_rows", "shapes", "ids", "categories") if old.get(k) != header[k]]
            old_model = (old.get("meta") or {}).get("model")
            if old_model != meta.get("model"):
                mismatch.append("meta.model")
            if mismatch:
                raise ValueError(
                    f"{meta_path}: this store was made for different inputs ({', '.join(mismatch)} differ), "
                    "so it cannot be resumed; choose a new output directory or delete this one")
            self.done_chunks = self._read_progress()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            for name, shape in shapes.items():
                chunk = (min(self.chunk_rows, max(n, 1)),) + tuple(shape[1:])
                ts.open(_spec(self.path / name), create=True, delete_existing=True, dtype=ts.int32,
                        shape=list(shape), chunk_layout=ts.ChunkLayout(chunk_shape=list(chunk))).result()
            atomic_write(self.path / "progress.json", json.dumps({"done_chunks": 0}))
            atomic_write(meta_path, json.dumps(header))
            self.done_chunks = 0
        self._arrays = {name: ts.open(_spec(self.path / name), open=True).result() for name in shapes}

    def _read_progress(self) -> int:
        p = self.path / "progress.json"
        return int(json.loads(p.read_text())["done_chunks"]) if p.exists() else 0

    def write_chunk(self, k: int, rows: dict[str, np.ndarray]) -> None:
        """Write chunk k (rows [k*chunk_rows, ...)) of every array, then mark it done."""
        if k != self.done_chunks:
            raise RuntimeError(f"chunks must be written in order: expected {self.done_chunks}, got {k}")
        start = k * self.chunk_rows
        futures = [self._arrays[name][start:start + len(v)].write(np.asarray(v, np.int32))
                   for name, v in rows.items()]
        for f in futures:
            f.result()
        self.done_chunks = k + 1
        atomic_write(self.path / "progress.json", json.dumps({"done_chunks": self.done_chunks}))


def is_complete(path: str | Path) -> bool:
    p = Path(path)
    if not (p / "meta.json").exists():
        return False
    meta = json.loads((p / "meta.json").read_text())
    done = json.loads((p / "progress.json").read_text())["done_chunks"]
    return done * meta["chunk_rows"] >= meta["n"]


def open_counts(path: str | Path, *, in_memory: bool = False) -> Counts:
    """Open a count store lazily (arrays are read slice by slice).

    Raises:
      ValueError: when the store is missing or incomplete (an interrupted run: resume it).
    """
    p = Path(path)
    if not (p / "meta.json").exists():
        raise ValueError(f"{p}: no count store here (meta.json missing); run `sparcom collect` first")
    meta = json.loads((p / "meta.json").read_text())
    if not is_complete(p):
        raise ValueError(f"{p}: the collection that writes this store has not finished; "
                         "run the same collect command again to resume it")
    arrays: dict[str, Any] = {name: LazyArray(ts.open(_spec(p / name), open=True).result())
                              for name in meta["shapes"]}
    counts = Counts(
        tokens=arrays.pop("tokens"),
        ids=meta.get("ids"),
        categories=meta.get("categories"),
        meta=dict(meta.get("meta") or {}, store=str(p)),
        **arrays,
    )
    return counts.to_numpy() if in_memory else counts
