"""How this process uses JAX: the persistent compilation cache, compile counting, and host batches onto devices.

Compilation cache. Every jitted step compiles once per shape, which on a big model
takes tens of seconds. JAX can keep compiled programs on disk, so that a second
process running the same model on the same shapes loads them instead.
`ensure_compilation_cache` turns that on; the CLI and the library's entry points
(`load_model`, `collect_counts`, `finetune`) call it, so it is on by default:

- in ``$SPARCOM_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/sparcom_jax/jax-<version>``
  (``~/.cache/...`` without XDG_CACHE_HOME);
- off with ``SPARCOM_JAX_CACHE=off`` (or ``0``, ``false``, ``no``);
- a ``jax_compilation_cache_dir`` the user set (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update``) always wins, with the user's other cache settings.

JAX keys each entry by the program, the devices, the compile options and the
jax/jaxlib versions, so a stale entry is never used for another program. The
cache is trusted code: keep it in a directory only you can write. It is bounded
(`MAX_CACHE_BYTES`, least recently used entries evicted first), so it does not grow
without limit in the user's cache directory; with a bound JAX also takes a file lock
around every read and write (the `filelock` package, a dependency), so processes that
share the cache (the processes of a run on one host, two runs, test workers) do not
write or evict one entry at once. (A partly written entry is not a danger either way:
entries are compressed, so a truncated one fails to decompress and JAX compiles again.)
Entries an unbounded cache left in the directory (an earlier sparcom_jax, a process
without filelock, the user's own JAX settings) get the access time the bounded cache
needs (`adopt_unbounded_entries`); without it every later write would fail.

Memory mappings. Linux caps the memory mappings of one process (``vm.max_map_count``,
65530 by default). XLA's CPU back end keeps the machine code of every compiled program in
mappings of its own (about 10 for a tiny program, more for one with many kernels) for as long
as a jitted function caches the program. A process that compiles thousands of programs (a long
notebook session, a test suite) reaches the cap, and the next mapping fails inside XLA as a
segmentation fault that names nothing. The compile listener (below) warns once when the
process holds `MAPS_WARN_FRACTION` of the cap; `release_compiled_programs` frees the cached
programs (they come back from the persistent cache when called again).

Compile counting. `compile_stats` reports how many XLA programs this process
compiled, how many it loaded from the cache and the time spent on both, from
JAX's monitoring events (counting starts with the first `ensure_compilation_cache`
or `track_compilations` call).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import warnings
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Sharding

from sparcom_jax.fileio import cache_root, cache_setting

log = logging.getLogger(__name__)

CACHE_ENV = "SPARCOM_JAX_CACHE"
# JAX's default (1 s) would leave small steps, and every step on a fast accelerator,
# uncached; loading any program from disk is faster than compiling it again.
MIN_COMPILE_SECS = 0.0
# The cache's size bound (see the module docstring); compiled programs are megabytes,
# so this holds thousands of them.
MAX_CACHE_BYTES = 8 * 2**30

# JAX monitoring events (jax/_src/dispatch.py and compiler.py). The backend-compile
# event wraps both a real compilation and a load from the persistent cache.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_ours: str | None = None  # the cache directory this module configured (None: not ours)
_tracking = False
_programs = 0
_hits = 0
_seconds = 0.0
# Share of vm.max_map_count at which the compile listener warns (see the module docstring),
# and how many compilations apart it looks (reading /proc/self/maps takes ~25 ms at 40k mappings).
MAPS_WARN_FRACTION = 0.75
MAPS_CHECK_EVERY = 8
_maps_warned = False


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sparcom_jax/jax-<jax version>`` (``~/.cache`` without XDG_CACHE_HOME)."""
    return cache_root() / f"jax-{jax.__version__}"


def _reset_jax_cache() -> None:
    # JAX decides once per process, at the first compilation, whether the cache is in use;
    # resetting makes it decide again with the directory set now.
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()


def ensure_compilation_cache() -> Path | None:
    """Turn JAX's persistent compilation cache on, as configured (see the module docstring).

    Idempotent and cheap: call it at the top of every entry point. It also starts
    `compile_stats` counting. A cache directory that cannot be created gives a
    warning and no cache, never an error.

    Returns:
      The cache directory in use (the user's own one if set), or None when off.
    """
    global _ours
    track_compilations()
    current = jax.config.jax_compilation_cache_dir
    if current and current != _ours:
        return Path(current)  # the user's own setting wins
    path = cache_setting(CACHE_ENV, default_cache_dir())
    if path is None:
        if _ours is not None:  # switched off after we turned it on in this process
            jax.config.update("jax_compilation_cache_dir", None)
            _ours = None
            _reset_jax_cache()
        return None
    if _ours == str(path):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s); set %s to a writable directory or 'off'",
                    path, e, CACHE_ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    if importlib.util.find_spec("filelock") is None:  # JAX needs it for a bounded cache
        log.warning("compilation cache %s unbounded and unlocked (no filelock package)", path)
    else:
        jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
        adopt_unbounded_entries(path)
    _ours = str(path)
    _reset_jax_cache()
    return path


# JAX's bounded cache (jax/_src/lru_cache.py) keeps each entry as <key>-cache with its last
# access time, int nanoseconds little-endian, in <key>-atime.
_ENTRY_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"


def adopt_unbounded_entries(path: Path) -> int:
    """Give every cache entry in `path` that lacks one an access-time file (its modification time).

    JAX's bounded cache reads the access time of every entry whenever it makes room for a
    new one; an entry written by an unbounded cache has none, so every later write fails
    with a warning ("Error writing persistent compilation cache entry ... -atime") and
    nothing new is cached. Runs under JAX's lock on the directory; on a lock timeout
    it leaves the entries as they are (a warning).

    Returns:
      The number of entries adopted.
    """
    import filelock

    try:
        with filelock.FileLock(path / ".lockfile", timeout=10):
            entries = {e.name[:-len(_ENTRY_SUFFIX)]: e for e in os.scandir(path) if e.name.endswith(_ENTRY_SUFFIX)}
            missing = [key for key in entries if not (path / (key + _ATIME_SUFFIX)).exists()]
            for key in missing:
                (path / (key + _ATIME_SUFFIX)).write_bytes(entries[key].stat().st_mtime_ns.to_bytes(8, "little"))
    except filelock.Timeout:
        log.warning("compilation cache %s: locked by another process; entries without an access time "
                    "were left as they are, and writes may fail until they have one", path)
        return 0
    return len(missing)


def _on_event(event: str, **_) -> None:
    global _hits
    if event == CACHE_HIT_EVENT:
        with _lock:
            _hits += 1


def _on_duration(event: str, duration: float, **_) -> None:
    global _programs, _seconds
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _programs += 1
            _seconds += duration
            check = _programs % MAPS_CHECK_EVERY == 1
        if check:
            warn_near_map_limit()


def memory_maps() -> tuple[int, int] | None:
    """(memory mappings this process holds, the most Linux allows one process), or None where
    ``/proc`` does not say (not Linux)."""
    try:
        cap = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as f:
            held = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return held, cap


def warn_near_map_limit(fraction: float | None = None) -> bool:
    """Warn (once per process) when this process holds `fraction` (default `MAPS_WARN_FRACTION`)
    or more of the memory mappings Linux allows it; returns whether it is that near."""
    global _maps_warned
    maps = memory_maps()
    if maps is None or maps[0] < (MAPS_WARN_FRACTION if fraction is None else fraction) * maps[1]:
        return False
    if not _maps_warned:
        _maps_warned = True
        held, cap = maps
        warnings.warn(
            f"this process holds {held:,} of the {cap:,} memory mappings Linux allows one process "
            "(vm.max_map_count): XLA keeps the machine code of every compiled program in mappings of "
            "its own while a jitted function caches it, and at the cap the process ends with a "
            "segmentation fault. Free the cached programs with sparcom_jax.runtime.release_compiled_programs() "
            "(jax.clear_caches(); they load again from the compilation cache), start a new process, or "
            "raise the cap (sudo sysctl -w vm.max_map_count=262144)", RuntimeWarning, stacklevel=2)
    return True


def release_compiled_programs() -> None:
    """Free the compiled programs that jitted functions cache in this process (`jax.clear_caches`
    and a garbage collection), with the memory mappings that hold their machine code. The next
    call of each function compiles again or loads its program from the persistent cache."""
    import gc

    jax.clear_caches()
    gc.collect()


def track_compilations() -> None:
    """Start counting compilations and cache hits in this process (idempotent)."""
    global _tracking
    with _lock:
        if _tracking:
            return
        _tracking = True
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_stats(since: dict | None = None) -> dict:
    """XLA programs this process compiled or loaded since counting began (or since `since`).

    Args:
      since: an earlier return value; the result is then the difference (one run's share).

    Returns:
      {"compilations": programs compiled by XLA, "cache_hits": programs loaded from
      the persistent cache instead, "compile_seconds": wall time spent on both}.
      Tracing and lowering are not included.
    """
    with _lock:
        now = {"compilations": _programs - _hits, "cache_hits": _hits, "compile_seconds": _seconds}
    if since is not None:
        now = {k: v - since[k] for k, v in now.items()}
    return now


def put_batch(x: np.ndarray, sharding: Sharding | None, *, global_batch: bool) -> jax.Array | np.ndarray:
    """Host array -> one global device array; each process copies only the shards of its own devices.

    Args:
      x: the host array; its leading axis holds rows.
      sharding: the target sharding; None leaves `x` on the host (jit moves it to
        the default device).
      global_batch: True when `x` is the whole batch, identical on every process
        (training: a step's batch is a function of the step alone); False when it
        holds only this process's rows (collection: each process brings its own
        share), the global batch being the processes' rows in process order. With
        one process both read the same.
    """
    if sharding is None:
        return x
    return jax.make_array_from_process_local_data(sharding, x, x.shape if global_batch else None)
