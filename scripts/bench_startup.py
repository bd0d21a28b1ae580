"""Benchmark seconds to first result: a fresh process until its first counted batch, cold and warm.

    python scripts/bench_startup.py                 # the small models of bench_collect.py
    python scripts/bench_startup.py --models llama1b --repeats 1 --no-off --json results.json

For each model, a checkpoint directory is written once; then fresh Python processes
each run ``load_model`` and ``collect_counts`` on exactly one batch (so the end of the
call is the first counted batch), timed from just before the process is spawned:

- "cache off": ``SPARCOM_JAX_CACHE=off``, what every run paid before the cache (left out
  with --no-off);
- "cold": an empty persistent compilation cache (compiles, and writes the cache);
- "warm": a second process on the same model, data and cache (loads the programs).

Each child reports its phases (import of jax and sparcom_jax, load_model, the first
batch) and `sparcom_jax.runtime.compile_stats()`. The persistent cache keeps XLA
programs only: tracing and lowering still run in every process, as do the Python and
JAX imports and reading the weights, so "warm" is the floor this mechanism reaches.
Best of `--repeats` (each repeat with a new empty cache). Target (issue 15): the warm
process reaches its first counted batch in <= 10 s.

Writes (or replaces) the section ``<!-- startup:<machine>:start -->`` ...
``<!-- startup:<machine>:end -->`` in docs/benchmarks.md; other sections are left alone.

With ``--cli`` it times the ends of short ``sparcom`` commands instead (section
``cli-ends:<machine>``): ``--help``, a bad argument, a config error, ``run --dry-run`` on a
shipped config, ``report`` on a finished tiny run and a two-step tiny ``finetune``, each in
fresh processes (``python -m sparcom_jax.cli``, unbuffered output), median of ``--repeats``
(default 5): the wall time, the time to its first output line (start-up) and from its last
output line to the process's exit (the shutdown). ``--ref REV`` times that git revision too,
in the same session, alternating the two trees round by round (as ``bench_ab.py`` does):

    python scripts/bench_startup.py --cli --ref main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import (  # noqa: E402
    PRESETS, device_name, make_sequences, met_word, replace_section, shape, stamp, target, update_results,
)

WARM_TARGET_S = 10.0

CHILD = textwrap.dedent("""
    import json, os, sys, time
    t_spawn = float(os.environ["BENCH_T_SPAWN"])
    t0 = time.time()
    import numpy as np
    import jax
    import sparcom_jax as sj
    from sparcom_jax.runtime import compile_stats
    t1 = time.time()
    model = sj.load_model(sys.argv[1], dtype=sys.argv[2], with_tokenizer=False)
    t2 = time.time()
    seqs = list(np.load(sys.argv[3], allow_pickle=True)["seqs"])
    c = sj.collect_counts(model, seqs, batch_size=len(seqs), progress=False)
    assert int(c.tokens.sum()) == sum(len(s) for s in seqs)
    t3 = time.time()
    print("RESULT", json.dumps({"total_s": t3 - t_spawn, "start_s": t0 - t_spawn, "import_s": t1 - t0,
                                "load_s": t2 - t1, "first_batch_s": t3 - t2, **compile_stats()}))
""")


def run_child(script: Path, ckpt: Path, dtype: str, seqs_path: Path, cache: str, timeout: float) -> dict:
    env = dict(os.environ, SPARCOM_JAX_CACHE=cache, BENCH_T_SPAWN=repr(time.time()),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the user's own cache would take precedence
    try:
        r = subprocess.run([sys.executable, str(script), str(ckpt), dtype, str(seqs_path)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no first batch within {timeout:.0f} s"}
    if r.returncode != 0:
        print(f"child failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", file=sys.stderr)
        return {"error": f"child failed (exit {r.returncode}; its output is in the log)"}
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def best(runs: list[dict]) -> dict | None:
    """The fastest run that finished (None if none was run); the first error if none finished."""
    ok = [r for r in runs if "error" not in r]
    return min(ok, key=lambda r: r["total_s"]) if ok else (runs[0] if runs else None)


def bench_model(name: str, hf: dict, args, tmp: Path) -> dict:
    import numpy as np

    import sparcom_jax as sj

    cfg = sj.ModelConfig.from_hf_config(hf)
    ckpt = tmp / "ckpt"
    model = sj.init_model(cfg, seed=0, dtype=args.dtype)
    sj.save_model(model, ckpt)
    del model  # the children need the device's memory
    seqs = make_sequences(args.batch, args.min_len, args.max_len, cfg.vocab_size)
    arr = np.empty(len(seqs), object)
    arr[:] = seqs
    np.savez(tmp / "seqs.npz", seqs=arr)
    script = tmp / "child.py"
    script.write_text(CHILD)
    off, cold, warm = [], [], []
    for k in range(args.repeats):
        cache = tmp / f"cache{k}"
        child = (script, ckpt, args.dtype, tmp / "seqs.npz")
        if not args.no_off:
            off.append(run_child(*child, "off", args.child_timeout))
        cold.append(run_child(*child, str(cache), args.child_timeout))
        warm.append(run_child(*child, str(cache), args.child_timeout))
        print(f"{name}: off {off[-1] if off else None}, cold {cold[-1]}, warm {warm[-1]}", flush=True)
    return {"name": name, "tokens": sum(len(s) for s in seqs), "off": best(off), "cold": best(cold),
            "warm": best(warm)}


def fmt_row(r: dict) -> str:
    def cell(m):
        if m is None:
            return "not run"
        if "error" in m:
            return f"failed: {m['error']}"
        return (f"**{m['total_s']:.1f}** ({m['start_s'] + m['import_s']:.1f} + {m['load_s']:.1f} + "
                f"{m['first_batch_s']:.1f})")

    def get(m, key, fmt):
        return format(m[key], fmt) if m and key in m else "?"

    c, w = r["cold"], r["warm"]
    return (f"| {r['name']} | {cell(r['off'])} | {cell(c)} | {cell(w)} | {get(c, 'compilations', 'd')} / "
            f"{get(w, 'compilations', 'd')} | {get(w, 'cache_hits', 'd')} | {get(c, 'compile_seconds', '.1f')} / "
            f"{get(w, 'compile_seconds', '.2f')} |")


# --------------------------------------------------------------------------- #
# --cli: the ends of short `sparcom` commands

# A two-layer random Llama (nothing downloaded): the finished run `report` reads, and the timed finetune.
TINY_EXPERIMENT = {
    "name": "bench-tiny",
    "base": {"name": "base", "init": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "max_position_embeddings": 64}},
    "data": {"n_per_category": 2, "max_length": 48}, "train_data": {"n_per_category": 2},
    "train": {"total_steps": 2, "save_every": 1, "batch_size": 4, "warmup_steps": 0, "max_length": 48,
              "buckets": [48], "allow_cut_responses": True},
    "identify": {"eps": 0.05, "n_boot": 0, "n_perm": 0}, "collect": {"batch_size": 12, "buckets": [48]},
    "ablation": {"enabled": False},
}


def cli_commands(tmp: Path, tree: str) -> list[tuple[str, list[str], int]]:
    """(label, arguments of `sparcom`, expected exit status) of each timed command; `tree` names the
    tree's own finished run and finetune outputs under `tmp` (`cli_setup` made the run)."""
    tiny, run = str(tmp / "tiny.yaml"), str(tmp / f"run-{tree}")
    return [
        ("`sparcom --help`", ["--help"], 0),
        ("a bad argument (`run --bogus`)", ["run", "--bogus"], 2),
        ("a config error (an unknown key)", ["run", "--config", str(tmp / "bad.yaml")], 2),
        ("`run --dry-run` (configs/llama2_7b.yaml)", ["run", "--config", "configs/llama2_7b.yaml", "--dry-run"], 0),
        ("`report` on a finished tiny run", ["report", "--config", tiny, "--out", run], 0),
        ("`finetune`, tiny, 2 steps", ["finetune", "--config", tiny, "--out", f"{run}-finetune", "--overwrite"], 0),
    ]


def cli_env(tree: Path, tmp: Path) -> dict:
    """The environment of a timed command: the tree's package, unbuffered output (each line is
    timed as it is printed), one compilation cache for the session (warmed by `cli_setup`)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", SPARCOM_JAX_CACHE=str(tmp / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def time_command(cmd: list[str], cwd: Path, env: dict, timeout: float) -> dict:
    """Run `cmd` once: wall seconds, seconds to its first and from its last output line (stdout and
    stderr) to its exit, its exit status and the tail of its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    stamps, lines = [], []
    try:
        for line in proc.stdout:
            stamps.append(time.perf_counter())
            lines.append(line.decode(errors="replace"))
        status = proc.wait()
    finally:
        killer.cancel()
    end = time.perf_counter()
    first, last = (stamps[0], stamps[-1]) if stamps else (end, end)
    return {"wall_s": end - t0, "first_line_s": first - t0, "tail_s": end - last, "status": status,
            "output": "".join(lines[-20:])}


def cli_setup(tmp: Path, trees: dict[str, Path], timeout: float) -> None:
    """The configs, and one finished tiny `sparcom run` per tree (what its `report` reads)."""
    import yaml

    (tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY_EXPERIMENT, sort_keys=False))
    (tmp / "bad.yaml").write_text(yaml.safe_dump({**TINY_EXPERIMENT, "identfy": {"eps": 0.05}}, sort_keys=False))
    for name, tree in trees.items():
        r = time_command([sys.executable, "-m", "sparcom_jax.cli", "run", "--config", str(tmp / "tiny.yaml"),
                          "--out", str(tmp / f"run-{name}")], tree, cli_env(tree, tmp), timeout)
        if r["status"]:
            raise SystemExit(f"bench_startup: the tiny run of {tree} failed (exit {r['status']}):\n{r['output']}")


def bench_cli(trees: dict[str, Path], repeats: int, timeout: float, tmp: Path) -> dict[str, dict[str, list[dict]]]:
    """{tree: {command label: [one dict of `time_command` per round]}}, the trees alternated round by round."""
    cli_setup(tmp, trees, timeout)
    got: dict[str, dict[str, list[dict]]] = {name: {} for name in trees}
    for r in range(repeats):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            for label, argv, expected in cli_commands(tmp, name):
                m = time_command([sys.executable, "-m", "sparcom_jax.cli", *argv], trees[name],
                                 cli_env(trees[name], tmp), timeout)
                if m["status"] != expected:
                    print(f"{name}: {label} exited {m['status']}, not {expected}:\n{m['output']}", file=sys.stderr)
                    m["error"] = f"exit status {m['status']}, not {expected}"
                got[name].setdefault(label, []).append(m)
                print(f"round {r + 1} {name}: {label}: {m['wall_s']:.2f} s, last line to exit {m['tail_s']:.2f} s",
                      flush=True)
    return got


def median_cell(runs: list[dict]) -> str:
    """`wall (first line / last line to exit)`, medians in seconds; the error of a run that failed."""
    bad = [m["error"] for m in runs if "error" in m]
    if bad:
        return f"failed: {bad[0]}"
    med = {k: statistics.median(m[k] for m in runs) for k in ("wall_s", "first_line_s", "tail_s")}
    return f"**{med['wall_s']:.2f}** ({med['first_line_s']:.2f} / {med['tail_s']:.2f})"


def cli_section(got: dict[str, dict[str, list[dict]]], names: dict[str, str], repeats: int) -> str:
    """The `cli-ends` section: a row per command, a column per tree."""
    trees = list(got)
    labels = list(got[trees[0]])
    head = " | ".join(f"{names[t]}: s (first line / last line to exit)" for t in trees)
    return "\n".join([
        f"{stamp()}; each cell the median of {repeats} fresh processes (`python -m sparcom_jax.cli`, "
        "unbuffered output), the trees alternated round by round; wall seconds from spawn to exit, in "
        "brackets from spawn to the first output line (start-up) and from the last output line to the exit "
        f"(the shutdown); 1-minute load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"| command | {head} |",
        "|---|" + "---|" * len(trees),
        *[f"| {label} | " + " | ".join(median_cell(got[t][label]) for t in trees) + " |" for label in labels],
        "",
        "The time from the last output line to the exit is what a process spends once its output is "
        "complete (docs/cli.md, \"Errors\"); `--help` and a bad argument import neither jax nor the pipeline, "
        "so their ends were short already. Re-run with `python scripts/bench_startup.py --cli --ref REV` "
        "(REV: the revision to compare with).",
    ])


def main_cli(args) -> int:
    from bench_ab import unpack

    with tempfile.TemporaryDirectory(prefix="bench_cli_") as d:
        tmp = Path(d)
        trees, names = {"tree": ROOT}, {"tree": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            or "this tree"}
        if args.ref:
            (tmp / "ref").mkdir()
            names["ref"] = f"{unpack(args.ref, tmp / 'ref')[:9]} (ref)"
            trees = {"ref": tmp / "ref", **trees}
        got = bench_cli(trees, args.repeats, args.child_timeout, tmp)
    update_results(args.json, "cli_ends", got)
    body = cli_section(got, names, args.repeats)
    print(body)
    if not args.no_write:
        machine = device_name()
        replace_section(Path(args.doc), f"cli-ends:{machine}", body,
                        title=f"Seconds at the ends of short commands (`scripts/bench_startup.py --cli`) — {machine}")
        print(f"wrote {args.doc}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small", help="preset (small, gpu) or comma-separated shape keys "
                                                      "of bench_common.SHAPES, e.g. llama1b")
    ap.add_argument("--tiny", action="store_true", help="shrink every model to toy size (CPU dry runs)")
    ap.add_argument("--no-off", action="store_true", help="skip the cache-off process (saves one cold start)")
    ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--json", default=None, help="results JSON to update (key 'startup')")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, float32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="sequences in the one counted batch "
                                                            "(default 8 on CPU, 32 otherwise)")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (5 with --cli)")
    ap.add_argument("--cli", action="store_true", help="time the ends of short `sparcom` commands instead")
    ap.add_argument("--ref", default=None, help="with --cli: a git revision to time in the same session")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.cli:
        args.repeats = args.repeats or 5
        return main_cli(args)
    args.repeats = args.repeats or 2
    import jax

    cpu = jax.default_backend() == "cpu"
    if args.dtype is None:
        args.dtype = "float32" if cpu else "bfloat16"
    args.batch = args.batch or (8 if cpu else 32)
    machine = device_name()
    rows, targets = [], []
    for key in PRESETS.get(args.models) or args.models.split(","):
        name, hf = shape(key, args.tiny)
        with tempfile.TemporaryDirectory() as d:
            rows.append(bench_model(name, hf, args, Path(d)))
        c, w = rows[-1]["cold"], rows[-1]["warm"]
        warm_s = w.get("total_s")
        targets.append(target(f"{name}: warm second process to its first counted batch",
                              f"{warm_s:.1f} s" if warm_s is not None else w.get("error", "not run"),
                              f"<= {WARM_TARGET_S:.0f} s",
                              warm_s is not None and warm_s <= WARM_TARGET_S))
        reported = "compilations" in c and "compilations" in w
        targets.append(target(f"{name}: XLA compilations reported (cold / warm)",
                              f"{c['compilations']} / {w['compilations']}" if reported else "not reported",
                              "reported", reported))
    update_results(args.json, "startup", {"rows": rows, "targets": targets, "dtype": args.dtype})
    body = "\n".join([
        f"{stamp()}; compute {args.dtype}; one batch of {args.batch} random sequences of {args.min_len}-"
        f"{args.max_len} tokens; each cell is a fresh process, timed from its spawn to the end of `collect_counts` "
        f"(its first counted batch), best of {args.repeats}; 1-minute load average {os.getloadavg()[0]:.1f} at "
        "the end.",
        "",
        "| model | cache off: s (start+import + load_model + first batch) | cold: empty cache | warm: second "
        "process, same cache | XLA compilations cold / warm | cache hits warm | compile or load s cold / warm |",
        "|---|---|---|---|---|---|---|",
        *[fmt_row(r) for r in rows],
        "",
        *[f"- {t['target']}: {t['value']} (target {t['goal']}): **{met_word(t['met'])}**" for t in targets],
        "",
        "The persistent cache (`sparcom_jax.runtime`, on by default) stores XLA programs: a warm process "
        "skips XLA compilation, not Python start-up, imports, tracing and lowering, or reading the weights. "
        "Re-run with `python scripts/bench_startup.py` (`--models llama1b` on an accelerator).",
    ])
    print(body)
    if not args.no_write:
        replace_section(Path(args.doc), f"startup:{machine}", body,
                        title=f"Seconds to first result (`scripts/bench_startup.py`) — {machine}")
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
