"""constraints.txt pins every dependency, within pyproject.toml's bounds, and setup_env.sh uses it.

A new dependency added to pyproject.toml without a pin would install at whatever version is
newest on the day: the environment of the demo's numbers would drift again unseen.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """{canonical name: version} of the file's "name==version" lines (comments and blanks skipped)."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{path}:{n}: {line!r} is not an exact pin (name==version)"
        assert canonicalize_name(req.name) not in out, f"{path}:{n}: {req.name} pinned twice"
        out[canonicalize_name(req.name)] = spec[0].version
    return out


def requirements(extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    """pyproject.toml's dependencies and those of `extras`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


def unpinned_or_out_of_bounds(reqs: list[Requirement], pinned: dict[str, str]) -> list[str]:
    problems = []
    for req in reqs:
        version = pinned.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req.name}=={version} is outside pyproject.toml's {req.specifier}")
    return problems


def test_every_runtime_and_test_dependency_is_pinned_within_pyprojects_bounds():
    reqs = requirements()
    assert len(reqs) >= 15  # the file was read: the runtime dependencies and the test extra
    assert unpinned_or_out_of_bounds(reqs, pins()) == []


def test_the_check_names_a_dependency_left_unpinned_or_pinned_out_of_bounds():
    pinned = pins()
    reqs = requirements() + [Requirement("newdep>=1")]
    assert unpinned_or_out_of_bounds(reqs, pinned) == ["newdep is not pinned"]
    assert unpinned_or_out_of_bounds(reqs[:1], {canonicalize_name(reqs[0].name): "0.0.1"}) == [
        f"{reqs[0].name}==0.0.1 is outside pyproject.toml's {reqs[0].specifier}"]


def test_a_pin_that_is_not_exact_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("# a comment\njax==0.10.2\nflax>=0.12\n")
    with pytest.raises(AssertionError, match=r"c.txt:3: 'flax>=0.12' is not an exact pin"):
        pins(tmp_path / "c.txt")


def test_the_torch_pin_is_the_test_extras():
    torch = next(r for r in requirements() if r.name == "torch")
    assert str(torch.specifier) == "==2.13.0" and pins()["torch"] == "2.13.0"


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A directory setup_env.sh takes for a venv: its bin/python logs its arguments instead of installing."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (venv / "bin" / "python").chmod(0o755)
    return venv, log


def setup_env(venv: Path, constraints: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPARCOM_CONSTRAINTS"}
    env["SPARCOM_VENV"] = str(venv)
    if constraints is not None:
        env["SPARCOM_CONSTRAINTS"] = constraints
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_setup_env_installs_with_the_constraints_by_default_and_without_on_request(tmp_path):
    venv, log = fake_venv(tmp_path)
    assert setup_env(venv).returncode == 0
    assert log.read_text().splitlines() == [f"-m pip install -q -c {ROOT / 'constraints.txt'} -e {ROOT}"]
    assert setup_env(venv).returncode == 0  # nothing changed: no second install
    assert len(log.read_text().splitlines()) == 1
    res = setup_env(venv, "none")  # the choice changed: installed again, unpinned
    assert res.returncode == 0 and "pinned by none" in res.stderr
    assert log.read_text().splitlines()[1:] == [f"-m pip install -q -e {ROOT}"]


def test_setup_env_refuses_a_constraints_file_that_is_not_there(tmp_path):
    venv, log = fake_venv(tmp_path)
    res = setup_env(venv, str(tmp_path / "missing.txt"))
    assert res.returncode == 2 and "missing.txt is not a file" in res.stderr and "'none'" in res.stderr
    assert not log.exists()
