#!/usr/bin/env bash
# Create a Cloud TPU VM (single- or multi-host) and install sparcom_jax with the `tpu` extra on every worker.
#
# Usage:
#   scripts/tpu_setup.sh --name NAME --zone ZONE [--accelerator-type v4-32] [--version tpu-ubuntu2204-base]
#                        [--project PROJECT] [--spot] [--src DIR] [--workdir DIR] [--skip-create] [--dry-run]
#
# Example:
#   scripts/tpu_setup.sh --name sparcom-v4 --zone us-central2-b --accelerator-type v4-32 --dry-run
#
# Steps (each printed with --dry-run instead of run):
#   1. gcloud compute tpus tpu-vm create NAME ...          (skipped with --skip-create)
#   2. pack the source tree (no .git, .venv, runs) and gcloud compute tpus tpu-vm scp it to every worker
#   3. on every worker: python3 -m venv, pip install -e '.[tpu]', check jax.device_count()
# Then download the weights on every worker (or mount a shared disk) and launch with scripts/tpu_launch.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_common.sh"

NAME="" ZONE="" TYPE="v4-8" VERSION="tpu-ubuntu2204-base" PROJECT="" SPOT=0 SKIP_CREATE=0
SRC="$(cd "$HERE/.." && pwd)" WORKDIR="sparcom_jax" DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="${2:?}"; shift 2 ;;
    --zone) ZONE="${2:?}"; shift 2 ;;
    --accelerator-type) TYPE="${2:?}"; shift 2 ;;
    --version) VERSION="${2:?}"; shift 2 ;;
    --project) PROJECT="${2:?}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --src) SRC="${2:?}"; shift 2 ;;
    --workdir) WORKDIR="${2:?}"; shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$NAME" ] || { usage >&2; die "--name is required"; }
[ -n "$ZONE" ] || { usage >&2; die "--zone is required"; }
export DRY_RUN

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[ -n "$PROJECT" ] && WHERE+=(--project "$PROJECT")

if [ "$SKIP_CREATE" = 0 ]; then
  CREATE=("${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --version "$VERSION")
  [ "$SPOT" = 1 ] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi
TARBALL="${TMPDIR:-/tmp}/sparcom_jax-src.tar.gz"
run tar -C "$SRC" -czf "$TARBALL" --exclude=./.git --exclude='./.venv*' --exclude=./runs --exclude=./logs .
run "${GC[@]}" scp "$TARBALL" "$NAME:sparcom_jax-src.tar.gz" "${WHERE[@]}" --worker=all
INSTALL="mkdir -p ~/$WORKDIR && tar -C ~/$WORKDIR -xzf ~/sparcom_jax-src.tar.gz && cd ~/$WORKDIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$INSTALL"
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: nothing was created or installed"
else
  echo "TPU VM $NAME is ready; next: scripts/tpu_launch.sh --name $NAME --zone $ZONE -- run --config configs/<pair>.yaml"
fi
