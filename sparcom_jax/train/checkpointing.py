"""Train checkpoints with orbax, and their export to Hugging Face directories.

A run directory (the `out_dir` of `finetune`) holds::

    run.json            run id, model config (HF dict), train config, total steps, data fingerprint
    tokenizer/          the tokenizer the run used (HF format)
    checkpoints/<step>/ orbax: params (float32), opt_state, meta (JSON)
    metrics.jsonl       one JSON object per line (train steps, evals, checkpoints)

Checkpoints are written at step 0 (the base model, "before"), every
`save_every` steps and at the last step ("after"). The latest `keep_last` are
kept, and step 0 and the last step are never deleted. With
`async_checkpointing` the device-to-host copy happens in `save` and the file
writing in a background thread, so training continues while a checkpoint is
written; a checkpoint appears on disk only once complete (orbax writes to a
temporary directory and renames it), so a killed run never leaves a half
checkpoint that a resume would read.

Deletion is atomic in the same way: orbax renames a step it drops into
``checkpoints/.deleting/`` (its `todelete_subdir`, a name it never lists) and the
files are removed there, so a kill mid-deletion leaves no half-deleted step under
its number; what it leaves in ``.deleting`` is removed by the next
`TrainCheckpointer`. Readers refuse a step directory that is not finished (one that
an earlier version's deletion cut short: `UnfinishedCheckpointError`), and the next
`finetune` removes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from sparcom_jax.checkpoints.hf import CheckpointError
from sparcom_jax.console import interrupt_held
from sparcom_jax.fileio import remove_path, write_json
from sparcom_jax.models.config import ModelConfig
from sparcom_jax.parallel.processes import together
from sparcom_jax.train.step import TrainState, abstract_params, merge_params

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_SUBDIR = "checkpoints"
TOKENIZER_SUBDIR = "tokenizer"
# orbax's todelete_subdir: a step being deleted is renamed in here (one atomic rename) before its
# files are removed, so a kill mid-deletion never leaves a half-deleted step under its number.
DELETING_SUBDIR = ".deleting"
# orbax's record of a step, with its items and commit time: written into the temporary directory
# before the rename that gives a new step its number (orbax 0.12.8, constraints.txt, on a local or
# mounted file system). A step directory without it lost it in a deletion.
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEMS = ("params", "opt_state", "meta")


class UnfinishedCheckpointError(CheckpointError):
    """A step directory that is not a finished checkpoint: a deletion (or a write) that a kill cut short."""


def unfinished_reason(step_dir: Path) -> str | None:
    """Why `step_dir` is not a finished train checkpoint, or None when it is.

    orbax writes a step under a temporary name and renames it once complete, with
    `STEP_METADATA` (holding the commit time) and a directory per item; a deletion
    that a kill cut short removed some of them. (Files it removed deeper in an item
    are found when the step is read: `_restore` names the step then.)
    """
    try:
        meta = json.loads((step_dir / STEP_METADATA).read_text())
    except (OSError, ValueError):
        return f"{STEP_METADATA} is missing or unreadable"
    if not isinstance(meta, dict) or not meta.get("commit_timestamp_nsecs"):
        return f"{STEP_METADATA} records no commit"
    gone = [i for i in dict.fromkeys([*ITEMS, *(meta.get("item_handlers") or {})])
            if not (step_dir / i).is_dir() or not any((step_dir / i).iterdir())]
    return f"item(s) {', '.join(gone)} missing" if gone else None


def _step_dir(directory: Path, step: int) -> Path:
    return directory / str(step)  # orbax's standard step name (no prefix, no padding)


def _refuse_unfinished(directory: Path, steps) -> None:
    bad = {s: why for s in steps if (why := unfinished_reason(_step_dir(directory, s)))}
    if bad:
        where = "; ".join(f"{_step_dir(directory, s)} ({why})" for s, why in sorted(bad.items()))
        raise UnfinishedCheckpointError(
            f"unfinished checkpoint(s): {where}. A run killed while a checkpoint was deleted leaves one so; run "
            f"the same finetune again (it resumes the run and removes them), or delete those directories")


def _remove_left(directory: Path, *, unfinished: bool) -> None:
    """Remove `DELETING_SUBDIR`, where orbax renamed the steps it dropped (called when no save is in
    progress: orbax renames into it from its saves' thread), and with `unfinished` the step
    directories that are not finished (moved there first, so that a kill now leaves nothing
    half-removed under a step's number)."""
    trash = directory / DELETING_SUBDIR
    for p in sorted(directory.iterdir()) if unfinished and directory.is_dir() else ():
        if p.name.isdigit() and p.is_dir() and (why := unfinished_reason(p)):
            log.warning("%s: an unfinished checkpoint (%s), left by a killed run: removed", p, why)
            trash.mkdir(exist_ok=True)
            os.replace(p, trash / f"{p.name}.unfinished")
    remove_path(trash)


def read_run(run_dir: str | Path) -> dict:
    """The run description written by `finetune` (run.json)."""
    p = Path(run_dir) / RUN_FILE
    if not p.exists():
        raise FileNotFoundError(f"{p}: not found; {run_dir} is not a fine-tuning run directory "
                                "(finetune(..., out_dir) writes it)")
    return json.loads(p.read_text())


@contextlib.contextmanager
def orbax_errors_held():
    """Hold the errors orbax reports while the block runs, so that they do not come before the
    error the block raises.

    When a write fails (a full disk), orbax's writer threads log each failure with its traceback
    (through absl) before the save raises it, and tensorstore's callbacks into the event loops
    orbax then closes fail as "Event loop is closed" (printed by `sys.unraisablehook`): some
    hundred lines ahead of the CLI's one-line error. Both are held: when the block raises, they
    become a note on the exception (shown by ``--debug``'s traceback, and by that of any error
    that is not one line); when it ends normally they are reported then, so nothing is lost.
    Warnings and lesser records pass as they come.
    """
    held: list[logging.LogRecord] = []
    closed_loop: list[str] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            # As text: a held traceback keeps the failed save's frames (and their futures) alive.
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            held.append(record)
            return False
        return True

    default_hook = sys.unraisablehook

    def hold_unraisable(u) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            closed_loop.append(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n" + "".join(
                traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
        else:
            default_hook(u)

    absl_log = logging.getLogger("absl")  # orbax logs through absl.logging, which logs to this logger
    absl_log.addFilter(hold)
    sys.unraisablehook = hold_unraisable
    try:
        yield
    except BaseException as e:
        if held or closed_loop:
            e.add_note("orbax reported, while checkpoints were written:\n" + "\n".join(
                [f"  {r.getMessage()}" for r in held]
                + ([f"  {len(closed_loop)} callbacks into event loops orbax had closed"] if closed_loop else [])))
        raise
    finally:
        absl_log.removeFilter(hold)
        sys.unraisablehook = default_hook
    for r in held:
        absl_log.handle(r)
    for text in closed_loop:
        print(text, end="", file=sys.stderr)


class TrainCheckpointer:
    """An orbax CheckpointManager for the train state, with the keep rules of this project.

    Args:
      run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
      save_every: save when the step is a multiple of this.
      keep_last: keep this many latest checkpoints.
      final_step: the run's last step, always saved and kept (with step 0).
      async_save: write in a background thread.
    """

    def __init__(self, run_dir: str | Path, *, save_every: int, keep_last: int, final_step: int,
                 async_save: bool = True):
        self.directory = Path(run_dir).absolute() / CHECKPOINT_SUBDIR
        with together(f"removing what a killed run left in {self.directory}"):
            self._remove_left(unfinished=True)  # before the manager lists the steps
        keep = ocm.AnyPreservationPolicy([ocm.LatestN(keep_last), ocm.CustomSteps([0, final_step])])
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            save_on_steps=[0, final_step],
            preservation_policy=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a killed run can leave an unfinished (never read) temp dir
            todelete_subdir=DELETING_SUBDIR,  # a dropped step is renamed aside whole; `_remove_left` removes it
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _remove_left(self, *, unfinished: bool = False) -> None:
        if jax.process_index() == 0:  # the process that deletes (orbax's primary host)
            _remove_left(self.directory, unfinished=unfinished)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, state: TrainState, meta: dict) -> bool:
        """Save `state` at ``meta["step"]`` if the policy says so; returns whether it did."""
        step = int(meta["step"])
        if self.should_save(step):
            # The steps the previous save dropped are renamed aside once it has finished: removed
            # before this one is written, so that the disk never holds more than orbax's own
            # deletion left on it.
            self.wait()
        # Ctrl-C is held until orbax has started the save whole: raised inside it (after the writer
        # threads started, before the thread that completes the checkpoint), the checkpoint was
        # never completed and its writers failed as the interpreter shut down.
        with interrupt_held():
            return self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta),
            ))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        """Restore the state at `step` into `target`'s shapes and shardings (any mesh)."""
        r = _restore(self.manager, step, params=ocp.args.StandardRestore(target.params),
                     opt_state=ocp.args.StandardRestore(target.opt_state), meta=ocp.args.JsonRestore())
        step_arr = jax.device_put(jax.numpy.asarray(int(r.meta["step"]), jax.numpy.int32), target.step.sharding)
        return TrainState(step_arr, r.params, r.opt_state), dict(r.meta)

    def wait(self) -> None:
        """Wait for the save in progress, then remove the steps it dropped."""
        self.manager.wait_until_finished()
        self._remove_left()

    def saving(self) -> bool:
        """Whether a checkpoint is being written in the background."""
        return self.manager.is_saving_in_progress()

    def close(self) -> None:
        self.manager.close()
        self._remove_left()


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #

def _restore(mngr: ocp.CheckpointManager, step: int, **items):
    """orbax's restore of `items` of `step`; a step it cannot read (files a deletion removed) is named."""
    try:
        return mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore's NOT_FOUND, orbax's KeyError for an item, ...
        raise CheckpointError(
            f"{_step_dir(Path(mngr.directory), step)}: orbax could not read this checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). A run killed while it was "
            "deleted leaves a checkpoint so; delete that directory (a resumed run then continues from the latest "
            "checkpoint left)") from e


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps with a complete checkpoint in a run directory.

    Raises:
      UnfinishedCheckpointError: a step directory is not finished (a deletion a kill cut
        short); the message names it and the fix.
    """
    d = Path(run_dir).absolute() / CHECKPOINT_SUBDIR
    if not d.exists():
        return []
    mngr = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = sorted(mngr.all_steps())
    finally:
        mngr.close()
    _refuse_unfinished(d, steps)
    return steps


def load_checkpoint_model(run_dir: str | Path, step: int, *, dtype: str = "float32"):
    """The CausalLM of checkpoint `step` (float32 parameters on the default device)."""
    from sparcom_jax.models.transformer import abstract_model
    from flax import nnx

    run = read_run(run_dir)
    cfg = ModelConfig.from_hf_config(run["model_config"], source=str(Path(run_dir) / RUN_FILE))
    d = Path(run_dir).absolute() / CHECKPOINT_SUBDIR
    mngr = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"{d}: no checkpoint for step {step}; available: {sorted(mngr.all_steps())}")
        _refuse_unfinished(d, [step])
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract_params(cfg))
        params = _restore(mngr, step, params=ocp.args.StandardRestore(target)).params
    finally:
        mngr.close()
    return merge_params(nnx.graphdef(abstract_model(cfg, dtype=dtype, param_dtype="float32")), params)


def _run_tokenizer(run_dir: Path):
    from sparcom_jax.checkpoints.hf import load_tokenizer

    p = run_dir / TOKENIZER_SUBDIR
    return load_tokenizer(p) if p.exists() else None


def export_hf(run_dir: str | Path, step: int, out_dir: str | Path, *, tokenizer=None,
              dtype: str | None = None) -> Path:
    """Write checkpoint `step` of a run as a Hugging Face directory.

    transformers (``AutoModelForCausalLM.from_pretrained``) and
    `sparcom_jax.load_model` both read the result.

    Args:
      run_dir: the run directory (`finetune`'s out_dir).
      step: a checkpoint step (see `checkpoint_steps`).
      out_dir: the HF directory to write (replaced atomically if it exists).
      tokenizer: saved alongside; default: the tokenizer the run saved.
      dtype: storage dtype of the weights ("float32" default, or "bfloat16").

    Returns:
      out_dir.
    """
    from sparcom_jax.checkpoints.hf import save_model

    run_dir = Path(run_dir)
    model = load_checkpoint_model(run_dir, step)
    tok = tokenizer if tokenizer is not None else _run_tokenizer(run_dir)
    return save_model(model, out_dir, tokenizer=tok, dtype=dtype)


def series_name(step: int, final_step: int, *, before: str | None = "before", after: str = "after",
                middle: str = "step_{step:06d}") -> str | None:
    """The name of checkpoint `step` in a series: the one naming rule of the project.

    `before` for step 0 (None leaves step 0 out: a pipeline's base model already has
    its name), `after` for the last step, else `middle` formatted with the step.
    Defaults: "before", "step_000123", "after". The pipeline names a run's checkpoints
    "<name>-step<k>" and "<name>", the demo "<pair>-base", "<pair>-step<k>", "<pair>-chat".
    """
    if step == 0:
        return before
    if step == final_step:
        return after
    return middle.format(step=step)


def export_series(run_dir: str | Path, out_dir: str | Path, *, steps: Sequence[int] | None = None,
                  tokenizer=None, dtype: str | None = None) -> list[tuple[str, Path]]:
    """Export a run's checkpoints (before, intermediate, after) as HF directories.

    Writes ``out_dir/<name>/`` for each checkpoint, with names from `series_name`,
    and ``out_dir/series.json`` listing name, step and path in step order: the
    input of a series comparison.

    Args:
      run_dir: the run directory.
      out_dir: where the HF directories go.
      steps: which checkpoints (default: all that exist).
      tokenizer: default: the run's tokenizer.
      dtype: storage dtype of the weights.

    Returns:
      [(name, path)] in step order.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    final = int(read_run(run_dir)["total_steps"])
    have = checkpoint_steps(run_dir)
    steps = have if steps is None else sorted(int(s) for s in steps)
    missing = [s for s in steps if s not in have]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no checkpoint for step(s) {missing}; available: {have}")
    tok = tokenizer if tokenizer is not None else _run_tokenizer(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for s in steps:
        name = series_name(s, final)
        path = export_hf(run_dir, s, out_dir / name, tokenizer=tok, dtype=dtype)
        series.append((name, path))
        log.info("exported step %d to %s", s, path)
    write_json(out_dir / "series.json",
               [{"name": n, "step": s, "path": str(p)} for (n, p), s in zip(series, steps)])
    return series
