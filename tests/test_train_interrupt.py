"""Ctrl-C during fine-tuning (docs/training.md, "Resume"; docs/cli.md): the run stops with every
checkpoint on disk complete or absent, says what it saved, and the same call resumes it."""

from __future__ import annotations

import asyncio
import signal

import pytest
from test_train_loop import MODEL, _random_model

SETTINGS = dict(batch_size=2, max_length=192, buckets=(192,), total_steps=4, warmup_steps=1, learning_rate=1e-2,
                seed=3, save_every=1, keep_last=1, async_checkpointing=True)


@pytest.fixture()
def setup():
    from sparcom_jax.data import default_tokenizer, load_instructions, sample_balanced
    from sparcom_jax.models.config import ModelConfig

    tok = default_tokenizer()
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "num_hidden_layers": 1, "vocab_size": len(tok),
                                                      "pad_token_id": tok.pad_token_id}))
    return model, sample_balanced(load_instructions(), 1, seed=0), tok


def test_ctrl_c_inside_orbax_save_lets_that_save_finish_whole(setup, tmp_path, monkeypatch, capsys):
    # Ctrl-C raised inside CheckpointManager.save, after its writer threads started and before the
    # thread that finishes the save (it waits for the writers, then applies the keep rules): that
    # thread never ran, so nothing waited for the writers (the process went on to exit while they
    # wrote, and they failed as the interpreter shut down) and the checkpoint the keep rules drop
    # (step 1, keep_last=1) stayed. Held until save returns, the save finishes whole.
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import atomicity

    from sparcom_jax.train import TrainConfig, checkpoint_steps, finetune

    model, records, tok = setup
    inner = ocp.CheckpointManager._get_old_steps_to_remove  # called mid-save, between those two
    rename = atomicity.AtomicRenameTemporaryPath.finalize  # completes the checkpoint, in a writer thread

    async def slow_rename(self, *a, **k):
        await asyncio.sleep(1.0)
        return await rename(self, *a, **k)

    def ctrl_c_mid_save(self):
        if self.latest_step() == 2:  # the save of step 2 has registered its checkpoint
            signal.raise_signal(signal.SIGINT)
        return inner(self)

    monkeypatch.setattr(ocp.CheckpointManager, "_get_old_steps_to_remove", ctrl_c_mid_save)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_rename)  # a big model's write
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    run = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(model, records, tok, TrainConfig(**SETTINGS), run, progress=True)
    finally:
        signal.signal(signal.SIGINT, old)
    # as finetune raises (the process would exit now), that checkpoint is complete
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0", "2"]  # step 1 dropped, no temporary dir
    assert checkpoint_steps(run) == [0, 2]
    err = capsys.readouterr().err
    assert (f"{run}: fine-tuning interrupted after step 2 of 4: checkpoints of steps 0, 2 are in "
            f"{(run / 'checkpoints').absolute()}; the same call resumes from step 2") in err, err

    monkeypatch.setattr(ocp.CheckpointManager, "_get_old_steps_to_remove", inner)
    res = finetune(model, records, tok, TrainConfig(**SETTINGS), run, progress=False)
    assert sorted(res.losses) == [3, 4] and res.checkpoint_steps == [0, 4]
