#!/usr/bin/env bash
# Create a Cloud TPU VM (single- or multi-host) and install sparcom_jax with the `tpu` extra on every worker.
#
# Usage:
#   scripts/tpu_setup.sh --name NAME --zone ZONE [--accelerator-type v4-32] [--version RUNTIME]
#                        [--project PROJECT] [--spot] [--src DIR] [--workdir DIR] [--python 3.12]
#                        [--skip-create] [--dry-run]
#
# Example:
#   scripts/tpu_setup.sh --name sparcom-v4 --zone us-central2-b --accelerator-type v4-32 --dry-run
#
# Steps (each printed with --dry-run instead of run):
#   1. gcloud compute tpus tpu-vm create NAME ...          (skipped with --skip-create)
#      The runtime (--version) defaults by accelerator type, as Google's "TPU software versions"
#      table for JAX gives them (https://cloud.google.com/tpu/docs/runtimes): tpu-ubuntu2204-base
#      for v2/v3/v4, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e (v5litepod),
#      v2-alpha-tpuv6e for v6e (Trillium); other types need --version. TPU7x (Ironwood) is not
#      offered as a TPU VM, only through GKE (https://cloud.google.com/tpu/docs/tpu7x).
#   2. pack the source tree (no .git, .venv, runs) and gcloud compute tpus tpu-vm scp it to every worker
#   3. on every worker: a virtual environment with Python --python (default 3.12; jax >= 0.7
#      needs 3.11+, the images' python3 is Ubuntu 22.04's 3.10) made by uv (pip-installed for the
#      user, it fetches that Python), pip install -e '.[tpu]', check jax.device_count()
# Then put the weights on every worker (the same path on each) and an NFS share (e.g. Filestore)
# for the outputs, mounted at the same path on every worker, and launch with scripts/tpu_launch.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_common.sh"

NAME="" ZONE="" TYPE="v4-8" VERSION="" PROJECT="" SPOT=0 SKIP_CREATE=0
SRC="$(cd "$HERE/.." && pwd)" WORKDIR="sparcom_jax" PYVER="3.12" DRY_RUN=0
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
    --python) PYVER="${2:?}"; shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$NAME" ] || { usage >&2; die "--name is required"; }
[ -n "$ZONE" ] || { usage >&2; die "--zone is required"; }
export DRY_RUN
if [ -z "$VERSION" ]; then
  case "$TYPE" in
    v2-*|v3-*|v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    tpu7x-*|v7*) die "TPU7x (Ironwood) is offered only through GKE, not as a TPU VM this script creates (https://cloud.google.com/tpu/docs/tpu7x)" ;;
    *) die "no default runtime for --accelerator-type $TYPE; pass --version (gcloud compute tpus tpu-vm versions list)" ;;
  esac
fi

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[ -n "$PROJECT" ] && WHERE+=(--project "$PROJECT")

if [ "$SKIP_CREATE" = 0 ]; then
  CREATE=("${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --version "$VERSION")
  [ "$SPOT" = 1 ] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi
TARBALL="${TMPDIR:-/tmp}/sparcom_jax-src.tar.gz"
run tar -C "$SRC" -czf "$TARBALL" --exclude=./.git --exclude='./.venv*' --exclude=./runs --exclude=./logs \
    --exclude=./.pytest_cache --exclude=./.whl .
run "${GC[@]}" scp "$TARBALL" "$NAME:sparcom_jax-src.tar.gz" "${WHERE[@]}" --worker=all
# The runtime images' python3 is 3.10, too old for jax >= 0.7: uv makes the venv with a newer Python.
VENV="python3 -m pip install -q --user uv && rm -rf .venv && ~/.local/bin/uv venv -q --seed --python $PYVER .venv"
INSTALL="mkdir -p ~/$WORKDIR && tar -C ~/$WORKDIR -xzf ~/sparcom_jax-src.tar.gz && cd ~/$WORKDIR && $VENV && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$INSTALL"
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: nothing was created or installed"
else
  echo "TPU VM $NAME is ready; next: scripts/tpu_launch.sh --name $NAME --zone $ZONE -- run --config configs/<pair>.yaml"
fi
