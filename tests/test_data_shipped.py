"""The shipped balanced six-category set."""

from __future__ import annotations

from collections import Counter

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data import SHIPPED_PATH, Record, load_instructions


def test_shipped_set_is_balanced_and_complete():
    recs, report = load_instructions(return_report=True)  # strict: every record valid
    assert report.files == [str(SHIPPED_PATH)] and report.skipped == [] and report.excluded == []
    assert all(isinstance(r, Record) for r in recs)
    counts = Counter(r.category for r in recs)
    assert set(counts) == set(CATEGORIES)
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 50
    assert len({r.id for r in recs}) == len(recs)
    assert all(r.output.strip() for r in recs)
    with_input = Counter(r.category for r in recs if r.input.strip())
    assert sum(with_input.values()) >= len(recs) // 10
    # No two records ask the same thing (an instruction may recur with another input).
    assert len({(r.instruction, r.input) for r in recs}) == len(recs)


def test_shipped_balanced_sample():
    recs = load_instructions(n_per_category=10, seed=3)
    assert Counter(r.category for r in recs) == {c: 10 for c in CATEGORIES}
    assert recs == load_instructions(n_per_category=10, seed=3)
