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


def run_on_a_worker(launch: subprocess.CompletedProcess, home: Path, workdir: str, sparcom: str):
    """Run the remote command a `tpu_launch.sh --dry-run` printed, as a worker whose home is `home`
    and whose `~/<workdir>/.venv/bin/sparcom` is a shell script of `sparcom`'s lines."""
    import os

    (ssh,) = commands(launch.stdout)
    remote = ssh[ssh.index("--command") + 1]
    fake = home / workdir / ".venv" / "bin" / "sparcom"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\n{sparcom}\n")
    fake.chmod(0o755)
    return subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)), capture_output=True,
                          text=True, timeout=60)

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


@pytest.mark.parametrize("accelerator, runtime", [("v4-32", "tpu-ubuntu2204-base"), ("v5p-32", "v2-alpha-tpuv5"),
                                                   ("v5litepod-16", "v2-alpha-tpuv5-lite")])
def test_tpu_setup_picks_the_runtime_and_a_python_jax_supports(accelerator, runtime):
    # jax >= 0.7 needs Python 3.11+; the runtimes' python3 is Ubuntu 22.04's 3.10, so a venv
    # made with it cannot install jax[tpu]. A v5p does not run the v4 runtime.
    r = bash("tpu_setup.sh", "--name", "n", "--zone", "z", "--accelerator-type", accelerator, "--dry-run")
    assert r.returncode == 0, r.stderr
    create, _, _, ssh = commands(r.stdout)
    assert create[create.index("--version") + 1] == runtime
    remote = ssh[ssh.index("--command") + 1]
    venv = remote.index("uv venv -q --seed --python 3.12 .venv")
    assert "python3 -m venv" not in remote and venv < remote.index("pip install -q -e '.[tpu]'")
    r = bash("tpu_setup.sh", "--name", "n", "--zone", "z", "--accelerator-type", "v9x-8", "--dry-run")
    assert r.returncode == 2 and "pass --version" in r.stderr


def test_tpu_launch_fails_when_sparcom_fails_on_a_worker(tmp_path):
    # The remote command pipes sparcom into tee for the log: without pipefail its status was
    # tee's, and a run that failed on every worker reported success.
    r = bash("tpu_launch.sh", "--name", "n", "--zone", "z", "--dry-run", "--", "collect", "--config", "c.yaml")
    done = run_on_a_worker(r, tmp_path, "sparcom_jax", "echo \"sparcom: error: no weights\"\nexit 2")
    assert done.returncode == 2
    assert "no weights" in (tmp_path / "sparcom_jax" / "logs" / "sparcom-collect.log").read_text()



def test_tpu_launch_quotes_the_workdir_and_log_in_the_remote_command(tmp_path):
    # --workdir and --log went into the remote shell line unquoted: a name with a space (or a shell
    # character) split into two words there, and the worker ran something else.
    r = bash("tpu_launch.sh", "--name", "n", "--zone", "z", "--workdir", "my runs/sparcom", "--log",
             "logs/first try.log", "--dry-run", "--", "collect", "--config", "c.yaml")
    assert r.returncode == 0, r.stderr
    done = run_on_a_worker(r, tmp_path, "my runs/sparcom", "echo \"ran $*\"")
    assert done.returncode == 0, done.stderr
    log = tmp_path / "my runs" / "sparcom" / "logs" / "first try.log"
    assert log.read_text() == "ran collect --config c.yaml --distributed\n"

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


GPU_STEPS = ["1", "2", "3", "4a", "4b", "5", "6", "7", "8"]


def gpu_check(out, timeout: int, **env_extra) -> subprocess.CompletedProcess:
    import os
    import sys

    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def section(doc: str, key: str) -> str:
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    assert start in doc and end in doc, f"section {key!r} was not written"
    return doc[doc.index(start):doc.index(end)]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_every_table(tmp_path):
    import json
    import sys

    docs = SCRIPTS.parent / "docs" / "benchmarks.md"
    before = docs.read_bytes()
    out = tmp_path / "out"
    r = gpu_check(out, 900, GPU_CHECK_WORK=str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert docs.read_bytes() == before  # the run writes a copy under OUT only
    # What comes back from the device machine: at most 8 plain files, none in sub-folders.
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "benchmarks.md", "env.txt", "results.json",
                                                     "summary.md", "tests.log"]
    res = json.loads((out / "results.json").read_text())
    assert {s["n"]: s["status"] for s in res["steps"]} == {n: "ok" for n in GPU_STEPS}
    assert res["tests"]["passed"] == 1 and res["tests"]["failed"] == 0 and res["tests"]["not_run"] == 0
    m = res["env"]["machine"]
    doc = (out / "benchmarks.md").read_text()
    assert section(doc, "collect:NVIDIA H200 (gpu)") in before.decode()  # earlier tables are kept
    summary = section(doc, f"gpu-check:{m}")
    assert all(f"| {n}. " in summary for n in GPU_STEPS) and "DRY RUN" in summary
    dense = section(doc, f"gpu-dense:{m}")
    row = next(ln for ln in dense.splitlines() if ln.startswith("| Llama 1B (16L"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "default" and cells[3].replace(",", "").isdigit()  # tok/s measured
    assert "x)" in cells[6] and "x)" in cells[7]  # speed-ups vs transformers plain and + hooks
    assert "Llama 1B (16L, D2048, F5632, GQA 16/4) [tiny: 2L, D64]: with the activation sums that break ties" in dense
    olmoe = section(doc, f"gpu-moe-olmoe:{m}")
    assert sum(ln.startswith("| OLMoE shape") for ln in olmoe.splitlines()) == 3  # auto, capacity, tokamax
    assert "| capacity | " in olmoe
    sys.path.insert(0, str(SCRIPTS))
    from bench_common import moe_strategies

    if "tokamax" not in moe_strategies():  # a strategy this version lacks is a row that says so
        assert "| tokamax | not available in this version |" in olmoe
    assert "| Mixtral shape, 4 layers" in section(doc, f"gpu-moe-mixtral:{m}")
    startup = section(doc, f"startup:{m}")
    assert "| Llama 1B (16L" in startup and "warm second process to its first counted batch" in startup
    full = section(doc, f"mixtral-full:{m}")
    assert "| Mixtral-8x7B (32L" in full and "| yes |" in full  # every token and routed assignment counted
    assert "step 2's tests" in full
    assert "**MFU**" in section(doc, f"train:{m}")
    prec = section(doc, f"precision:{m}")
    assert "| Llama 1B (16L, D2048, F5632, GQA 16/4) [tiny: 2L, D64] | bfloat16 | " in prec
    assert "| OLMoE shape, 4 layers (D2048, 64 x 1024, top-8, MHA 16/16) [tiny: 2L, D64] | bfloat16 | " in prec
    assert "ISE" in prec and "expert neurons" in prec
    # The summary printed last names every target with its verdict.
    assert "| target | measured | goal | result |" in r.stdout and "(dry run)**" in r.stdout
    assert not (tmp_path / "work").joinpath("site").exists()  # no wheels installed in a dry run


def test_gpu_check_skips_every_step_when_no_budget_is_left(tmp_path):
    import json

    out = tmp_path / "out"
    r = gpu_check(out, 120, TOTAL_BUDGET="5", MIN_STEP="5")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    statuses = {s["n"]: s["status"] for s in res["steps"]}
    assert sorted(statuses) == GPU_STEPS and all(s.startswith("skipped") for s in statuses.values())
    doc = (out / "benchmarks.md").read_text()
    assert "<!-- gpu-dense:" not in doc and "(no benchmark finished)" in (out / "summary.md").read_text()


def test_gpu_check_help_and_bad_arguments():
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage:" in r.stdout and "Example:" in r.stdout and "--dry-run" in r.stdout
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "a", "b"], capture_output=True, text=True)
    assert r.returncode == 2 and "one OUT_DIR only" in r.stderr


def test_tpu_setup_gives_a_v6e_its_runtime_and_refuses_a_tpu7x():
    # Runtime names from https://cloud.google.com/tpu/docs/runtimes; TPU7x is GKE-only.
    r = bash("tpu_setup.sh", "--name", "n", "--zone", "z", "--accelerator-type", "v6e-8", "--dry-run")
    assert r.returncode == 0, r.stderr
    create = commands(r.stdout)[0]
    assert create[create.index("--version") + 1] == "v2-alpha-tpuv6e"
    r = bash("tpu_setup.sh", "--name", "n", "--zone", "z", "--accelerator-type", "tpu7x-8", "--dry-run")
    assert r.returncode == 2 and "only through GKE" in r.stderr
