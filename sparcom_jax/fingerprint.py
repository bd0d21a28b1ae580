"""Fingerprints: what a stage that reuses finished work checks before it does.

A fingerprint is a flat mapping of named components: settings that change the
result (``"scope": "prompt"``) and digests of inputs too large to store
(``"records"``: the record ids, ``"tokens"``: the tokenized sequences, ``"model"``:
the content of the weights files). Outputs carry the fingerprint of their inputs
beside them; before reusing an output, a stage compares it with the fingerprint of
the current inputs, and `difference` names what changed.

    fp = {"model": model_files_fingerprint(path), "scope": "prompt", "tokens": digest_arrays(ids)}
    keys = difference(stored, fp)        # ["scope"] when only the scope changed
    describe(keys, stored, fp)           # "scope: 'prompt' -> 'all'"

Beside a fingerprint, `record_digests` keeps a 4-byte digest of each record's tokens,
from which `changed_records` names the records whose tokens changed.

Model weights are fingerprinted by content: the SHA-256 of config.json, the
safetensors index and every ``*.safetensors`` file, by name, without the directory's
path (a moved or copied checkpoint is the same model; weights rewritten in place are
another, whatever their size and times). Hashing reads every byte once; the digest
of each file is then cached (`file_digests`) under the user's cache directory
(``$SPARCOM_JAX_DIGEST_CACHE``, default ``~/.cache/sparcom_jax/weights-sha256``, ``off``
to hash every time), keyed by the file's resolved path and its size, modification
and change times, inode and device. The change time (ctime) is set by the kernel on
every write and cannot be set back, so a rewritten file is hashed again even when
its size and mtime were restored. A call that hashed something prunes the cache
(`prune_digest_cache`): entries of files that are gone or changed go (some hundred
checked per call), then the least recently used beyond `MAX_ENTRIES`.
The tokenizer is not in it: the stages fingerprint the tokens it produced.

Package versions are not in any fingerprint (a patch release must not force recomputing a
week of counts). Every output records them beside its fingerprint instead (`environment`:
python, the packages, JAX's backend and devices, sparcom_jax's commit; work resumed under
another keeps each with the part it made, `with_environment`), and a stage that reuses work
made under other versions says so where that can change a number there (`environment_changes`,
`MODEL_COMPUTE`, `sparcom_jax.pipeline.provenance.note_environment`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sparcom_jax.console import log as say

log = logging.getLogger(__name__)

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


# The version of what the stages compute from the same inputs and settings. Bump it when a
# change alters what a stage computes (a fixed count, rule or statistic): every stage's
# fingerprint then differs from those of results made before, which are refused, not reused.
# Version 1 is left out of the fingerprints (`with_method`), so that results made before the
# version existed, which are version 1, still match.
METHOD_VERSION = 1


def with_method(components: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's fingerprint `components` with the current `METHOD_VERSION` ("method"; absent
    while it is 1)."""
    return dict(components) if METHOD_VERSION == 1 else {**components, "method": METHOD_VERSION}


# Bytes of one record's digest in `record_digests`: a collision (odds 2**-32 per changed
# record) only leaves that record unnamed, since the digest of the whole set decides.
RECORD_DIGEST_BYTES = 4


def record_digests(ids: Sequence[np.ndarray], scopes: Sequence[np.ndarray] | None = None) -> str:
    """One short digest per record of its token ids (and scope mask), as one base64 string.

    Values, not dtypes, are hashed (ids as int64, scopes as bool), so the same tokens held
    in another integer type give the same digest. Kept beside a fingerprint (about 5.3
    bytes per record) so that `changed_records` can name the records whose tokens changed.

    Args:
      ids: N 1-D int arrays [T_n].
      scopes: optional N 1-D bool arrays [T_n].

    Returns:
      base64 of N * RECORD_DIGEST_BYTES bytes, record n's at [n * RECORD_DIGEST_BYTES, ...).
    """
    out = bytearray()
    for n, a in enumerate(ids):
        h = hashlib.blake2b(np.ascontiguousarray(a, dtype="<i8").tobytes(), digest_size=RECORD_DIGEST_BYTES)
        if scopes is not None:
            h.update(b"|scope|" + np.ascontiguousarray(scopes[n], dtype=bool).tobytes())
        out += h.digest()
    return base64.b64encode(bytes(out)).decode()


def changed_records(stored: Mapping[str, Any] | None, current: Mapping[str, Any], limit: int = 3) -> str | None:
    """Which records' tokens changed, from two mappings with "ids", "categories" and
    "token_digests" (`record_digests`), e.g. a count store's header: "2 of 12 records:
    'a' (math), 'b' (code)". None when either lacks its digests (made before they were
    kept) or no record held by both changed (the set or the order of records did)."""
    old, new = dict(stored or {}), dict(current)
    if not old.get("token_digests") or not new.get("token_digests") or not old.get("ids") or not new.get("ids"):
        return None

    def by_id(m):
        raw = base64.b64decode(m["token_digests"])
        k = RECORD_DIGEST_BYTES
        return {i: raw[n * k:(n + 1) * k] for n, i in enumerate(m["ids"])}

    before, after = by_id(old), by_id(new)
    cats = dict(zip(new["ids"], new.get("categories") or ()))
    changed = [i for i in new["ids"] if i in before and before[i] != after[i]]
    if not changed:
        return None
    both = sum(i in before for i in new["ids"])
    named = ", ".join(f"{i!r}" + (f" ({cats[i]})" if i in cats else "") for i in changed[:limit])
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return f"{len(changed)} of {both} records: {named}{more}"


# Prefix of a content digest of model files; older outputs carry a bare digest of the
# files' path, sizes and times (`describe` says so when it meets one).
WEIGHTS_DIGEST = "content:"
DIGEST_CACHE_ENV = "SPARCOM_JAX_DIGEST_CACHE"
# A file changed this recently is hashed but its digest is not cached: on a filesystem
# with coarse timestamps, a rewrite within one tick would keep every stat field.
SETTLE_NS = 2_000_000_000
# Hashing more than this many bytes is announced (and timed): it can take minutes.
ANNOUNCE_BYTES = 2**30
_CHUNK = 16 * 2**20
_warned: set[str] = set()
# A call that hashed something (the cache grows only then) checks this many entries, picked at
# random, for files gone or changed: bounded work whatever the cache's size (a run of cache hits
# checks none), and over calls every entry is checked.
PRUNE_SAMPLE = 256
# Entries kept (each a ~250-byte file, one disk block): some hundred checkpoints of 30 shards.
MAX_ENTRIES = 4096
# A writer's temporary file lives for milliseconds; one this old was left by a killed process.
STALE_TEMP_S = 3600
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.json")
_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.json\..*\.tmp")  # atomic_write's temporary names


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (hashlib releases the GIL while it hashes)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _digest_cache() -> Path | None:
    from sparcom_jax.fileio import cache_root, cache_setting  # not runtime: it imports jax

    return cache_setting(DIGEST_CACHE_ENV, cache_root() / "weights-sha256")


def stat_key(st: os.stat_result) -> list[int]:
    """[size, modification time, change time, inode, device id] of a file's `os.stat`: a file
    whose key is unchanged is taken to be unchanged (the change time cannot be set back)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _entry(cache: Path, real: Path) -> Path:
    return cache / (hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json")


def _cached(cache: Path | None, real: Path, key: list[int]) -> str | None:
    """The cached digest of `real` when its entry is for these stat fields; None on a miss or a
    damaged entry (hashed again, never an error)."""
    if cache is None:
        return None
    entry = _entry(cache, real)
    try:
        e = json.loads(entry.read_text())
        if e["stat"] == key and re.fullmatch("[0-9a-f]{64}", e["sha256"]):
            with contextlib.suppress(OSError):  # its mtime is its last use (pruning keeps the recent)
                os.utime(entry)
            return e["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _current(entry: str) -> bool:
    """Whether a cache entry names a file that is there with the stat fields it was hashed at
    (False for a damaged entry)."""
    try:
        e = json.loads(Path(entry).read_text())
        return stat_key(os.stat(e["path"])) == e["stat"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_unless_replaced(entry: str, inode: int) -> None:
    # Another process may have put a new entry (a new file: atomic_write renames one in) at this
    # name since it was judged; that one stays. (Between this check and the unlink a replacement
    # can still be lost: the file is then hashed once more, the cache is never wrong.)
    with contextlib.suppress(OSError):
        if os.stat(entry).st_ino == inode:
            os.unlink(entry)


def _hash_and_cache(cache: Path | None, real: Path, key: list[int]) -> str:
    start = time.time_ns()
    sha = file_sha256(real)
    # Cached only when the file did not change while it was read, nor just before (see SETTLE_NS).
    if cache is not None and stat_key(real.stat()) == key and max(key[1], key[2]) < start - SETTLE_NS:
        from sparcom_jax.fileio import write_json

        try:  # one entry per file, replaced atomically: concurrent writers at worst both hash
            write_json(_entry(cache, real), {"path": str(real), "stat": key, "sha256": sha})
        except OSError as e:
            if str(cache) not in _warned:
                _warned.add(str(cache))
                log.warning("weights digests not cached: cannot write %s (%s); set %s to a writable "
                            "directory or 'off'", cache, e, DIGEST_CACHE_ENV)
    return sha


def prune_digest_cache(cache: Path, everything: bool = False) -> None:
    """Remove the entries of files that are gone or changed since they were hashed (and damaged
    ones), checking `PRUNE_SAMPLE` entries picked at random (all of them when `everything`),
    then, beyond `MAX_ENTRIES`, the least recently used (down to 90% of it). Never an
    error: a cache that cannot be pruned is left as it is.

    Safe beside processes that use the cache: an entry written while this runs is kept, a
    writer's temporary file is removed only when it is older than `STALE_TEMP_S` (left by a
    killed process), and files in `cache` that are not entries are never touched.
    """
    try:
        with os.scandir(cache) as listing:
            names = list(listing)
    except OSError:
        return
    now = time.time()
    for e in names:
        if _TEMP_NAME.fullmatch(e.name):
            with contextlib.suppress(OSError):
                if now - e.stat().st_mtime > STALE_TEMP_S:
                    os.unlink(e.path)
    entries = [e for e in names if _ENTRY_NAME.fullmatch(e.name)]
    check = entries if everything or len(entries) <= PRUNE_SAMPLE else random.sample(entries, PRUNE_SAMPLE)
    gone = set()
    for e in check:
        with contextlib.suppress(OSError):
            inode = os.stat(e.path).st_ino  # of the entry judged below (not scandir's: overlayfs differs)
            if not _current(e.path):
                _remove_unless_replaced(e.path, inode)
                gone.add(e.name)
    entries = [e for e in entries if e.name not in gone]
    if len(entries) > MAX_ENTRIES:
        used = []
        for e in entries:
            with contextlib.suppress(OSError):
                st = os.stat(e.path)
                used.append((st.st_mtime_ns, e.path, st.st_ino))
        used.sort(reverse=True)
        # down to 90% of the bound, so that the stat of every entry is not redone on each new one
        for _, path, inode in used[MAX_ENTRIES - MAX_ENTRIES // 10:]:
            _remove_unless_replaced(path, inode)


def file_digests(files: Sequence[str | os.PathLike], where: str | os.PathLike | None = None) -> list[str]:
    """SHA-256 of each file, from the digest cache where the file is unchanged since it was
    hashed, else hashed (in threads, one file each) and cached.

    Hashing more than `ANNOUNCE_BYTES` logs one line before and one after (how many GB,
    how long), naming `where` (default: the first file's directory).

    Returns:
      Hex digests in the order of `files`.
    """
    cache = _digest_cache()
    reals = [Path(f).resolve() for f in files]
    keys = [stat_key(r.stat()) for r in reals]
    out = [_cached(cache, r, k) for r, k in zip(reals, keys)]
    todo = [i for i, d in enumerate(out) if d is None]
    size = sum(keys[i][0] for i in todo)
    if size > ANNOUNCE_BYTES:
        where = where or Path(files[todo[0]]).parent
        say(f"hashing {size / 1e9:.1f} GB of model weights in {where} (once: the digests are cached"
            + (f" in {cache})" if cache is not None else "; the cache is off)"))
    t = time.perf_counter()
    if todo:
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1, 8)) as pool:
            for i, sha in zip(todo, pool.map(lambda i: _hash_and_cache(cache, reals[i], keys[i]), todo)):
                out[i] = sha
        if cache is not None:
            prune_digest_cache(cache)
    if size > ANNOUNCE_BYTES:
        sec = time.perf_counter() - t
        say(f"hashed {size / 1e9:.1f} GB in {sec:.1f} s ({size / 1e9 / max(sec, 1e-9):.2f} GB/s)")
    return out


def model_files_fingerprint(path: str | os.PathLike) -> str:
    """Content digest of a model directory: the SHA-256 of config.json, the safetensors index
    and every weights file, by file name (the directory's path is not in it, so a moved or
    copied checkpoint gives the same digest). Returns ``"content:<16 hex>"``."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) + [p / n for n in _MODEL_FILES if (p / n).exists()]
    return WEIGHTS_DIGEST + digest(dict(zip((f.name for f in files), file_digests(files, where=p))))


def _bit_sums(x):
    """uint32 [2]: the float32 bit patterns of `x` summed plainly and weighted by position.

    Integer sums wrap around and are exact in any order, so the result is the same on any
    mesh or sharding; the weights (odd, one per element) tell a permutation apart.
    """
    import jax
    import jax.numpy as jnp

    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    pos = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):  # the flat index, without reshaping a sharded array
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    weights = pos * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)])


@functools.cache
def _bit_sums_of_tree():
    """The jitted `_bit_sums` over a tree: one function, so that a tree checksummed again (a
    resumed collection's model) reuses its program instead of compiling another."""
    import jax

    return jax.jit(lambda p: jax.tree.map(_bit_sums, p))


def params_checksum(params: dict) -> str:
    """A checksum of parameter values (as float32), equal for equal values on any mesh.

    One pass over the parameters on their devices, so that a run can tell its base model
    from another of the same architecture without copying the weights to the host.

    Args:
      params: a nested dict of arrays (`sparcom_jax.train.step.pure_params`), any float dtype and sharding.

    Returns:
      16 hex digits.
    """
    import jax

    sums = jax.device_get(_bit_sums_of_tree()(params))
    h = hashlib.sha256()
    for path, v in sorted((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(sums)):
        h.update(path.encode())
        h.update(np.asarray(v, np.uint32).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Digest of a loaded model: its weights files when it came from a directory, else its
    architecture and `params_checksum` of its parameters (exact; computed on the device)."""
    source = getattr(model, "source_path", None)
    if source:
        return model_files_fingerprint(source)
    from flax import nnx

    checksum = params_checksum(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return digest({"config": model.config.to_hf_config(), "checksum": checksum})


def difference(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ (a key missing on one side differs), in `new`'s order."""
    old = dict(old or {})
    keys = list(new) + [k for k in old if k not in new]
    return [k for k in keys if old.get(k, _MISSING) != new.get(k, _MISSING)]


_MISSING = object()

# Settings whose every effect shows in the tokens they make (the "tokens" component): beside
# equal tokens they changed nothing (a max_length above every record's length).
THROUGH_TOKENS = ("max_length",)


def stale_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The components by which outputs fingerprinted `old` are stale for `new`: `difference`,
    less the settings of `THROUGH_TOKENS` when both sides hold the same "tokens"."""
    keys = difference(old, new)
    if "tokens" in new and "tokens" not in keys:
        keys = [k for k in keys if k not in THROUGH_TOKENS]
    return keys


def served_by(fp: dict[str, Any], stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """`fp` (the fingerprint of a count store: `collect_counts`', the pipeline's
    `collect_fingerprint`) as counts stored with fingerprint `stored` serve it.

    Counts collected with the activation sums (`collect_counts(sums=True)`, collect.sums)
    hold everything a collection without them needs: the same counts of the same records
    in the same order, the float sums beside them. Such a store is reused, or an
    unfinished one completed, as it was made (with the sums): `fp` gets "sums": True. The
    other way, a store without the sums stays stale for a collection that asks for them
    (they were never counted).
    """
    if fp.get("sums") is False and (stored or {}).get("sums") is True:
        return {**fp, "sums": True}
    return fp


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(f"({WEIGHTS_DIGEST})?[0-9a-f]{{16}}", v) is not None


def _shown(v: Any) -> str:
    if v is _MISSING or v is None:
        return "unset"
    text = repr(v)
    return text if len(text) <= 40 else "…"


def describe(keys: list[str], old: Mapping[str, Any] | None, new: Mapping[str, Any],
             labels: Mapping[str, str] | None = None, limit: int = 3,
             details: Mapping[str, str | None] | None = None) -> str:
    """One phrase naming what changed: "data.scope: 'prompt' -> 'all'; records changed (and 1 more)".

    Digests (and other long values) are reported as "changed", followed by `details` of
    the component when there are some (e.g. `changed_records`); `labels` maps component
    names to the names the user knows (config keys).
    """
    details = details or {}
    old = dict(old or {})
    labels = labels or {}
    parts = []
    for k in keys[:limit]:
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        name = labels.get(k, k)
        if _is_digest(b) and _is_digest(a) and b.startswith(WEIGHTS_DIGEST) and not a.startswith(WEIGHTS_DIGEST):
            parts.append(f"{name} changed, or were fingerprinted by an older sparcom_jax (by their path, "
                         "sizes and times, now by their content), so whether they changed cannot be told")
        elif isinstance(a, Mapping) and isinstance(b, Mapping):  # a settings section: the keys that changed
            subs = sorted(difference(a, b), key=str)
            shown = [f"{s}: {_shown(a.get(s, _MISSING))} -> {_shown(b.get(s, _MISSING))}" for s in subs[:limit]]
            rest = f", and {len(subs) - limit} more" if len(subs) > limit else ""
            parts.append(f"{name} changed ({', '.join(shown)}{rest})")
        elif _shown(a) == "…" or _shown(b) == "…" or _is_digest(b):
            parts.append(f"{name} changed" + (f" ({details[k]})" if details.get(k) else ""))
        else:
            parts.append(f"{name}: {_shown(a)} -> {_shown(b)}")
    more = f" (and {len(keys) - limit} more: {', '.join(labels.get(k, k) for k in keys[limit:])})" \
        if len(keys) > limit else ""
    return "; ".join(parts) + more


FINGERPRINT_FILE = "fingerprint.json"


def write_fingerprint(directory: str | os.PathLike, stage: str, components: Mapping[str, Any],
                      token_digests: str | None = None, made_under: Mapping[str, Any] | None = None,
                      environments: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write ``<directory>/fingerprint.json`` ({"stage", "components", "digest"}, the records'
    `token_digests` when given, and the "environment" the outputs were made under: `made_under`,
    default this process's `environment()`; an empty one is left out; with `environments`, every
    environment and the part each made, `with_environment`) atomically."""
    from sparcom_jax.fileio import write_json

    path = Path(directory) / FINGERPRINT_FILE
    made_under = environment() if made_under is None else made_under
    beside = {"token_digests": token_digests} if token_digests else {}
    beside.update({"environment": dict(made_under)} if made_under else {})
    beside.update({"environments": [dict(p) for p in environments]} if environments else {})
    write_json(path, {"stage": stage, "components": dict(components), "digest": digest(dict(components)), **beside})
    return path


def read_fingerprint(directory: str | os.PathLike, *, whole: bool = False) -> dict | None:
    """The components stored in ``<directory>/fingerprint.json`` (with `whole`, everything the
    file holds: {"components", "token_digests", ...}), or None when there is none."""
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        return dict(stored) if whole else dict(stored["components"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}  # unreadable: differs from anything


def made_under(directory: str | os.PathLike) -> dict | None:
    """The `environment` the output in `directory` recorded in its fingerprint.json; None when
    it has none (no fingerprint, or one written before environments were recorded)."""
    return (read_fingerprint(directory, whole=True) or {}).get("environment")


# --------------------------------------------------------------------------- #
# The software a result was made with
# --------------------------------------------------------------------------- #

# The distributions whose versions every output records (`environment`).
ENVIRONMENT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "transformers",
                        "tokenizers", "numpy", "datasets", "safetensors")
# What can change a number from the same inputs and settings: the packages that compute or tokenize,
# and the accelerator. Not in the fingerprints (a patch release must not force recomputing a week of
# counts); a stage that reuses work made under other values says so (`environment_changes`).
RESULT_AFFECTING = ("jax", "jaxlib", "flax", "optax", "numpy", "transformers", "tokenizers", "backend",
                    "device_kind")
# What a change of each can affect depends on the work that reuses an output (docs/cli.md,
# "Environments: what a change can affect"): new model computation set beside or against the
# output's own (a resumed collection, counts that choose the sets an ablation then measures) can
# differ through the numerics of the model code and the device; training also through the
# optimizer and numpy (batch order); a stage that only reads finished outputs with numpy
# (identify, evaluate, compare, report) cannot, except where it sets outputs of other such
# environments against each other. transformers and tokenizers act only through the tokens,
# which every fingerprint holds: a change of tokens is refused, one without cannot change a number.
MODEL_COMPUTE = ("jax", "jaxlib", "flax", "backend", "device_kind")
TRAINING = (*MODEL_COMPUTE, "optax", "numpy")
# `environment_changes`' entry for an output made before environments were recorded.
UNRECORDED = {"package": "(all)", "old": "not recorded (an earlier sparcom_jax)", "new": "this run's"}


@functools.cache
def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("sparcom_jax", *ENVIRONMENT_PACKAGES)}


# The directory above the package: a git checkout's root when sparcom_jax is run from one.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def checkout(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """{"commit", "dirty"}: the git commit checked out at `root` (default: where this sparcom_jax
    is imported from) and whether tracked files differ from it; {} when `root` is no git
    checkout's root (an installed package) or git cannot tell. One `git status`, cached."""
    import subprocess

    if not (root / ".git").exists():  # (a worktree's .git is a file)
        return {}
    try:
        # No optional locks: other processes of a run may be reading the same checkout.
        res = subprocess.run(["git", "-C", str(root), "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = res.stdout.splitlines()
    commit = next((ln.split()[2] for ln in lines if ln.startswith("# branch.oid ")), None)
    if res.returncode != 0 or commit is None or commit == "(initial)":
        return {}
    return {"commit": commit, "dirty": any(not ln.startswith("#") for ln in lines)}


def environment() -> dict[str, Any]:
    """The software and devices this process computes with, as every output records it: python,
    platform, the versions of `ENVIRONMENT_PACKAGES` (None: not installed), JAX's backend, device
    kind and count, and sparcom_jax's version with, when imported from a git checkout, its
    commit and whether tracked files were modified ("dirty").

    Cheap after the first call (the versions and the one `git status` are cached); it asks JAX
    for its devices, so call it where JAX is in use (after `jax.distributed.initialize`).
    """
    import platform

    import jax

    versions = dict(_package_versions())
    devices = jax.devices()
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": {k: v for k, v in versions.items() if k != "sparcom_jax"},
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
            "process_count": jax.process_count(),
            "sparcom_jax": {"version": versions["sparcom_jax"], **checkout()}}


def result_values(env: Mapping[str, Any]) -> dict[str, Any]:
    """An environment's values of what can change a number (`RESULT_AFFECTING`), by name."""
    packages = env.get("packages") or {}
    return {k: packages.get(k, env.get(k)) for k in RESULT_AFFECTING}


def environment_changes(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """How the `environment` an output was made under (`stored`) differs from `current` in what can
    change a number (`RESULT_AFFECTING`): [{"package", "old", "new"}], [] when it does not, and
    [`UNRECORDED`] for an output that recorded none (made before environments were recorded)."""
    if not stored:
        return [dict(UNRECORDED)]
    old, new = result_values(stored), result_values(current)
    return [{"package": k, "old": old[k], "new": new[k]} for k in RESULT_AFFECTING if old[k] != new[k]]


def environment_parts(holder: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Every environment an output was made under, with the part each made: the "environments" of
    `holder` (a count store's meta, a fingerprint.json: [{"environment", "from", "unit"}], "from"
    the units, chunks or steps, done before it took over), else its one "environment" (an output
    made in one go, or before the list was kept) from 0; [] when it recorded none."""
    holder = holder or {}
    if holder.get("environments"):
        return [dict(p) for p in holder["environments"]]
    return [{"environment": holder["environment"], "from": 0}] if holder.get("environment") else []


def with_environment(holder: Mapping[str, Any], env: Mapping[str, Any], start: int, unit: str) -> dict | None:
    """`holder` (as `environment_parts` reads it) with `env` making the `unit`s from `start` on, or
    None when it made the last part already (nothing to record). A part that made nothing (its
    successor starts where it started: a resume stopped before its first unit) is replaced; the
    "environment" stays the first part's, as earlier readers take it."""
    parts = environment_parts(holder) or ([{"environment": None, "from": 0}] if start else [])
    if parts and parts[-1]["environment"] == env:
        return None
    kept = [p for p in parts if p["from"] < start]
    parts = [{**p, "unit": unit} for p in kept + ([] if kept and kept[-1]["environment"] == env else
                                                  [{"environment": dict(env), "from": int(start)}])]
    out = {k: v for k, v in holder.items() if k not in ("environment", "environments")}
    out.update({"environment": parts[0]["environment"]} if parts[0]["environment"] else {})
    out.update({"environments": parts} if len(parts) > 1 else {})
    return out


def part_ranges(parts: Sequence[Mapping[str, Any]], total: int | None, first: int = 0) -> list[str]:
    """The part each of `environment_parts` made, as "chunks 0-3" (units numbered from `first`,
    `total` units in all; None: unknown, the last part runs "on")."""
    out = []
    for i, p in enumerate(parts):
        unit = p.get("unit", "unit")
        lo = p["from"] + first
        hi = parts[i + 1]["from"] + first - 1 if i + 1 < len(parts) else (None if total is None else total + first - 1)
        out.append(f"{unit}s {lo}-{hi}" if hi is not None and hi != lo else f"{unit} {lo}" if hi == lo
                   else f"{unit}s {lo} on")
    return out


def _flat(env: Mapping[str, Any]) -> dict[str, Any]:
    """An environment's values by one name each (packages, backend, device kind, python, the commit)."""
    src = env.get("sparcom_jax") or {}
    return {**(env.get("packages") or {}), "backend": env.get("backend"), "device_kind": env.get("device_kind"),
            "devices": env.get("device_count"), "python": env.get("python"),
            "sparcom_jax": (src.get("commit") or "")[:12] + (" (modified)" if src.get("dirty") else "")
            or src.get("version")}


def parts_line(what: str, parts: Sequence[Mapping[str, Any]], ranges: Sequence[str]) -> str:
    """One phrase naming the environments of an output's parts by what differs between them:
    "counts of llama made under jax 0.10.1 (chunks 0-3) and jax 0.10.2 (chunks 4-7)"."""
    flats = [_flat(p["environment"]) if p["environment"] else {} for p in parts]
    known = [f for f in flats if f]
    keys = [k for k in (known or [{}])[0] if len({repr(f.get(k)) for f in known}) > 1] or ["jax", "backend"]
    named = [(", ".join(f"{k} {f.get(k)}" for k in keys) if f else "versions not recorded") + f" ({r})"
             for f, r in zip(flats, ranges)]
    return f"{what} made under " + (" and ".join(named) if len(named) < 3 else ", ".join(named[:-1]) + " and " + named[-1])


def environment_line(env: Mapping[str, Any] | None) -> str:
    """One line naming an `environment`: "python 3.11.7, jax 0.10.2 (cpu, 1 x cpu), ..."."""
    if not env:
        return "not recorded"
    p = env.get("packages") or {}
    src = env.get("sparcom_jax") or {}
    commit = f" @ {src['commit'][:12]}" + (" (modified)" if src.get("dirty") else "") if src.get("commit") else ""
    shown = ", ".join(f"{k} {p[k]}" for k in ENVIRONMENT_PACKAGES if p.get(k) and k not in ("jax",))
    return (f"sparcom_jax {src.get('version')}{commit}; python {env.get('python')}, jax {p.get('jax')} "
            f"({env.get('backend')}, {env.get('device_count')} x {env.get('device_kind')}), {shown}; "
            f"{env.get('platform')}")
