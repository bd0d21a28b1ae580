"""The embedded demo end to end (fast mode): both pairs trained, analysed and reported."""

from __future__ import annotations

import json
import re

import pytest

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.cli import main


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARCOM_JAX_CACHE", str(tmp_path / "jax_cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
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
