#!/usr/bin/env bash
# One GPU visit (see /work/shared/GPU.md and benchmarks/README.md):
#
#   MINC_KERNELS_GIT_COMMIT=<sha> benchmarks/gpu_check.sh OUT_DIR
#
# 1. build + install the package against the torch there (CUDA extension for sm_90),
# 2. python -m minc_kernels.info, 3. the "not slow" tests (now with CUDA),
# 4. the benchmark runner over the full grid, writing results.json / results.md / plots
#    into OUT_DIR as it goes, 5. a summary, last.
#
# Needs no network.  Everything is fitted into TOTAL_S seconds (default 510, for a
# 10-minute limit): each step has a timeout, the benchmark gets what is left as its
# --time-budget (cases not started by then are recorded as skipped, the most important
# ones run first), and results.json is rewritten during the run, so a kill keeps results.
# Knobs (environment): STEPS (default build,info,tests,bench; e.g. two visits' calls
# STEPS=build,info,tests then STEPS=build,bench give the benchmark a whole call), TOTAL_S,
# BUILD_TIMEOUT_S, TEST_TIMEOUT_S, BENCH_ARGS (extra runner arguments), PYTHON.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_S=${TOTAL_S:-510}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-200}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-150}
STEPS=${STEPS:-build,info,tests,bench}
START=$(date +%s)
STATUS="$OUT/steps.txt"
: > "$STATUS"

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
record() { printf '%-10s rc=%-4s %5ss  %s\n' "$1" "$2" "$(elapsed)" "${3:-}" >> "$STATUS"; }

step "machine"
{ date -u; nvidia-smi 2>&1 | head -20; "$PY" --version; } | tee "$OUT/machine.txt"

if want build; then
  step "build + install (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, timeout ${BUILD_TIMEOUT_S}s)"
  timeout "$BUILD_TIMEOUT_S" "$PY" -m pip install --no-build-isolation --no-deps -q -e . \
    > "$OUT/build.log" 2>&1
  rc=$?; tail -5 "$OUT/build.log"; record build $rc "log: build.log"
fi

if want info; then
  step "minc_kernels.info"
  timeout 120 "$PY" -m minc_kernels.info 2>&1 | tee "$OUT/info.txt"
  record info "${PIPESTATUS[0]}" "info.txt"
fi

if want tests; then
  step "tests: pytest -m 'not slow' (timeout ${TEST_TIMEOUT_S}s)"
  # SIGINT: pytest stops like on Ctrl-C and still prints its summary.
  timeout --signal=INT --kill-after=20 "$TEST_TIMEOUT_S" "$PY" -m pytest -q -m "not slow" \
    -p no:cacheprovider --durations=15 tests > "$OUT/pytest.txt" 2>&1
  rc=$?; tail -15 "$OUT/pytest.txt"
  record tests $rc "$(grep -E '(passed|failed|error)' "$OUT/pytest.txt" | tail -1)"
fi

if want bench; then
  LEFT=$(( TOTAL_S - $(elapsed) ))
  BUDGET=$(( LEFT - 75 ))   # compile/OOM cases in flight, then tables and plots
  if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
  HARD=$(( LEFT - 15 ))
  if [ "$HARD" -lt 90 ]; then HARD=90; fi
  step "benchmarks: python -m benchmarks.run --out $OUT --time-budget $BUDGET (hard limit ${HARD}s)"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=15 "$HARD" "$PY" -m benchmarks.run --out "$OUT" \
    --time-budget "$BUDGET" --no-progress ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  rc=$?; record bench $rc "bench.log, results.json"
  if [ "$rc" != 0 ] && [ -f "$OUT/results.json" ]; then
    # Killed before it wrote the tables: rebuild them from what results.json holds.
    timeout 60 "$PY" -m benchmarks.report "$OUT" --quiet >> "$OUT/bench.log" 2>&1
  fi
fi

step "summary"
cat "$STATUS"
if want bench && [ -f "$OUT/results.json" ]; then
  "$PY" -m benchmarks.report "$OUT" --summary-only 2>&1 | tee "$OUT/summary.txt"
fi
echo "=== done in $(elapsed) s; files in $OUT"
