#!/usr/bin/env bash
# Run one `sparcom` command on every worker of a (multi-host) TPU VM at once.
#
# Usage:
#   scripts/tpu_launch.sh --name NAME --zone ZONE [--project PROJECT] [--workdir DIR] [--log FILE] [--dry-run] \
#                         -- COMMAND --config FILE [KEY=VALUE ...] [--out DIR]
#
# Example:
#   scripts/tpu_launch.sh --name sparcom-v4 --zone us-central2-b -- run --config configs/mixtral_8x7b.yaml \
#       --out runs/mixtral mesh.devices=16
#
# Every worker runs `sparcom COMMAND ... --distributed`, so each process calls
# jax.distributed.initialize() (coordinator, process ids and devices are detected on TPU VMs)
# before any other JAX call. Checkpoints and outputs must be on a path every worker sees
# (the same local path on each, or a shared disk / bucket mount); process 0 writes the report.
# With --dry-run the gcloud command is printed, not run.
set -euo pipefail
# ---- helpers: run CMD... runs it, or with DRY_RUN=1 prints it (shell-quoted, after "+ ") ----

_q() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local first=1 a
  for a in "$@"; do
    [ $first = 1 ] || printf ' '
    first=0
    _q "$a"
  done
}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}
# ---- end of helpers ----

NAME="" ZONE="" PROJECT="" WORKDIR="sparcom_jax" LOG="" DRY_RUN=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="${2:?}"; shift 2 ;;
    --zone) ZONE="${2:?}"; shift 2 ;;
    --project) PROJECT="${2:?}"; shift 2 ;;
    --workdir) WORKDIR="${2:?}"; shift 2 ;;
    --log) LOG="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown argument: $1 (put the sparcom command after --)" ;;
  esac
done
[ -n "$NAME" ] || { usage >&2; die "--name is required"; }
[ -n "$ZONE" ] || { usage >&2; die "--zone is required"; }
[ $# -gt 0 ] || { usage >&2; die "no sparcom command after --"; }
export DRY_RUN
STAGE="$1"
LOG="${LOG:-logs/sparcom-$STAGE.log}"

SPARCOM="$(quote_all .venv/bin/sparcom "$@" --distributed)"
REMOTE="cd ~/$WORKDIR && mkdir -p $(dirname "$LOG") && $SPARCOM 2>&1 | tee -a $LOG"
CMD=(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE")
[ -n "$PROJECT" ] && CMD+=(--project "$PROJECT")
CMD+=(--worker=all --command "$REMOTE")
run "${CMD[@]}"
[ "$DRY_RUN" = 1 ] && echo "dry run: nothing was run (each worker would log to ~/$WORKDIR/$LOG)"
exit 0
