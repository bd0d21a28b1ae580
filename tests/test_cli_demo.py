"""The embedded demo end to end (fast mode): both pairs trained, analysed and reported."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.cli import main
from sparcom_jax.pipeline import merge_pair_summaries


def is_6x6(m) -> bool:
    return isinstance(m, list) and len(m) == 6 and all(isinstance(r, list) and len(r) == 6 for r in m)


def test_merge_pair_summaries_unites_models_and_merges_sections_key_by_key():
    dense = {"summary_version": 1, "identification": {"eps": 0.05}, "scope": "prompt", "data": {"path": "shipped"},
             "model_paths": {"d-base": "/d0", "d-chat": "/d1"}, "models": {"d-base": {"isn": 1}, "d-chat": {"isn": 2}},
             "comparison": {"before": "d-base", "after": "d-chat", "isn": {"code": 1}, "moves": {"isn": 3}},
             "series": {"names": ["d-base", "d-chat"], "isn": [1]},
             "ablation": {"isn": [[0]], "random": [[1]], "neurons": {}}, "experiment": "demo-d"}
    moe = {"summary_version": 1, "identification": {"eps": 0.05}, "scope": "prompt", "data": {"path": "shipped"},
           "model_paths": {"m-base": "/m0"}, "models": {"m-base": {"ise": 4}},
           "comparison": {"before": "m-base", "after": "m-chat", "ise": {"code": 5}, "moves": {"ise": 6}},
           "ablation": {"ise": [[2]], "ise_random": [[3]], "experts": {}}, "experiment": "demo-m"}
    before = json.dumps([dense, moe])
    m = merge_pair_summaries({"dense": dense, "moe": moe})
    assert json.dumps([dense, moe]) == before  # inputs untouched
    assert list(m["models"]) == ["d-base", "d-chat", "m-base"] and m["model_paths"]["m-base"] == "/m0"
    assert m["comparison"]["isn"] == {"code": 1} and m["comparison"]["ise"] == {"code": 5}
    assert m["comparison"]["moves"] == {"isn": 3, "ise": 6}  # no key in common: united
    assert m["comparison"]["before"] == "d-base" and m["series"]["names"] == ["d-base", "d-chat"]
    assert set(m["ablation"]) == {"isn", "random", "neurons", "ise", "ise_random", "experts"}
    assert m["identification"] == {"eps": 0.05} and m["scope"] == "prompt" and m["experiment"] == "demo-d"
    assert m["merged_from"] == {"comparison.before": "dense", "comparison.after": "dense", "experiment": "dense"}
    assert m["pairs"] == {"dense": dense, "moe": moe}
    assert merge_pair_summaries({})["merged_from"] == {}


def test_merged_pairs_list_every_pairs_outputs_made_under_other_versions():
    old = {"stage": "collect", "output": "counts/x", "package": "jax", "old": "0.4.30", "new": "0.10.2"}
    m = merge_pair_summaries({"dense": {"environment_changes": [old]}, "moe": {"environment_changes": []},
                              "other": {"environment_changes": [{**old, "package": "numpy"}]}})
    assert m["environment_changes"] == [{"pair": "dense", **old}, {"pair": "other", **old, "package": "numpy"}]
    assert m["merged_from"] == {}


def test_the_demo_summary_names_a_pairs_training_made_under_other_versions(tmp_path):
    from sparcom_jax.fingerprint import environment, write_fingerprint
    from sparcom_jax.pipeline import demo

    env = environment()
    write_fingerprint(tmp_path / "train" / "llama", "demo-train", {"x": 1})
    assert demo._train_changes(tmp_path, "llama") == []
    old = {**env, "packages": {**env["packages"], "optax": "0.2.4"}}
    write_fingerprint(tmp_path / "train" / "moe", "demo-train", {"x": 1}, made_under=old)
    assert demo._train_changes(tmp_path, "moe") == [
        {"stage": "finetune", "output": "train/moe", "package": "optax", "old": "0.2.4", "new": env["packages"]["optax"],
         "matters": False}]  # (recorded; fixed weights counted afresh mix nothing)


def test_a_demo_stopped_before_it_finishes_leaves_the_config_of_the_outputs_there(tmp_path, monkeypatch):
    # e.g. `sparcom demo --fast --out d finetune.total_steps=5` into a finished demo: refused
    from sparcom_jax.errors import StaleResultError
    from sparcom_jax.pipeline import demo

    out = tmp_path / "d"
    out.mkdir()
    (out / "config.yaml").write_text("the config of the outputs that are here\n")

    def refused(*a, **k):
        raise StaleResultError(f"{out}/train/llama: made with other inputs or settings (finetune changed)")

    monkeypatch.setattr(demo, "_train_pair", refused)
    with pytest.raises(StaleResultError):
        demo.run_demo(out, cfg=demo.demo_config(True, ["finetune.total_steps=5"]))
    assert (out / "config.yaml").read_text() == "the config of the outputs that are here\n"


def test_an_interrupted_demo_report_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    import shutil

    from sparcom_jax.pipeline import demo

    pages = {}
    for pair in ("llama", "mixtral"):
        page = tmp_path / "pairs" / pair / "report" / "index.html"
        page.parent.mkdir(parents=True)
        page.write_text(f"<html><head><title>t</title></head><body><h1>{pair} v1</h1></body></html>")
        pages[pair] = page
    summaries = {"llama": {"models": {"a": 1}}, "mixtral": {"models": {"b": 2}}}
    rdir = tmp_path / "report"
    demo.write_demo_report(rdir, summaries, pages, title="demo")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in rdir.rglob("*") if p.is_file()}
    for page in pages.values():
        page.write_text(page.read_text().replace("v1", "v2"))
    copy = shutil.copytree

    def interrupted(src, dst, *a, **k):  # Ctrl-C while the second pair's report is copied
        if "mixtral" in str(src):
            raise KeyboardInterrupt
        return copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copytree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.write_demo_report(rdir, summaries, pages, title="demo")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.glob("report*/**/*") if p.is_file()}
    assert after == before and b"llama v1" in before[Path("report/llama/index.html")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "report"]  # nothing left aside


# CI (.ci/run) runs this same `demo --fast` as its first step, in the runtime-only environment,
# and names that run's output directory and stdout here: the checks below then read them
# instead of training and analysing both pairs a second time (the suite's longest test).
# Unset (scripts/test.sh, a developer's pytest, mutation runs), the test runs the demo itself.
DEMO_OUT_ENV, DEMO_STDOUT_ENV = "SPARCOM_TEST_DEMO_OUT", "SPARCOM_TEST_DEMO_STDOUT"


def fast_demo(tmp_path, capsys, monkeypatch) -> tuple[Path, str]:
    """(output directory, stdout) of `sparcom demo --fast`: CI's run when named, else a fresh one."""
    given = os.environ.get(DEMO_OUT_ENV)
    if given:
        stdout = os.environ.get(DEMO_STDOUT_ENV)
        assert stdout, f"{DEMO_OUT_ENV} is set: set {DEMO_STDOUT_ENV} to the file holding that demo's stdout too"
        return Path(given), Path(stdout).read_text()
    monkeypatch.setenv("SPARCOM_JAX_CACHE", str(tmp_path / "jax_cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out, capsys.readouterr().out


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path, capsys, monkeypatch):
    out, stdout = fast_demo(tmp_path, capsys, monkeypatch)
    assert f"outputs: {out}" in stdout and str(out / "report" / "index.html") in stdout.strip().splitlines()[-1]
    assert "fast: true" in (out / "config.yaml").read_text()

    # checkpoints: before, intermediate, after, as HF directories, for both pairs
    for pair in ("llama", "mixtral"):
        for name in ("base", "step2", "chat"):
            hf = out / "checkpoints" / f"{pair}-{name}" / "hf"
            assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file(), hf
            assert (hf / "tokenizer.json").is_file()
    moe_cfg = json.loads((out / "checkpoints" / "mixtral-chat" / "hf" / "config.json").read_text())
    assert moe_cfg["model_type"] == "mixtral" and moe_cfg["num_local_experts"] == 8

    summary = json.loads((out / "report" / "summary.json").read_text())
    llama, moe = summary["pairs"]["llama"], summary["pairs"]["mixtral"]
    assert list(llama["models"]) == ["llama-base", "llama-step2", "llama-chat"]
    assert set(llama["models"]["llama-chat"]) >= {"meta", "isn"}
    assert set(moe["models"]["mixtral-chat"]) >= {"ise", "expert_neurons"}
    for s, secs in ((llama, ["isn"]), (moe, ["ise", "expert_neurons"])):
        assert s["comparison"]["before"].endswith("-base") and s["comparison"]["after"].endswith("-chat")
        assert s["series"]["names"][1].endswith("-step2")
        for sec in secs:
            assert set(s["comparison"][sec]) == set(CATEGORIES)
            assert len(s["series"][sec]["general"]) == 3
    assert len(llama["ablation"]["isn"]) == 6 and len(moe["ablation"]["ise"]) == 6
    assert summary["pairs"]["llama"]["identification"]["eps"] == 0.05

    # the top level holds both pairs merged (the analysis issue's summary.json keys)
    names = [f"{p}-{n}" for p in ("llama", "mixtral") for n in ("base", "step2", "chat")]
    assert list(summary["models"]) == names and set(summary["model_paths"]) == set(names)
    for name in names:
        sections = ["isn"] if name.startswith("llama") else ["ise", "expert_neurons"]
        for sec in sections:
            s = summary["models"][name][sec]
            for key in ("per_category_count", "unique", "per_layer"):
                assert set(s[key]) == set(CATEGORIES), (name, sec, key)
            assert isinstance(s["general"], int)
            for key in ("overlap_jaccard", "instruction_overlap"):
                assert is_6x6(s[key]), (name, sec, key)
    for sec in ("isn", "ise", "expert_neurons"):
        assert set(summary["comparison"][sec]) == set(CATEGORIES)
        for c in CATEGORIES:
            assert set(summary["comparison"][sec][c]) >= {"retained", "gained", "lost", "jaccard"}
        assert len(summary["series"][sec]["general"]) == 3
    assert set(summary["comparison"]["moves"]) == {"isn", "ise", "expert_neurons"}
    for key in ("isn", "random", "ise", "ise_random"):
        assert is_6x6(summary["ablation"][key]), key
    assert summary["ablation"]["neurons"]["kind"] == "neurons" and summary["ablation"]["experts"]["kind"] == "experts"
    assert summary["identification"]["eps"] == 0.05 and summary["identification"]["rule"] == "top"
    assert summary["data"]["n_per_category"] == 4 and summary["scope"] == "content"
    assert summary["comparison"]["before"] == "llama-base" and summary["merged_from"]["comparison.before"] == "llama"
    assert summary["merged_from"]["series.names"] == "llama" and "identification" not in summary["merged_from"]
    # the software it ran under; a fresh demo reuses nothing made under other versions
    assert set(summary["environment"]["packages"]) >= {"jax", "jaxlib", "flax", "numpy", "transformers"}
    assert summary["environment_changes"] == [] and "environment_changes" not in summary["merged_from"]

    html = (out / "report" / "index.html").read_text()
    assert 'id="llama"' in html and 'id="mixtral"' in html
    for fig in ("overlap_isn", "instruction_overlap_isn", "layers_isn", "generality_isn", "comparison_isn",
                "series_isn", "ablation_neurons"):
        assert f'id="llama-{fig}.png"' in html, fig
    for fig in ("overlap_ise", "layers_ise", "comparison_ise", "series_ise", "overlap_expert_neurons",
                "comparison_expert_neurons", "ablation_experts"):
        assert f'id="mixtral-{fig}.png"' in html, fig
    assert len(re.findall(r"<img ", html)) >= 30 and "<table>" in html
    for pair in ("llama", "mixtral"):
        assert (out / "report" / pair / "index.html").is_file()
        assert any((out / "report" / pair / "figures").glob("*.png"))
        assert any((out / "report" / pair / "tables").glob("*.csv"))
