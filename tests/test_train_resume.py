"""Which run directories `finetune` continues and which it refuses (docs/training.md, "Resume").

Resuming must continue the same run: the settings that change the numbers, the model
architecture, the base weights and the data must be those of the run in the directory;
the cadence fields and the mesh may change. Every check here runs before any compute:
the compiled programs are replaced by a stand-in that stops the call, so a call that got
past the checks ends with `Stop` and one that was refused with `TrainConfigError`.
"""

from __future__ import annotations

import json

import pytest
from test_train_loop import MODEL, _random_model
from test_train_targets import Stop, _stop

# max_length 192 keeps every record's response (the one summary, 174 tokens, whole)
SETTINGS = dict(batch_size=2, max_length=192, buckets=(192,), total_steps=4, warmup_steps=1, learning_rate=1e-2,
                seed=3)


@pytest.fixture()
def started(tmp_path, monkeypatch):
    """A run directory whose first call wrote run.json and stopped before its first step:
    (model, records, tokenizer, run dir)."""
    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, load_instructions, sample_balanced
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    monkeypatch.setattr(loop, "_programs", _stop)
    tok = default_tokenizer()
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok),
                                                      "pad_token_id": tok.pad_token_id}))
    records = sample_balanced(load_instructions(), 1, seed=0)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        finetune(model, records, tok, TrainConfig(**SETTINGS), run, progress=False)
    assert (run / "run.json").exists()
    return model, records, tok, run


def _again(started, *, model=None, records=None, resume=True, **changes):
    from sparcom_jax.train import TrainConfig, finetune

    m, recs, tok, run = started
    finetune(model or m, records or recs, tok, TrainConfig(**{**SETTINGS, **changes}), run, resume=resume,
             progress=False)


def test_the_same_run_and_a_changed_cadence_or_mesh_resume(started):
    """The same settings continue the run; so do other values of every field the docs list as free
    to change (save_every, keep_last, log_every, eval_batch_size, async_checkpointing,
    allow_cut_responses, the mesh): each call gets past the checks to the compiled programs."""
    run_json = (started[3] / "run.json").read_text()
    for changes in ({}, dict(save_every=7, keep_last=5, log_every=2, eval_batch_size=4, async_checkpointing=False),
                    dict(allow_cut_responses=True), dict(mesh_data=1, mesh_model=1)):
        with pytest.raises(Stop):
            _again(started, **changes)
    assert (started[3] / "run.json").read_text() == run_json  # the run's description is kept, not rewritten


def test_other_settings_are_refused_naming_each_changed_field_and_only_those(started):
    from sparcom_jax.train import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"holds a run with other settings") as e:
        _again(started, learning_rate=2e-2, seed=4, save_every=7)
    msg = str(e.value)
    assert "learning_rate: 0.01 -> 0.02" in msg and "seed: 3 -> 4" in msg
    # Neither an unchanged field nor a cadence field is named as a difference.
    assert "save_every" not in msg and "optimizer" not in msg and "batch_size" not in msg


def test_another_architecture_is_refused(started):
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfigError

    tok = started[2]
    deeper = _random_model(ModelConfig.from_hf_config({**MODEL, "num_hidden_layers": 3, "vocab_size": len(tok),
                                                       "pad_token_id": tok.pad_token_id}))
    with pytest.raises(TrainConfigError, match=r"holds a run of another model architecture"):
        _again(started, model=deeper)


def test_other_records_are_refused(started):
    """One record fewer: the same settings and model, other data."""
    from sparcom_jax.train import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"holds a run on other data"):
        _again(started, records=started[1][:-1])


def test_another_base_model_is_refused(started):
    from sparcom_jax.train import TrainConfigError

    other = _random_model(started[0].config, seed=5)
    with pytest.raises(TrainConfigError, match=r"started from another base model"):
        _again(started, model=other)


def test_resume_false_refuses_a_run_that_has_no_checkpoint_yet(started):
    """A run killed after writing run.json, before checkpoint 0 landed, is still a run."""
    from sparcom_jax.train import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"already holds a fine-tuning run; pass resume=True"):
        _again(started, resume=False)


def test_resume_false_refuses_checkpoints_without_run_json(started):
    """Checkpoints are a run's even where its run.json is gone, beside an unfinished temporary
    directory a killed save left."""
    from sparcom_jax.train import TrainConfigError

    run = started[3]
    (run / "run.json").unlink()
    (run / "checkpoints" / "0").mkdir(parents=True)
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir()
    with pytest.raises(TrainConfigError, match=r"already holds a fine-tuning run"):
        _again(started, resume=False)


def test_a_run_json_written_by_the_first_call_describes_it(started):
    """run.json holds the settings, the architecture and the step count resuming checks against."""
    from sparcom_jax.train import TrainConfig

    model, _, _, run = started
    d = json.loads((run / "run.json").read_text())
    assert d["train_config"] == TrainConfig(**SETTINGS).to_dict()
    assert d["model_config"] == model.config.to_hf_config()
    assert d["total_steps"] == SETTINGS["total_steps"]


def test_checkpoints_of_another_configuration_are_refused(tmp_path, monkeypatch):
    """Each checkpoint records the fingerprints of the run that wrote it: checkpoints copied into the
    directory of a run with other settings (its run.json matches the call) are refused on restore,
    not continued as if they were that run's."""
    import shutil

    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, load_instructions, sample_balanced
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, TrainConfigError, finetune

    tok = default_tokenizer()
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok),
                                                      "pad_token_id": tok.pad_token_id}))
    records = sample_balanced(load_instructions(), 1, seed=0)
    # another learning rate: the same data fingerprint, another train fingerprint
    a, b = (TrainConfig(**{**SETTINGS, "save_every": 1, "learning_rate": lr}) for lr in (1e-2, 2e-2))
    finetune(model, records, tok, a, tmp_path / "a", progress=False, callback=lambda step, row: step == 1)
    with monkeypatch.context() as m:  # run b's first call: its run.json, then stopped before any step
        m.setattr(loop, "_programs", _stop)
        with pytest.raises(Stop):
            finetune(model, records, tok, b, tmp_path / "b", progress=False)
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    with pytest.raises(TrainConfigError, match=r"checkpoint 1 in .*b was written by another run configuration"):
        finetune(model, records, tok, b, tmp_path / "b", progress=False)
