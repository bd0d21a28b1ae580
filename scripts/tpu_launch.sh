#!/usr/bin/env bash
# Run one `sparcom` command on every worker of a (multi-host) TPU VM at once.
#
# Usage:
#   scripts/tpu_launch.sh --name NAME --zone ZONE [--project PROJECT] [--workdir DIR] [--log FILE] [--dry-run] \
#                         -- COMMAND --config FILE [KEY=VALUE ...] [--out DIR]
#
# Example:
#   scripts/tpu_launch.sh --name sparcom-v4 --zone us-central2-b -- run --config configs/mixtral_8x7b.yaml \
#       --out /mnt/nfs/runs/mixtral
#
# Every worker runs `sparcom COMMAND ... --distributed`, so each process calls
# jax.distributed.initialize() (coordinator, process ids and devices are detected on TPU VMs)
# before any other JAX call. Model checkpoints may be copies at the same local path on every
# worker; the output directory (--out, else the config's out_dir) must be one directory every
# worker mounts (NFS, e.g. Filestore): each worker counts its share of the records into it and
# process 0 merges them and writes the analyses and the report. A per-worker local directory
# is refused at the start. The status is the command's (a failure on any worker fails it).
# Each worker's output is also appended to ~/WORKDIR/LOG on that worker.
# With --dry-run the gcloud command is printed, not run.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_common.sh"

NAME="" ZONE="" PROJECT="" WORKDIR="sparcom_jax" LOG="" DRY_RUN=0
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
# pipefail: the status is sparcom's, not tee's (a failed run would otherwise report success).
# The workdir and log are quoted for the worker's shell (a space in either split it into two words).
REMOTE="set -o pipefail && cd ~/$(_q "$WORKDIR") && mkdir -p $(_q "$(dirname "$LOG")") && $SPARCOM 2>&1 | tee -a $(_q "$LOG")"
CMD=(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE")
[ -n "$PROJECT" ] && CMD+=(--project "$PROJECT")
CMD+=(--worker=all --command "$REMOTE")
run "${CMD[@]}"
[ "$DRY_RUN" = 1 ] && echo "dry run: nothing was run (each worker would log to ~/$WORKDIR/$LOG)"
exit 0
