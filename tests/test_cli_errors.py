"""Bad input and interruptions at the `sparcom` command, as a new user meets them: each ends in
one line that names the file or setting and the fix, never in a traceback or a lost Ctrl-C."""

from __future__ import annotations

import gc
import signal
import sys
import time
import weakref

import pytest

from test_cli import run_cli, write_tiny


def _ctrl_c_in_a_gc_callback():
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


def _ctrl_c_in_a_weakref_callback():
    class Thing:
        pass

    def callback(ref):
        signal.raise_signal(signal.SIGINT)

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    return ref


def _ctrl_c_in_a_finalizer():
    class Thing:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    Thing()


@pytest.mark.parametrize("loaded", [False, True], ids=["", "threads_slow_to_start"])
@pytest.mark.parametrize("where", [_ctrl_c_in_a_gc_callback, _ctrl_c_in_a_weakref_callback, _ctrl_c_in_a_finalizer])
def test_ctrl_c_where_python_drops_exceptions_still_stops_the_command(where, loaded, tmp_path, capsys, monkeypatch):
    # jax runs a Python callback at every garbage collection (jax._src.lib._xla_gc_callback), and
    # collections run weakref callbacks and __del__ methods. A Ctrl-C landing in one raised
    # KeyboardInterrupt there, where Python prints "Exception ignored" and drops it: a fine-tuning
    # run interrupted so went on to its last step and exited 0 (1 of 6 tries on a tiny model).
    from sparcom_jax import pipeline

    after = []

    def stage(*a, **k):
        where()
        end = time.monotonic() + 5
        while time.monotonic() < end:  # the stage's next steps
            pass
        after.append(True)
        return {}

    monkeypatch.setattr(pipeline, "run_stage", stage)
    if loaded:  # a busy machine: a started thread runs for a while before its starter wakes up
        import threading

        start = threading.Thread.start

        def slow_start(self):
            start(self)
            time.sleep(0.05)  # (the resent Ctrl-C, 10 ms after, landed here: in the hook, dropped)

        monkeypatch.setattr(threading.Thread, "start", slow_start)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    hook = sys.unraisablehook
    try:
        code, _, err = run_cli(capsys, "collect", "--config", str(write_tiny(tmp_path)), "--out", str(tmp_path / "o"))
    finally:
        signal.signal(signal.SIGINT, old)
    assert sys.unraisablehook is hook  # the command's hook is gone
    assert code == 130 and after == [] and err.startswith("sparcom: interrupted; "), err
    assert "Exception ignored" not in err


def test_outputs_get_the_permissions_the_umask_gives_new_files(tmp_path):
    # Outputs are written under a temporary name and renamed; tempfile makes that name 0600
    # (a directory 0700) whatever the umask, so every result, OUT/config.yaml and the report
    # were readable by their owner alone: colleagues sharing the run, or a web server showing
    # index.html, got "Permission denied".
    import os
    import stat

    from sparcom_jax.fileio import atomic_dir, atomic_write, write_json

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", "x")
        write_json(tmp_path / "b.json", {})
        with atomic_dir(tmp_path / "report") as d:
            atomic_write(d / "index.html", "<html>")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() makes under this umask
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(plain) == 0o640
    for p in (tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "report" / "index.html"):
        assert mode(p) == 0o640, (p, oct(mode(p)))
    assert mode(tmp_path / "report") == 0o750


def test_a_negative_seed_is_refused_naming_its_key(capsys):
    # data.seed=-1 stopped the run with "the identify part of data.split has too few records
    # (expected non-negative integer)" (numpy's refusal, taken for a sampling one), and
    # train_data.seed=-1 with "train_data.n_per_category=8: expected non-negative integer".
    from test_cli import CONFIGS

    for override in ("data.seed=-1", "data.split_seed=-2", "train_data.seed=-1", "seed=-3"):
        key, value = override.split("=")
        code, out, err = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run", override)
        assert code == 2 and out == "", override
        assert err == f"sparcom: error: override '{override}': {key} must be >= 0, got {value}\n"


def test_a_section_given_another_type_says_a_mapping_of_its_keys(tmp_path, capsys):
    # "identify: expected IdentifySpec, got [1, 2] (list)" named a Python class the user never sees.
    from test_cli import CONFIGS

    code, _, err = run_cli(capsys, "identify", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                           "identify=[1, 2]")
    assert code == 2 and "IdentifySpec" not in err
    assert err.startswith("sparcom: error: override 'identify=[1, 2]': identify: expected a mapping of keys (rule, "
                          "eps, threshold, "), err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: /data/models/llama\n")
    code, _, err = run_cli(capsys, "identify", "--config", str(bad), "--dry-run")
    assert code == 2 and "ModelSpec" not in err
    assert err.startswith(f"sparcom: error: {bad}: base: expected a mapping of keys (name, path, "), err
    assert err.rstrip().endswith("got '/data/models/llama' (str)")


def test_a_mesh_the_devices_cannot_hold_is_refused_by_the_run_too(tmp_path, capsys):
    # The dry run refused mesh.model=3 on one device; the run made no mesh (one device) and went on,
    # unsharded, as if the setting were not there.
    cfg = write_tiny(tmp_path)
    for override, says in (("mesh.model=3", "mesh.model=3 does not divide the "),
                           ("mesh.data=2", "mesh.data=2 x mesh.model=1 = 2, but there are ")):
        out = tmp_path / override.replace("=", "")
        code, _, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(out), override)
        assert code == 2 and err.startswith(f"sparcom: error: {says}"), (override, err)
        assert not (out / "counts").exists()


def test_collect_buckets_below_max_length_are_refused_by_the_dry_run(capsys):
    # The run loaded the first model and stopped at its first batch with "a sequence has 64
    # tokens, more than the largest bucket (16); ... add a bucket", naming no config key.
    from test_cli import CONFIGS

    code, out, err = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                             "collect.buckets=[16, 512]")
    assert code == 2 and out == ""
    assert err == ("sparcom: error: override 'collect.buckets=[16, 512]': collect.buckets: the largest bucket (512) is "
                   "below data.max_length=1024, so a record that long would fit none; add a bucket of 1024, or lower "
                   "data.max_length\n")
    code, _, _ = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                         "collect.buckets=[16, 1024]")
    assert code == 0


def test_an_empty_data_path_is_refused_naming_the_key(capsys):
    # data.path="" was read as the current directory ("'.': not a directory written by datasets'
    # save_to_disk"), data.path=[] as records held in memory ("records: no records (an empty list)").
    from test_cli import CONFIGS

    for value in ('""', "[]", '[a.jsonl, ""]'):
        code, out, err = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                                 f"data.path={value}")
        assert code == 2 and out == "", value
        assert err.startswith(f"sparcom: error: override 'data.path={value}': data.path: empty ("), err
        assert err.endswith("); name a data file or directory (or a list of them), or null for the shipped set\n")


def test_a_causal_check_on_records_without_responses_is_refused_before_any_work(tmp_path, capsys):
    # A data file with empty `output`s (allowed for counting prompts) ran the whole study and a causal
    # check of end-of-sequence losses; the dry run said nothing, the run only warned about few records.
    import json

    data = tmp_path / "prompts.jsonl"
    cats = ["CLS", "CODE", "QA", "GEN", "MATH", "SUM"]
    data.write_text("".join(json.dumps({"id": f"{c}{i}", "category": c, "instruction": f"Task {i} of kind {c}: go.",
                                        "output": ""}) + "\n" for c in cats for i in range(4)))
    cfg = write_tiny(tmp_path)
    args = ["--config", str(cfg), "ablation.enabled=true", f"data.path={data}", "data.n_per_category=null",
            "data.split={identify: 0.5, ablate: 0.5}", "data.group_by=text"]
    for argv in (["ablate", "--dry-run"], ["ablate", "--out", str(tmp_path / "out")]):
        code, out, err = run_cli(capsys, *argv, *args)
        assert code == 2 and out == "", argv
        assert err.startswith("sparcom: error: 12 of 12 held-out records have no reference response"), err
        assert err.endswith("or turn the causal check off (ablation.enabled: false in a config)\n")
        assert not (tmp_path / "out" / "counts").exists()
    code, _, _ = run_cli(capsys, "ablate", "--dry-run", *args, "ablation.enabled=false")
    assert code == 0


def test_a_relative_path_found_beside_the_config_but_not_here_names_both(tmp_path, capsys, monkeypatch):
    # A config written beside its data and run from another directory: the dry run said the data
    # was "not on this machine: not checked" and passed; the run stopped at the first path it read.
    import json

    from test_cli import TINY

    study = tmp_path / "study"
    study.mkdir()
    (study / "mine.jsonl").write_text("".join(json.dumps({"category": c, "instruction": f"Do {c} task {i}.",
                                                          "output": "ok"}) + "\n"
                                              for c in ("CLS", "CODE", "QA", "GEN", "MATH", "SUM") for i in range(12)))
    (study / "my.yaml").write_text(TINY.replace("data: {n_per_category: 2,",
                                                "data: {path: mine.jsonl, group_by: text, n_per_category: 2,"))
    monkeypatch.chdir(tmp_path)
    for argv in (["collect", "--dry-run"], ["collect", "--out", "out"]):
        code, out, err = run_cli(capsys, *argv, "--config", "study/my.yaml")
        assert code == 2 and out == "", argv
        assert err == (f"sparcom: error: study/my.yaml: data.path: 'mine.jsonl' is not in the current directory "
                       f"({tmp_path}) but is beside the config (study/mine.jsonl); relative paths in a config are "
                       "read from the directory sparcom runs in: run it from study, or write the path as it is from "
                       "here (study/mine.jsonl), or absolute\n")
    assert not (tmp_path / "out").exists()
    code, _, _ = run_cli(capsys, "collect", "--dry-run", "--config", "study/my.yaml", "data.path=study/mine.jsonl")
    assert code == 0
    monkeypatch.chdir(study)  # from the config's own directory the same file is read
    code, _, _ = run_cli(capsys, "collect", "--dry-run", "--config", "my.yaml")
    assert code == 0


def test_a_stage_run_before_collect_says_how_to_run_collect(tmp_path, capsys):
    # `sparcom identify --config my.yaml --out OUT` on an OUT without counts said "run `sparcom
    # collect` first", which, run as written, stops for want of --config.
    cfg = write_tiny(tmp_path)
    code, _, err = run_cli(capsys, "identify", "--config", str(cfg), "--out", str(tmp_path / "out"))
    assert code == 2
    assert err.splitlines()[-1] == (
        f"sparcom: error: {tmp_path}/out/counts/base: no counts of base here: this stage reads the counts `sparcom "
        "collect` writes; run that first with the same --config and --out (or `sparcom run`, every stage in order, "
        "reusing what is done)")
