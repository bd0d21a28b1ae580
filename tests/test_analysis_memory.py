"""The analysis' host-memory estimate (sparcom_jax.analysis.memory) against tracemalloc."""

import functools
import sys
import tracemalloc
from pathlib import Path

import pytest

from sparcom_jax.analysis import IdentifyConfig, analyze_model
from sparcom_jax.analysis import study
from sparcom_jax.analysis.memory import analysis_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT / "scripts"))

from bench_analysis_memory import estimate, random_counts  # noqa: E402


@pytest.mark.parametrize("instruction_level", [True, False])
def test_the_estimate_follows_each_step_of_the_analysis(monkeypatch, instruction_level):
    """Each step's tracemalloc peak (above the analysis' start) within 10% of its term, and
    the whole analysis' peak: the dry run printed 11 MB for an analysis that peaked at 71 MB.
    Dropping any term of 10% or more of its step fails here (measured: each step is within
    3%; what the earlier steps keep, 0.7 of 22 MB, is below that). Without the instruction
    level the bootstrap's peak is its category aggregates, which the N x N replicates hide."""
    n, layers, width, n_boot, n_perm = 800, 2, 2048, 50, 64
    counts = random_counts(n, layers, width)
    rule = IdentifyConfig(ties="break")
    # Once untraced first: the modules it imports on a first call would count (~1 MB).
    analyze_model(random_counts(24, layers, 64), rule, n_boot=2, n_perm=2, top_units=0)
    peaks = {}

    def measured(name, step):
        fn = getattr(study, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            _restart(peaks)
            out = fn(*a, **k)
            # The first call is the step's own (between_groups runs a permutation test inside).
            peaks.setdefault(step, tracemalloc.get_traced_memory()[1])
            return out
        monkeypatch.setattr(study, name, wrapper)

    for name, step in (("identify_all", "identify"), ("bootstrap", "bootstrap"),
                       ("permutation_test", "permutation"), ("between_groups", "between_groups")):
        measured(name, step)
    monkeypatch.setattr(study.ev, "instruction_jaccard", _wrap_jaccard(peaks))
    tracemalloc.start()
    try:
        analyze_model(counts, rule, n_boot=n_boot, n_perm=n_perm, top_units=0, instruction_level=instruction_level)
        _restart(peaks)
    finally:
        tracemalloc.stop()
    est = analysis_bytes(n, {"neuron_active": (layers, width)}, n_boot=n_boot, n_perm=n_perm,
                         instruction_level=instruction_level)
    field = est["fields"]["neuron_active"]
    total = peaks.pop("total")
    assert len(peaks) == (5 if instruction_level else 2), peaks
    for step, peak in peaks.items():
        assert abs(field[step] - peak) < 0.1 * peak, (step, field[step], peak)
    assert abs(est["peak"] - total) < 0.1 * total, (est["peak"], total)


def _restart(peaks):
    """Start a step's peak, keeping the whole analysis' peak so far in peaks["total"]."""
    peaks["total"] = max(peaks.get("total", 0), tracemalloc.get_traced_memory()[1])
    tracemalloc.reset_peak()


def _wrap_jaccard(peaks):
    fn = study.ev.instruction_jaccard

    def wrapper(*a, **k):
        _restart(peaks)
        out = fn(*a, **k)
        peaks["jaccard"] = tracemalloc.get_traced_memory()[1]
        return out
    return wrapper


def test_the_dry_run_plans_the_analysis_and_every_process_s_merged_counts(tmp_path):
    """The plan's analysis is `analysis_bytes` of the config's fields and settings (the full
    analysis for evaluate, identification alone for identify), and on several processes each
    also holds one model's merged counts (`merge_shares`: the merged arrays, and one process's
    share read into them), which the plan left out."""
    from sparcom_jax.config import load_config
    from sparcom_jax.pipeline import format_plan, memory_plan

    over = [f"data.path={tmp_path / 'absent.jsonl'}", "data.n_per_category=200", "mesh.devices=8"]
    cfg = load_config(CONFIGS / "llama2_7b.yaml", over)
    evaluate = memory_plan(cfg, "evaluate")["analysis_host"]
    identify = memory_plan(cfg, "identify")["analysis_host"]
    assert evaluate["n_instructions"] == 1200 and evaluate["merged_counts"] == 0
    fields = {"neuron_active": (32, 11008)}
    s = cfg.identify
    full = analysis_bytes(1200, fields, models=2, n_boot=s.n_boot, n_perm=s.n_perm)
    assert evaluate["peak"] == evaluate["per_process"] == full["peak_all"] > 2 * 4 * 1200 ** 2
    assert identify["peak"] == analysis_bytes(1200, fields, models=2, n_boot=0, n_perm=0,
                                              instruction_level=False)["peak_all"] < evaluate["peak"]
    two = memory_plan(load_config(CONFIGS / "llama2_7b.yaml", over + ["mesh.num_processes=2"]), "evaluate")
    store = two["count_store"]["bytes_per_model"]
    assert two["analysis_host"]["merged_counts"] == store + store // 2
    assert two["analysis_host"]["per_process"] == evaluate["peak"] + store + store // 2
    assert "merged counts" in format_plan(two)


def test_the_benchmark_estimates_what_the_dry_run_plans_for_the_evaluate_stage(tmp_path):
    """The benchmark set the analysis up by hand (and the plan once more): its estimate is the
    plan's for one model's full analysis of the same size, from the same settings."""
    from sparcom_jax.config import load_config
    from sparcom_jax.pipeline import memory_plan

    over = [f"data.path={tmp_path / 'absent.jsonl'}", "data.n_per_category=200", "mesh.devices=8"]
    plan = memory_plan(load_config(CONFIGS / "llama2_7b.yaml", over), "evaluate")["analysis_host"]
    assert plan["full"] and plan["n_instructions"] == 1200
    assert estimate(1200, 32 * 11008)["peak"] == plan["peak_per_model"]


def test_between_groups_holds_its_copy_of_the_matrix_in_float32():
    """Its copy of the float32 instruction matrix (within-group pairs set to NaN) was float64:
    with pair_terms' float64 values and validity (17 N^2 bytes at their peak) it held 26 N^2,
    now 22 N^2 (the copy, the bool same-group mask and pair_terms); the figures read the
    copy in float64 either way, so they are unchanged (tests/test_analysis_clusters.py)."""
    import numpy as np

    n = 1000
    rng = np.random.default_rng(0)
    m = rng.random((n, n), dtype=np.float32)
    m = (m + m.T) / 2
    labels = np.arange(n) % 6
    groups = [f"g{i // 12}-{i % 6}" for i in range(n)]
    study.between_groups(m, labels, groups, n_perm=0)  # imports untraced
    tracemalloc.start()
    try:
        r = study.between_groups(m, labels, groups, n_perm=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r["within_group_pairs"]["math"] > 0
    assert 21 * n * n < peak < 24 * n * n, peak / n / n


def test_instruction_jaccard_in_float32_equals_the_float64_quotient_rounded():
    """The [b, b] intersections, unions and quotients are float32 now (13 bytes per pair
    against 28): both integers are exact below 2**24 and float32 division rounds once, so
    every entry must equal the float64 quotient rounded to float32, bit for bit (NaN where
    both sets are empty)."""
    import numpy as np

    from sparcom_jax.analysis import identify
    from sparcom_jax.analysis.evaluate import instruction_jaccard

    counts = random_counts(300, 2, 500)
    counts.neuron_active[:3] = 0  # empty sets: NaN against each other
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.2, ties="keep"))
    x = ident.instruction_sets().reshape(300, -1).astype(np.float64)
    inter = x @ x.T
    union = x.sum(1)[:, None] + x.sum(1)[None] - inter
    with np.errstate(invalid="ignore"):
        want = (inter / union).astype(np.float32)
    got = instruction_jaccard(ident)
    assert np.isnan(got[0, 1]) and len(np.unique(want[np.isfinite(want)])) > 1000
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(instruction_jaccard(ident, budget_bytes=4 * 1000 * 7), want)  # 7-row blocks


def test_dry_run_with_one_of_several_data_files_absent_plans_for_the_sample_and_names_the_absent_one(tmp_path):
    """data.path lists two files and one is not on this machine: the records are not read (the run
    would read them where both are), the plan is for data.n_per_category x 6, and the note names the
    file that is absent, not the one that is there."""
    from sparcom_jax.config import load_config
    from sparcom_jax.pipeline import memory_plan

    present, absent = tmp_path / "present.jsonl", tmp_path / "absent.jsonl"
    present.write_text("")  # not a usable records file: reading it would fail the plan
    over = [f"data.path=[{present}, {absent}]", "data.n_per_category=200"]
    plan = memory_plan(load_config(CONFIGS / "llama2_7b.yaml", over), "evaluate")
    assert plan["count_store"]["n_instructions"] == 1200
    assert f"({absent} not on this machine: not checked; planned for 1200 records" in plan["data"]
