"""Bad input and interruptions at the `sparcom` command, as a new user meets them: each ends in
one line that names the file or setting and the fix, never in a traceback or a lost Ctrl-C."""

from __future__ import annotations

import gc
import signal
import time

from test_cli import run_cli, write_tiny


def test_ctrl_c_inside_a_gc_callback_still_stops_the_command(tmp_path, capsys, monkeypatch):
    # jax runs a Python callback at every garbage collection (jax._src.lib._xla_gc_callback). A
    # Ctrl-C landing in it raised KeyboardInterrupt there, where Python prints "Exception ignored"
    # and drops it: a fine-tuning run interrupted so went on to its last step and exited 0.
    from sparcom_jax import pipeline

    after = []

    def stage(*a, **k):
        fired = []

        def callback(phase, info):
            if not fired:
                fired.append(phase)
                signal.raise_signal(signal.SIGINT)
                for _ in range(1000):  # Python checks for signals here, inside the callback
                    pass

        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        end = time.monotonic() + 5
        while time.monotonic() < end:  # the stage's next steps, after the collection
            pass
        after.append(True)
        return {}

    monkeypatch.setattr(pipeline, "run_stage", stage)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        code, _, err = run_cli(capsys, "collect", "--config", str(write_tiny(tmp_path)), "--out", str(tmp_path / "o"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handler is gone
    finally:
        signal.signal(signal.SIGINT, old)
    assert code == 130 and after == [] and err.startswith("sparcom: interrupted; "), err
    assert "Exception ignored" not in err
