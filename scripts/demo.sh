#!/usr/bin/env bash
# Quick start, command 1: set up and run the embedded end-to-end demo (no network needed).
# Usage: scripts/demo.sh [OUT_DIR] [extra sparcom demo args, e.g. --fast or --overwrite]
# Installs the runtime dependencies only (never the test extra) into .venv (or $SPARCOM_VENV).
set -euo pipefail
START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" ""
SETUP=$((SECONDS - START))
OUT="${1:-demo_out}"
shift || true
sparcom demo --out "$OUT" "$@"
TOTAL=$((SECONDS - START))
printf 'demo.sh: done in %dm%02ds (set-up %ds, demo %ds); report: %s/report/index.html\n' \
  $((TOTAL / 60)) $((TOTAL % 60)) "$SETUP" $((TOTAL - SETUP)) "$OUT" >&2
