#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package into it.
# Usage: source scripts/setup_env.sh [extra]   (extra: "" for runtime only, "test" for the test suite)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARCOM_VENV:-$ROOT/.venv}"
EXTRA="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "sparcom: creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
SPEC="$ROOT"
[ -n "$EXTRA" ] && SPEC="$ROOT[$EXTRA]"
# Reinstall only when pyproject.toml changed since the last install.
STAMP="$VENV/.sparcom-installed-$EXTRA"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "sparcom: installing $SPEC (editable) into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -e "$SPEC" >&2
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
