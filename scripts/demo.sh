#!/usr/bin/env bash
# Quick start, command 1: set up and run the embedded end-to-end demo (no network needed).
# Usage: scripts/demo.sh [OUT_DIR] [extra sparcom demo args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" ""
OUT="${1:-demo_out}"
shift || true
exec sparcom demo --out "$OUT" "$@"
