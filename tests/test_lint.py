"""Static checks the test suite enforces: pyflakes over the package, scripts and tests.

pyflakes finds the mistakes that run without an error: a method defined twice in
one class (the second silently replaces the first: DataSpec's split checks were
lost that way), names imported and never used, undefined names on rare paths.
"""

from __future__ import annotations

import io
from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


def flakes(*paths: Path) -> list[str]:
    out, err = io.StringIO(), io.StringIO()
    checkRecursive([str(p) for p in paths], Reporter(out, err))
    return [ln for ln in (out.getvalue() + err.getvalue()).splitlines() if ln.strip()]


def test_pyflakes_is_clean():
    problems = flakes(ROOT / "sparcom_jax", ROOT / "scripts", ROOT / "tests")
    assert not problems, "pyflakes:\n" + "\n".join(problems)


def test_pyflakes_sees_a_redefined_method(tmp_path):
    # The check above can fail: the mistake that hid DataSpec's split checks is reported.
    (tmp_path / "m.py").write_text(
        "class A:\n    def __post_init__(self):\n        pass\n\n    def __post_init__(self):\n        pass\n")
    assert any("redefinition of unused '__post_init__'" in p for p in flakes(tmp_path))
