"""The error types of sparcom_jax: every "your input cannot be used" error is a ValueError.

The `sparcom` command prints any of them as one line (``sparcom: error: ...``,
exit status 2); the message names the file, key or field and says how to fix it.

- `ConfigError`: a setting (experiment YAML, config.json, training settings) that
  cannot work.
- `MissingPathError`: a relative path of a saved run's config that is not found from here;
  its `file` and `what` are the config and the missing path (for a program to show).
- `StaleResultError`: a stage found earlier outputs made with other inputs or
  settings; it names what differs and the flag that recomputes them.
- `LockedError`: another run is writing the same output right now.
- `HostMemoryError`: a result would not fit in this machine's available memory; the
  message says its size, what is available, and how to keep it on disk or shrink it.
- `OtherProcessError`: in a multi-host run, another process stopped with an error
  (its log names it); this one stops with it instead of waiting for it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key, the file and the fix."""


class MissingPathError(ConfigError):
    """A relative path of a saved config names nothing from the current directory. `file` is the
    config; `what` says which path is missing, in words (the message without the file and the fix)."""

    def __init__(self, message: str, *, file: object = None, what: str = ""):
        super().__init__(message)
        self.file, self.what = file, what


class StaleResultError(ConfigError):
    """Earlier outputs were made with other inputs or settings than the current run's."""


class LockedError(ValueError):
    """Another live process holds the lock of an output directory."""


class OtherProcessError(ValueError):
    """Another process of a multi-host run stopped with an error; this one stops with it."""


class HostMemoryError(ValueError):
    """A result would not fit in the available host memory; the message gives both sizes and the fix."""
