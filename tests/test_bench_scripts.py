"""The benchmark scripts' own arithmetic and bookkeeping (scripts/bench_*.py, gpu_check_report.py).

The scripts run end to end in tests/test_cli_scripts.py (gpu_check.sh --dry-run); these
tests pin the numbers they report against hand-computed values.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_ab  # noqa: E402
import bench_collect  # noqa: E402
import bench_common  # noqa: E402
import bench_precision  # noqa: E402
import bench_startup  # noqa: E402
import gpu_check_report  # noqa: E402


def test_forward_flops_counts_the_useful_matmuls_by_hand():
    import sparcom_jax as sj

    # Dense: D=64, 4 query heads and 1 kv head of 16, F=128, 2 layers.
    dense = sj.ModelConfig.from_hf_config(bench_common.shape("llama1b", tiny=True)[1])
    attn = 64 * 64 + 2 * 64 * 16 + 64 * 64  # q, k and v, o
    assert bench_collect.forward_flops(dense, 10) == 2.0 * 2 * (attn + 3 * 64 * 128) * 10
    # MoE: top-2 of 8 experts of width 32, plus the router (D x E).
    moe = sj.ModelConfig.from_hf_config(bench_common.shape("mixtral4", tiny=True)[1])
    assert bench_collect.forward_flops(moe, 3) == 2.0 * 2 * (attn + 3 * 64 * 2 * 32 + 64 * 8) * 3


def test_tiny_shapes_keep_the_family_and_routing_and_load_in_both_frameworks():
    from transformers import AutoConfig

    import sparcom_jax as sj

    for key, (_, hf) in bench_common.SHAPES.items():
        tiny = bench_common.shrink(hf)
        cfg = sj.ModelConfig.from_hf_config(tiny)
        assert cfg.model_type == hf["model_type"] and cfg.num_layers == 2 and cfg.hidden_size == 64
        # The query/kv head ratio survives (GQA 16/4 -> 4/1, 32/8 -> 4/1, MHA stays MHA).
        assert cfg.num_heads // cfg.num_kv_heads == hf["num_attention_heads"] // hf["num_key_value_heads"]
        assert cfg.is_moe == ("num_local_experts" in hf or "num_experts" in hf)
        if cfg.is_moe:
            assert (cfg.num_experts, cfg.top_k) == (8, 2)
        hf_cfg = AutoConfig.for_model(**tiny)
        assert all(getattr(hf_cfg, k) < tiny["vocab_size"] for k in ("bos_token_id", "eos_token_id"))
    assert bench_common.shape("olmoe4")[1]["num_hidden_layers"] == 4  # the full shapes are untouched


def test_strategies_requested_but_not_offered_are_reported_not_run():
    import sparcom_jax as sj

    dense = sj.ModelConfig.from_hf_config(bench_common.shape("llama1b", tiny=True)[1])
    assert bench_collect.strategies_for(dense, "capacity") == ([None], [])
    moe = sj.ModelConfig.from_hf_config(bench_common.shape("olmoe4", tiny=True)[1])
    assert bench_collect.strategies_for(moe, None) == (["auto"], [])  # CPU default
    assert bench_collect.strategies_for(moe, "auto,no_such_strategy") == (["auto"], ["no_such_strategy"])


def test_replace_section_replaces_only_its_own_section(tmp_path):
    p = tmp_path / "b.md"
    p.write_text("# B\n\nintro\n\n<!-- a:m:start -->\nold a\n<!-- a:m:end -->\n\nbetween\n")
    bench_common.replace_section(p, "b:m", "new b", title="B")
    bench_common.replace_section(p, "a:m", "new a")
    text = p.read_text()
    assert text == ("# B\n\nintro\n\n<!-- a:m:start -->\nnew a\n<!-- a:m:end -->\n\nbetween\n\n"
                    "<!-- b:m:start -->\n## B\n\nnew b\n<!-- b:m:end -->\n")


def test_update_results_merges_keys_and_turns_nan_into_null(tmp_path):
    p = tmp_path / "r.json"
    bench_common.update_results(p, "a", {"x": 1.5})
    bench_common.update_results(p, "b", {"y": [float("nan"), np.float32(2.0), np.int64(3)]})
    bench_common.update_results(None, "c", 1)  # no file given: nothing to do
    assert json.loads(p.read_text()) == {"a": {"x": 1.5}, "b": {"y": [None, 2.0, 3]}}


XDIST_CUT_SHORT = """\
============================= test session starts ==============================
created: 4/4 workers
4 workers [6 items]

[gw0] [ 16%] PASSED tests/test_collect.py::test_counts_match_pytorch_hooks[llama-True]
[gw1] [ 33%] FAILED tests/test_models.py::test_logits_match_transformers[olmoe]
[gw2] [ 50%] SKIPPED tests/test_models.py::test_padding_never_influences_real_tokens
[gw0] [ 66%] PASSED tests/test_losses.py::test_neuron_ablation_matches_hooked_transformers
[gw0] [ 66%] ERROR tests/test_losses.py::test_neuron_ablation_matches_hooked_transformers
=========================== short test summary info ============================
FAILED tests/test_models.py::test_logits_match_transformers[olmoe] - AssertionError: x
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""

SERIAL = """\
collected 96 items / 94 deselected / 2 selected

tests/test_models.py::test_padding_never_influences_real_tokens PASSED   [ 50%]
tests/test_models.py::test_bfloat16_compute_close_to_float32 PASSED      [100%]
"""


@pytest.mark.parametrize("log, expected", [
    # A teardown ERROR after a PASS counts once, as an error; the short summary is not re-counted;
    # two of six were never reached.
    (XDIST_CUT_SHORT, dict(passed=1, failed=1, error=1, skipped=1, selected=6, not_run=2)),
    (SERIAL, dict(passed=2, failed=0, error=0, skipped=0, selected=2, not_run=0)),
])
def test_test_counts_reads_pytest_logs_also_when_cut_short(tmp_path, log, expected):
    p = tmp_path / "tests.log"
    p.write_text(log)
    got = gpu_check_report.test_counts(p)
    assert {k: got[k] for k in expected} == expected


def test_summary_lists_every_target_with_its_verdict(tmp_path):
    bench_common.update_results(tmp_path / "results.json", "env", {
        "machine": "Card X", "devices": 1, "versions": bench_common.versions(), "peak_flops": 7.5e14,
        "peak_matmul": "bfloat16 8192", "date": "2026-12-01", "dry_run": False})
    bench_common.update_results(tmp_path / "results.json", "train", {"targets": [
        bench_common.target("MFU", "41.0%", ">= 40%", True)]})
    bench_common.update_results(tmp_path / "results.json", "startup", {"targets": [
        bench_common.target("warm start", "12.0 s", "<= 10 s", False)]})
    (tmp_path / "benchmarks.md").write_text("# B\n")
    gpu_check_report.step(tmp_path, "7", "training", "ok", "30", "50")
    text = (tmp_path / "summary.md").read_text()
    assert "| 7. training | ok | 30 (50) |" in text
    assert "| MFU | 41.0% | >= 40% | **MET** |" in text and "| warm start | 12.0 s | <= 10 s | **NOT MET** |" in text
    assert "750.0 TFLOP/s" in text and "DRY RUN" not in text
    assert "<!-- gpu-check:Card X:start -->" in (tmp_path / "benchmarks.md").read_text()


def _counts(active):
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.stats.counts import Counts

    return Counts(tokens=np.full(6, 10), neuron_active=np.asarray(active, np.int32), categories=list(CATEGORIES))


def test_precision_comparison_by_hand():
    # Six instructions (one per category), one layer of 10 neurons, 10 tokens each. The
    # default rule keeps the top ceil(1% of 10) = 1 unit per instruction: instruction i's
    # unit i fires on 5 tokens, every other unit on 1.
    ref = np.ones((6, 1, 10), np.int32)
    for i in range(6):
        ref[i, 0, i] = 5
    var = ref.copy()
    var[0, 0, 0], var[0, 0, 9] = 1, 6  # instruction 0 now selects unit 9 instead of unit 0
    var[3, 0, 7] = 2  # a count that changes no set
    got = bench_precision.compare(_counts(ref), _counts(var))["neuron_active"]
    assert got["entries_differ"] == pytest.approx(3 / 60)
    # S(I) Jaccard: {0} vs {9} for instruction 0, identical sets for the other five.
    assert got["instruction_jaccard_mean"] == pytest.approx(5 / 6) and got["instruction_jaccard_min"] == 0.0
    # One instruction per category: S(c) = S(I), so only the first category's set changed.
    assert got["category_jaccard"] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert got["category_size_ref"] == [1] * 6 and got["category_size"] == [1] * 6


def test_precision_comparison_of_identical_counts_is_perfect_agreement():
    ref = np.random.default_rng(0).integers(0, 11, (6, 2, 7)).astype(np.int32)
    got = bench_precision.compare(_counts(ref), _counts(ref.copy()))["neuron_active"]
    assert got["entries_differ"] == 0.0 and got["instruction_jaccard_min"] == 1.0
    assert all(j is None or math.isclose(j, 1.0) for j in got["category_jaccard"])


def test_planned_peak_counts_bfloat16_weights_activations_and_counts_not_float32_weights():
    import sparcom_jax as sj
    import bench_mixtral_full

    hf = bench_common.shape("mixtral8x7b", tiny=True)[1]
    total, rows = bench_mixtral_full.planned_peak(hf, 60, 16, 64, "bfloat16")
    names = [r[0] for r in rows]
    assert names[0] == "parameters (analysis, bfloat16)" and "parameters (float32)" not in names
    assert rows[0][1] == 2 * sj.ModelConfig.from_hf_config(hf).param_count()  # 2 bytes per parameter
    assert any(n.startswith("forward activations") for n in names) and any("expert_neuron_active" in n for n in names)
    assert total == sum(r[1] for r in rows)


def test_bench_ab_alternates_the_trees_and_reports_medians_ranges_and_overlap(tmp_path, monkeypatch):
    calls = []
    speeds = {"ref": iter([100.0, 300.0, 200.0]), "tree": iter([210.0, 190.0, 400.0])}

    def fake_child(tree, job):
        name = "tree" if tree == bench_ab.ROOT else "ref"
        calls.append(name)
        return next(speeds[name])

    monkeypatch.setattr(bench_ab, "run_child", fake_child)
    out = tmp_path / "b.md"
    assert bench_ab.main(["--ref", "HEAD", "--models", "llama33m", "--rounds", "3", "--tiny", "--out", str(out)]) == 0
    assert calls == ["ref", "tree", "tree", "ref", "ref", "tree"]
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| Llama"))
    # ref median 200 (100-300), tree median 210 (190-400): ratio 1.05, ranges overlap.
    assert row.endswith("| 200 (100-300) | 210 (190-400) | 1.050 | yes |")


@pytest.mark.parametrize("a,b,expected", [([1, 3], [3, 5], True), ([1, 2], [2.5, 4], False),
                                           ([5, 6], [1, 4.9], False), ([1, 9], [4, 5], True)])
def test_bench_ab_overlap_of_ranges(a, b, expected):
    assert bench_ab.overlaps(a, b) is expected
    assert bench_ab.overlaps(b, a) is expected


def test_bench_ab_names_a_revision_that_is_not_a_commit(tmp_path):
    with pytest.raises(SystemExit, match="not-a-rev.*is not a commit"):
        bench_ab.unpack("not-a-rev", tmp_path)


def test_bench_startup_cli_alternates_the_trees_and_reports_each_commands_medians(tmp_path, monkeypatch):
    calls, n = [], {}

    def fake_time(cmd, cwd, env, timeout):  # rounds of a tree: walls 1, 2, 6 s (ref) or 0.1, 0.2, 0.6 s (tree)
        name = "tree" if cwd == bench_startup.ROOT else "ref"
        k = n[(name, tuple(cmd))] = n.get((name, tuple(cmd)), -1) + 1
        calls.append(name)
        wall = (1, 2, 6)[k] * (1 if name == "ref" else 0.1)
        status = 2 if "--bogus" in cmd else 0
        return {"wall_s": wall, "first_line_s": wall / 4, "tail_s": wall / 2, "status": status, "output": ""}

    monkeypatch.setattr(bench_startup, "time_command", fake_time)
    monkeypatch.setattr(bench_startup, "cli_setup", lambda tmp, trees, timeout: None)
    out = tmp_path / "b.md"
    assert bench_startup.main(["--cli", "--ref", "HEAD", "--repeats", "3", "--doc", str(out)]) == 0
    per_tree = len(bench_startup.cli_commands(tmp_path, "tree"))
    assert calls == ["ref"] * per_tree + ["tree"] * per_tree * 2 + ["ref"] * per_tree * 2 + ["tree"] * per_tree
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| `sparcom --help`"))
    # medians 2 s (ref) and 0.2 s (tree) (the means would be 3 and 0.3), a quarter and a half of them
    assert row == "| `sparcom --help` | **2.00** (0.50 / 1.00) | **0.20** (0.05 / 0.10) |"


def test_bench_startup_cli_times_the_first_and_last_line_and_the_exit(tmp_path):
    script = "import time; print('first', flush=True); time.sleep(0.3); print('last', flush=True); time.sleep(0.6)"
    m = bench_startup.time_command([sys.executable, "-c", script], tmp_path, None, 60)
    assert m["status"] == 0 and m["output"] == "first\nlast\n"
    assert m["tail_s"] >= 0.6 and m["wall_s"] - m["first_line_s"] >= 0.9 and m["first_line_s"] < m["wall_s"] - 0.9
    failed = bench_startup.median_cell([{"wall_s": 1, "first_line_s": 0, "tail_s": 0}, {"error": "exit status 1, not 0"}])
    assert failed == "failed: exit status 1, not 0"
