"""`sj.open_run(OUT)`: a finished CLI run back in Python, its analyses the report's or refused.

One tiny run (test_provenance's config: two random models, the same-template control, the
causal check) is made once; each test that changes something works on a copy of it.
"""

import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

import sparcom_jax as sj
from sparcom_jax.analysis.common import jsonable
from sparcom_jax.config import ConfigError, ExperimentConfig
from sparcom_jax.errors import LockedError, StaleResultError
from sparcom_jax.fileio import LOCK_NAME
from sparcom_jax.pipeline import reopen
from sparcom_jax.pipeline.stages import run_stage
from sparcom_jax.report.export import set_records
from test_provenance import exp


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """An output directory where `sparcom run` finished (collect ... report)."""
    out = tmp_path_factory.mktemp("reopen") / "out"
    run_stage("run", exp(), out)
    return out


@pytest.fixture(scope="module")
def run(done):
    return sj.open_run(done)


def copy_of(done, tmp_path):
    return shutil.copytree(done, tmp_path / "out")


def edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def tree(out):
    """Every file and directory under `out` with its size and modification time."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}


def test_the_analyses_are_those_the_identify_and_evaluate_stages_stored(run, done):
    an = run.analyses
    assert list(an.models) == ["base", "tuned"] and list(an.controls) == ["same_template"]
    for name, ma in an.models.items():
        stored = json.loads((done / "evaluate" / f"{name}.json").read_text())
        got = jsonable(ma.summary())
        for key in ("diagonal_dominance", "general", "unique", "per_category_count", "overlap_jaccard"):
            assert got["isn"][key] == stored["isn"][key], (name, key)
        assert got == stored
        assert got == run.summary["models"][name]  # what the report shows
        listed = json.loads((done / "identify" / name / "isn.json").read_text())["sets"]
        rebuilt = set_records(ma["isn"].ident)
        for cat, units in listed.items():
            assert [(u["layer"], u["index"]) for u in rebuilt[cat]] == [(u["layer"], u["index"]) for u in units]
        assert sum(map(len, listed.values())) > 0


def test_the_causal_check_and_comparison_are_the_stored_ones(run, done):
    res = run.ablations[("tuned", "neurons")]
    assert set(run.ablations) == {("tuned", "neurons")}
    assert jsonable(res.to_dict()) == run.summary["ablation"]["neurons"]
    assert run.comparison == json.loads((done / "compare" / "comparison.json").read_text())
    assert run.comparison["isn"] == run.summary["comparison"]["isn"]
    assert run.series is None  # two models: no series


def test_config_and_counts_are_the_runs(run, done):
    assert isinstance(run.config, ExperimentConfig)
    assert run.config == exp() and run.report_dir == done / "report"
    c = run.counts("tuned")
    assert c.meta["template"] == "chat" and c.n == 12
    control = run.counts("tuned", template="plain")
    assert control.meta["template"] == "plain"
    assert control.meta["store"].endswith("tuned_under_plain_template")
    np.testing.assert_array_equal(run.counts("base").neuron_active[:],
                                  sj.open_counts(done / "counts" / "base").neuron_active[:])
    with pytest.raises(KeyError, match=r"no counts of 'other'.*'base' \(plain template\), 'tuned' \(chat template\)"):
        run.counts("other")


def test_opening_and_using_a_run_writes_nothing_into_it(done):
    before = tree(done)
    r = sj.open_run(done)
    r.analyses, r.ablations, r.comparison, r.counts("base").neuron_active[:], repr(r)
    assert tree(done) == before


def test_repr_says_models_records_stages_and_where(done):
    r = sj.open_run(done)
    text = repr(r)
    assert text.startswith(f"Run({str(done)!r}): experiment 'prov'")
    assert "models: base, tuned (12 records, 6 categories)" in text
    assert "controls: same_template" in text
    assert "stages: collect, identify, evaluate, compare, ablate, report" in text
    assert str(done / "report" / "index.html") in text
    assert "rebuilt on first use" in text


def test_a_rule_changed_in_config_yaml_is_refused_before_any_count_is_read(done, tmp_path, monkeypatch):
    out = copy_of(done, tmp_path)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["identify"]["eps"] = 0.1
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = sj.open_run(out)

    def no_counts(*a, **k):
        raise AssertionError("counts were read")

    monkeypatch.setattr(reopen, "analyze_all", no_counts)
    with pytest.raises(StaleResultError, match=r"report/summary.json: .*eps: 0.05 -> 0.1.*config.yaml.*sparcom run "
                                               r"--config"):
        r.analyses


def test_a_stage_rerun_with_other_settings_since_the_report_is_refused(done, tmp_path):
    out = copy_of(done, tmp_path)
    run_stage("evaluate", exp("identify.n_boot=3"), out)  # rewrites config.yaml and evaluate/, not the report
    with pytest.raises(StaleResultError, match=r"report/summary.json: .*n_boot: 0 -> 3"):
        sj.open_run(out).analyses


def test_a_stored_output_made_from_other_counts_than_the_report_is_refused_when_read(done, tmp_path):
    out = copy_of(done, tmp_path)
    edit_json(out / "compare" / "fingerprint.json",
              lambda d: d["components"]["counts"].update({"base": "0123456789abcdef"}))
    with pytest.raises(StaleResultError, match=r"compare/fingerprint.json: .*counts changed \(base"):
        sj.open_run(out).comparison


def test_outputs_the_report_was_not_made_with_are_named_and_the_analyses_still_the_reports(done, tmp_path, capfd):
    """`sparcom report` rerun with another rule after `identify` rewrites the report (and compare/),
    not identify/ or evaluate/. `.analyses` was refused, naming identify/fingerprint.json, though
    the analyses it rebuilds are the report's: they are handed back now, with a note (in the repr
    and the log) naming the directories whose files are not the report's and what differs; reading
    such a file through the run (`.comparison`) is still refused (test above)."""
    out = copy_of(done, tmp_path)
    run_stage("report", exp("identify.eps=0.1", "ablation.enabled=false"), out)
    r = sj.open_run(out)
    capfd.readouterr()
    text = repr(r)
    assert (f"  not the report's: {out}/identify, {out}/evaluate (identify settings changed (eps: 0.05 -> 0.1)); "
            "the analyses are the report's (its set lists: report/sets/)") in text
    an = r.analyses
    for name, ma in an.models.items():
        assert jsonable(ma.summary()) == r.summary["models"][name]  # what the report shows
        listed = json.loads((out / "report" / "sets" / f"{name}_isn.json").read_text())["sets"]
        assert {c: [(u["layer"], u["index"]) for u in v] for c, v in set_records(ma["isn"].ident).items()} == {
            c: [(u["layer"], u["index"]) for u in v] for c, v in listed.items()}
    assert (f"{out}/identify: not made with the report's settings and counts (identify settings changed (eps: 0.05 "
            "-> 0.1)), so its files are not what the report shows") in capfd.readouterr().err
    assert r.comparison["isn"] == r.summary["comparison"]["isn"]  # compare/ was rewritten with the report
    edit_json(out / "evaluate" / "fingerprint.json",  # evaluate/ from other counts: named as such
              lambda d: d["components"]["counts"].update({"tuned": "0123456789abcdef"}))
    assert "counts changed (tuned" in repr(sj.open_run(out))
    assert "not the report's" not in repr(sj.open_run(done))


def test_counts_recollected_with_other_settings_are_refused(done, tmp_path):
    out = copy_of(done, tmp_path)
    edit_json(out / "counts" / "base" / "meta.json", lambda d: d["fingerprint"].update(scope="all"))
    with pytest.raises(StaleResultError, match=r"cannot be rebuilt: .*counts/base.*data.scope: 'all' -> 'content'"):
        sj.open_run(out).analyses


def test_missing_counts_are_refused_naming_the_store(done, tmp_path):
    out = copy_of(done, tmp_path)
    shutil.rmtree(out / "counts" / "tuned")
    r = sj.open_run(out)
    assert r.summary["models"]["tuned"]  # the report itself is still there to read
    with pytest.raises(ConfigError, match=r"cannot be rebuilt: .*counts/tuned: no counts of tuned.*sparcom collect"):
        r.analyses


@pytest.mark.parametrize("removed,missing,where", [
    (["report"], "report", "report/summary.json"), (["report", "evaluate"], "evaluate", "evaluate/fingerprint.json"),
    (["report", "ablate"], "ablate", "ablate"), (["report", "counts/tuned"], "collect", "counts")])
def test_a_run_that_never_finished_names_the_missing_stage_and_how_to_finish(done, tmp_path, removed, missing, where):
    out = copy_of(done, tmp_path)
    for d in removed:
        shutil.rmtree(out / d)
    with pytest.raises(ConfigError, match=rf"never finished: its {missing} stage has no output \({out}/{where}\).*"
                                          rf"sparcom run --config {out}/config.yaml --out {out}"):
        sj.open_run(out)


def test_a_directory_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(ConfigError, match="not a sparcom output directory"):
        sj.open_run(tmp_path)
    (tmp_path / "counts").mkdir()
    with pytest.raises(ConfigError, match="no stage of the run here has finished"):
        sj.open_run(tmp_path)


def test_a_file_or_folder_inside_a_run_names_the_run_to_open(done, tmp_path):
    # Opening the report's summary.json or OUT/config.yaml (the files a user has at hand) said a
    # command was writing into the run: "pid None on host None, since 1970-01-01 ...".
    for inside in ("config.yaml", "report/summary.json", "report/index.html"):
        with pytest.raises(ConfigError, match=rf"^{done / inside}: a file, not a run's output directory; open the "
                                              rf"run's directory: sj\.open_run\('{done}'\)$"):
            sj.open_run(done / inside)
    with pytest.raises(ConfigError, match=rf"^{done / 'report'}: inside the run {done}, not its output directory; "
                                          rf"open the run's directory: sj\.open_run\('{done}'\)$"):
        sj.open_run(done / "report")
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(ConfigError, match=r": a file, not a run's output directory; pass the --out directory of a "):
        sj.open_run(tmp_path / "notes.txt")


def test_a_report_of_another_format_version_is_refused(done, tmp_path):
    out = copy_of(done, tmp_path)
    edit_json(out / "report" / "summary.json", lambda d: d.update(summary_version=99))
    with pytest.raises(StaleResultError, match=r"summary.json: summary_version 99, written by another sparcom_jax"):
        sj.open_run(out)


def test_a_config_of_another_version_names_the_key_and_what_to_do(done, tmp_path):
    out = copy_of(done, tmp_path)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["identify"]["future_option"] = 1
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"config.yaml: unknown key 'identify.future_option'.*written by "
                                          r"another sparcom_jax"):
        sj.open_run(out)


def test_a_count_store_of_another_format_version_is_refused(done, tmp_path):
    out = copy_of(done, tmp_path)
    edit_json(out / "counts" / "base" / "meta.json", lambda d: d.update(version=2))
    with pytest.raises(StaleResultError, match=r"counts/base/meta.json: a count store of format version 2"):
        sj.open_run(out).analyses


def test_a_demo_output_names_the_runs_to_open(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"pairs": [{"name": "llama"}]}))
    (tmp_path / "pairs" / "llama").mkdir(parents=True)
    (tmp_path / "pairs" / "llama" / "config.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=rf"`sparcom demo`.*sj.open_run\('{tmp_path}/pairs/llama'\)"):
        sj.open_run(tmp_path)


def test_a_run_a_command_is_writing_now_is_refused_and_a_dead_ones_lock_is_not(done, tmp_path):
    out = copy_of(done, tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": writer.pid, "host": socket.gethostname(), "started": 0,
                                                 "command": "sparcom ablate"}))
        with pytest.raises(LockedError, match=rf"pid {writer.pid} .*sparcom ablate.*has finished"):
            sj.open_run(out)
    finally:
        writer.kill()
        writer.wait()
    assert "report" in sj.open_run(out).stages  # its process is gone: the lock was left behind
    assert (out / LOCK_NAME).is_file()  # and is left where it is (opening writes nothing)


def _started_in(tmp_path, records):
    """A directory a run was started in, holding its data file data/recs.jsonl (a copy of `records`)."""
    start = tmp_path / "start"
    (start / "data").mkdir(parents=True)
    shutil.copy(records, start / "data" / "recs.jsonl")
    return start


def _other_files_in(tmp_path):
    """Another directory, with another data/recs.jsonl (the shipped set less its first record)."""
    from sparcom_jax.data.loaders import SHIPPED_PATH

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "recs.jsonl").write_text("".join(SHIPPED_PATH.read_text().splitlines(True)[1:]))
    return elsewhere


def test_the_repr_names_a_missing_relative_path_in_directories_whose_names_hold_a_colon(done, tmp_path, monkeypatch):
    # The repr's stage line names the missing path from the error's fields: it took the message apart
    # at ': ', which the directories' names here hold too.
    from sparcom_jax.config import dump_config

    out = shutil.copytree(done, tmp_path / "run: one" / "out")
    dump_config(exp("data.path=data/recs.jsonl"), out / "config.yaml")  # as saved before: relative
    here = tmp_path / "here: now"
    here.mkdir()
    monkeypatch.chdir(here)
    r = sj.open_run(out)
    assert (f"  stages: not listed here (data.path is the relative path 'data/recs.jsonl', and "
            f"{here / 'data' / 'recs.jsonl'} does not exist)\n") in repr(r)


def test_a_relative_data_path_is_read_as_the_run_read_it_from_any_directory(done, tmp_path, monkeypatch):
    """OUT/config.yaml kept data.path as given ("data/recs.jsonl") and open_run read it from the
    current directory: from another one the run's records were not found, or other records were
    read. The run now saves it absolute, as it read it."""
    from sparcom_jax.data.loaders import SHIPPED_PATH
    from sparcom_jax.pipeline.common import save_resolved

    out = copy_of(done, tmp_path)
    start = _started_in(tmp_path, SHIPPED_PATH)  # the records of `done` (the shipped set), from a file
    monkeypatch.chdir(start)
    save_resolved(exp("data.path=data/recs.jsonl"), out)  # as every stage does when it has finished
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["path"] == str(start / "data" / "recs.jsonl")
    monkeypatch.chdir(_other_files_in(tmp_path))
    r = sj.open_run(out)
    assert r.config.data.path == str(start / "data" / "recs.jsonl")
    assert jsonable(r.analyses.models["tuned"].summary())["isn"] == r.summary["models"]["tuned"]["isn"]


def test_a_run_saved_with_relative_paths_is_read_from_here_or_refused_naming_the_path(done, tmp_path, monkeypatch):
    """A config.yaml saved before the paths were made absolute: the directory the run was started in
    is not known. From there it opens as before; from a directory without the file the refusal names
    the field, the path it tried and the fix; where another file of that name is read, the analyses'
    refusal (other records) says that the path was read from here."""
    from sparcom_jax.config import dump_config
    from sparcom_jax.data.loaders import SHIPPED_PATH

    out = copy_of(done, tmp_path)
    dump_config(exp("data.path=data/recs.jsonl"), out / "config.yaml")  # as saved before: relative
    start = _started_in(tmp_path, SHIPPED_PATH)
    monkeypatch.chdir(start)
    r = sj.open_run(out)
    assert jsonable(r.analyses.models["base"].summary())["isn"] == r.summary["models"]["base"]["isn"]
    monkeypatch.chdir(tmp_path)
    missing = (rf"config.yaml: data.path is the relative path 'data/recs.jsonl', and {tmp_path}/data/recs.jsonl does "
               r"not exist: .*open it from that directory, or write the absolute paths into the config file")
    # opened all the same: what the report stored needs no record (resolved when read, not when opened)
    r = sj.open_run(out)
    assert r.summary["models"]["base"]["isn"] and r.environment and r.comparison["isn"] == r.summary["comparison"]["isn"]
    assert "stages: not listed here (data.path is the relative path 'data/recs.jsonl'" in repr(r)
    for read in (lambda: r.analyses, lambda: r.counts("base"), lambda: r.ablations, lambda: r.stages):
        with pytest.raises(ConfigError, match=missing):  # what reads the records: the field, the path tried, the fix
            read()
    monkeypatch.chdir(_other_files_in(tmp_path))
    with pytest.raises(StaleResultError, match=r"records .*config.yaml names data.path 'data/recs.jsonl' relative "
                                               r"to the directory the run was started in, read here from "
                                               rf"{tmp_path}/elsewhere: if the run was started elsewhere"):
        sj.open_run(out).analyses
