"""Ctrl-C during fine-tuning (docs/training.md, "Resume"; docs/cli.md): the run stops with every
checkpoint on disk complete or absent, says what it saved, and the same call resumes it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _interrupt_when(out: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """Send Ctrl-C (SIGINT) to `proc` once its metrics file shows a train step >= `step`."""
    metrics, end = out / "train" / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(r).get("type") == "train" and json.loads(r)["step"] >= step for r in rows if r.endswith("}")):
            proc.send_signal(signal.SIGINT)
            return
        time.sleep(0.02)
    pytest.fail(f"the run never reached step {step} (exit status {proc.poll()})")


@pytest.mark.slow  # two `sparcom finetune` processes: about a minute on a loaded 2-core machine
def test_ctrl_c_mid_training_exits_130_saying_what_is_saved_and_the_same_command_resumes(tmp_path):
    # Ctrl-C took 3-18 s to end a tiny `sparcom finetune` (the interpreter's shutdown, after the
    # message); a save under way could be left to writer threads that failed as it shut down.
    from test_cli import write_tiny

    from sparcom_jax.train import checkpoint_steps

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "sparcom_jax.cli", "finetune", "--config", str(write_tiny(tmp_path)), "--out", str(out),
           "train.total_steps=30", "train.save_every=5", "train.async_checkpointing=true"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # as from a terminal: a handled signal is reset at exec, an ignored one (a background job) stays ignored
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        _interrupt_when(out, proc, 7)
        _, err = proc.communicate(timeout=60)  # a bound that catches a hang, not a timing
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if "step/s" not in ln]
    assert proc.returncode == 130, err[-3000:]
    assert lines[-1].startswith("sparcom: interrupted; ") and lines[-1].endswith(shlex.join(["sparcom", *cmd[3:]]))
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    said = re.search(r"fine-tuning interrupted after step (\d+) of 30: checkpoints of steps ([\d, ]+) are in (\S+); "
                     r"the same call resumes from step (\d+)$", lines[-2])
    assert said, lines[-2]
    saved = [int(s) for s in said[2].split(", ")]
    # the checkpoints on disk are those said, none half written (the resumed run exports each one)
    assert sorted(int(p.name) for p in (out / "train" / "checkpoints").iterdir()) == saved == checkpoint_steps(out / "train")
    assert saved[0] == 0 and 5 <= saved[-1] == int(said[4]) <= int(said[1]) < 30

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"stopped after step {saved[-1]} of 30; resuming from its checkpoint there" in again.stderr
    steps = [r["step"] for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    assert steps == list(range(1, 31))
    assert json.loads((out / "checkpoints" / "series.json").read_text())[-1]["step"] == 30


def test_ctrl_c_after_the_command_finished_ends_it_with_its_status_and_no_traceback(tmp_path):
    # A Ctrl-C in the interpreter's shutdown (3 s of it on a tiny finetune) raised KeyboardInterrupt
    # in jax's atexit clean-up: "Exception ignored in atexit callback" and a traceback under the outputs.
    script = ("import atexit, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal
              "import jax\n"  # its atexit clean-up runs after the one registered below
              "atexit.register(signal.raise_signal, signal.SIGINT)\n"
              "from sparcom_jax.cli import main\n"
              "sys.exit(main())\n")
    (tmp_path / "run.py").write_text(script)
    r = subprocess.run([sys.executable, str(tmp_path / "run.py"), "run", "--config", "configs/llama2_7b.yaml", "--dry-run"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "nothing written" in r.stdout, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-2000:]
