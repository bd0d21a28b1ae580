#!/usr/bin/env bash
# Accelerator check in one go: environment, the correctness tests that compare with
# transformers (logits, chosen experts, counts vs PyTorch hooks) run on the accelerator,
# then the statistics-engine benchmark (small and ~1B models, bfloat16, vs transformers
# on the same card). Everything is logged under OUT_DIR; the benchmark section is
# written into OUT_DIR/benchmarks.md (a copy of docs/benchmarks.md).
#
# Usage: scripts/gpu_check.sh [OUT_DIR] [--tests-only | --bench-only]
# Needs: an environment with jax (GPU/TPU), flax, transformers, torch, pytest and the
# project on PYTHONPATH (or installed). Each step has its own time limit, so a failing
# step still leaves the others' results.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-gpu_check_out}"
MODE="${2:-all}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import jax, flax, transformers, torch
print("jax", jax.__version__, "flax", flax.__version__, "transformers", transformers.__version__, "torch", torch.__version__)
print("devices", jax.devices())
EOF

# Which lowering does ragged_dot get here (grouped GEMM, or a dense rewrite over all experts)?
timeout 60 "$PY" scripts/probe_ragged_dot.py 2>&1 | grep -v "^W\|Warning" | tee "$OUT/ragged_probe.txt"

if [ "$MODE" != "--bench-only" ]; then
  # The comparisons with transformers and the invariance tests; multi-device and
  # multi-process tests simulate CPU devices and are left to the CPU suite.
  timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-4}" \
    tests/test_models.py tests/test_collect.py tests/test_losses.py \
    -k "${TEST_FILTER:-logits_match or chosen_experts or counts_match or dispatch_implementations or capacity_path or expert_neuron_count or padding_never or bfloat16 or do_not_depend or ablat or blocked_attention or counts_only}" \
    2>&1 | tee "$OUT/tests.log" | tail -25
  echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
fi

if [ "$MODE" != "--tests-only" ]; then
  cp docs/benchmarks.md "$OUT/benchmarks.md"
  timeout "${BENCH_TIMEOUT:-360}" "$PY" scripts/bench_collect.py --no-memory --out "$OUT/benchmarks.md" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^W\|Warning" | tail -30
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
fi
