"""The analysis' host-memory estimate (sparcom_jax.analysis.memory) against tracemalloc."""

import functools
import tracemalloc

import numpy as np

from sparcom_jax.analysis import IdentifyConfig, analyze_model
from sparcom_jax.analysis import study
from sparcom_jax.analysis.memory import analysis_bytes
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.stats.counts import Counts


def _counts(n: int, layers: int, width: int) -> Counts:
    rng = np.random.default_rng(0)
    tokens = rng.integers(8, 64, n).astype(np.int32)
    labels = np.arange(n) % 6
    p = rng.random((6, layers * width))[labels] * rng.random((n, 1))
    act = rng.binomial(tokens[:, None], p).astype(np.int32).reshape(n, layers, width)
    return Counts(tokens=tokens, neuron_active=act, neuron_act_sum=act.astype(np.float32) * rng.random(act.shape, dtype=np.float32),
                  categories=[CATEGORIES[c] for c in labels], ids=[f"r{i}" for i in range(n)],
                  sources=["human" if i % 2 else "generated" for i in range(n)],
                  groups=[f"g{i // 12}-{i % 6}" for i in range(n)])  # pairs of one category share a key


def test_the_estimate_follows_each_step_of_the_analysis(monkeypatch):
    """Each step's tracemalloc peak (above the analysis' start) within 10% of its term, and
    the whole analysis' peak: the dry run printed 11 MB for an analysis that peaked at 71 MB.
    Dropping any term of 10% or more of its step fails here (measured: each step is within
    6%; the identify step's vote counts, 0.4 of 3.5 MB, are below that)."""
    n, layers, width, n_boot, n_perm = 400, 2, 1024, 50, 64
    counts = _counts(n, layers, width)
    rule = IdentifyConfig(ties="break")
    # Once untraced first: the modules it imports on a first call would count (~1 MB).
    analyze_model(_counts(24, layers, 64), rule, n_boot=2, n_perm=2, top_units=0)
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
        analyze_model(counts, rule, n_boot=n_boot, n_perm=n_perm, top_units=0)
        _restart(peaks)
    finally:
        tracemalloc.stop()
    est = analysis_bytes(n, {"neuron_active": (layers, width)}, n_boot=n_boot, n_perm=n_perm)
    field = est["fields"]["neuron_active"]
    total = peaks.pop("total")
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
