"""A run killed while orbax removes an old checkpoint (docs/training.md, "Checkpoints kept").

orbax deleted a step's directory in place: a kill in that deletion (SIGKILL, an OOM, a
preempted TPU VM) left `checkpoints/<step>/` half-deleted under its own name, which
`checkpoint_steps` listed and an export then failed to read, deep in tensorstore. A step is
now renamed out of the way before its files are removed; readers refuse a step that is not
finished, and the next `finetune` removes what a kill left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train_units import _saved_run

ROOT = Path(__file__).resolve().parents[1]

# Builds the run of `_saved_run` with save_every=1, keep_last=1: the save of step 2 drops step 1.
# The 4th file removed from then on (one of step 1's) kills the process, as a preemption would.
_KILLED_MID_DELETION = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, "tests")
from sparcom_jax.train import checkpointing
from test_train_units import _saved_run

removed, save = [0], checkpointing.TrainCheckpointer.save
def unlink(*a, _unlink=os.unlink, **k):
    removed[0] += 1
    if removed[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return _unlink(*a, **k)
def save_cut(self, state, meta):
    if meta["step"] == 2:
        os.unlink = unlink
    return save(self, state, meta)
checkpointing.TrainCheckpointer.save = save_cut
_saved_run(Path(sys.argv[1]), save_every=1, keep_last=1)
"""


def _dirs_named(root: Path, name: str) -> list[Path]:
    return [p for p in root.rglob(name) if p.is_dir()]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run directory whose process was killed while the save of step 2 removed step 1."""
    run = tmp_path_factory.mktemp("killed") / "run"
    r = subprocess.run([sys.executable, "-c", _KILLED_MID_DELETION, str(run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    # the kill came mid-deletion: part of step 1 is still on disk (somewhere under checkpoints/)
    left = _dirs_named(run / "checkpoints", "1")
    assert left and any(p.is_file() for p in left[0].rglob("*")), sorted(map(str, (run / "checkpoints").rglob("*")))
    return run


def test_a_step_whose_deletion_a_kill_cut_short_is_not_listed_and_the_rest_export(killed, tmp_path):
    from sparcom_jax.checkpoints.hf import load_model
    from sparcom_jax.train import checkpoint_steps, export_series
    from sparcom_jax.train.step import pure_params

    assert checkpoint_steps(killed) == [0, 2]
    series = export_series(killed, tmp_path / "hf")
    assert [n for n, _ in series] == ["before", "step_000002"]
    before, two = (pure_params(load_model(p)) for _, p in series)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a) + 2), before, two)


def test_the_next_run_removes_what_the_kill_left_and_resumes_from_the_latest_step(killed, tmp_path):
    import shutil

    from sparcom_jax.train.checkpointing import TrainCheckpointer

    run = tmp_path / "run"
    shutil.copytree(killed, run)
    ck = TrainCheckpointer(run, save_every=1, keep_last=1, final_step=5, async_save=False)
    try:
        assert ck.all_steps() == [0, 2] and ck.latest_step() == 2
    finally:
        ck.close()
    assert not _dirs_named(run / "checkpoints", "1")  # nothing of step 1 is left, under any name


@pytest.fixture()
def cut_in_place(tmp_path):
    """A run (checkpoints 0, 3, 5) whose step 3 an earlier version's deletion cut short in place:
    its step metadata and one item are gone, the rest is there."""
    import shutil

    run = tmp_path / "run"
    _saved_run(run)
    (run / "checkpoints" / "3" / "_CHECKPOINT_METADATA").unlink()
    shutil.rmtree(run / "checkpoints" / "3" / "meta")
    return run


def test_readers_refuse_a_step_left_half_deleted_in_place_naming_it_and_the_fix(cut_in_place, tmp_path):
    from sparcom_jax.train import checkpoint_steps, export_series, load_checkpoint_model
    from sparcom_jax.train.checkpointing import UnfinishedCheckpointError

    step3 = cut_in_place.absolute() / "checkpoints" / "3"
    said = rf"unfinished checkpoint\(s\): {step3} \(_CHECKPOINT_METADATA is missing or unreadable\)\. .*run the same finetune again"
    with pytest.raises(UnfinishedCheckpointError, match=said):
        checkpoint_steps(cut_in_place)
    with pytest.raises(UnfinishedCheckpointError, match=said):
        export_series(cut_in_place, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written
    with pytest.raises(UnfinishedCheckpointError, match=said):
        load_checkpoint_model(cut_in_place, 3)
    load_checkpoint_model(cut_in_place, 5)  # the finished steps still load one by one


def test_the_next_run_removes_a_step_left_half_deleted_in_place(cut_in_place):
    from sparcom_jax.train import checkpoint_steps
    from sparcom_jax.train.checkpointing import TrainCheckpointer

    ck = TrainCheckpointer(cut_in_place, save_every=3, keep_last=5, final_step=5)
    try:
        assert ck.all_steps() == [0, 5] and ck.latest_step() == 5
    finally:
        ck.close()
    assert sorted(p.name for p in (cut_in_place / "checkpoints").iterdir() if p.name.isdigit()) == ["0", "5"]
    assert not _dirs_named(cut_in_place / "checkpoints", "3.unfinished") and checkpoint_steps(cut_in_place) == [0, 5]


def test_a_step_missing_data_files_is_named_when_read(tmp_path):
    # Files a deletion removed deeper in an item (here the parameters' data) leave the step's markers:
    # orbax's restore fails (tensorstore's NOT_FOUND), and the error names the step's directory.
    import shutil

    from sparcom_jax.checkpoints.hf import CheckpointError
    from sparcom_jax.train import load_checkpoint_model

    run = tmp_path / "run"
    _saved_run(run)
    shutil.rmtree(run / "checkpoints" / "3" / "params" / "d")
    with pytest.raises(CheckpointError, match=rf"{run.absolute() / 'checkpoints' / '3'}: orbax could not read this "
                                              r"checkpoint \(.*\)\. .*delete that directory"):
        load_checkpoint_model(run, 3)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_dropped_step_is_off_the_disk_before_the_next_save_is_written(tmp_path, async_save):
    # Renamed aside, a dropped step still fills the disk until its files are removed: that happens
    # before the next save writes (with async saves, once the save that dropped it has finished),
    # so the disk never holds more checkpoints than orbax's own deletion left on it.
    import jax.numpy as jnp

    from sparcom_jax.train.checkpointing import TrainCheckpointer
    from sparcom_jax.train.step import TrainState

    ck = TrainCheckpointer(tmp_path, save_every=1, keep_last=1, final_step=4, async_save=async_save)
    on_disk, save = {}, ck.manager.save

    def seen(step, *a, **k):  # every step directory, under its number or renamed aside, as orbax starts a save
        on_disk[step] = sorted(int(p.name) for p in [*ck.directory.glob("*"), *ck.directory.glob("*/*")]
                               if p.is_dir() and p.name.isdigit())
        return save(step, *a, **k)

    ck.manager.save = seen
    for s in range(5):
        ck.save(TrainState(jnp.int32(s), {"w": jnp.full(3, float(s))}, {"m": jnp.zeros(2)}), {"step": s})
    ck.close()
    # keep_last=1 plus step 0: each save finds step 0 and the one before it alone
    assert on_disk == {0: [], 1: [0], 2: [0, 1], 3: [0, 2], 4: [0, 3]}
    assert sorted(p.name for p in ck.directory.iterdir()) == ["0", "4"]  # and no deletion folder is left
