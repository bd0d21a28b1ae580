#!/usr/bin/env bash
# Quick start, command 2: set up (with the test extra: pytest, CPU torch for parity) and run the tests.
# Usage: scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKERS="${SPARCOM_TEST_WORKERS:-2}"
# The 20 slowest tests close every run: CI must stay under 30 minutes on 2 cores, and a
# test that grows shows up in the log of the run that made it grow.
# A worker that crashes (a segfault in native code) fails the run at once: with restarts allowed,
# pytest-xdist (3.x, --dist loadfile) hands the crashed file to a new worker and the run can hang
# until CI's time limit (seen once, 2026-12-02, a segfault inside jax's compilation-cache write).
exec python -m pytest -q -n "$WORKERS" --dist loadfile --max-worker-restart=0 --durations=20 "$@"
