"""Fingerprints: what a stage that reuses finished work checks before it does.

A fingerprint is a flat mapping of named components: settings that change the
result (``"scope": "prompt"``) and digests of inputs too large to store
(``"records"``: the record ids, ``"tokens"``: the tokenized sequences, ``"model"``:
the weights files' sizes and modification times). Outputs carry the fingerprint
of their inputs beside them; before reusing an output, a stage compares it with
the fingerprint of the current inputs, and `difference` names what changed.

    fp = {"model": model_fingerprint(path), "scope": "prompt", "tokens": digest_arrays(ids)}
    keys = difference(stored, fp)        # ["scope"] when only the scope changed
    describe(keys, stored, fp)           # "scope: 'prompt' -> 'all'"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

# Files of a Hugging Face directory whose change changes the model's outputs.
_MODEL_FILES = ("config.json", "model.safetensors.index.json")


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digest_arrays(*groups: Iterable[np.ndarray] | None) -> str:
    """A short stable hash of sequences of arrays (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for group in groups:
        h.update(b"|group|")
        for a in group or ():
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_files_fingerprint(path: str | os.PathLike) -> str:
    """Digest of a model directory: its absolute path, and the size and modification time
    of config.json and every weights file (not their bytes: hashing 100 GB of weights
    would take longer than most runs)."""
    p = Path(path).resolve()
    files = sorted(f for f in p.glob("*.safetensors")) + [p / n for n in _MODEL_FILES if (p / n).exists()]
    stats = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    return digest({"path": str(p), "files": stats})


def model_fingerprint(model) -> str:
    """Digest of a loaded model: its weights files when it came from a directory, else its
    architecture and a checksum of every parameter (computed on the device)."""
    source = getattr(model, "source_path", None)
    if source:
        return model_files_fingerprint(source)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    sums = [(float(jnp.sum(x.astype(jnp.float32))), float(jnp.sum(jnp.abs(x.astype(jnp.float32)))))
            for x in leaves]
    return digest({"config": model.config.to_hf_config(), "checksums": sums})


def difference(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ (a key missing on one side differs), in `new`'s order."""
    old = dict(old or {})
    keys = list(new) + [k for k in old if k not in new]
    return [k for k in keys if old.get(k, _MISSING) != new.get(k, _MISSING)]


_MISSING = object()


def _shown(v: Any) -> str:
    if v is _MISSING or v is None:
        return "unset"
    text = repr(v)
    return text if len(text) <= 40 else "…"


def describe(keys: list[str], old: Mapping[str, Any] | None, new: Mapping[str, Any],
             labels: Mapping[str, str] | None = None, limit: int = 3) -> str:
    """One phrase naming what changed: "data.scope: 'prompt' -> 'all'; records changed (and 1 more)".

    Digests (and other long values) are reported as "changed"; `labels` maps component
    names to the names the user knows (config keys).
    """
    old = dict(old or {})
    labels = labels or {}
    parts = []
    for k in keys[:limit]:
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        name = labels.get(k, k)
        if _shown(a) == "…" or _shown(b) == "…" or (isinstance(b, str) and re.fullmatch("[0-9a-f]{16}", b)):
            parts.append(f"{name} changed")
        else:
            parts.append(f"{name}: {_shown(a)} -> {_shown(b)}")
    more = f" (and {len(keys) - limit} more: {', '.join(labels.get(k, k) for k in keys[limit:])})" \
        if len(keys) > limit else ""
    return "; ".join(parts) + more


FINGERPRINT_FILE = "fingerprint.json"


def write_fingerprint(directory: str | os.PathLike, stage: str, components: Mapping[str, Any]) -> Path:
    """Write ``<directory>/fingerprint.json`` ({"stage", "components", "digest"}) atomically."""
    from sparcom_jax.fileio import write_json

    path = Path(directory) / FINGERPRINT_FILE
    write_json(path, {"stage": stage, "components": dict(components), "digest": digest(dict(components))})
    return path


def read_fingerprint(directory: str | os.PathLike) -> dict | None:
    """The components stored in ``<directory>/fingerprint.json``, or None when there is none."""
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["components"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}  # unreadable: differs from anything
