"""Each way a checkpoint step can be left unfinished, as `unfinished_reason` tells it, and the
removal of one by the next run (docs/training.md, "Checkpoints kept").

Written against hand-made mutants of sparcom_jax/train/checkpointing.py that the first tests
(test_train_deletion.py) let through: an unreadable or commit-less step record, an item
directory left empty or one the record lists, and a kill while an unfinished step is removed."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from test_train_units import _saved_run

from sparcom_jax.train import checkpointing
from sparcom_jax.train.checkpointing import DELETING_SUBDIR, STEP_METADATA, unfinished_reason


@pytest.fixture(scope="module")
def finished_step(tmp_path_factory):
    """A finished step directory as orbax writes it (step 3 of `_saved_run`)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    _saved_run(run)
    return run / "checkpoints" / "3"


def edit_record(step, edit):
    path = step / STEP_METADATA
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def truncate_record(step):
    path = step / STEP_METADATA
    path.write_text(path.read_text()[:40])  # (cut mid-write: no longer JSON)


def empty_item(name):
    def cut(step):
        shutil.rmtree(step / name)
        (step / name).mkdir()  # (its files removed, the directory itself not yet)
    return cut


def item_as_file(step):
    shutil.rmtree(step / "params")
    (step / "params").write_text("")


def record_names_more(step):
    edit_record(step, lambda m: {**m, "item_handlers": {**m["item_handlers"], "extra": "SomeHandler"}})


def record_without_items(step):
    edit_record(step, lambda m: {k: v for k, v in m.items() if k != "item_handlers"})
    shutil.rmtree(step / "meta")


CUTS = {
    "the step record cut mid-write": (truncate_record, f"{STEP_METADATA} is missing or unreadable"),
    "a step record that is not a mapping": (lambda s: (s / STEP_METADATA).write_text("[1, 2]"),
                                            f"{STEP_METADATA} records no commit"),
    "a step record without its commit": (
        lambda s: edit_record(s, lambda m: {k: v for k, v in m.items() if k != "commit_timestamp_nsecs"}),
        f"{STEP_METADATA} records no commit"),
    "the parameters' files removed": (empty_item("params"), "item(s) params missing"),
    "the optimizer state removed alone": (lambda s: shutil.rmtree(s / "opt_state"), "item(s) opt_state missing"),
    "an item the record lists and the disk lacks": (record_names_more, "item(s) extra missing"),
    "an item of ours missing where the record lists none": (record_without_items, "item(s) meta missing"),
    "an item that is not a directory": (item_as_file, "item(s) params missing"),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_each_way_a_step_is_left_unfinished_is_named(finished_step, tmp_path, cut):
    step = tmp_path / "3"
    shutil.copytree(finished_step, step)
    assert unfinished_reason(step) is None  # (the copy is finished)
    how, why = CUTS[cut]
    how(step)
    assert unfinished_reason(step) == why


def test_a_kill_while_an_unfinished_step_is_removed_leaves_nothing_under_its_number(finished_step, tmp_path,
                                                                                     monkeypatch, caplog):
    """The step is renamed aside whole before its files go: a kill in the removal (here: the
    removal raising) leaves it in the deletion folder, not half-removed under its number; what
    was removed, and why, is logged."""
    ckpts = tmp_path / "checkpoints"
    for name in ("3", "5"):
        shutil.copytree(finished_step, ckpts / name)
    (ckpts / "3" / STEP_METADATA).unlink()

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "remove_path", killed)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__), pytest.raises(KeyboardInterrupt):
        checkpointing._remove_left(ckpts, unfinished=True)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["5", DELETING_SUBDIR])
    assert (ckpts / DELETING_SUBDIR / "3.unfinished" / "params").is_dir()
    assert f"{ckpts / '3'}: an unfinished checkpoint ({STEP_METADATA} is missing or unreadable), left by a killed " \
           "run: removed" in caplog.text
