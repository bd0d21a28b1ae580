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
exec python -m pytest -q -n "$WORKERS" --dist loadfile --durations=20 "$@"
