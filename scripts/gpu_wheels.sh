#!/usr/bin/env bash
# Fetch, into ./.whl, the wheels the H200 image lacks for the "grouped" MoE strategy
# (tokamax and the packages it imports; the image has jax 0.11.2, flax, absl-py, jaxtyping,
# tqdm, numpy, protobuf). scripts/gpu_check.sh installs whatever lies in ./.whl before it
# runs; without them the grouped rows read "not available" and everything else still runs.
#
# Usage: scripts/gpu_wheels.sh            (needs pip and the package index; about 40 MB)
# Then pass `carry: [".whl"]` with the device call that runs scripts/gpu_check.sh.
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PKGS=(tokamax==0.0.17 einshape==1.0 qwix==0.1.8 immutabledict==4.3.1 tensorboardx==2.6.5
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection xprof==2.24.2 fire termcolor)
mkdir -p "$ROOT/.whl"
grep -qx '/.whl/' "$ROOT/.gitignore" 2>/dev/null || echo '/.whl/' >> "$ROOT/.gitignore"
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLAT+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d "$ROOT/.whl" "${PKGS[@]}"
ls -1 "$ROOT/.whl"
du -sh "$ROOT/.whl"
