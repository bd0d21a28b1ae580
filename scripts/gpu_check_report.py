#!/usr/bin/env python
"""The bookkeeping of `scripts/gpu_check.sh`: the environment line, step statuses, the summary.

    python scripts/gpu_check_report.py env OUT [--dry-run]     # step 1: versions, device, measured peak
    python scripts/gpu_check_report.py step OUT N NAME STATUS SECONDS LIMIT
    python scripts/gpu_check_report.py summary OUT             # print OUT/summary.md

Everything lands in OUT/results.json (each benchmark adds its own key there); after each
step the summary is rebuilt: OUT/summary.md (the environment, every step's status and
time, the GPU tests' outcome counts from OUT/tests.log, and every target with MET / NOT MET)
and the `gpu-check:MACHINE` section of OUT/benchmarks.md. Only `env` imports jax.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import met_word, replace_section, update_results, versions  # noqa: E402

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def env(out: Path, dry_run: bool) -> None:
    """Versions, the device, and the measured bf16 matmul peak (the peak every later row uses)."""
    import jax
    import jax.numpy as jnp

    from bench_common import device_name, matmul_peak_flops

    dev = jax.devices()[0]
    n = 512 if dry_run else 8192
    peak = matmul_peak_flops(n, repeats=3 if dry_run else 10, dtype=jnp.bfloat16)
    info = {"machine": device_name(), "device_kind": dev.device_kind, "platform": dev.platform,
            "devices": jax.device_count(), "versions": versions(), "peak_flops": peak,
            "peak_matmul": f"bfloat16 {n}x{n}x{n}", "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry_run}
    update_results(out / "results.json", "env", info)
    print(env_line(info))


def env_line(e: dict) -> str:
    v = e["versions"]
    return (f"{e['machine']} x{e['devices']}; jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, optax "
            f"{v['optax']}, transformers {v['transformers']}, torch {v['torch']}; measured matmul peak "
            f"{e['peak_flops'] / 1e12:,.1f} TFLOP/s ({e['peak_matmul']}); {e['date']}"
            + (" — DRY RUN (CPU, tiny sizes: not measurements)" if e.get("dry_run") else ""))


def test_counts(log: Path) -> dict | None:
    """Outcome counts of a pytest -v run, from its log (also when it was stopped early)."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    selected = None
    m = re.search(r"\[(\d+) items?\]", text)  # xdist: "4 workers [58 items]"
    if m:
        selected = int(m.group(1))
    else:
        m = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
        if m:
            selected = int(m.group(3) or (int(m.group(1)) - int(m.group(2) or 0)))
    last: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")) and " - " in line:
            continue  # the short summary repeats outcomes already counted
        node = next((t for t in line.split() if "::" in t), None)
        word = next((w for w in OUTCOMES if re.search(rf"\b{w}\b", line)), None)
        if node and word:
            last[node] = word if last.get(node) != "ERROR" else "ERROR"
    counts = {w.lower(): sum(1 for v in last.values() if v == w) for w in OUTCOMES}
    counts["selected"] = selected
    counts["not_run"] = None if selected is None else max(selected - len(last), 0)
    return counts


def step(out: Path, n: str, name: str, status: str, seconds: str, limit: str) -> None:
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    steps = [s for s in data.get("steps", []) if s["n"] != n]
    steps.append({"n": n, "name": name, "status": status, "seconds": float(seconds), "limit": float(limit)})
    update_results(path, "steps", sorted(steps, key=lambda s: s["n"]))
    summary(out, quiet=True)


def all_targets(data: dict) -> list[dict]:
    out = []
    for key, val in data.items():
        if isinstance(val, dict) and isinstance(val.get("targets"), list):
            out += [dict(t, step=key) for t in val["targets"]]
    return out


def summary(out: Path, quiet: bool = False) -> str:
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    e = data.get("env")
    dry = bool(e and e.get("dry_run"))
    lines = ["Environment: " + (env_line(e) if e else "not recorded (step 1 did not finish)"), "",
             "| step | status | seconds (limit) |", "|---|---|---|"]
    for s in data.get("steps", []):
        lines.append(f"| {s['n']}. {s['name']} | {s['status']} | {s['seconds']:.0f} ({s['limit']:.0f}) |")
    tc = test_counts(out / "tests.log")
    if tc:
        lines += ["", "GPU tests (tests.log): " + ", ".join(
            f"{tc[k]} {k}" for k in ("passed", "failed", "error", "skipped", "xfail", "xpass") if tc[k])
            + f"; {tc['not_run'] if tc['not_run'] is not None else '?'} not run of "
              f"{tc['selected'] if tc['selected'] is not None else '?'} selected"]
        data["tests"] = tc
    targets = all_targets(data)
    lines += ["", "| target | measured | goal | result |", "|---|---|---|---|"]
    for t in targets:
        word = met_word(t["met"]) + (" (dry run)" if dry else "")
        lines.append(f"| {t['target']} | {t['value']} | {t['goal']} | **{word}** |")
    if not targets:
        lines.append("| (no benchmark finished) | | | |")
    text = "\n".join(lines)
    (out / "summary.md").write_text(f"# gpu_check summary\n\n{text}\n")
    if tc:
        update_results(path, "tests", tc)
    machine = e["machine"] if e else "unknown machine"
    bench = out / "benchmarks.md"
    if bench.exists():
        replace_section(bench, f"gpu-check:{machine}", text + "\n\nWritten by `scripts/gpu_check.sh`; the other "
                        "sections of this run carry the same machine name.",
                        title=f"Accelerator check (`scripts/gpu_check.sh`) — {machine}")
    if not quiet:
        print(text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("env", "step", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, out = argv[0], Path(argv[1])
    if cmd == "env":
        env(out, "--dry-run" in argv[2:])
    elif cmd == "step":
        if len(argv) != 7:
            print("usage: gpu_check_report.py step OUT N NAME STATUS SECONDS LIMIT", file=sys.stderr)
            return 2
        step(out, *argv[2:])
    else:
        summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
