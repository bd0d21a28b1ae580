"""How a `sparcom` process ends (docs/cli.md, "Errors"): a finished command leaves without the
interpreter's shutdown (~3 s after a tiny finetune or report), once its outputs are complete and
the other libraries' exit work is done; only where `main()` runs its own process's command line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sparcom_jax import cli

ROOT = Path(__file__).resolve().parents[1]

# The console script's shape (`sys.exit(main())` at a script's top level), with what other code of
# the process could have left for the interpreter's shutdown to finish, each leaving a mark in MARKS.
# SETUP is run before `main`; a test that takes a private hook of the fast exit away (`_leave`) gives
# it back after `main` has returned (RESTORE), as the interpreter's own exit calls it.
CONSOLE_SCRIPT = """\
import atexit, io, json, logging, logging.handlers, sys, threading, time
from pathlib import Path

marks = Path(sys.argv.pop(1))


def last():  # registered before jax is imported, so it runs after jax's atexit clean-up (had that run)
    seen = {{"jax_imported": "jax" in sys.modules}}
    if seen["jax_imported"]:
        from jax._src import xla_bridge

        seen["backends_left"] = xla_bridge.backends_are_initialized()  # jax's clean-up clears them
    (marks / "atexit.json").write_text(json.dumps(seen))


atexit.register(last)


def after_the_command():  # a library's thread (not a daemon) with work left once the command returns
    while threading.main_thread().is_alive():
        time.sleep(0.01)
    time.sleep(0.3)
    (marks / "thread.txt").write_text("finished")


threading.Thread(target=after_the_command).start()
left_open = open(marks / "left_open.txt", "w")  # a library's file, written and never closed
left_open.write("written before the exit")


class Tee(io.TextIOWrapper):  # a Python subclass of a file type, written and never closed
    pass


tee = Tee(open(marks / "tee.txt", "wb"))
tee.write("written through a subclass")


class Raw(io.RawIOBase):  # a raw file of Python's: what it writes goes to the system at once
    def writable(self):
        return True

    def write(self, b):
        return len(b)


raw = Raw()  # open, writable, nothing held: no reason for the normal exit

# A user's log file behind a buffer that only logging's own `atexit` shutdown empties.
held = logging.handlers.MemoryHandler(capacity=1000, flushLevel=logging.CRITICAL,
                                      target=logging.FileHandler(marks / "log.txt"))
logging.getLogger("sparcom_jax").addHandler(held)
logging.getLogger("sparcom_jax").setLevel(logging.INFO)
logging.getLogger("sparcom_jax.cli").info("logged before the command")


class Finalized:  # its __del__ runs in the interpreter's shutdown, never after os._exit
    def __init__(self, path):
        self.path = str(path)

    def __del__(self, open=open):
        with open(self.path, "w") as f:
            f.write("the interpreter's shutdown ran")


finalized = Finalized(marks / "finalized.txt")
{setup}
from sparcom_jax.cli import main

status = main()
{restore}
sys.exit(status)
"""


def console(tmp_path: Path, *argv: str, timeout: float = 120, setup: str = "",
            restore: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    """Run `sparcom ARGV` through CONSOLE_SCRIPT (stdout a pipe, so block-buffered); its marks."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "sparcom_console.py"
    script.write_text(CONSOLE_SCRIPT.format(setup=setup, restore=restore))
    r = subprocess.run([sys.executable, str(script), str(marks), *argv], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    seen = {p.name: p.read_text(errors="replace") for p in marks.iterdir()}
    return r, seen


def test_a_finished_command_leaves_without_jax_clean_up_once_threads_atexit_and_files_are_done(tmp_path):
    r, seen = console(tmp_path, "run", "--config", "configs/llama2_7b.yaml", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    # every line printed reached the pipe (a block-buffered stdout, flushed before leaving)
    assert r.stdout.rstrip().splitlines()[-1] == "outputs would go to runs/llama2_7b (dry run: nothing written)"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    # the other atexit functions ran; jax's clean-up did not (the backends are still there after it)
    assert json.loads(seen["atexit.json"]) == {"jax_imported": True, "backends_left": True}
    assert seen["thread.txt"] == "finished"  # waited for, as the interpreter waits for such threads
    assert_nothing_written_was_lost(seen)
    assert "finalized.txt" not in seen  # it left at once


def assert_nothing_written_was_lost(seen: dict) -> None:
    """What CONSOLE_SCRIPT wrote and left for the exit is in its files."""
    assert seen["left_open.txt"] == "written before the exit"  # flushed, as the shutdown's closing flushes it
    assert seen["tee.txt"] == "written through a subclass"
    assert "logged before the command" in seen["log.txt"]  # logging's atexit shutdown emptied the buffer


def test_a_config_error_keeps_its_status_and_imports_no_jax(tmp_path):
    # The config is read before jax, orbax and the pipeline are imported: the error took ~4 s, 3 s of it imports.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentfy: {eps: 0.1}\n")
    r, seen = console(tmp_path, "run", "--config", str(bad))
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.startswith(f"sparcom: error: {bad}: unknown key 'identfy' (did you mean 'identify'?)")
    assert r.stderr.count("\n") == 1, r.stderr
    assert json.loads(seen["atexit.json"]) == {"jax_imported": False}
    assert seen["thread.txt"] == "finished" and "finalized.txt" not in seen
    assert_nothing_written_was_lost(seen)


# The private hooks of CPython the fast exit calls, each as the test takes it away and gives it back.
HOOKS = {"threading._shutdown": ("saved = threading._shutdown\ndel threading._shutdown",
                                 "threading._shutdown = saved"),
         "atexit._run_exitfuncs": ("import atexit\nsaved = atexit._run_exitfuncs\ndel atexit._run_exitfuncs", "")}


@pytest.mark.parametrize("hook", HOOKS)
def test_an_interpreter_without_a_hook_of_the_fast_exit_takes_the_normal_exit(tmp_path, hook):
    # The fast exit waits for threads and runs the atexit functions through hooks that are not
    # Python's API (present in 3.11-3.14); where one is missing, the command ends as Python ends it.
    setup, restore = HOOKS[hook]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentfy: {eps: 0.1}\n")
    r, seen = console(tmp_path, "run", "--config", str(bad), setup=setup, restore=restore)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.startswith(f"sparcom: error: {bad}: unknown key") and r.stderr.count("\n") == 1, r.stderr
    assert seen["finalized.txt"] == "the interpreter's shutdown ran"
    assert json.loads(seen["atexit.json"]) == {"jax_imported": False} and seen["thread.txt"] == "finished"
    assert_nothing_written_was_lost(seen)


def test_a_file_that_only_closing_completes_takes_the_normal_exit(tmp_path):
    # A gzip file's end (and what it still holds) is written when it is closed, which the
    # interpreter's shutdown does and a flush does not: left open, it is not left behind.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentfy: {eps: 0.1}\n")
    setup = ("import gzip\nzipped = gzip.open(marks / 'zipped.gz', 'wt')\n"
             "zipped.write('written into a gzip file')")
    r, seen = console(tmp_path, "run", "--config", str(bad), setup=setup)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert gzip.decompress((tmp_path / "marks" / "zipped.gz").read_bytes()) == b"written into a gzip file"
    assert seen["finalized.txt"] == "the interpreter's shutdown ran" and seen["thread.txt"] == "finished"
    assert_nothing_written_was_lost(seen)


def config_error_exit(tmp_path: Path, setup: str, restore: str = "") -> dict:
    """CONSOLE_SCRIPT's marks after `sparcom run` of a config with an unknown key (status 2, one line)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentfy: {eps: 0.1}\n")
    r, seen = console(tmp_path, "run", "--config", str(bad), setup=setup, restore=restore)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    return seen


def test_a_file_open_for_reading_or_that_cannot_say_keeps_the_fast_exit(tmp_path):
    # Only a file open for writing can hold what closing writes: a gzip file left open for reading,
    # or a file object whose writable() fails, is no reason for the slower normal exit.
    setup = ("import gzip\nwith gzip.open(marks / 'read.gz', 'wt') as f:\n    f.write('read back')\n"
             "reading = gzip.open(marks / 'read.gz', 'rt')\nassert reading.read() == 'read back'\n"
             "class Unsure(io.IOBase):\n    def writable(self):\n        raise OSError('cannot tell')\n"
             "unsure = Unsure()")
    seen = config_error_exit(tmp_path, setup)
    assert seen["thread.txt"] == "finished" and "finalized.txt" not in seen  # it left at once
    assert_nothing_written_was_lost(seen)


def test_the_normal_exit_a_file_left_to_closing_asks_for_gets_jax_clean_up_back(tmp_path):
    # The fast exit takes jax's atexit clean-up off the list before it runs the others (which it
    # empties); when a file sends the command to the normal exit after all, the clean-up is put back
    # for that exit to run, the one function left on the list when `main` returns.
    setup = ("import gzip, jax\njax.devices()\nzipped = gzip.open(marks / 'zipped.gz', 'wt')\n"
             "zipped.write('written into a gzip file')")
    restore = "(marks / 'left.txt').write_text(str(atexit._ncallbacks()))"  # (the fast exit's run emptied it)
    seen = config_error_exit(tmp_path, setup, restore)
    assert seen["finalized.txt"] == "the interpreter's shutdown ran"
    assert json.loads(seen["atexit.json"]) == {"jax_imported": True, "backends_left": True}  # (before it)
    assert seen["left.txt"] == "1"  # jax's clean-up, put back


@pytest.mark.slow  # a tiny `sparcom run` (finetune with async checkpoints, collect, ..., report): ~40 s on 2 cores
def test_every_output_of_a_run_that_left_at_once_reads_back_whole(tmp_path):
    # The command waits for its checkpoint writes, closes its orbax managers and count stores and
    # renames its outputs into place before it returns; nothing of that is left to the shutdown.
    import sparcom_jax as sj
    from sparcom_jax.train import checkpoint_steps
    from test_cli import write_tiny

    out = tmp_path / "o"
    r, seen = console(tmp_path, "run", "--config", str(write_tiny(tmp_path)), "--out", str(out),
                      "train.async_checkpointing=true", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(seen["atexit.json"]) == {"jax_imported": True, "backends_left": True}  # it left at once
    lines = r.stdout.rstrip().splitlines()
    assert f"outputs: {out}" in lines and lines[-1].startswith("compiled "), r.stdout[-2000:]

    series = json.loads((out / "checkpoints" / "series.json").read_text())
    # train.total_steps=2, save_every=1: every step's checkpoint, each after the base exported as a model
    assert checkpoint_steps(out / "train") == [0, 1, 2] and [s["step"] for s in series] == [1, 2]
    for s in series:  # each exported checkpoint loads, every weight finite
        model = sj.load_model(s["path"], with_tokenizer=False)
        assert all(bool(abs(v).max() < float("inf")) for v in _weights(model)), s
    steps = [json.loads(ln)["step"] for ln in (out / "train" / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["type"] == "train"]
    assert steps == [1, 2]
    run = sj.open_run(out)  # the report, the config and every stage's outputs, checked against each other
    for name in run.models:  # each count store complete: every record's tokens counted
        counts = run.counts(name)
        assert counts.n == 12 and int(counts.tokens[:].sum()) > 0 and counts.neuron_active[:].shape[0] == 12
    assert list(run.analyses.models) == run.models  # rebuilt from the stores, checked against the report's


def _weights(model):
    import jax
    import numpy as np
    from flax import nnx

    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


# --------------------------------------------------------------------------- #
# Where `main` ends the process: only when it runs its own process's command line.

@pytest.fixture()
def leaving(monkeypatch):
    """`main` with its command replaced by a set status; what `_leave` was asked to end with."""
    left: list[int] = []
    monkeypatch.setattr(cli, "_leave", lambda status, *hooks: left.append(status))
    monkeypatch.setattr(cli, "_ctrl_c_ends_the_shutdown", lambda status: None)  # (it sets this process's handler)
    monkeypatch.setattr(cli, "_other_processes", lambda: False)
    status = {"value": 0}
    monkeypatch.setattr(cli, "_main", lambda argv: status["value"])
    return left, status


def at_top_level(main, call: str = "main()"):
    """Call `main` as a script's top level does (`sys.exit(main())`), or a notebook's cell."""
    scope = {"__name__": "__main__", "main": main}
    exec(compile(f"status = {call}", "<script>", "exec"), scope)
    return scope["status"]


@pytest.mark.parametrize("status", [0, 1, 2, 130])
def test_the_scripts_own_command_line_ends_the_process_with_the_commands_status(leaving, status):
    left, set_status = leaving
    set_status["value"] = status
    assert at_top_level(cli.main) == status and left == [status]


def test_main_called_from_a_function_or_with_arguments_never_ends_the_process(leaving, monkeypatch):
    left, _ = leaving
    monkeypatch.setattr(sys, "argv", ["sparcom", "run", "--config", "x.yaml", "--dry-run"])
    assert cli.main() == 0 and cli.main(["--help"]) == 0  # the tests call main in-process, as here
    assert at_top_level(cli.main, "main(['run', '--config', 'x.yaml'])") == 0  # a library's call, argv given
    assert at_top_level(lambda: cli.main()) == 0  # from a function of a program that goes on after it
    assert left == []
    assert at_top_level(cli.main) == 0 and left == [0]  # (the same process's own command line does end)


def test_an_interactive_session_outlives_the_command(leaving, monkeypatch):
    left, _ = leaving
    shell = types.ModuleType("IPython")
    shell.get_ipython = lambda: object()  # a notebook's kernel (its cells run as `__main__` too)
    monkeypatch.setitem(sys.modules, "IPython", shell)
    assert at_top_level(cli.main) == 0 and left == []
    shell.get_ipython = lambda: None  # IPython imported by a library, no shell running
    assert at_top_level(cli.main) == 0 and left == [0]
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # the Python prompt
    assert at_top_level(cli.main) == 0 and left == [0]


def test_a_process_of_a_multi_process_run_takes_the_normal_exit_after_success(leaving, monkeypatch):
    # jax's clean-up shuts jax.distributed down: a barrier every process must reach.
    left, _ = leaving
    monkeypatch.setattr(cli, "_other_processes", lambda: True)
    assert at_top_level(cli.main) == 0 and left == []
