"""The `sparcom` command: one subcommand per stage, each a thin call into `sparcom_jax.pipeline`.

    sparcom demo --out runs/demo
    sparcom run --config configs/llama2_7b.yaml --dry-run --devices 8
    sparcom collect --config configs/olmoe_1b_7b.yaml data.n_per_category=50 --out runs/olmoe

Bad input (a config, data file or checkpoint that cannot be used) and a machine
that cannot take the outputs (a full disk, a read-only file system, no permission)
are reported as one line, ``sparcom: error: ...``, with exit status 2; ``--debug``
shows the traceback. Ctrl-C says how to resume (exit status 130).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import errno
import io
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from sparcom_jax.console import interrupt_held
from sparcom_jax.fileio import prepare_out_dir

# Errors that mean "the input is wrong" (configs, data, checkpoints all raise
# ValueError subclasses); anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

# Errors of the machine rather than of the program (a full disk, a read-only file system, a
# file this user may not read or write): one line naming the file and what to do.
_MACHINE_ERRORS = {
    errno.ENOSPC: "free space on that file system, or choose another --out",
    errno.EDQUOT: "free space within your disk quota, or choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "fix its permissions, or choose another path",
    errno.EPERM: "fix its permissions, or choose another path",
}
# What a process's collective says when another process of the run is gone (killed, out of
# memory, its host restarted or off the network): gloo on CPU, the coordination service elsewhere.
_LOST_PROCESS = ("connection closed by peer", "connection reset by peer", "heartbeat", "unavailable:",
                 "disconnected")
INTERRUPTED = ("sparcom: interrupted; finished work in the output directory is kept: run the same command "
               "again to resume (counts and training continue from their last saved chunk or checkpoint)")

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")

STAGE_HELP = {
    "finetune": ("instruction-fine-tune the base model, saving intermediate and final checkpoints",
                 "sparcom finetune --config configs/llama2_7b.yaml finetuned=null train.total_steps=1000 "
                 "--out runs/llama2-sft"),
    "collect": ("count neuron activations and expert routing per instruction (all models)",
                "sparcom collect --config configs/llama2_7b.yaml collect.batch_size=32 --out runs/llama2"),
    "identify": ("identify instruction-specific neurons / experts and export their lists",
                 "sparcom identify --config configs/llama2_7b.yaml identify.eps=0.02 --out runs/llama2"),
    "evaluate": ("generality, uniqueness, overlaps and layer profiles of every model",
                 "sparcom evaluate --config configs/mixtral_8x7b.yaml identify.n_boot=200 --out runs/mixtral"),
    "compare": ("compare the models before and after fine-tuning (and along the series)",
                "sparcom compare --config configs/qwen25_7b.yaml --out runs/qwen25"),
    "ablate": ("causal check: switch off each category's units, measure every category's loss",
               "sparcom ablate --config configs/olmoe_1b_7b.yaml ablation.n_random=5 --out runs/olmoe"),
    "report": ("write the report (index.html, summary.json, figures, tables)",
               "sparcom report --config configs/llama2_7b.yaml --out runs/llama2"),
    "run": ("run every stage from one config (finetune when no fine-tuned model is given)",
            "sparcom run --config configs/mistral_7b.yaml --out runs/mistral"),
}

# What each stage reads and writes (OUT = --out); docs/cli.md has the full layout.
STAGE_FILES = {
    "finetune": ("the base model and the train part of the records",
                 "OUT/train/ (orbax run), OUT/checkpoints/<name>/hf, OUT/checkpoints/series.json"),
    "collect": ("every model (base, series, fine-tuned or OUT/checkpoints) and the identify part of the records",
                "OUT/counts/<model>/ (resumable count stores)"),
    "identify": ("OUT/counts/", "OUT/identify/<model>/{isn,ise,expert_neurons}.{csv,json}"),
    "evaluate": ("OUT/counts/", "OUT/evaluate/<model>.json"),
    "compare": ("OUT/counts/", "OUT/compare/comparison.json, series.json (with a series), same_template.json"),
    "ablate": ("OUT/counts/, the models and the ablate part of the records", "OUT/ablate/<model>_<kind>.json"),
    "report": ("OUT/counts/ and OUT/ablate/", "OUT/report/ (index.html, summary.json, figures/, tables/, sets/)"),
    "run": ("the models and the records", "all of the above under OUT, then OUT/report/index.html"),
}

OVERRIDES_EPILOG = """
Overrides: any config key as dotted KEY=VALUE (values are YAML), anywhere on the line,
e.g. {}.
"""
REUSE_EPILOG = """The resolved config is saved as OUT/config.yaml.
Finished work in OUT is reused only when it was made with the same inputs and settings;
otherwise the command stops and names what differs (--overwrite recomputes it).
"""
COMMON_EPILOG = OVERRIDES_EPILOG.format(
    "identify.eps=0.02 data.n_per_category=50 mesh.model=4 'series=[{path: /ckpt}]'") + """--dry-run validates the config, resolves the mesh for --devices N and prints the
memory plan without reading weights. """ + REUSE_EPILOG


_Formatter = argparse.RawDescriptionHelpFormatter


def _add_common(p: argparse.ArgumentParser, stage: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="FILE", required=stage,
                   help="YAML experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. identify.eps=0.02")
    p.add_argument("--out", "-o", metavar="DIR",
                   help="output directory (default: the config's out_dir, else runs/<name>)")
    if stage:  # the demo plans no mesh and runs on one process
        p.add_argument("--dry-run", action="store_true",
                       help="validate, resolve the mesh and print the memory plan; read no weights, write nothing")
        p.add_argument("--devices", type=int, metavar="N",
                       help="device count the dry run plans the mesh for (with --dry-run only; a run uses the "
                            "visible devices)")
        p.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (multi-host; same as mesh.distributed=true)")
    else:
        p.add_argument("--dry-run", action="store_true", help="validate the config and print it; write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute earlier outputs in --out that were made with other inputs or settings "
                        "(without it such outputs stop the run with a message naming what differs)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sparcom` (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="sparcom", formatter_class=_Formatter,
        description="SPARCOM in JAX: instruction-specific neurons and experts, before and after "
                    "instruction fine-tuning.",
        epilog="Start with:  sparcom demo --out runs/demo\n"
               "Real pairs:   sparcom run --config configs/llama2_7b.yaml --dry-run --devices 8\n"
               "Each command has --help with an example.")
    from sparcom_jax import __version__

    parser.add_argument("--version", action="version", version=f"sparcom_jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help="end-to-end demo on tiny models (offline, about 6 min on 2 CPU cores)",
                       description="Pretrain and instruction-tune a tiny Llama and a tiny Mixtral-style MoE, "
                                   "then collect, identify, evaluate, compare, ablate and write the report.\n\n"
                                   "reads:  the shipped records and tokenizer (nothing is downloaded)\n"
                                   "writes: OUT/train/<pair>/, OUT/checkpoints/, OUT/pairs/<pair>/ (each pair's "
                                   "stages), OUT/report/index.html and summary.json",
                       epilog="example:\n  sparcom demo --out runs/demo\n  sparcom demo --out /tmp/d --fast\n"
                              "  sparcom demo --config configs/demo.yaml finetune.total_steps=120 --out runs/demo\n"
                              + OVERRIDES_EPILOG.format("identify.eps=0.02 finetune.total_steps=120 data.n_per_category=8")
                              + "--dry-run validates the config and prints it. " + REUSE_EPILOG)
    _add_common(p, stage=False)
    p.add_argument("--fast", action="store_true", help="a much smaller demo (about a minute; used by tests)")

    p = sub.add_parser("selfcheck", formatter_class=_Formatter,
                       help="load a model (or a tiny random one), run a forward and check it",
                       description="Forward a Hugging Face directory (or a tiny random model), check the logits' "
                                   "shape and finiteness and, when torch + transformers are installed, compare "
                                   "them with transformers'.",
                       epilog="example:\n  sparcom selfcheck\n  sparcom selfcheck --model /data/models/Llama-2-7b-hf "
                              "--dtype bfloat16\n  sparcom selfcheck --model-type mixtral --out runs/check")
    p.add_argument("--model", metavar="DIR", help="Hugging Face model directory (default: a tiny random model)")
    p.add_argument("--model-type", default="llama", choices=["llama", "mixtral"],
                   help="family of the tiny random model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with transformers")
    p.add_argument("--out", "-o", metavar="DIR", help="write selfcheck.json here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    for name, (summary, example) in STAGE_HELP.items():
        reads, writes = STAGE_FILES[name]
        p = sub.add_parser(name, formatter_class=_Formatter, help=summary, description=summary[0].upper() + summary[1:]
                           + f".\n\nreads:  {reads}\nwrites: {writes}, and OUT/config.yaml",
                           epilog=f"example:\n  {example}\n  {example.split(' --out')[0]} --dry-run "
                                  f"--devices 8\n" + COMMON_EPILOG)
        _add_common(p)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse argv; KEY=VALUE overrides may appear anywhere after the command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not _OVERRIDE.match(a)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    return args


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or e.__class__.__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    if "No space left on device" in msg:  # tensorstore and orbax report a full disk as a ValueError
        msg += f"; {_MACHINE_ERRORS[errno.ENOSPC]}"
    return " | ".join(line.strip() for line in msg.splitlines() if line.strip())


def _machine_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; {_MACHINE_ERRORS[e.errno]}"


def _print_outputs(res: dict, out: Path) -> None:
    from sparcom_jax.runtime import compile_stats

    print()
    print(f"outputs: {out}")
    for k, v in res.items():
        print(f"  {k:<12} {v}")
    c = compile_stats()
    print(f"compiled {c['compilations']} program(s), loaded {c['cache_hits']} from the compilation cache "
          f"({c['compile_seconds']:.1f} s)")


def cmd_demo(args) -> int:
    from sparcom_jax import pipeline
    from sparcom_jax.config import DemoConfig, load_config

    base = load_config(args.config, [], cls=DemoConfig) if args.config else None
    cfg = pipeline.demo_config(args.fast, args.overrides, base=base)
    out = pipeline.out_dir(cfg, args.out)
    if args.dry_run:
        import yaml

        from sparcom_jax.config import to_dict

        print("dry run: sparcom demo — config valid, nothing trained or written")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"outputs would go to {out} (report: {out / 'report' / 'index.html'})")
        return 0
    res = pipeline.run_demo(out, cfg=cfg, overwrite=args.overwrite)  # it checks `out` first
    _print_outputs(res, out)
    print(f"\nopen the report: {res['report']}")
    return 0


def cmd_selfcheck(args) -> int:
    from sparcom_jax import pipeline

    if args.out:
        prepare_out_dir(args.out)
    res = pipeline.selfcheck(args.model, model_type=args.model_type, dtype=args.dtype, compare=not args.no_compare)
    print(f"model        {res['model']} ({res['params']:,} parameters)")
    print(f"logits       shape {res['shape']} ({'ok' if res['shape_ok'] else 'WRONG'}), "
          f"{'finite' if res['finite'] else 'NOT FINITE'}")
    diff = res["max_abs_diff"]
    print(f"reference    {res['reference'] or 'not compared'}"
          + ("" if diff is None else f", max |logits - transformers| = {diff:.3g}"))
    print(f"selfcheck    {'PASSED' if res['ok'] else 'FAILED'}")
    if args.out:
        from sparcom_jax.fileio import write_json

        path = write_json(Path(args.out) / "selfcheck.json", res)
        print(f"\noutputs: {path}")
    else:
        print("\noutputs: none written (pass --out DIR to save selfcheck.json)")
    return 0 if res["ok"] else 1


def cmd_stage(args) -> int:
    from sparcom_jax.config import apply_overrides, check_paths_from_here, load_config

    if args.devices is not None and not args.dry_run:
        raise ValueError(f"--devices {args.devices} plans a dry run's mesh and is used only with --dry-run; a run "
                         "uses the devices it sees (set mesh.data / mesh.model to shape them)")
    cfg = load_config(args.config, args.overrides)  # a config error is told before jax is imported (~3 s)
    check_paths_from_here(cfg, args.config)
    if args.distributed and not cfg.mesh.distributed:
        cfg = apply_overrides(cfg, ["mesh.distributed=true"])
    if not args.dry_run:
        _start_jax()
    from sparcom_jax import pipeline

    out = pipeline.out_dir(cfg, args.out)
    if args.dry_run:
        plan = pipeline.memory_plan(cfg, args.command, devices=args.devices)
        print(pipeline.format_plan(plan))
        if plan["mesh"]["distributed"]:
            print("\n  multi-host: each process would call jax.distributed.initialize() first")
        print(f"\noutputs would go to {out} (dry run: nothing written)")
        return 0
    # run_stage checks `out` once every process has joined: a host failing alone before that left
    # the others waiting for it at start-up (jax.distributed's initialization timeout).
    pipeline.init_distributed(cfg.mesh)
    res = pipeline.run_stage(args.command, cfg, out, overwrite=args.overwrite)
    _print_outputs(res, out)
    return 0


def _start_jax() -> None:
    """Import jax and open the persistent compilation cache, before the command's first compile.
    Ctrl-C is held meanwhile: an interrupt in jax's native start-up aborted the process."""
    with interrupt_held():
        from sparcom_jax.runtime import ensure_compilation_cache  # imports jax

        ensure_compilation_cache()


class _CtrlCResender:
    """Sends a dropped Ctrl-C again from a thread of its own, 10 ms after it was dropped (sent from
    the callback that dropped it, it would land in that callback again). The thread is started
    with the command, before any callback runs: the hook (`hook`) only puts a note in a queue,
    one call into C, where a second Ctrl-C cannot interrupt it. A hook that started a timer
    thread itself waited for that thread to start, and on a loaded machine the timer's own
    Ctrl-C landed in that wait, inside the hook, and was dropped for good (the command exited 0)."""

    def __init__(self, previous):
        import queue

        self.previous, self.notes = previous, queue.SimpleQueue()
        self.lock, self.active = threading.Lock(), True
        self.thread = threading.Thread(target=self._run, name="sparcom-ctrl-c", daemon=True)
        self.thread.start()

    def hook(self, unraisable) -> None:
        if unraisable.exc_type is not KeyboardInterrupt:
            return self.previous(unraisable)
        self.notes.put(True)

    def _run(self) -> None:
        while self.notes.get():
            time.sleep(0.01)
            with self.lock:
                if self.active:
                    _thread.interrupt_main(signal.SIGINT)

    def close(self) -> None:
        """No Ctrl-C is sent after this (one dropped in the command's last 10 ms: it has finished)."""
        with self.lock:
            self.active = False
        self.notes.put(False)


@contextlib.contextmanager
def _ctrl_c_never_dropped():
    """Never lose a Ctrl-C while the command runs. Python raises KeyboardInterrupt wherever the
    main thread is when Ctrl-C comes; in a garbage-collection callback (jax runs one at every
    collection), a weakref callback or a `__del__` method it prints "Exception ignored ...
    KeyboardInterrupt" and drops it, and the command went on as if Ctrl-C had not been pressed
    (a fine-tuning run to its last step, exit status 0). Such a dropped Ctrl-C is sent again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = sys.unraisablehook
    resender = _CtrlCResender(previous)
    sys.unraisablehook = resender.hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        resender.close()


COMMANDS = {"demo": cmd_demo, "selfcheck": cmd_selfcheck, **{s: cmd_stage for s in STAGE_HELP}}


def _other_processes() -> bool:
    """Whether this process is one of several of a `jax.distributed` run."""
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def _leave_at_once(status: int) -> None:
    """End a process of a multi-process run that stops with an error, without jax.distributed's
    shutdown. That shutdown is a barrier of every process: the others, still waiting for this
    one in a collective, never reach it, so both sides waited its 5-minute timeout and then
    crashed with a barrier error that does not name the cause. Gone at once, this process
    fails the others' next collective (on CPU at once, else at the heartbeat timeout)."""
    import os

    import jax

    print(f"sparcom: process {jax.process_index()} of {jax.process_count()} stops here (exit status {status}) "
          "without waiting for the others (those still running stop at their next step)", file=sys.stderr)
    _flush_std()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sparcom` console script; returns the exit status. Called with argv None
    from the top level of the script Python started (the console script, `python -m sparcom_jax.cli`),
    it runs the process's own command line and ends the process once the command's outputs are out
    (`_leave`), without the interpreter's shutdown. In a multi-process run, a process that stops
    with an error exits at once (`_leave_at_once`) and one that succeeds takes the normal exit
    (jax.distributed's shutdown waits for the others there)."""
    ends_process = argv is None and _runs_the_command_line(sys._getframe(1))
    try:
        status = _main(argv)
    except BaseException:
        if not _other_processes():
            raise
        traceback.print_exc()
        status = 1
    if status and _other_processes():
        _leave_at_once(status)
    if ends_process:
        _ctrl_c_ends_the_shutdown(status)
        hooks = _fast_exit_hooks()
        if hooks is not None and not _other_processes():
            _leave(status, *hooks)  # returns where the normal exit has work only it can do
    return status


def _runs_the_command_line(caller) -> bool:
    """Whether `main()`, called from the frame `caller`, runs the command line of its own process,
    which may end with the command: called from the top level of the script Python started (the
    `sparcom` console script, `python -m sparcom_jax.cli`, `python -c`), on the main thread, in no
    interactive session. A REPL, IPython or a Jupyter kernel (whose cells run as `__main__` too)
    outlives the command, and so does a program that calls `main()` from one of its functions."""
    if caller is None or caller.f_code.co_name != "<module>" or caller.f_globals.get("__name__") != "__main__":
        return False
    ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    return (threading.current_thread() is threading.main_thread() and not sys.flags.interactive
            and not hasattr(sys, "ps1") and (ipython is None or ipython() is None))


def _ctrl_c_ends_the_shutdown(status: int) -> None:
    """The command has finished: a Ctrl-C from now on, in the interpreter's shutdown, ends the
    process with the command's status. It raised KeyboardInterrupt in jax's `atexit` clean-up,
    which printed "Exception ignored in atexit callback" and its traceback under the outputs."""
    import os

    def leave(*_):
        _flush_std()
        os._exit(status)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, leave)


def _fast_exit_hooks() -> tuple[Callable[[], None], Callable[[], None]] | None:
    """CPython's own steps of its shutdown that `_leave` takes (present in 3.11-3.14, but not part
    of Python's API): wait for the threads that are not daemons (`threading._shutdown`, which also
    runs the `threading._register_atexit` functions, such as executors' shutdowns) and run the
    `atexit` functions (`atexit._run_exitfuncs`). None on an interpreter without one of them (another
    implementation, a CPython that dropped or renamed one), whose command takes the normal exit:
    slower, never skipping that work. 3.14's `threading._shutdown` is 3.13's, its main thread's handle
    renamed (`_os_thread_handle`), which `_leave` does not touch."""
    import atexit

    wait_for_threads = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if sys.implementation.name != "cpython" or not (callable(wait_for_threads) and callable(run_exitfuncs)):
        return None
    return wait_for_threads, run_exitfuncs


def _leave(status: int, wait_for_threads: Callable[[], None], run_exitfuncs: Callable[[], None]) -> None:
    """End the process with `status` once the command's outputs are out, without the interpreter's
    shutdown. That shutdown took ~3 s after a finished tiny `sparcom finetune` or `report` (collecting
    ~430k objects of jax's and the models' heap with XLA's compile threads running, and jax's
    `atexit` clean-up clearing the backends for 1-2 s), and 2-18 s after an interrupted one (also
    the threads of a checkpoint write given up by a second Ctrl-C, which failed as the interpreter
    went away). What the shutdown would finish is finished first, in its order, with its own steps
    (`_fast_exit_hooks`): the threads that are not daemons are waited for (not after Ctrl-C, status
    130, where a given-up write must not hold the exit), every `atexit` function runs (logging's
    shutdown flushes and closes every log handler, temporary directories are removed) but jax's, and
    files left open are flushed (`_flush_open_files`). A file that only closing completes (a gzip
    file's end) is left to the interpreter's shutdown: then this returns and the command takes the
    normal exit, which may close it (not always: once jax's backends are up, a plain script's gzip
    file left open lost its end-of-stream marker at the normal exit too). The command itself has waited for its checkpoint writes, closed
    its orbax managers and count stores and renamed its outputs into place. jax's clean-up clears
    the backends, which the process leaving frees anyway, and shuts jax.distributed down, which a
    single process (the only one here: `_leave_at_once` and `main`) has not started."""
    import atexit
    import os

    if status != 130:
        wait_for_threads()
    jax_clean_up = _without_jax_clean_up()
    run_exitfuncs()
    if _flush_open_files():
        if jax_clean_up is not None:
            atexit.register(jax_clean_up)  # the normal exit is left all it would have done
        return
    _flush_std()
    os._exit(status)


def _without_jax_clean_up() -> Callable[[], None] | None:
    """Take jax's `atexit` clean-up off the list (returned; None where jax is not imported)."""
    import atexit

    if "jax" not in sys.modules:
        return None
    from jax._src import api

    clean_up = getattr(api, "clean_up", None)
    atexit.unregister(clean_up)
    return clean_up


# The file types of the io module whose flush writes all they hold (subclasses of them too); the
# others hold nothing that is not already with the system: raw files (a raw file's write goes to
# the system, by io.RawIOBase's contract: a socket's, a Python class's), memory, readers.
_FLUSHED = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom, io.BufferedRWPair)
_HOLD_NOTHING = (io.RawIOBase, io.FileIO, io.BytesIO, io.StringIO, io.BufferedReader)


def _flush_open_files() -> list:
    """Flush every file object still open for writing, as the interpreter's shutdown does when it
    closes them: a library's unclosed log or output file keeps what it wrote. Returns the open ones
    a flush cannot complete: any other `io.IOBase` (a gzip, bz2 or lzma file, whose end is written
    on closing, or a Python class with a buffer of its own), for the interpreter's shutdown to close.
    Found among the objects the garbage collector tracks (0.1-0.2 s over the ~410k after a tiny
    finetune), by type (`_file_kind`, once for each type): isinstance would read each object's
    __class__, which some objects compute (torch warned of a deprecated name there)."""
    import gc

    kinds: dict[type, str | None] = {}
    left = []
    for obj in gc.get_objects():
        t = type(obj)
        kind = kinds[t] if t in kinds else kinds.setdefault(t, _file_kind(t))
        if kind is not None and _open_for_writing(obj):
            if kind == "flush":
                with contextlib.suppress(Exception):  # a pipe whose reader has gone
                    obj.flush()
            else:
                left.append(obj)
    return left


def _file_kind(t: type) -> str | None:
    """What leaving does with an open file object of type `t`: "flush" it, or leave it to the
    "close" of the interpreter's shutdown; None for no file object, or one that holds nothing.
    Read from the type's bases: `issubclass(t, io.IOBase)`, an ABC's check, took 0.2 ms a type
    (0.37 s for the ~1700 types after a tiny `sparcom run`)."""
    bases = getattr(t, "__mro__", ())
    if any(b in bases for b in _FLUSHED):
        return "flush"
    if any(b in bases for b in _HOLD_NOTHING) or io.IOBase not in bases:
        return None
    return "close"


def _open_for_writing(f) -> bool:
    with contextlib.suppress(Exception):  # a file object's own methods may fail in any way here
        return not f.closed and f.writable()
    return False


def _flush_std() -> None:
    """Flush stdout and stderr; one whose reader has gone (`sparcom ... | head`) is let go, as
    `_run` does with a broken pipe."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command_line = shlex.join(["sparcom", *argv])
    with _plain_data_warnings(args.debug), _ctrl_c_never_dropped():
        return _run(args)


@contextlib.contextmanager
def _plain_data_warnings(debug: bool):
    """Print the warnings about the user's data (`DataWarning`) as one `sparcom: warning:`
    line each, like the errors: Python's form adds the warning's source file and code line,
    which say nothing to someone fixing a data file. `--debug` keeps Python's form."""
    import warnings

    from sparcom_jax.data.records import DataWarning

    with warnings.catch_warnings():  # restores showwarning (tests call main in-process)
        python_form = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if debug or not issubclass(category, DataWarning):
                return python_form(message, category, filename, lineno, file, line)
            print(f"sparcom: warning: {message}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


def _run(args) -> int:
    try:
        # A dry run compiles nothing; a stage starts jax once its config has loaded (`cmd_stage`).
        if not getattr(args, "dry_run", False) and args.command not in STAGE_HELP:
            _start_jax()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{INTERRUPTED}: {args.command_line}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sparcom run --dry-run ... | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BAD_INPUT as e:
        if args.debug:
            traceback.print_exc()
        print(f"sparcom: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _MACHINE_ERRORS:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"sparcom: error: {_machine_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _lost_process(e):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"sparcom: error: {_lost_process_line(e)}", file=sys.stderr)
        return 2


def _lost_process(e: Exception) -> bool:
    """Whether `e` is this process's collective failing because another process of the run is gone."""
    if not _other_processes():
        return False
    import jax

    return isinstance(e, jax.errors.JaxRuntimeError) and any(s in str(e).lower() for s in _LOST_PROCESS)


def _lost_process_line(e: Exception) -> str:
    """The one line of a process whose collective failed because another process is gone: it cannot
    name the process (the collective does not say), so it says where to look and how to resume."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()} lost contact with another process of the run "
            f"({_one_line(e)[:300]}): that process stopped (killed, out of memory, its host restarted or lost the "
            "network) and its own log says why; finished work in the output directory is kept: start the same "
            "command on every host again to resume it (counts from their last finished chunk)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
