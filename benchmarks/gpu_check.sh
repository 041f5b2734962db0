#!/usr/bin/env bash
# One GPU visit (see GPU.md and benchmarks/README.md), in order of value:
#
#   MINC_KERNELS_GIT_COMMIT=<sha> benchmarks/gpu_check.sh OUT_DIR
#
# 1. setup:    setuptools >= what pyproject.toml's [build-system] needs (else the build
#              would fail: say so, and go on without the extension)
# 2. build:    pip install --no-build-isolation --no-deps -e .  (CUDA extension, sm_90)
# 3. info:     python -m minc_kernels.info
# 4. gputests: pytest -m gpu on the ops and extension tests, FIRST (an empty Triton cache
#              makes each specialisation a 1-2 s compile: the whole suite would not get here)
# 5. sync:     one training step per loss under torch.cuda.set_sync_debug_mode("error")
#              (benchmarks/sync_check.py)
# 6. bench:    the benchmark runner, with what is left as its --time-budget
# 7. rest:     pytest -m "not slow and not gpu" on the rest, only if time is left
# then a summary, last.
#
# Needs no network.  Everything fits in TOTAL_S seconds (default 540, inside a 10-minute
# call): each step has a timeout, and every step writes its output under OUT_DIR as it goes
# (steps.txt gets one line per finished step), so a run cut short keeps what it got.
# Knobs (environment): STEPS (default setup,build,info,gputests,sync,bench,rest), TOTAL_S,
# BUILD_TIMEOUT_S, GPU_TEST_TIMEOUT_S, SYNC_TIMEOUT_S, BENCH_ARGS (extra runner
# arguments), SYNC_ARGS, PYTHON, PYPROJECT (the file the setup step reads; tests).
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
TOTAL_S=${TOTAL_S:-540}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-200}
GPU_TEST_TIMEOUT_S=${GPU_TEST_TIMEOUT_S:-150}
SYNC_TIMEOUT_S=${SYNC_TIMEOUT_S:-90}
STEPS=${STEPS:-setup,build,info,gputests,sync,bench,rest}
# "tests" (the step name before the split into GPU tests first and the rest last)
case ",$STEPS," in *",tests,"*) STEPS="$STEPS,gputests,rest" ;; esac
START=$(date +%s)
STATUS="$OUT/steps.txt"
: > "$STATUS"

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
record() { printf '%-10s rc=%-4s %5ss  %s\n' "$1" "$2" "$(elapsed)" "${3:-}" >> "$STATUS"; }

step "machine"
{ date -u; nvidia-smi 2>&1 | head -20; "$PY" --version; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

SETUP_OK=1
if want setup; then
  step "setup: setuptools against pyproject.toml [build-system]"
  "$PY" - > "$OUT/setup.txt" 2>&1 <<'EOF'
import re, sys
from importlib.metadata import version, PackageNotFoundError
import os
text = open(os.environ.get("PYPROJECT", "pyproject.toml")).read()
block = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
m = re.search(r'"setuptools\s*>=\s*([0-9][0-9.]*)"', block)
need = m.group(1) if m else "0"
try:
    have = version("setuptools")
except PackageNotFoundError:
    have = "none"
def key(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3]) if v != "none" else (-1,)
ok = have != "none" and key(have) >= key(need)
print(f"setuptools {have}, pyproject needs >= {need}: {'ok' if ok else 'TOO OLD: the build will fail'}")
sys.exit(0 if ok else 1)
EOF
  rc=$?; cat "$OUT/setup.txt"; record setup $rc "$(tail -1 "$OUT/setup.txt")"
  [ "$rc" = 0 ] || SETUP_OK=0
fi

if want build; then
  if [ "$SETUP_OK" = 1 ]; then
    step "build + install (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, timeout ${BUILD_TIMEOUT_S}s)"
    timeout "$BUILD_TIMEOUT_S" "$PY" -m pip install --no-build-isolation --no-deps -q -e . \
      > "$OUT/build.log" 2>&1
    rc=$?; tail -5 "$OUT/build.log"; record build $rc "log: build.log"
  else
    record build skip "setuptools too old (setup.txt): running from the source tree, no extension"
  fi
fi

if want info; then
  step "minc_kernels.info"
  timeout 120 "$PY" -m minc_kernels.info > "$OUT/info.txt" 2>&1
  rc=$?; cat "$OUT/info.txt"; record info "$rc" "info.txt"
fi

if want gputests; then
  FILES=""
  for f in tests/test_ops_minc.py tests/test_ops_spectral.py tests/test_ops_mio.py \
           tests/test_ema_ext.py tests/test_ema.py tests/test_losses.py tests/test_functional.py; do
    [ -f "$f" ] && FILES="$FILES $f"
  done
  step "GPU tests first: pytest -m gpu$FILES (timeout ${GPU_TEST_TIMEOUT_S}s)"
  # SIGINT: pytest stops like on Ctrl-C and still prints its summary.
  # shellcheck disable=SC2086
  timeout --signal=INT --kill-after=20 "$GPU_TEST_TIMEOUT_S" "$PY" -m pytest -q -m gpu \
    -p no:cacheprovider -rfEs --durations=10 $FILES > "$OUT/pytest_gpu.txt" 2>&1
  rc=$?; tail -15 "$OUT/pytest_gpu.txt"
  record gputests $rc "$(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/pytest_gpu.txt" | tail -1)"
fi

if want sync; then
  step "sync check: one training step per loss under set_sync_debug_mode('error')"
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$SYNC_TIMEOUT_S" "$PY" -m benchmarks.sync_check --out "$OUT" \
    ${SYNC_ARGS:-} > "$OUT/sync_check.txt" 2>&1
  rc=$?; cat "$OUT/sync_check.txt"; record sync $rc "$(tail -1 "$OUT/sync_check.txt")"
fi

if want bench; then
  LEFT=$(left)
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

if want rest; then
  LEFT=$(( $(left) - 20 ))
  if [ "$LEFT" -ge 60 ]; then
    step "the other tests: pytest -m 'not slow and not gpu' (timeout ${LEFT}s)"
    timeout --signal=INT --kill-after=15 "$LEFT" "$PY" -m pytest -q -m "not slow and not gpu" \
      -p no:cacheprovider --durations=10 tests > "$OUT/pytest_rest.txt" 2>&1
    rc=$?; tail -5 "$OUT/pytest_rest.txt"
    record rest $rc "$(grep -E '(passed|failed|error)' "$OUT/pytest_rest.txt" | tail -1)"
  else
    record rest skip "no time left (${LEFT}s)"
  fi
fi

step "summary"
cat "$STATUS"
if want bench && [ -f "$OUT/results.json" ]; then
  "$PY" -m benchmarks.report "$OUT" --summary-only 2>&1 | tee "$OUT/summary.txt"
fi
echo "=== done in $(elapsed) s; files in $OUT"
