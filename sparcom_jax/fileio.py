"""Atomic file writes, the output directory check and directory locks: a reader never
sees a half-written output file, and two runs never write one output at once. And where
sparcom_jax keeps its caches (`cache_root`, `cache_setting`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sparcom_jax.errors import LockedError


def _umask() -> int:
    """This process's file-creation mask. Read from /proc where it is shown: setting the mask
    to read it back would, for that moment, give other threads' new files another mask."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (directory) made by tempfile, 0600 (0700), the mode a plain open()
    (mkdir) would have given it: an output renamed into place keeps its mode, and results
    readable by their owner alone cannot be shared."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | os.PathLike, data: bytes | str) -> str:
    """Write `data` to a temporary file in the same directory, then rename it.

    os.replace within one directory (one filesystem) is atomic on POSIX and
    Windows, so `path` holds either the old or the complete new content.

    Returns:
      The path written.

    Raises:
      OSError: the write failed (e.g. a full disk), naming `path`; nothing is left behind.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _usual_mode(tmp)
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name the output
            raise OSError(e.errno, e.strerror, path) from e
        raise
    return path


_OFF = {"off", "0", "false", "no", "none"}


def env_off(env: str) -> bool:
    """Whether environment variable `env` says off (``off``, ``0``, ``false``, ``no``, ``none``)."""
    return os.environ.get(env, "").strip().lower() in _OFF


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/sparcom_jax`` (``~/.cache`` without XDG_CACHE_HOME): where sparcom_jax
    keeps what it can always make again (compiled programs, weights digests)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparcom_jax"


def cache_setting(env: str, default: Path) -> Path | None:
    """The directory environment variable `env` names for a cache: `default` when unset or
    empty, None when it says off (``off``, ``0``, ``false``, ``no``, ``none``)."""
    if env_off(env):
        return None
    setting = os.environ.get(env, "").strip()
    return Path(setting).expanduser() if setting else default


def relative_note(path: str | os.PathLike) -> str:
    """" (relative to the current directory, <cwd>)" for a relative path, else "": said
    beside a path that is not there, since relative paths in a config are taken from the
    directory sparcom runs in, not from the config file's."""
    return "" if os.path.isabs(path) else f" (relative to the current directory, {os.getcwd()})"


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped).

    Raises:
      ValueError: a byte that is not UTF-8, naming the file, line and column and the fix.
    """
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")  # Notepad's "UTF-8 with BOM"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`, or "
            "encoding='utf-8' when writing it)"
        ) from None


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Atomically write JSON (strict: NaN is rejected, convert it to None first)."""
    return atomic_write(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a directory under a temporary sibling name; put it at `path` only when the block
    succeeds (replacing what was there), and remove it when the block fails.

        with atomic_dir(out / "report") as tmp:
            ...write files under tmp...

    A failed or interrupted write thus leaves the earlier directory (or none), never a
    partial one. The old directory is moved aside before the new one is renamed in, so
    `path` is missing only between two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        _usual_mode(tmp, directory=True)
        yield tmp
        old = tmp.with_name(f"{tmp.name}.old")  # unique, as tmp's name is
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_path(old)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree at `path`; nothing when there is none."""
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


LOCK_NAME = ".sparcom.lock"
# Locks this process holds (a lock file naming this pid but not listed here was left by
# an earlier, crashed call in the same process, e.g. a notebook cell that was interrupted).
_HELD: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirLock:
    """An exclusive lock on an output directory: ``<dir>/.sparcom.lock`` holding pid and host.

    Taking it fails with `LockedError` (naming the holder and the fix) while another live
    process holds it. A lock left by a process that no longer runs on this host is taken
    over (`stale_taken` says so); a lock from another host is never taken over, since
    its process cannot be checked from here.

        with DirLock(store_dir, what="count store"):
            ...write...
    """

    def __init__(self, directory: str | os.PathLike, what: str = "output directory"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.stale_taken: dict | None = None

    def _read(self) -> dict | None:
        for _ in range(20):  # the holder may be between creating and writing the file
            try:
                return json.loads(self.path.read_text() or "null")
            except FileNotFoundError:
                return None
            except (json.JSONDecodeError, OSError):
                time.sleep(0.05)
        return {}

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv[:3])}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue  # released meanwhile: try again
                pid, host = held.get("pid"), held.get("host")
                if self._left_behind(held):
                    self.stale_taken = held
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
                raise LockedError(
                    f"{self.directory}: another run is writing this {self.what} (pid {pid} on host {host}, "
                    f"since {since}: {held.get('command', '?')}); wait for it to finish or choose another "
                    f"output directory. If that run is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            _HELD.add(str(self.path))
            return self

    def _left_behind(self, held: dict) -> bool:
        """Whether the lock `held` was left by a process gone from this host (or by an earlier,
        crashed call in this process): taken over, not waited for."""
        pid, host = held.get("pid"), held.get("host")
        if host != socket.gethostname():
            return False
        return (pid == os.getpid() and str(self.path) not in _HELD) or (isinstance(pid, int) and not _pid_alive(pid))

    def held_by(self) -> dict | None:
        """Who holds the lock now ({"pid", "host", "started", "command"}; {} when unreadable), or
        None when it is free or left behind (`_left_behind`). Reads only: for readers that must
        not write into the directory (`sparcom_jax.pipeline.reopen.open_run`)."""
        held = self._read()
        return None if held is None or self._left_behind(held) else held

    def release(self) -> None:
        if str(self.path) in _HELD:
            _HELD.discard(str(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_out_dir(path: str | os.PathLike) -> str:
    """Create the output directory, or fail at once with one clear line (naming the path
    and the fix) rather than with a traceback once the work has started.

    Args:
      path: the output directory (--out); created with its parents.

    Returns:
      `path` as a string.

    Raises:
      ValueError: when `path` or a parent is a file, or the directory cannot be
        created or written.
    """
    path = os.fspath(path)
    probe = os.path.abspath(path)
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"is under {probe}, which is a file"
        raise ValueError(f"output directory {path} {where}; choose another --out")
    # access() also answers False for a read-only file system, which mode bits do not show.
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {path}: {probe} is not writable; "
                         "choose another --out or fix its permissions")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"output directory {path} cannot be created ({err.strerror}); "
                         "choose another --out or fix its permissions") from None
    return path
