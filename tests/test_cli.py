"""The `sparcom` command: help texts, dry runs of every real config, errors, stages, self-check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from sparcom_jax.cli import STAGE_HELP, build_parser, main, parse_args
from sparcom_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
COMMANDS = ["demo", "selfcheck", *STAGE_HELP]

# name -> (parameter count printed by the plan, published size in billions)
REAL = {
    "llama2_7b": 6.74, "mistral_7b": 7.24, "qwen25_7b": 7.62,
    "mixtral_8x7b": 46.7, "qwen15_moe_a27b": 14.3, "olmoe_1b_7b": 6.92,
}

TINY = """\
name: tiny
base:
  name: base
  init:
    model_type: llama
    hidden_size: 32
    intermediate_size: 64
    num_hidden_layers: 2
    num_attention_heads: 2
    num_key_value_heads: 1
    max_position_embeddings: 64
data: {n_per_category: 2, max_length: 48}
train_data: {n_per_category: 2}
train: {total_steps: 2, save_every: 1, batch_size: 4, warmup_steps: 0, max_length: 48, buckets: [48],
        async_checkpointing: false, allow_cut_responses: true}
identify: {eps: 0.05, n_boot: 0, n_perm: 0}
collect: {batch_size: 12, buckets: [48]}
ablation: {enabled: false}
"""


def write_tiny(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    return cfg


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_declared():
    eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "sparcom"]
    assert eps and eps[0].value == "sparcom_jax.cli:main"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "example:" in out and f"sparcom {command}" in out.split("example:")[1]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for c in COMMANDS:
        assert re.search(rf"^\s+{c}\b", out, re.M), c
    assert "sparcom demo --out" in out


def test_overrides_may_appear_anywhere():
    a = parse_args(["collect", "identify.eps=0.1", "--config", "x.yaml", "mesh.model=2", "--dry-run", "data.seed=3"])
    assert a.config == "x.yaml" and a.dry_run
    assert sorted(a.overrides) == ["data.seed=3", "identify.eps=0.1", "mesh.model=2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["collect"])  # --config is required


@pytest.mark.parametrize("name", sorted(REAL))
def test_dry_run_of_every_real_config(name, capsys):
    code, out, _ = run_cli(capsys, "run", "--config", str(CONFIGS / f"{name}.yaml"), "--dry-run")
    assert code == 0
    m = re.search(r"parameters\s+([\d,]+) \(", out)
    assert m, out
    n = int(m.group(1).replace(",", ""))
    assert abs(n / (REAL[name] * 1e9) - 1) < 0.01
    assert "weights not present" in out and "no weights read" in out
    assert re.search(r"mesh\s+\d+ devices = data \d+ x model \d+", out)
    assert "count store" in out and "per device" in out
    assert "training state" not in out  # the pair is given: `run` does not fine-tune
    assert "nothing written" in out.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["llama2_7b", "olmoe_1b_7b"])
def test_dry_run_of_finetuning_checks_the_batch_split(name, capsys):
    cfg = str(CONFIGS / f"{name}.yaml")
    code, out, _ = run_cli(capsys, "finetune", "--config", cfg, "--dry-run", "finetuned=null", "--devices", "8")
    assert code == 0 and "training state (f32 params+grads+2 adamw moments, FSDP)" in out
    assert "embed->data" in out  # FSDP rules split the model width over the data axis
    code, out, err = run_cli(capsys, "finetune", "--config", cfg, "--dry-run", "--devices", "16", "mesh.model=1")
    assert code == 2 and "not divisible by the 16 devices of the mesh's data axis" in err and err.count("\n") == 1


def test_dry_run_resolves_the_mesh_for_a_device_count(capsys):
    cfg = str(CONFIGS / "mixtral_8x7b.yaml")
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "--devices", "32", "mesh.model=8")
    assert code == 0 and "32 devices = data 4 x model 8" in out
    assert "experts->model" in out
    # per-device parameter bytes shrink with the model axis
    per = re.search(r"parameters \(analysis, bfloat16\)\s+\S+\s+([\d.]+) GiB\s+([\d.]+) GiB", out)
    assert per and float(per.group(2)) < float(per.group(1)) / 7
    assert "expert_neuron_active   N x 32 x 8 x 14336" in out
    assert "training state" not in out  # collect only

    code, out, err = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "--devices", "12", "mesh.model=8")
    assert code == 2 and out == ""
    assert err.startswith("sparcom: error: mesh.model=8 does not divide the 12 devices") and err.count("\n") == 1


def test_dry_run_refuses_a_model_axis_over_hosts_for_collection_only(capsys):
    # Each host counts its own records, so a batch row cannot lie on two hosts; training
    # gives every host the whole batch and may split the model over hosts.
    cfg = str(CONFIGS / "mixtral_8x7b.yaml")  # 4 processes
    code, out, err = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "--devices", "16", "mesh.model=8")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("sparcom: error: mesh.model=8 spans processes (4 processes of 4 devices)")
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "--devices", "16")
    assert code == 0 and "16 devices = data 4 x model 4, 4 processes" in out  # the config as shipped
    code, out, err = run_cli(capsys, "finetune", "--config", cfg, "--dry-run", "--devices", "16", "mesh.model=8",
                             "finetuned=null", "train.batch_size=16")
    assert code == 0, err


def _collected_with_process_copies(tmp_path, capsys, processes):
    """A tiny config collected by one process, its store copied to process_0 .. process_<P-1>
    beside it (the layout a P-process collection leaves); returns (config, OUT, store)."""
    import shutil

    cfg = write_tiny(tmp_path)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(out))
    assert code == 0, err
    store = out / "counts" / "base"
    for k in range(processes):
        shutil.copytree(store, store / f"process_{k}", ignore=shutil.ignore_patterns("process_*", ".*"))
    return cfg, out, store


def test_collect_replaces_the_stores_another_number_of_processes_left(tmp_path, capsys):
    # A count directory holds one store (one process) or process_0..process_<P-1>. Stores of
    # other shares left beside it were what the analysis read (and refused, asking for the
    # very collect that had just said "already complete").
    cfg, out, store = _collected_with_process_copies(tmp_path, capsys, 2)  # what a two-process run left
    code, _, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(out))
    assert code == 0 and "removing process_0, left by a collection with another number of processes" in err
    assert not list(store.glob("process_*")) and (store / "meta.json").is_file()
    code, _, err = run_cli(capsys, "evaluate", "--config", str(cfg), "--out", str(out))
    assert code == 0, err


@pytest.mark.parametrize("left, processes, kept", [
    ({0, 1}, 3, set()), ({0, 1, 2}, 2, set()), ({0, 1, 2}, 3, {0, 1, 2}), ({0, 2}, 2, set()), ({1}, 2, set())])
def test_collect_replaces_the_process_stores_of_another_number_of_processes(left, processes, kept, tmp_path):
    # A 2-process collection rerun on 3 processes (or 3 on 2) kept process_0 and process_1, which hold
    # another share of the records, and refused them as stores "made with other inputs or settings
    # (records ... changed; tokenized text ... changed)", asking for --overwrite (measured on 3 real
    # processes over a 2-process OUT). The stores one collection leaves are process_0 .. process_<P-1>
    # (each process opens its own before any counting), so another set is another number of processes.
    from sparcom_jax.pipeline.stages import _clear_other_layout

    for k in left:
        (tmp_path / f"process_{k}").mkdir()
        (tmp_path / f"process_{k}" / "meta.json").write_text("{}")
    (tmp_path / ".lock").write_text("")  # hidden files (the store's lock) are not the layout's
    _clear_other_layout(tmp_path, processes)
    assert {p.name for p in tmp_path.iterdir()} == {f"process_{k}" for k in kept} | {".lock"}


def test_analysis_of_process_stores_with_one_missing_names_it(tmp_path, capsys):
    # A 3-process OUT copied without process_2 (or process_1) to where it is analysed: the analysis took
    # the stores there for a 2-process run and refused them as "made with other inputs or settings
    # (records ... changed; tokenized text ... changed)", asking for `sparcom collect --overwrite`.
    import shutil

    cfg, out, store = _collected_with_process_copies(tmp_path, capsys, 3)
    ids = json.loads((store / "meta.json").read_text())["ids"]
    for k in range(3):  # what a 3-process run leaves: process k holds records k, k+3, ...
        header = json.loads((store / f"process_{k}" / "meta.json").read_text())
        (store / f"process_{k}" / "meta.json").write_text(json.dumps(dict(header, ids=ids[k::3])))
    for p in store.iterdir():
        if not p.name.startswith(("process_", ".")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for gone in ("process_2", "process_1"):
        shutil.move(store / gone, tmp_path / gone)
        code, _, err = run_cli(capsys, "identify", "--config", str(cfg), "--out", str(out))
        last = err.rstrip("\n").splitlines()[-1]
        assert code == 2 and "Traceback" not in err, err
        assert last.startswith(f"sparcom: error: {store}: the count stores of a 3-process collection are not all "
                               f"here ({gone} is missing)"), err
        assert "copy every process_<k> directory of it, or run `sparcom collect` again" in last
        shutil.move(tmp_path / gone, store / gone)

def test_only_process_0_writes_shared_outputs_and_every_process_waits_for_it(tmp_path, capsys, monkeypatch):
    # Another process of a multi-host run computes the same analyses: it writes none of them,
    # removes nothing (processes deleting one tree at once fail on each other's deletions), and
    # ends each stage at a barrier (one that exits first has jax.distributed's shutdown stop
    # process 0 while it still writes the report).
    from sparcom_jax.pipeline import common, stages

    cfg_path = write_tiny(tmp_path)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "collect", "--config", str(cfg_path), "--out", str(out))
    assert code == 0, err
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir()
    (stale_dir / "old.txt").write_text("made by an earlier run")
    waits = []
    monkeypatch.setattr(stages, "barrier", waits.append)
    for where in (common, stages):
        monkeypatch.setattr(where, "is_primary", lambda: False)
    cfg = load_config(cfg_path)
    for stage in ("identify", "evaluate"):
        stages.run_stage(stage, cfg, out)
        assert not (out / stage).exists(), stage
        assert waits[-1] == "sparcom:stage-done"
    stages.guard_dir(stale_dir, "x", {"a": 1}, overwrite=True)
    assert (stale_dir / "old.txt").is_file() and waits[-1] == "sparcom:guard-dir-cleared"
    for where in (common, stages):
        monkeypatch.setattr(where, "is_primary", lambda: True)
    stages.run_stage("evaluate", cfg, out)
    assert (out / "evaluate" / "base.json").is_file()
    stages.guard_dir(stale_dir, "x", {"a": 1}, overwrite=True)
    assert not (stale_dir / "old.txt").exists()
    # Process 0 failing alone while it writes (a full disk under the report): the others, seen
    # from process 1 here, went on to their next collective (the stage's end) and met its exit
    # there (on TPU / GPU after the heartbeat timeout). Each write now ends where every process
    # learns of its error.
    from sparcom_jax.errors import OtherProcessError
    from sparcom_jax.parallel import processes

    real = processes.raise_together

    def process_0_fails(at):
        def raise_together(error, what):
            if what.startswith(at):
                raise OtherProcessError(f"{what}: process 0 of 2 stopped with an error")
            real(error, what)
        return raise_together

    for where in (common, stages):
        monkeypatch.setattr(where, "is_primary", lambda: False)
    for stage, at in (("report", f"report: writing {out / 'report'}"), ("identify", "identify: writing "),
                      ("evaluate", f"writing {out / 'evaluate' / 'base.json'}"),
                      ("identify", f"writing {out / 'config.yaml'}")):
        monkeypatch.setattr(processes, "raise_together", process_0_fails(at))
        del waits[:]
        with pytest.raises(OtherProcessError, match=f"^{re.escape(at)}"):
            stages.run_stage(stage, cfg, out)
        assert "sparcom:stage-done" not in waits, (stage, at)


def test_dry_run_reads_no_weights_even_when_paths_are_missing(capsys, tmp_path):
    cfg = str(CONFIGS / "qwen15_moe_a27b.yaml")
    code, out, _ = run_cli(capsys, "ablate", "--config", cfg, "--dry-run", f"base.path={tmp_path / 'nope'}",
                           "--out", str(tmp_path / "o"))
    # One assert per condition: `a and b or c` once let a failing exit code pass.
    assert code == 0, out
    assert "dry run: sparcom ablate" in out and "qwen2_moe (from architecture" in out
    assert "weights not present" in out and "no weights read" in out
    assert "parameters (analysis" in out  # the ablation holds the analysis copy of the weights
    assert not (tmp_path / "o").exists()


def test_dry_run_refuses_what_the_run_would_refuse_and_says_what_data_it_checked(tmp_path, capsys):
    cfg = str(CONFIGS / "llama2_7b.yaml")
    # two exports named .../hf: one store for both models. The dry run said "config valid" here.
    code, out, err = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "base.name=null", "finetuned.name=null",
                             f"base.path={tmp_path / 'a' / 'hf'}", f"finetuned.path={tmp_path / 'b' / 'hf'}")
    assert code == 2 and "config valid" not in out
    assert err.startswith("sparcom: error: base ('hf') and finetuned ('hf') would be stored under one name, 'hf'")
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, "--dry-run", f"data.path={tmp_path / 'mine.jsonl'}",
                           "data.n_per_category=50")
    assert code == 0
    assert f"  data              {tmp_path / 'mine.jsonl'} (not on this machine: not checked; planned for 300 " \
           "records, data.n_per_category x 6)" in out
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "data.path=null", "data.n_per_category=2")
    assert code == 0 and "  data              the shipped set (read and checked: 12 records to count)" in out


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncollect:\n  batch_sise: 4\n")
    r = subprocess.run([sys.executable, "-m", "sparcom_jax.cli", "collect", "--config", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sparcom: error: ") and "'collect.batch_sise'" in lines[0]
    assert "did you mean 'batch_size'" in lines[0] and "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nidentify: {eps: high}\n")
    code, _, err = run_cli(capsys, "identify", "--config", str(bad), "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("sparcom: error:")
    cfg = str(CONFIGS / "llama2_7b.yaml")
    code, _, err = run_cli(capsys, "identify", "--config", cfg, "identify.eps=0.1", "data.scope=nope")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("sparcom: error: override 'data.scope=nope': data.scope: expected one of")


def test_missing_weights_error_says_how_to_download(tmp_path, capsys):
    cfg = str(CONFIGS / "llama2_7b.yaml")
    code, _, err = run_cli(capsys, "collect", "--config", cfg, "--out", str(tmp_path),
                           f"base.path={tmp_path / 'absent'}", "data.n_per_category=1")
    assert code == 2 and err.count("\n") == 1
    assert "does not exist" in err and "huggingface-cli download meta-llama/Llama-2-7b-hf" in err


def test_stages_on_a_tiny_random_model(tmp_path, capsys):
    cfg = write_tiny(tmp_path)
    out = tmp_path / "run"
    code, so, _ = run_cli(capsys, "finetune", "--config", str(cfg), "--out", str(out))
    assert code == 0 and f"outputs: {out}" in so
    series = json.loads((out / "checkpoints" / "series.json").read_text())
    assert [d["name"] for d in series] == ["base-ft-step1", "base-ft"]
    assert (out / "checkpoints" / "base-ft" / "hf" / "config.json").is_file()

    code, so, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(out))
    assert code == 0 and f"outputs: {out}" in so
    for name in ("base", "base-ft-step1", "base-ft"):
        assert (out / "counts" / name / "meta.json").is_file()
    # Content scope: data.max_length=48 cuts plain's longer header further into the content than
    # the chat prefix, yet every model and template (same-template control included) counts the
    # same instruction/input tokens of every record, and the cut is logged.
    from sparcom_jax.stats.store import open_counts

    stores = {p.name: open_counts(p) for p in (out / "counts").iterdir()}
    assert len(stores) == 4 and len({tuple(c.tokens[:].tolist()) for c in stores.values()}) == 1
    cut = {name: c.meta["content_cut"] for name, c in stores.items()}
    assert cut["base"]["capped_records"] == 0 < cut["base-ft"]["capped_records"]
    assert cut["base"]["records"] == cut["base-ft"]["records"] > 0
    assert f"collect base-ft: {cut['base-ft']['records']} of 12 records have instruction/input tokens" in err
    saved = (out / "config.yaml").read_text()
    assert "name: tiny" in saved and "batch_size: 12" in saved

    code, so, _ = run_cli(capsys, "identify", "--config", str(cfg), "--out", str(out), "identify.eps=0.1")
    assert code == 0 and (out / "identify" / "base-ft" / "isn.csv").is_file()
    assert "eps: 0.1" in (out / "config.yaml").read_text()  # the resolved config of this command

    code, so, _ = run_cli(capsys, "compare", "--config", str(cfg), "--out", str(out))
    comp = json.loads((out / "compare" / "comparison.json").read_text())
    assert code == 0 and comp["before"] == "base" and comp["after"] == "base-ft" and "isn" in comp
    assert json.loads((out / "compare" / "series.json").read_text())["names"] == ["base", "base-ft-step1", "base-ft"]
    assert "comparison" in so

    code, so, _ = run_cli(capsys, "evaluate", "--config", str(cfg), "--out", str(out))
    ev = json.loads((out / "evaluate" / "base-ft.json").read_text())
    assert code == 0 and set(ev["isn"]["per_category_count"]) >= {"code", "math"}


def test_selfcheck_tiny_random_model_against_transformers(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "selfcheck", "--out", str(tmp_path))
    assert code == 0, out
    assert "PASSED" in out and "transformers" in out
    res = json.loads((tmp_path / "selfcheck.json").read_text())
    assert res["ok"] and res["finite"] and res["shape"] == [2, 16, 256] and res["max_abs_diff"] < 1e-3
    assert f"outputs: {tmp_path / 'selfcheck.json'}" in out


def test_selfcheck_forwards_a_right_padded_row(monkeypatch):
    # Its padding check could go (every row real) and the selfcheck still passed: record the mask it uses.
    from sparcom_jax.models import transformer
    from sparcom_jax.pipeline import selfcheck

    masks, build = [], transformer.init_model

    class Recorded:
        def __init__(self, model):
            self.model, self.config = model, model.config

        def __call__(self, ids, mask):
            masks.append(mask.copy())
            return self.model(ids, mask)

    monkeypatch.setattr(transformer, "init_model", lambda *a, **k: Recorded(build(*a, **k)))
    assert selfcheck(compare=False, seq_len=6)["ok"]
    (mask,) = masks
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_selfcheck_fails_beyond_its_tolerance_and_removes_its_directory(tmp_path, monkeypatch):
    # Every selfcheck test passed a correct model: `ok` could ignore the difference, and the difference
    # could be the smallest one. (Its temporary model directory must not outlive the call either.)
    import tempfile

    from sparcom_jax.pipeline import selfcheck

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = selfcheck(seq_len=6, atol=0.0)  # float32 against transformers: never bit-equal everywhere
    assert res["reference"] == "transformers" and res["max_abs_diff"] > 0
    assert res["finite"] and res["shape_ok"] and not res["ok"]
    assert list(tmp_path.glob("sparcom-selfcheck-*")) == []  # (torch keeps its own cache there)


def test_selfcheck_of_a_transformers_written_moe_directory(hf_checkpoint, capsys):
    path = hf_checkpoint("olmoe")
    code, out, _ = run_cli(capsys, "selfcheck", "--model", str(path))
    assert code == 0, out
    assert "PASSED" in out and str(path) in out
    diff = float(re.search(r"max \|logits - transformers\| = (\S+)", out).group(1))
    assert diff < 1e-3


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    cfg = write_tiny(tmp_path)
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    for argv in (["collect", "--config", str(cfg)], ["demo", "--fast"], ["selfcheck"]):
        code, _, err = run_cli(capsys, *argv, "--out", str(taken))
        assert code == 2, argv
        assert err == f"sparcom: error: output directory {taken} is a file; choose another --out\n", argv
    code, _, err = run_cli(capsys, "identify", "--config", str(cfg), "--out", str(taken / "sub"))
    assert code == 2
    assert err == f"sparcom: error: output directory {taken / 'sub'} is under {taken}, which is a file; " \
                  "choose another --out\n"
    assert taken.read_text() == "not a directory"


def test_out_in_a_read_only_directory_is_one_line(tmp_path, capsys, monkeypatch):
    import os

    cfg = write_tiny(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    # Tests run as root, for whom permission bits do not deny writes; access() is what
    # the check asks (and what answers for read-only file systems), so deny it here.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.path.abspath(p) == str(locked)
                        and mode & os.W_OK else real(p, mode, *a, **k))
    code, _, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(locked / "run"))
    assert code == 2
    assert err == (f"sparcom: error: output directory {locked / 'run'}: {locked} is not writable; "
                   "choose another --out or fix its permissions\n")
    assert not (locked / "run").exists()


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    def full(fd):  # a full disk often shows first when the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "selfcheck", "--no-compare", "--out", str(tmp_path))
    assert code == 2
    assert err.splitlines()[-1] == (f"sparcom: error: {tmp_path / 'selfcheck.json'}: No space left on device; "
                                    "free space on that file system, or choose another --out")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither selfcheck.json nor its temporary file
    # tensorstore (count stores) and orbax (training checkpoints) raise a full disk as a ValueError
    from sparcom_jax.cli import _one_line

    seen = ('RESOURCE_EXHAUSTED: Error writing local file "/o/counts/b/neuron_active/c/0/0/0": Failed to write '
            "65536 bytes to file 4: No space left on device [os_error_code='28']")
    assert _one_line(ValueError(seen)) == seen + "; free space on that file system, or choose another --out"


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from sparcom_jax import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stage", interrupted)
    code, _, err = run_cli(capsys, "collect", "--config", str(write_tiny(tmp_path)), "--out", str(tmp_path / "o"))
    assert code == 130 and err.count("\n") == 1 and err.startswith("sparcom: interrupted; ")
    assert "finished work in the output directory is kept: run the same command again to resume" in err


def test_ctrl_c_while_jax_starts_up_is_held_then_one_line(tmp_path, capsys, monkeypatch):
    # An interrupt inside jax's native start-up aborted the process (a C++ terminate, a core
    # dump, a 60-line traceback): it is held until the start-up is done, then reported.
    import os
    import signal
    import time

    import sparcom_jax.runtime as runtime

    finished = []

    def start_up():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # a handler that raises would interrupt this
        finished.append(True)

    monkeypatch.setattr(runtime, "ensure_compilation_cache", start_up)
    handler = signal.getsignal(signal.SIGINT)
    code, _, err = run_cli(capsys, "collect", "--config", str(write_tiny(tmp_path)), "--out", str(tmp_path / "o"))
    assert finished == [True] and code == 130 and err.startswith("sparcom: interrupted; ")
    assert signal.getsignal(signal.SIGINT) is handler and not (tmp_path / "o").exists()


def test_empty_data_file_and_zero_values_fail_in_one_line(tmp_path, capsys):
    cfg = write_tiny(tmp_path)
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n\n")
    code, _, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(tmp_path / "o"),
                           f"data.path={empty}")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"sparcom: error: {empty}: no records (the file has only blank lines)")
    real = str(CONFIGS / "llama2_7b.yaml")
    for override in ("collect.batch_size=0", "data.max_length=0", "data.n_per_category=-1"):
        code, out, err = run_cli(capsys, "collect", "--config", real, "--dry-run", override)
        key, value = override.split("=")
        assert code == 2 and out == "", override
        assert err == f"sparcom: error: override '{override}': {key} must be >= 1, got {value}\n"


def tiny_stand_in(arch: dict) -> dict:
    """A real config's architecture shrunk to a few thousand parameters: same family and
    options (biases, shared experts, qk-norm, top-k, renormalisation), tiny sizes."""
    small = dict(arch, vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    small.pop("head_dim", None)
    small.pop("max_window_layers", None)
    for key, value in (("moe_intermediate_size", 16), ("shared_expert_intermediate_size", 32)):
        if key in arch:
            small[key] = value
    for key in ("num_experts", "num_local_experts"):
        if key in arch:
            small[key] = 4
            small["num_experts_per_tok"] = min(arch["num_experts_per_tok"], 2)
    return small


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_runs_every_stage_on_tiny_stand_ins(name, tmp_path, capsys):
    # Dry runs read a config's plan; this runs its settings (split, templates, scope, rule,
    # ablation kinds) through every stage, with random tiny models in place of the weights.
    import yaml

    arch = tiny_stand_in(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["architecture"])
    init = json.dumps(arch)
    out = tmp_path / "run"
    code, so, err = run_cli(
        capsys, "run", "--config", str(CONFIGS / f"{name}.yaml"), "--out", str(out), "architecture=null",
        "base.path=null", "finetuned.path=null", f"base.init={init}", f"finetuned.init={init}",
        "finetuned.seed=1", "data.n_per_category=3", "data.max_length=48", "collect.dtype=float32",
        "collect.batch_size=12", "identify.n_boot=3", "identify.n_perm=9", "ablation.max_records=2",
        "ablation.n_random=1", "mesh.devices=null", "mesh.model=1", "mesh.num_processes=1",
        "mesh.distributed=false")
    assert code == 0, err[-2000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    cfg = load_config(CONFIGS / f"{name}.yaml")
    data = summary["data"]
    assert data["splits"]["split"] == cfg.data.split  # the config's parts, nothing merged in
    assert set(data["splits"]["counts"]) == set(cfg.data.split) == {"identify", "ablate"}
    assert data["fine_tuning_records"].startswith("none here")  # a given pair: nothing tuned here
    assert (out / "report" / "index.html").is_file() and f"outputs: {out}" in so


def test_checkpoints_tuned_on_another_train_part_are_refused(tmp_path):
    # Adding one record to the data moves others between parts (the split deals records by
    # category totals): checkpoints fine-tuned before must not be analysed on an identify part
    # that now holds records they were tuned on.
    from sparcom_jax.config import ConfigError, apply_overrides
    from sparcom_jax.data import Record, load_instructions
    from sparcom_jax.fingerprint import digest, write_fingerprint
    from sparcom_jax.pipeline.common import model_list, record_parts, train_records

    def with_data(records, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps(vars(r)) + "\n" for r in records), encoding="utf-8")
        return apply_overrides(load_config(write_tiny(tmp_path)), [f"data.path={path}", "train_data=null"])

    records = load_instructions()
    before = with_data(records, "v1.jsonl")
    after = with_data(records + [Record("math-new", "math", "Add 40 and 2, then halve it.", "", "21")], "v2.jsonl")
    tuned_on = {r.id for r in train_records(before)}
    assert tuned_on & {r.id for r in record_parts(after)[0]["identify"]}  # the leak this check exists for
    out = tmp_path / "run"
    write_fingerprint(out / "train", "finetune", {"records": digest([r.id for r in train_records(before)])})
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "series.json").write_text(json.dumps([{"name": "base-ft", "step": 2, "path": "/ck"}]))
    assert [s.label for s in model_list(before, out)] == ["base", "base-ft"]
    with pytest.raises(ConfigError, match=r"checkpoints: fine-tuned on other records than the train part.*"
                                          r"sparcom finetune --overwrite"):
        model_list(after, out)


def test_summary_says_which_records_tuned_the_model(tmp_path):
    from sparcom_jax.config import apply_overrides
    from sparcom_jax.pipeline.stages import data_description

    tiny = load_config(write_tiny(tmp_path))
    assert data_description(tiny)["fine_tuning_records"] == "the train part of data.split"
    given = apply_overrides(tiny, ["finetuned={path: /m}"])
    assert data_description(given)["fine_tuning_records"].startswith("none here")
    no_split = apply_overrides(tiny, ["data.split=null"])
    assert data_description(no_split)["fine_tuning_records"] == "every record (no split)"
    own = apply_overrides(tiny, [f"train_data.path={tmp_path / 'own.jsonl'}"])
    assert data_description(own)["fine_tuning_records"].startswith("train_data")


def test_multi_host_config_off_a_pod_says_how_to_run_it(tmp_path):
    # mixtral_8x7b.yaml is a 4-host pod config: off a TPU VM, jax cannot find the other hosts.
    # A fresh process: jax.distributed must be the first JAX call.
    r = subprocess.run([sys.executable, "-m", "sparcom_jax.cli", "collect", "--config",
                        str(CONFIGS / "mixtral_8x7b.yaml"), "--out", str(tmp_path), f"base.path={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    code, err = r.returncode, r.stderr
    assert code == 2 and err.count("\n") == 1 and err.startswith("sparcom: error: mesh.distributed"), err
    assert "mesh.coordinator=HOST:PORT" in err and "mesh.distributed=false mesh.num_processes=1" in err


def test_summary_says_how_much_content_max_length_cut(tmp_path):
    from types import SimpleNamespace

    from sparcom_jax.config import apply_overrides
    from sparcom_jax.pipeline.stages import Analyses, data_description

    tiny = load_config(write_tiny(tmp_path))
    cut = {"records": 2, "tokens": 9, "max_tokens": 6, "capped_records": 1, "capped_tokens": 2}
    an = Analyses({"base": SimpleNamespace(name="base", meta={"content_cut": cut})},
                  {"same_template": SimpleNamespace(name="base-ft under plain template", meta={"content_cut": None})})
    assert data_description(tiny, an)["content_cut"] == {"base": cut, "base-ft under plain template": None}
    assert "content_cut" not in data_description(apply_overrides(tiny, ["data.scope=prompt"]), an)


def test_run_fine_tunes_when_no_tuned_model_is_given_whether_steps_or_epochs(tmp_path):
    # `run` once fine-tuned only with train.total_steps set: an epoch-based config (the default,
    # total_steps null) silently analysed the base model alone, while the dry-run plan showed training.
    from sparcom_jax.config import apply_overrides
    from sparcom_jax.pipeline.stages import fine_tunes

    tiny = load_config(write_tiny(tmp_path))
    assert tiny.finetuned is None and fine_tunes(tiny)
    assert fine_tunes(apply_overrides(tiny, ["train.total_steps=null", "train.epochs=2"]))
    assert not fine_tunes(apply_overrides(tiny, ["finetuned={path: /m}"]))


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs_sample_what_their_data_holds(name, capsys):
    # The real configs read the shipped set (data.path: null) and once asked for 160 per
    # category of an identify part with 48: every run stopped in its checks, after a dry
    # run that had passed. The dry run reads the records now, as the run does.
    from sparcom_jax.pipeline.common import identify_records

    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.path is None and len(identify_records(cfg)) >= 6 * 40
    code, out, err = run_cli(capsys, "collect", "--config", str(CONFIGS / f"{name}.yaml"), "--dry-run",
                             "data.n_per_category=160")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("sparcom: error: data.n_per_category=160: the identify part of data.split has too few")
    assert "(null takes the whole part)" in err


@pytest.mark.parametrize("command", [*STAGE_HELP, "demo"])
def test_help_says_what_each_command_reads_and_writes(command, capsys):
    from sparcom_jax.cli import STAGE_FILES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    head = out.split("positional arguments:")[0]
    reads = re.search(r"^reads:\s+(.+)$", head, re.M)
    writes = re.search(r"^writes:\s+(.+)$", head, re.M)
    assert reads and writes, head
    if command in STAGE_FILES:
        assert STAGE_FILES[command][1] in writes.group(1)
    if command in ("report", "demo"):
        assert "OUT/report/" in writes.group(1)


def test_devices_outside_a_dry_run_and_demo_mesh_options_are_refused(tmp_path, capsys):
    # --devices only plans a dry run's mesh: a real run silently ignored it, and the demo
    # silently ignored --devices and --distributed (it plans no mesh).
    cfg = write_tiny(tmp_path)
    code, out, err = run_cli(capsys, "collect", "--config", str(cfg), "--devices", "8", "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("sparcom: error: --devices 8 plans a dry run's mesh and is used only with --dry-run")
    assert not (tmp_path / "o").exists()
    for flag in (["--devices", "8"], ["--distributed"]):
        with pytest.raises(SystemExit) as e:
            parse_args(["demo", "--dry-run", *flag])
        assert e.value.code == 2
    assert "unrecognized arguments: --distributed" in capsys.readouterr().err


def test_a_model_path_that_is_a_file_or_holds_no_weights_says_which(tmp_path, capsys):
    cfg = write_tiny(tmp_path)
    code, _, err = run_cli(capsys, "collect", "--config", str(cfg), "--out", str(tmp_path / "o"), "base.init=null",
                           f"base.path={cfg}")  # once reported as "does not exist"
    assert code == 2 and err.count("\n") == 1
    assert f"{cfg} is a file, not a Hugging Face model directory; point path at the model's directory" in err
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "vocab_size": 64,
                                                   "intermediate_size": 64, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2}))
    code, _, err = run_cli(capsys, "selfcheck", "--model", str(empty))
    assert code == 2 and err.count("\n") == 1
    assert err == (f"sparcom: error: {empty}: no *.safetensors files; the weights are missing (an unfinished "
                   "download?): download the model again with its *.safetensors files\n")


def test_a_full_disk_while_a_checkpoint_is_written_is_our_one_line_without_orbax_logs_before_it(tmp_path, capfd,
                                                                                              monkeypatch):
    # orbax's writer threads log each failure with its traceback (some hundred lines for a real
    # full disk) before the save raises it; the user should see the one line that says what to do.
    import errno
    import logging
    import os

    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    async def full(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("async_checkpointing: false", "async_checkpointing: true"))
    # Outside pytest, absl's first log call gives the root logger a stderr handler (basicConfig)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    logging.getLogger().addHandler(console)
    try:
        code = main(["finetune", "--config", str(cfg), "--out", str(tmp_path / "o"), "train.total_steps=1"])
    finally:
        logging.getLogger().removeHandler(console)
    err = capfd.readouterr().err
    assert code == 2
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("sparcom: error: ") and "No space left on device" in last, err[-2000:]
    assert "free space on that file system, or choose another --out" in last
    assert "ERROR:absl" not in err and "Traceback" not in err, err[:3000]


# A stage that fails on process 1 while process 0 waits for it in a collective (a host without the
# model's files, say), run through `sparcom ablate --distributed`.
ONE_PROCESS_FAILS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
pid, port, config, out = sys.argv[1:]
os.environ["SPARCOM_PROCESS_ID"] = pid
from sparcom_jax import cli, pipeline

def run_stage(stage, cfg, out, overwrite=False):
    import jax
    from sparcom_jax.parallel.processes import gather
    assert stage == "ablate" and jax.process_count() == 2, (stage, jax.process_count())
    gather(0)  # (as the stage's first checks do) the processes have met once
    if jax.process_index() == 1:
        raise ValueError("process 1 cannot read the weights")
    gather(0)  # waits for process 1

pipeline.run_stage = run_stage
sys.exit(cli.main(["ablate", "--config", config, "--distributed", f"mesh.coordinator=127.0.0.1:{port}",
                   "mesh.num_processes=2", "--out", out]))
"""


def test_a_process_failing_alone_in_a_distributed_run_stops_every_process_at_once(tmp_path):
    """A process that raised went on to jax.distributed's shutdown barrier, which the others,
    waiting for it in a collective, never reach: both waited the 5-minute shutdown timeout and
    then crashed with a barrier error. Now the failing process leaves at once, saying why."""
    import time

    from launch import run_processes

    (tmp_path / "run.py").write_text(ONE_PROCESS_FAILS)
    (tmp_path / "exp.yaml").write_text("name: x\nbase: {path: /no/such/model}\n")
    start = time.perf_counter()
    outs = run_processes(lambda i, port: [str(tmp_path / "run.py"), str(i), port, str(tmp_path / "exp.yaml"),
                                          str(tmp_path / "out")], timeout=150, status=lambda code: code != 0)
    assert time.perf_counter() - start < 60  # without leaving at once: 300 s, then a crash
    assert "sparcom: error: process 1 cannot read the weights" in outs[1], outs[1][-2000:]
    for i, out in enumerate(outs):
        assert f"sparcom: process {i} of 2 stops here" in out, out[-2000:]


# A real `sparcom identify --distributed` whose process 0 cannot write its --out (argv: pid, port,
# config, out, the --out of process 0).
ONE_HOST_CANNOT_WRITE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
pid, port, config, out, out0 = sys.argv[1:]
os.environ["SPARCOM_PROCESS_ID"] = pid
from sparcom_jax import cli
sys.exit(cli.main(["identify", "--config", config, "--distributed", f"mesh.coordinator=127.0.0.1:{port}",
                   "mesh.num_processes=2", "mesh.init_timeout=40", "--out", out0 if pid == "0" else out]))
"""


def test_a_host_that_cannot_write_its_out_stops_every_process_naming_its_error(tmp_path):
    """Process 0 refused its --out before jax.distributed started: process 1 waited for it at
    start-up until jax's 300-s timeout, then aborted with a C++ stack trace. Now --out is
    checked once every process has joined, and process 1's error quotes process 0's (read from
    process 0's coordination service before process 0 leaves)."""
    import time

    from launch import run_processes

    (tmp_path / "afile").write_text("a file, not a directory")
    (tmp_path / "exp.yaml").write_text(TINY)
    out0 = tmp_path / "afile" / "out"
    start = time.perf_counter()
    outs = run_processes(lambda i, port: ["-c", ONE_HOST_CANNOT_WRITE, str(i), port, str(tmp_path / "exp.yaml"),
                                          str(tmp_path / "out"), str(out0)],
                         timeout=150, status=lambda code: code == 2)
    assert time.perf_counter() - start < 40  # mesh.init_timeout: the processes joined
    refused = f"output directory {out0} is under {tmp_path / 'afile'}, which is a file; choose another --out"
    assert f"sparcom: error: {refused}" in outs[0], outs[0][-2000:]
    assert ("sparcom: error: identify: locking the output directory: process 0 "
            f"of 2 stopped with an error (its log says why): ValueError: {refused}; every process stops with it") \
        in outs[1], outs[1][-2000:]


def test_a_process_whose_others_never_join_stops_after_the_stated_timeout(tmp_path):
    """A process that stopped before joining (its host could not read the config) left the
    others in jax.distributed.initialize for 300 s; then jax aborted them (SIGABRT, a C++
    stack trace, no cause). Now they stop after mesh.init_timeout with one line saying what to check."""
    import time

    from launch import run_processes

    (tmp_path / "exp.yaml").write_text(TINY)
    out = str(tmp_path / "o")
    start = time.perf_counter()
    outs = run_processes(lambda i, port: ["-c", ONE_HOST_CANNOT_WRITE.replace("init_timeout=40", "init_timeout=2"),
                                          "0", port, str(tmp_path / "exp.yaml"), out, out],
                         n=1, timeout=60, status=lambda code: code == 2)
    assert time.perf_counter() - start < 30  # jax's own deadline is 30 s later
    last = outs[0].rstrip().splitlines()[-1]
    assert last.startswith("sparcom: error: jax.distributed: not all 2 processes joined within 2 s at the "
                           "coordinator 127.0.0.1:"), outs[0][-2000:]
    assert "(mesh.init_timeout); check that every host started the same command" in last
    assert "Check failure" not in outs[0]


def config_only_model(tmp_path) -> Path:
    """A model directory with its config.json alone: no weights files, no tokenizer."""
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)))
    return model


def test_dry_run_refuses_weights_without_their_tokenizer(tmp_path, capsys):
    # A downloaded model directory without tokenizer files passed the dry run ("weights found")
    # and stopped the run at its first model. Under data.scope content (the default) every stage
    # reads the tokenizers (the content caps); under another scope those that read no tokenizer still plan.
    model = config_only_model(tmp_path)
    cfg = str(CONFIGS / "llama2_7b.yaml")
    args = ("--dry-run", f"base.path={model}", f"finetuned.path={tmp_path / 'absent'}", "data.max_length=128")
    for command in ("collect", "ablate", "run", "identify", "report"):
        code, out, err = run_cli(capsys, command, "--config", cfg, *args)
        assert code == 2 and "config valid" not in out, command
        assert err.startswith(f"sparcom: error: model 'llama2-7b': {model}: no tokenizer beside the weights"), err
    code, out, _ = run_cli(capsys, "identify", "--config", cfg, *args, "data.scope=prompt")
    assert code == 0 and "llama2-7b (weights found)" in out
    (model / "tokenizer.json").write_text("{}")
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, *args)
    assert code == 0 and "llama2-7b (weights found)" in out


def test_a_run_refuses_weights_without_their_tokenizer_before_any_work(tmp_path, capsys):
    # Only the dry run checked: a real run found out where it first tokenized with the model (collect
    # under data.scope=prompt after counting the models before it), without the model's name.
    # identify, evaluate, compare and report read them too under data.scope content (the content caps),
    # and stopped there without the model's name.
    model = config_only_model(tmp_path)
    for command in ("collect", "ablate", "report"):
        out = tmp_path / f"out-{command}"
        code, _, err = run_cli(capsys, command, "--config", str(CONFIGS / "llama2_7b.yaml"), f"base.path={model}",
                               f"finetuned.path={model}", "--out", str(out))
        assert code == 2, command
        assert err.startswith(f"sparcom: error: model 'llama2-7b': {model}: no tokenizer beside the weights"), err
        assert not (out / "counts").exists()


def broken_models(tmp_path) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """A loadable tiny model directory (weights, tokenizer with a chat template), and copies of it
    broken as downloads and hand edits break them: {name: (directory, the error's start as the fine-tuned
    model of configs/llama2_7b.yaml)}."""
    import shutil

    import sparcom_jax as sj

    good = tmp_path / "good"
    cfg = sj.ModelConfig(model_type="llama", vocab_size=4096, hidden_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, intermediate_size=16)
    sj.save_model(sj.init_model(cfg), good, tokenizer=sj.default_tokenizer())
    broken = {}

    def copy(name: str, says: str) -> Path:
        d = shutil.copytree(good, tmp_path / name)
        broken[name] = (d, f"model 'llama2-7b-chat': {d}{says}")
        return d

    d = copy("gpt2", "/config.json: model_type 'gpt2' is not supported")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "gpt2"}))
    d = copy("shard", "/model.safetensors.index.json: names 1 shard file(s) that are not in")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    d = copy("shape", "/model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape (16, 16) but")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "intermediate_size": 32}))
    d = copy("nochat", "")
    broken["nochat"] = (d, f"model 'llama2-7b-chat': the chat template is its prompt template, but its tokenizer ({d}) has none")
    (d / "chat_template.jinja").unlink()
    return good, broken


def test_a_model_that_cannot_be_loaded_is_refused_before_the_models_before_it_are_counted(tmp_path, capsys):
    # The fine-tuned model's directory (an unsupported model_type, a shard not downloaded, a config.json
    # whose sizes the weights do not have, a tokenizer without the chat template it is counted under)
    # passed the dry run, and the run stopped at it only after collecting the base model: hours for a 7B.
    good, broken = broken_models(tmp_path)
    cfg = str(CONFIGS / "llama2_7b.yaml")
    for name, (d, says) in broken.items():
        args = ("--config", cfg, f"base.path={good}", f"finetuned.path={d}", "data.n_per_category=2",
                "data.max_length=64")
        if name not in ("shard", "shape"):  # a dry run plans before the weights are downloaded: not read
            code, out, err = run_cli(capsys, "run", "--dry-run", *args)
            assert code == 2 and "config valid" not in out, name
            assert err.startswith(f"sparcom: error: {says}"), err
        out = tmp_path / f"out-{name}"
        code, _, err = run_cli(capsys, "collect", *args, "--out", str(out))
        assert code == 2 and err.startswith(f"sparcom: error: {says}"), err
        assert not (out / "counts").exists()
    code, _, _ = run_cli(capsys, "run", "--dry-run", "--config", cfg, f"base.path={good}",
                         f"finetuned.path={broken['shard'][0]}", "data.n_per_category=2", "data.max_length=64")
    assert code == 0


def test_data_warnings_are_one_plain_line(tmp_path, capsys):
    # A data file's warning came as Python prints it: the library's file and line, then a line
    # of its code ("  return load_instructions(d.path, ..."), before the message that matters.
    data = tmp_path / "ctx.jsonl"
    data.write_text("".join(json.dumps({"id": f"{c}{k}", "category": c, "instruction": f"Task {k} of {c}.",
                                        "output": "ok", "context": "x"}) + "\n"
                            for c in ("classification", "code", "general_qa", "generation", "math", "summarization")
                            for k in range(5)))
    args = ("collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run", f"data.path={data}",
            "data.group_by=text")
    code, _, err = run_cli(capsys, *args)
    assert code == 0
    assert err == (f"sparcom: warning: {data}: column(s) ['context'] are not read: records take only the fields id, "
                   "category, instruction, output, input, source; if it holds a record field, map it: "
                   "fields={'input': 'context'} (data.fields in a config)\n")
    data.write_text(data.read_text() + "\n")  # read again (the records are cached by file and time)
    from sparcom_jax.data import DataWarning

    with pytest.warns(DataWarning, match=r"\['context'\] are not read"):  # --debug: Python's own form, with its source
        code, _, err = run_cli(capsys, *args, "--debug")
    assert code == 0 and "sparcom: warning" not in err


def _last_error(err: str) -> str:
    return [line for line in err.splitlines() if line.startswith("sparcom: error: ")][-1]


def test_dry_run_refuses_training_records_cut_before_their_response_as_finetuning_does(tmp_path, capsys):
    # train.allow_cut_responses false (the default) refuses such records, but only when the real run
    # fine-tunes; the dry run had the records and the tokenizer and said "config valid".
    cfg = str(write_tiny(tmp_path))
    cut = ("train.allow_cut_responses=false", "train.max_length=16", "train.buckets=[16]")
    code, out, err = run_cli(capsys, "finetune", "--config", cfg, "--dry-run", *cut)
    assert code == 2 and "config valid" not in out
    dry = _last_error(err)
    code, _, err = run_cli(capsys, "finetune", "--config", cfg, "--out", str(tmp_path / "o"), *cut)
    assert code == 2 and _last_error(err) == dry
    assert "before their response begins" in dry and dry.endswith("set allow_cut_responses=true to train on the "
                                                                  "other records anyway")
    # Allowed, it is said as the run says it, and the plan is printed.
    code, out, err = run_cli(capsys, "finetune", "--config", cfg, "--dry-run", *cut[1:])
    assert code == 0 and "sparcom: warning: max_length=16 cuts " in err
    assert "  train data        12 records (read and tokenized: responses checked against train.max_length=16)" in out


def test_dry_run_refuses_records_longer_than_the_model_s_context_as_collection_does(tmp_path, capsys):
    # data.max_length above max_position_embeddings (64 here) stopped the collection of each such model,
    # after the models before it were counted; the dry run passed it.
    cfg = str(write_tiny(tmp_path))
    long = ("data.max_length=100", "collect.buckets=null")
    code, out, err = run_cli(capsys, "collect", "--config", cfg, "--dry-run", *long)
    assert code == 2 and "config valid" not in out
    dry = _last_error(err)
    code, _, err = run_cli(capsys, "collect", "--config", cfg, "--out", str(tmp_path / "o"), *long)
    assert code == 2
    real = _last_error(err)[len("sparcom: error: "):]
    assert dry == f"sparcom: error: collect base (plain template): {real}"
    assert "longer than the model's context (max_position_embeddings=64" in real
    # The causal check scores the held-out records with the same refusal (its loss): checked where it runs.
    code, _, err = run_cli(capsys, "ablate", "--config", cfg, "--dry-run", *long, "ablation.enabled=true")
    assert code == 2
    assert _last_error(err).startswith("sparcom: error: ablate base (plain template): ")
    assert "longer than the model's context (max_position_embeddings=64" in err
    # Within the context, or records too short to reach it, pass.
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, "--dry-run", "data.max_length=64", "collect.buckets=null")
    assert code == 0 and "  note" not in out
    code, out, _ = run_cli(capsys, "collect", "--config", cfg, "--dry-run", *long, "data.n_per_category=1",
                           "data.group_by=text", f"data.path={_short_records(tmp_path)}")
    assert code == 0, out
    # Without the tokenizer here it cannot be checked: the plan says so.
    code, out, _ = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                           "data.max_length=8192", f"base.path={tmp_path / 'nope'}")
    assert code == 0
    assert ("  note              data.max_length=8192 is above the context of llama2-7b (max_position_embeddings="
            "4096): the run refuses its records longer than 4096 tokens (not checked here") in out


def _short_records(tmp_path: Path) -> Path:
    path = tmp_path / "short.jsonl"
    cats = ("classification", "code", "general_qa", "generation", "math", "summarization")
    path.write_text("".join(json.dumps({"id": f"{c}-{k}", "category": c, "instruction": f"Do {c} {k}.",
                                        "output": "ok"}) + "\n" for c in cats for k in range(3)))
    return path


# What a surviving process's collective raised (CPU, gloo) when another process of the run was killed
# mid-collect (kill -9 of either process, measured on 2 processes of `sparcom collect`).
LOST_PEER = ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
             "[127.0.0.1]:24448: Connection reset by peer")


@pytest.mark.parametrize("message, lost", [(LOST_PEER, True), ("RESOURCE_EXHAUSTED: Out of memory allocating", False)])
def test_a_process_that_lost_another_says_so_in_one_line_and_how_to_resume(message, lost, tmp_path, capsys,
                                                                            monkeypatch):
    # The survivor printed a 60-line traceback ending in gloo's error, which did not say that another
    # process had gone, nor that the work done is kept and how to resume it. Another runtime error
    # (a bug, an accelerator out of memory) keeps its traceback.
    import jax

    from sparcom_jax import cli, pipeline

    def run_stage(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(message)

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    monkeypatch.setattr(cli, "_other_processes", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    left = []
    monkeypatch.setattr(cli, "_leave_at_once", left.append)  # (it ends the process)
    main(["collect", "--config", str(write_tiny(tmp_path)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    if not lost:
        assert left == [1] and "Traceback" in err and message in err
        return
    assert left == [2] and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("sparcom: error: process 0 of 2 lost contact with another process of the run "
                          f"({message})"), err
    assert "its own log says why" in err and "start the same command on every host again to resume" in err


def test_the_dry_run_of_a_pod_says_each_process_s_devices_or_that_it_planned_no_processes(capsys):
    # A v5e-32 is 8 hosts of 4 chips: the plan said "4 processes" (mixtral_8x7b.yaml's v4-32) and nothing of
    # the devices each holds, and with mesh.num_processes left at 1 it checked no host's share, silently.
    code, out, err = run_cli(capsys, "collect", "--config", str(CONFIGS / "mixtral_8x7b.yaml"), "--dry-run",
                             "--devices", "32")
    assert code == 0 and "32 devices = data 8 x model 4, 4 processes of 8 devices each" in out, err
    assert "not planned" not in out
    code, out, err = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                             "--devices", "32", "--distributed")
    assert code == 0 and "32 devices = data 32 x model 1 (jax.distributed.initialize)" in out, err
    assert "processes         not planned (mesh.num_processes=1" in out and "a v5e-32 8" in out
    code, out, _ = run_cli(capsys, "collect", "--config", str(CONFIGS / "llama2_7b.yaml"), "--dry-run",
                           "--devices", "32")
    assert code == 0 and "processes " not in out  # one host: nothing to plan


def test_a_pod_with_another_number_of_hosts_than_the_config_says_is_told(monkeypatch, capsys):
    # mixtral_8x7b.yaml says 4 processes (a v4-32); on a v5e-32 jax.distributed finds 8 hosts itself
    # (no coordinator: mesh.num_processes is not passed to it). The run went on silently, though its dry
    # run had planned (and checked the model axis against) 4 hosts of 8 devices.
    import jax

    from sparcom_jax.pipeline import init_distributed

    mesh = load_config(CONFIGS / "mixtral_8x7b.yaml").mesh
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: joined.append(kw))
    for found, said in ((8, True), (4, False)):
        monkeypatch.setattr(jax, "process_count", lambda: found)
        assert init_distributed(mesh) and "num_processes" not in joined[-1]
        err = capsys.readouterr().err
        assert ("mesh.num_processes=4, but jax.distributed found 8 processes" in err) == said, err
        assert ("set mesh.num_processes=8 so that dry runs plan this pod" in err) == said, err


# A tiny Mixtral-style pair through every stage (counts, sets, evaluation, comparison, both expert kinds'
# causal check, the report): few records, few draws.
POD_PAIR = """\
name: pod
base:
  name: moe
  init: &moe {model_type: mixtral, hidden_size: 32, intermediate_size: 16, num_hidden_layers: 2,
              num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 48, num_local_experts: 4,
              num_experts_per_tok: 2}
finetuned: {name: moe-ft, template: chat, seed: 1, init: *moe}
data: {n_per_category: 2, max_length: 48}
identify: {n_boot: 3, n_perm: 9}
collect: {batch_size: 4, buckets: [48]}
ablation: {n_random: 1, max_records: 2, batch_size: 4}
"""

# `sparcom run` as process pid of n (argv: pid, n, port, config, out), one device each.
RUN_ON_PROCESSES = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("SPARCOM_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
pid, n, port, config, out = sys.argv[1:]
argv = ["run", "--config", config, "--out", out]
if n != "1":
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    os.environ["SPARCOM_PROCESS_ID"] = pid
    argv += ["--distributed", f"mesh.coordinator=127.0.0.1:{port}", f"mesh.num_processes={n}"]
from sparcom_jax import cli
sys.exit(cli.main(argv))
"""


@pytest.mark.slow
def test_a_two_process_run_writes_what_one_process_writes(tmp_path):
    """The whole study on 2 processes (gloo) against 1 process with the same devices per process: every
    output file alike, byte for byte (JSON by content: the merged counts' fingerprint, quoted in the
    analyses' meta, lists its keys in another order), but the mesh in config.yaml and the output
    directory's own path (the count stores, laid out per process, are compared through the analyses
    that read them)."""
    from launch import clean_env, run_processes

    (tmp_path / "pod.yaml").write_text(POD_PAIR)
    (tmp_path / "run.py").write_text(RUN_ON_PROCESSES)
    outs = {n: tmp_path / f"on{n}" for n in (1, 2)}
    run_processes(lambda i, port: [str(tmp_path / "run.py"), str(i), "2", port, str(tmp_path / "pod.yaml"),
                                   str(outs[2])], timeout=600)
    subprocess.run([sys.executable, str(tmp_path / "run.py"), "0", "1", "0", str(tmp_path / "pod.yaml"),
                    str(outs[1])], check=True, env=clean_env(), timeout=600, capture_output=True)

    envs = {}  # the environments the outputs record: how each run ran, compared apart

    def without_environment(d, out):
        if isinstance(d, dict):
            envs.setdefault(out, []).extend([d["environment"]] if "environment" in d else [])
            return {k: without_environment(v, out) for k, v in d.items() if k != "environment"}
        return [without_environment(v, out) for v in d] if isinstance(d, list) else d

    def files(out):
        got = {}
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out)
            if p.is_file() and rel.parts[0] != "counts" and not p.name.startswith("."):
                data = p.read_bytes().replace(str(out).encode(), b"OUT")
                if rel.name == "config.yaml":  # the mesh (processes, coordinator) is how it ran
                    data = re.sub(rb"\nmesh:\n(  .*\n)*", b"\n", data)
                data = re.sub(rb"(# environment: |Software: )[^\n<]*", rb"\1ENV", data)  # (the device count)
                got[str(rel)] = without_environment(json.loads(data), out) if p.suffix == ".json" else data
        return got

    one, two = files(outs[1]), files(outs[2])
    assert sorted(one) == sorted(two)
    assert {"report/summary.json", "ablate/moe-ft_experts.json", "ablate/moe-ft_expert_neurons.json",
            "identify/moe-ft/ise.json", "compare/comparison.json", "evaluate/moe.json"} <= set(one)
    assert [name for name in one if one[name] != two[name]] == []
    # every output of a run records one environment; the two runs' differ in their processes and devices only
    env = {n: envs[outs[n]][0] for n in (1, 2)}
    assert all(e == env[n] for n in (1, 2) for e in envs[outs[n]]) and len(envs[outs[1]]) == len(envs[outs[2]]) > 5
    # (sparcom_jax's commit and "dirty" flag are read when each run starts: a checkout edited while the
    # suite runs gives the two runs two of them)
    assert {k for k in env[1] if env[1][k] != env[2][k]} - {"sparcom_jax"} == {"process_count", "device_count"}
    assert (env[1]["process_count"], env[2]["process_count"]) == (1, 2)
    assert sorted(p.name for p in (outs[2] / "counts" / "moe").iterdir()) == ["process_0", "process_1"]
