#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package into it.
# Usage: source scripts/setup_env.sh [extra]   (extra: "" for runtime only, "test" for the test suite)
# Versions are pinned by constraints.txt (the set the demo's numbers were measured under);
# SPARCOM_CONSTRAINTS=none installs the newest releases pyproject.toml allows instead,
# SPARCOM_CONSTRAINTS=FILE pins with another file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARCOM_VENV:-$ROOT/.venv}"
EXTRA="${1:-}"
PY="${PYTHON:-python3}"
CONSTRAINTS="${SPARCOM_CONSTRAINTS:-$ROOT/constraints.txt}"
PIN=()
if [ "$CONSTRAINTS" != "none" ]; then
  if [ ! -f "$CONSTRAINTS" ]; then
    echo "sparcom: SPARCOM_CONSTRAINTS=$CONSTRAINTS is not a file (set it to a pip constraints file, or to 'none' to install unpinned)" >&2
    exit 2
  fi
  PIN=(-c "$CONSTRAINTS")
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "sparcom: creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
SPEC="$ROOT"
[ -n "$EXTRA" ] && SPEC="$ROOT[$EXTRA]"
# Reinstall only when pyproject.toml, the pin set or the choice of pins changed since the last install.
STAMP="$VENV/.sparcom-installed-$EXTRA"
PINNED_BY="$CONSTRAINTS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] \
   || { [ "$CONSTRAINTS" != "none" ] && [ "$CONSTRAINTS" -nt "$STAMP" ]; } \
   || [ "$(cat "$STAMP")" != "$PINNED_BY" ]; then
  echo "sparcom: installing $SPEC (editable) into $VENV, pinned by $PINNED_BY" >&2
  "$VENV/bin/python" -m pip install -q ${PIN[@]+"${PIN[@]}"} -e "$SPEC" >&2
  echo "$PINNED_BY" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
