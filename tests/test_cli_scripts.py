"""The TPU / GPU scripts: --dry-run prints the commands they would run and exits 0."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def bash(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    """The printed commands ("+ cmd args"), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_setup_dry_run_creates_copies_and_installs_with_the_tpu_extra():
    r = bash("tpu_setup.sh", "--name", "sparcom-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
             "--project", "proj", "--spot", "--dry-run")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    create, tar, scp, ssh = cmds
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == "sparcom-v4"
    assert "--accelerator-type" in create and create[create.index("--accelerator-type") + 1] == "v4-32"
    assert "--spot" in create and create[create.index("--project") + 1] == "proj"
    assert tar[0] == "tar" and "--exclude=./.git" in tar
    assert scp[4] == "scp" and "--worker=all" in scp
    assert ssh[4:6] == ["ssh", "sparcom-v4"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "pip install -q -e '.[tpu]'" in remote and "jax.device_count()" in remote
    assert "dry run: nothing was created" in r.stdout


def test_tpu_setup_skip_create_and_required_arguments():
    r = bash("tpu_setup.sh", "--name", "n", "--zone", "z", "--skip-create", "--dry-run")
    assert r.returncode == 0 and not any(c[4] == "create" for c in commands(r.stdout) if c[0] == "gcloud")
    r = bash("tpu_setup.sh", "--zone", "z", "--dry-run")
    assert r.returncode == 2 and "--name is required" in r.stderr


def test_tpu_launch_dry_run_runs_sparcom_distributed_on_all_workers():
    r = bash("tpu_launch.sh", "--name", "sparcom-v4", "--zone", "us-central2-b", "--dry-run", "--",
             "run", "--config", "configs/mixtral_8x7b.yaml", "--out", "runs/mixtral", "series=[{path: /ck}]")
    assert r.returncode == 0, r.stderr
    (ssh,) = commands(r.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sparcom-v4"]
    assert ssh[ssh.index("--zone") + 1] == "us-central2-b" and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    sparcom = shlex.split(remote.split("&&")[-1].split("2>&1")[0])
    assert sparcom == [".venv/bin/sparcom", "run", "--config", "configs/mixtral_8x7b.yaml", "--out", "runs/mixtral",
                       "series=[{path: /ck}]", "--distributed"]
    assert "tee -a logs/sparcom-run.log" in remote


def test_tpu_launch_needs_a_command():
    r = bash("tpu_launch.sh", "--name", "n", "--zone", "z", "--dry-run")
    assert r.returncode == 2 and "no sparcom command" in r.stderr


def test_gpu_single_dry_run_installs_cuda_checks_plans_and_runs(tmp_path):
    r = bash("gpu_single.sh", "--config", "configs/olmoe_1b_7b.yaml", "--out", "runs/olmoe",
             "--venv", str(tmp_path / "venv"), "--dry-run", "collect.batch_size=32")
    assert r.returncode == 0, r.stderr
    venv, pip, check, plan, go = commands(r.stdout)
    assert venv[1:] == ["-m", "venv", str(tmp_path / "venv")]
    assert pip[-1].endswith("[cuda]") and pip[1:4] == ["install", "-q", "-e"]
    assert check[1] == "selfcheck"
    assert plan[1:] == ["run", "--config", "configs/olmoe_1b_7b.yaml", "--dry-run", "--devices", "1", "mesh.model=1",
                        "collect.batch_size=32"]
    assert go[1:6] == ["run", "--config", "configs/olmoe_1b_7b.yaml", "--out", "runs/olmoe"]
    assert "mesh.devices=1" in go and go[-1] == "collect.batch_size=32"
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("script", ["tpu_setup.sh", "tpu_launch.sh", "gpu_single.sh"])
def test_scripts_have_help(script):
    r = bash(script, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout and "Example:" in r.stdout and "--dry-run" in r.stdout
