#!/usr/bin/env bash
# Single-GPU recipe: a virtual environment with CUDA JAX, a self-check, the dry-run plan, then the run.
#
# Usage:
#   scripts/gpu_single.sh --config FILE [--command run] [--out DIR] [--venv DIR] [--python python3]
#                         [--dry-run] [KEY=VALUE ...]
#
# Example:
#   scripts/gpu_single.sh --config configs/olmoe_1b_7b.yaml --out runs/olmoe collect.batch_size=32
#
# Steps (each printed with --dry-run instead of run):
#   1. python3 -m venv VENV; pip install -e '.[cuda]'
#   2. sparcom selfcheck (a tiny model against transformers, on the GPU)
#   3. sparcom COMMAND --config FILE --dry-run --devices 1 (the memory plan for one GPU)
#   4. sparcom COMMAND --config FILE --out DIR mesh.devices=1 mesh.model=1 [KEY=VALUE ...]
# A 7B pair needs ~15 GiB per model in bfloat16; Mixtral-8x7B (~87 GiB) does not fit one GPU.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_common.sh"

ROOT="$(cd "$HERE/.." && pwd)"
CONFIG="" COMMAND="run" OUT="" VENV="$ROOT/.venv-cuda" PY="python3" DRY_RUN=0 OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:?}"; shift 2 ;;
    --command) COMMAND="${2:?}"; shift 2 ;;
    --out) OUT="${2:?}"; shift 2 ;;
    --venv) VENV="${2:?}"; shift 2 ;;
    --python) PY="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$CONFIG" ] || { usage >&2; die "--config is required"; }
export DRY_RUN

OUT_ARGS=()
[ -n "$OUT" ] && OUT_ARGS=(--out "$OUT")
if [ ! -x "$VENV/bin/python" ] || [ "$DRY_RUN" = 1 ]; then
  run "$PY" -m venv "$VENV"
fi
run "$VENV/bin/pip" install -q -e "$ROOT[cuda]"
run "$VENV/bin/sparcom" selfcheck
run "$VENV/bin/sparcom" "$COMMAND" --config "$CONFIG" --dry-run --devices 1 mesh.model=1 "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
run "$VENV/bin/sparcom" "$COMMAND" --config "$CONFIG" "${OUT_ARGS[@]+"${OUT_ARGS[@]}"}" mesh.devices=1 mesh.model=1 \
    mesh.num_processes=1 mesh.distributed=false "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
[ "$DRY_RUN" = 1 ] && echo "dry run: nothing was installed or run"
exit 0
