#!/usr/bin/env bash
# Usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]
#
# One run on one accelerator (sized for an NVIDIA H200 in <= 9 minutes) that measures what
# issues 13 and 15 ask for, in this order of value:
#   1. environment: versions, device, the measured bf16 matmul peak (every row uses it)
#   2. the GPU-relevant tests (vs transformers, dispatch paths, precision, blocked attention,
#      counts-only, ablation), 4 xdist workers, 150 s; run alongside step 6 (see below)
#   3. dense row: Llama 1B shape, 1,024 sequences of 64-511 tokens, batch 32, vs transformers
#      plain decoder forward and + hooks
#   4. MoE rows: OLMoE shape (4 layers) and Mixtral shape (4 layers), every dispatch strategy,
#      vs transformers' plain forward (default grouped_mm experts)
#   5. seconds to first result: cold vs warm second process, Llama 1B shape
#   6. Mixtral-8x7B shape initialised on the device, 1,200 instructions, peak memory vs plan
#   7. training step on the Llama 1B shape, MFU
#   8. precision: float32 vs bfloat16 (vs bfloat16 with a float32 gate) sets
# Step 6 runs while step 2's tests run (they share the card; its memory numbers are per
# process, its tok/s is marked as measured alongside the tests); the other rows run alone.
#
# Every step has a hard time limit and the run a total budget (TOTAL_BUDGET, 540 s): a step
# that would start with less than MIN_STEP seconds left is skipped and says so. Each step
# writes its table into OUT_DIR/benchmarks.md (a copy of docs/benchmarks.md, sections
# replaced atomically, stamped with the card, versions and date): copy it back over
# docs/benchmarks.md. OUT_DIR holds 6 files: benchmarks.md, summary.md (every step's status
# and every target, MET or NOT MET), results.json, env.txt, tests.log, bench.log.
# Caches and temporary files go to GPU_CHECK_WORK (default /tmp/sparcom_gpu_check.PID, removed
# at the end).
#
# --dry-run: every step on the CPU at toy sizes (a couple of minutes; what the CI test runs).
#
# Example:
#   scripts/gpu_check.sh /tmp/out                     # on the accelerator machine
#   scripts/gpu_check.sh --dry-run /tmp/out           # anywhere, CPU
#
# Environment: PYTHON (python3), TOTAL_BUDGET, MIN_STEP, TEST_WORKERS (4), TEST_FILTER,
# STEPS (e.g. "1 3 6": run only these). Wheels in ./.whl (scripts/gpu_wheels.sh fetches them) are installed
# into GPU_CHECK_WORK/site first (not in a dry run). Needs no `datasets` and no network.
set -u
usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
DRY=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUT_DIR only, got '$OUT' and '$1'" >&2; exit 2; }
       OUT="$1" ;;
  esac
  shift
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"
else
  WORK="/tmp/sparcom_gpu_check.$$"
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK" || exit 2
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  SPARCOM_JAX_CACHE="$WORK/jax-cache"
if [ "$DRY" = 1 ]; then
  # Toy sizes on the CPU check that every step runs, not how fast: LLVM at -O0 compiles the
  # steps' programs in about half the time (results differ by float rounding only).
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
  TOTAL_BUDGET="${TOTAL_BUDGET:-900}" MIN_STEP="${MIN_STEP:-5}"
else
  TOTAL_BUDGET="${TOTAL_BUDGET:-540}" MIN_STEP="${MIN_STEP:-25}"
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$ROOT"/.whl/*.whl && export PYTHONPATH="$WORK/site:$PYTHONPATH"
  fi
fi
START=$(date +%s)
LOG="$OUT/bench.log"
: >"$LOG"
cp docs/benchmarks.md "$OUT/benchmarks.md"
REPORT=("$PY" scripts/gpu_check_report.py)
R=(--json "$OUT/results.json")
rm -f "$OUT/results.json" "$OUT/summary.md" "$OUT/tests.log" "$OUT/env.txt"

wanted() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" ${1%[ab]} "* ]]; }
left() { echo $((START + TOTAL_BUDGET - $(date +%s))); }
limit_for() {  # min(cap, time left), minus the 10 s grace before a kill
  local cap=$1 l
  l=$(left)
  [ "$l" -lt "$cap" ] && cap=$l
  echo $((cap - 10))
}
record() {  # N NAME RC SECONDS LIMIT
  local status
  case "$3" in
    0) status=ok ;;
    124|137) status="timed out" ;;
    skip) status="skipped: under ${MIN_STEP} s of the budget left" ;;
    *) status="failed (exit $3)" ;;
  esac
  "${REPORT[@]}" step "$OUT" "$1" "$2" "$status" "$4" "$5" >>"$LOG" 2>&1
  printf '%-4s %-34s %-28s %5s s (limit %s s)\n' "$1" "$2" "$status" "$4" "$5"
}
# run_step N NAME CAP LOGFILE CMD...: the command under its time limit, its output in LOGFILE.
run_step() {
  local n=$1 name=$2 cap=$3 log=$4 t t0 rc
  shift 4
  wanted "$n" || return 0
  t=$(limit_for "$cap")
  if [ "$t" -lt "$MIN_STEP" ]; then record "$n" "$name" skip 0 0; return 0; fi
  echo "=== step $n: $name (limit ${t} s): $*" >>"$log"
  t0=$(date +%s)
  timeout -s INT -k 10 "$t" "$@" >>"$log" 2>&1
  rc=$?
  record "$n" "$name" "$rc" $(($(date +%s) - t0)) "$t"
}

if [ "$DRY" = 1 ]; then
  # One test of the real selection that compiles nothing: a dry run checks that the step runs
  # and its result is recorded (the CI test of this script), not the tests themselves.
  TINY=(--tiny) TEST_ARGS=(-n 0 -k "${TEST_FILTER:-attention_kernel}")
  DENSE=(--n 12 --min-len 8 --max-len 40 --batch 4 --max-buckets 1 --repeats 1)
  MOE=("${DENSE[@]}" --strategies auto,capacity,tokamax)
  MOE_MIX=("${DENSE[@]}")
  START_ARGS=(--batch 4 --min-len 8 --max-len 24)
  MIX_ARGS=(--n 24 --min-len 8 --max-len 48 --dtype float32 --max-buckets 1)
  TRAIN_ARGS=(--batch 2 --seq 32 --steps 1)
  PREC_ARGS=(--n-per-category 2 --min-len 8 --max-len 32 --max-buckets 1)
  CAP_TESTS=120 CAP=240
else
  TINY=() TEST_ARGS=(-n "${TEST_WORKERS:-4}" -k "${TEST_FILTER:-logits_match or chosen_experts or counts_match or \
dispatch_implementations or capacity_path or expert_neuron_count or padding_never or bfloat16 or do_not_depend or \
ablat or blocked_attention or fused_attention or attention_kernel or counts_only or precision or init_ or plan_}")
  DENSE=(--n 1024 --min-len 64 --max-len 511 --batch 32 --max-buckets 4 --repeats 2)
  MOE=(--n 1024 --min-len 64 --max-len 511 --batch 32 --max-buckets 3 --repeats 2)
  MOE_MIX=(--n 512 --min-len 64 --max-len 511 --batch 32 --max-buckets 3 --repeats 2)
  START_ARGS=(--batch 32 --min-len 64 --max-len 511)
  MIX_ARGS=(--n 1200 --min-len 30 --max-len 400 --batch 16 --max-buckets 4)
  TRAIN_ARGS=(--batch 16 --seq 1024 --steps 5)
  PREC_ARGS=(--n-per-category 40 --max-len 250 --max-buckets 2)
  CAP_TESTS=150 CAP=0
fi
cap() { [ "$CAP" -gt 0 ] && echo "$CAP" || echo "$1"; }

echo "gpu_check: OUT=$OUT WORK=$WORK budget ${TOTAL_BUDGET} s$([ "$DRY" = 1 ] && echo ', DRY RUN on CPU')"
run_step 1 "environment, matmul peak" "$(cap 45)" "$OUT/env.txt" "${REPORT[@]}" env "$OUT" \
  $([ "$DRY" = 1 ] && echo --dry-run)
PEAK=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['env']['peak_flops'])" "$OUT/results.json" \
  2>/dev/null)
PEAK_ARG=()  # one measured peak for every row (a dry run computes in float32: each script measures its own)
[ -n "$PEAK" ] && [ "$DRY" = 0 ] && PEAK_ARG=(--peak-flops "$PEAK")

# Steps 2 and 6 together: the tests mostly compile tiny models on the CPU cores while the
# Mixtral row holds the card; neither's result depends on the other's timing. Only the
# foreground writes results.json (the tests' status is recorded after both end).
TEST_FILES=(tests/test_collect.py tests/test_models.py tests/test_losses.py)  # counts first: xdist hands out in order
for f in tests/test_precision.py tests/test_memory.py; do [ -f "$f" ] && TEST_FILES+=("$f"); done
TESTS_PID="" ALONGSIDE=()
if wanted 2; then
  T2=$(limit_for "$(cap "$CAP_TESTS")")
  if [ "$T2" -lt "$MIN_STEP" ]; then
    record 2 "GPU tests (pytest)" skip 0 0
  else
    (
      t0=$(date +%s)
      timeout -s INT -k 10 "$T2" "$PY" -m pytest -v -p no:cacheprovider -rfE --durations=10 "${TEST_ARGS[@]}" \
        "${TEST_FILES[@]}" >"$OUT/tests.log" 2>&1
      echo "$? $(($(date +%s) - t0))" >"$WORK/tests.rc"
    ) &
    TESTS_PID=$!
    ALONGSIDE=(--note "measured while step 2's tests ran on the same machine")
  fi
fi
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run_step 6 "Mixtral-8x7B shape, 1,200 instr." "$(cap 170)" "$LOG" \
  "$PY" scripts/bench_mixtral_full.py "${TINY[@]}" "${MIX_ARGS[@]}" "${ALONGSIDE[@]}" --out "$OUT/benchmarks.md" \
  "${R[@]}"
if [ -n "$TESTS_PID" ]; then
  wait "$TESTS_PID"
  read -r RC2 S2 <"$WORK/tests.rc"
  record 2 "GPU tests (pytest)" "$RC2" "$S2" "$T2"
fi

run_step 3 "dense row (Llama 1B)" "$(cap 75)" "$LOG" "$PY" scripts/bench_collect.py "${TINY[@]}" --models llama1b \
  "${DENSE[@]}" --baselines plain,hooks --no-memory --section gpu-dense "${PEAK_ARG[@]}" --out "$OUT/benchmarks.md" \
  "${R[@]}"
run_step 4a "MoE row (OLMoE, 4 layers)" "$(cap 75)" "$LOG" "$PY" scripts/bench_collect.py "${TINY[@]}" \
  --models olmoe4 "${MOE[@]}" --baselines plain --no-forward --no-memory --section gpu-moe-olmoe "${PEAK_ARG[@]}" \
  --out "$OUT/benchmarks.md" "${R[@]}"
run_step 4b "MoE row (Mixtral, 4 layers)" "$(cap 70)" "$LOG" "$PY" scripts/bench_collect.py "${TINY[@]}" \
  --models mixtral4 "${MOE_MIX[@]}" --baselines plain --no-forward --no-memory --section gpu-moe-mixtral \
  "${PEAK_ARG[@]}" --out "$OUT/benchmarks.md" "${R[@]}"
run_step 5 "first result, cold vs warm" "$(cap 80)" "$LOG" "$PY" scripts/bench_startup.py "${TINY[@]}" \
  --models llama1b --repeats 1 --no-off "${START_ARGS[@]}" --child-timeout 45 --doc "$OUT/benchmarks.md" "${R[@]}"
run_step 7 "training step (Llama 1B)" "$(cap 60)" "$LOG" "$PY" scripts/bench_train.py --shape llama1b "${TINY[@]}" \
  "${TRAIN_ARGS[@]}" --no-finetune "${PEAK_ARG[@]}" --out "$OUT/benchmarks.md" "${R[@]}"
run_step 8 "precision (f32 vs bf16 sets)" "$(cap 60)" "$LOG" "$PY" scripts/bench_precision.py --shapes llama1b,olmoe4 \
  "${TINY[@]}" "${PREC_ARGS[@]}" --out "$OUT/benchmarks.md" "${R[@]}"

echo
"${REPORT[@]}" summary "$OUT"
echo
echo "gpu_check: $(($(date +%s) - START)) s; copy $OUT/benchmarks.md over docs/benchmarks.md to keep these tables"
