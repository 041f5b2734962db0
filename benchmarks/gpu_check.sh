#!/usr/bin/env bash
# One GPU visit (see GPU.md and benchmarks/README.md), in order of value:
#
#   MINC_KERNELS_GIT_COMMIT=<sha> benchmarks/gpu_check.sh OUT_DIR
#
# 1. setup:    setuptools >= what pyproject.toml's [build-system] needs (else the build
#              would fail: say so, and go on without the extension)
# 2. build:    pip install --no-build-isolation --no-deps -e .  (CUDA extension, sm_90); pip's
#              output is kept whole in build.log (no -q: a failed build once hid behind it)
#    app:      pip install --no-build-isolation --no-deps -e examples (the application, for
#              the train step; its dependencies must already be installed)
# 3. ext:      import minc_kernels._C and check it loads against this torch and has CUDA
#              kernels when a GPU is present.  A failure is LOUD: printed as a banner, first
#              line of summary.txt, and the script's exit code is 1
# 4. info:     python -m minc_kernels.info
# 5. gputests: pytest -m gpu, one pytest process per test file holding GPU tests (ops and
#              extension files first), each with its own timeout and exit code in steps.txt,
#              so a crash (a segfault kills its process) costs only its own file
# 6. sync:     one training step per loss under torch.cuda.set_sync_debug_mode("error")
#              (benchmarks/sync_check.py)
# 7. calibrate: python -m benchmarks.calibrate (CALIBRATE_S, default 150 s): the speed
#              choices of `auto` measured on this GPU (Gram layer Triton vs cuBLAS per
#              launcher, pairwise vs gram per loss), bf16, B 256-8192 x k 128-8192; writes
#              calibration/table.json (commit it as minc_kernels/tables/<family>.json) and
#              calibration/calibration.md.  The later steps run with that table
#              (MINC_KERNELS_TABLE), so the benchmarks measure the calibrated auto
# 8. bench:    the benchmark runner, with what is left (minus TRAIN_RESERVE_S) as its
#              --time-budget
# 9. train:    the ResNet-50 training step, eager vs minc_kernels, all three losses
#              (python -m minc_train.bench_step from the installed examples/ application)
#    gramab:   opt-in: MINC_KERNELS_GRAM=triton vs =cublas, minc_kernels fwd+bwd, the same
#              cases (GRAMAB_ARGS, default B 1024/4096/8192 x k 512/2048/8192), half of
#              GRAMAB_S (default 200 s) or of the time left each; gram_ab.md side by side
#    splitab:  opt-in, the same for MINC_KERNELS_ROWMAT_SPLIT=never vs =always (bf16 rowmat:
#              G's pieces per program or split once; SPLITAB_ARGS, default MINC and spectral
#              bf16, B 2048/8192 x k 512/2048/8192; SPLITAB_S, default 120 s); split_ab.md
#    wideab:   opt-in, the same for MINC_KERNELS_GRAM=triton vs =triton_wide (rowmat's wide
#              tiles on the rounded Grams; WIDEAB_ARGS, default spectral and Barlow Twins
#              bf16, B 4096/8192 x k 512/2048/8192; WIDEAB_S, default 120 s); wide_ab.md
#    orderab:  opt-in, the same for MINC_KERNELS_TILE_ORDER=launch vs =grouped (the Gram
#              kernels' tile order; ORDERAB_ARGS, default spectral, MINC and Barlow Twins bf16,
#              B 4096/8192 x k 2048/8192; ORDERAB_S, default 120 s); order_ab.md
# 10. rest:    pytest -m "not slow and not gpu" on the rest, only if time is left
# then a summary, last, and (PACK=1, the default) everything packed into a few files:
#   OUT_DIR/gpu_check.tar.gz (every file the steps wrote), OUT_DIR/summary.txt,
#   OUT_DIR/steps.txt, OUT_DIR/results.md, OUT_DIR/calibration/{table.json,calibration.md}
#   (a device run returns at most 8 files).
#
# Needs no network.  Everything fits in TOTAL_S seconds (default 540, inside a 10-minute
# call): each step has a timeout, and every step writes its output under OUT_DIR as it goes
# (steps.txt gets one line per finished step, one per GPU test file), so a run cut short
# keeps what it got.  Exit code: 0 if every step that ran passed, 1 otherwise (the failed
# steps are listed last).
# Knobs (environment): STEPS (default
# setup,build,app,ext,info,gputests,sync,calibrate,bench,train,rest), TOTAL_S, BUILD_TIMEOUT_S, GPU_TEST_TIMEOUT_S (all GPU test files together),
# GPU_FILE_TIMEOUT_S (one file), GPU_TEST_FILES (override the discovered list),
# SYNC_TIMEOUT_S, CALIBRATE_S, CALIBRATE_ARGS, TRAIN_TIMEOUT_S, TRAIN_RESERVE_S, TRAIN_ARGS (default: ResNet-50 defaults of the app,
# --steps 10 --warmup 3), GRAMAB_S, GRAMAB_ARGS, SPLITAB_S, SPLITAB_ARGS, WIDEAB_S, WIDEAB_ARGS,
# ORDERAB_S, ORDERAB_ARGS, BENCH_ARGS (extra runner arguments),
# SYNC_ARGS, PACK (1/0),
# PYTHON, PYPROJECT (the file the setup step reads; tests).
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
GPU_FILE_TIMEOUT_S=${GPU_FILE_TIMEOUT_S:-90}
SYNC_TIMEOUT_S=${SYNC_TIMEOUT_S:-90}
TRAIN_TIMEOUT_S=${TRAIN_TIMEOUT_S:-120}
TRAIN_RESERVE_S=${TRAIN_RESERVE_S:-70}
CALIBRATE_S=${CALIBRATE_S:-150}
PACK=${PACK:-1}
STEPS=${STEPS:-setup,build,app,ext,info,gputests,sync,calibrate,bench,train,rest}
# "tests" (the step name before the split into GPU tests first and the rest last)
case ",$STEPS," in *",tests,"*) STEPS="$STEPS,gputests,rest" ;; esac
START=$(date +%s)
STATUS="$OUT/steps.txt"
: > "$STATUS"
FAILED=""

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
# capped N RESERVE: N seconds, or what is left less RESERVE if that is smaller
capped() { local c=$(( $(left) - $2 )); [ "$1" -lt "$c" ] && c=$1; echo "$c"; }
# record NAME RC NOTE: one line in steps.txt; a non-zero, non-skip rc is a failed step.
record() {
  printf '%-10s rc=%-4s %5ss  %s\n' "$1" "$2" "$(elapsed)" "${3:-}" >> "$STATUS"
  case "$2" in 0|skip) ;; *) FAILED="$FAILED $1" ;; esac
}
signame() {  # 139 -> " (SIGSEGV)": a crash, not a test failure
  case "$1" in 124) echo " (timeout)" ;; 134) echo " (SIGABRT)" ;; 137) echo " (SIGKILL)" ;;
    139) echo " (SIGSEGV)" ;; *) echo "" ;; esac
}
crashnote() { local s; s=$(signame "$1"); [ -n "$s" ] && echo "${s# } "; }

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
    # No -q: a failed extension build must leave its compiler errors in build.log.
    timeout "$BUILD_TIMEOUT_S" "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
      > "$OUT/build.log" 2>&1
    rc=$?; tail -5 "$OUT/build.log"; record build $rc "log: build.log ($(wc -l < "$OUT/build.log") lines)"
  else
    record build skip "setuptools too old (setup.txt): running from the source tree, no extension"
  fi
fi

if want app; then
  step "install the application (examples/, for the train step)"
  timeout 120 "$PY" -m pip install --no-build-isolation --no-deps -v -e examples \
    > "$OUT/app_build.log" 2>&1
  rc=$?; tail -2 "$OUT/app_build.log"; record app $rc "pip install -e examples (app_build.log)"
fi

EXT_OK=unknown
if want ext; then
  step "extension: import minc_kernels._C"
  "$PY" - > "$OUT/ext.txt" 2>&1 <<'EOF'
import sys
import torch
try:
    import minc_kernels._C  # noqa: F401  (the compiled extension, built by setup.py)
except Exception as exc:  # noqa: BLE001
    print(f"EXTENSION NOT BUILT: import minc_kernels._C failed: {type(exc).__name__}: {exc}")
    sys.exit(3)
from minc_kernels import _ext
ok, why = _ext.status()
info = _ext.build_info()
print(f"import minc_kernels._C: ok; status: {why}; build_info: {info}")
if not ok:
    print(f"EXTENSION NOT USABLE: {why}")
    sys.exit(3)
if torch.cuda.is_available() and not _ext.supports(torch.device("cuda")):
    print("EXTENSION BUILT WITHOUT CUDA KERNELS on a machine with a GPU "
          f"(cuda_compiled={info.get('cuda_compiled')}): see build.log")
    sys.exit(4)
print("extension ok" + (" (CUDA kernels)" if torch.cuda.is_available() else " (no GPU here)"))
EOF
  rc=$?; cat "$OUT/ext.txt"
  if [ "$rc" = 0 ]; then
    EXT_OK=yes
  else
    EXT_OK=no
    echo "!!!!!!!! THE EXTENSION DID NOT BUILD OR LOAD: $(tail -1 "$OUT/ext.txt")"
    echo "!!!!!!!! (build.log has pip's whole output)"
  fi
  record ext $rc "$(tail -1 "$OUT/ext.txt")"
fi

if want info; then
  step "minc_kernels.info"
  timeout 120 "$PY" -m minc_kernels.info > "$OUT/info.txt" 2>&1
  rc=$?; cat "$OUT/info.txt"; record info "$rc" "info.txt"
fi

if want gputests; then
  if [ -n "${GPU_TEST_FILES:-}" ]; then
    FILES=$GPU_TEST_FILES
  else
    # Every test file that holds GPU tests: ops and extension files first.
    # Every test file whose code (not a string in it) says mark.gpu: ops and extension
    # files first.
    FILES=$("$PY" - <<'EOF'
import glob, io, tokenize
first = sorted(glob.glob("tests/test_ops_*.py")) + glob.glob("tests/test_ema_ext.py")
for f in dict.fromkeys(first + sorted(glob.glob("tests/test_*.py"))):
    toks = [t.string for t in tokenize.generate_tokens(io.StringIO(open(f).read()).readline)
            if t.type in (tokenize.NAME, tokenize.OP)]
    if any(toks[i:i + 3] == ["mark", ".", "gpu"] for i in range(len(toks) - 2)):
        print(f)
EOF
)
  fi
  step "GPU tests first: pytest -m gpu, one process per file (${GPU_TEST_TIMEOUT_S}s in all)"
  : > "$OUT/pytest_gpu.txt"
  GPU_END=$(( $(elapsed) + GPU_TEST_TIMEOUT_S ))
  for f in $FILES; do
    name=$(basename "$f" .py)
    budget=$(( GPU_END - $(elapsed) ))
    [ "$budget" -gt "$GPU_FILE_TIMEOUT_S" ] && budget=$GPU_FILE_TIMEOUT_S
    if [ "$budget" -lt 10 ]; then
      record "gpu:$name" skip "no time left in GPU_TEST_TIMEOUT_S"
      continue
    fi
    echo "----- $f (timeout ${budget}s)" | tee -a "$OUT/pytest_gpu.txt"
    # SIGINT: pytest stops like on Ctrl-C and still prints its summary.
    timeout --signal=INT --kill-after=15 "$budget" "$PY" -m pytest -q -m gpu \
      -p no:cacheprovider -rfEs --durations=5 "$f" > "$OUT/pytest_gpu.cur" 2>&1
    rc=$?
    [ "$rc" = 5 ] && rc=0  # no GPU test collected in this file (pytest's "no tests ran")
    line=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/pytest_gpu.cur" | tail -1)
    cat "$OUT/pytest_gpu.cur" >> "$OUT/pytest_gpu.txt" && rm -f "$OUT/pytest_gpu.cur"
    echo "----- $f: rc=$rc$(signame "$rc")" >> "$OUT/pytest_gpu.txt"
    record "gpu:$name" "$rc" "$(crashnote "$rc")${line:0:120}"
  done
  grep -E '^----- .*: rc=' "$OUT/pytest_gpu.txt"
fi

if want sync; then
  step "sync check: one training step per loss under set_sync_debug_mode('error')"
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$SYNC_TIMEOUT_S" "$PY" -m benchmarks.sync_check --out "$OUT" \
    ${SYNC_ARGS:-} > "$OUT/sync_check.txt" 2>&1
  rc=$?; cat "$OUT/sync_check.txt"; record sync $rc "$(tail -1 "$OUT/sync_check.txt")"
fi

if want calibrate; then
  CAL=$(capped "$CALIBRATE_S" 60)
  if [ "$CAL" -lt 30 ]; then
    record calibrate skip "no time left"
  else
    step "calibrate: python -m benchmarks.calibrate (budget ${CAL}s)"
    # shellcheck disable=SC2086
    timeout --signal=TERM --kill-after=15 $(( CAL + 30 )) "$PY" -m benchmarks.calibrate \
      --out "$OUT/calibration" --time-budget "$CAL" ${CALIBRATE_ARGS:-} \
      > "$OUT/calibrate.log" 2>&1
    rc=$?; tail -3 "$OUT/calibrate.log"
    NOTE="no table written"
    if [ -f "$OUT/calibration/table.json" ]; then
      # what was measured decides from here on (the benchmarks measure the calibrated auto)
      export MINC_KERNELS_TABLE="$OUT/calibration/table.json"
      NOTE="calibration/table.json (MINC_KERNELS_TABLE set for the later steps), calibration.md"
    fi
    record calibrate "$rc" "$(crashnote "$rc")$NOTE; calibrate.log"
  fi
fi

# env_ab NAME PREFIX VAR A B SECONDS ARGS: an opt-in A/B of one environment switch read per
# call: the runner with VAR=A, then VAR=B, on the same cases (ARGS), minc_kernels fwd+bwd
# only, half of SECONDS (or of the time left) each; then PREFIX_ab.md side by side
# (benchmarks.report --ab), the runs in PREFIX-A/ and PREFIX-B/.
env_ab() {
  local name=$1 prefix=$2 var=$3 a=$4 b=$5 secs=$6 args=$7 half cap rc rc_all=0 v
  half=$(( ($(left) - 60) / 2 ))
  cap=$(( secs / 2 ))
  [ "$half" -gt "$cap" ] && half=$cap
  if [ "$half" -lt 30 ]; then
    record "$name" skip "no time left"
    return
  fi
  for v in "$a" "$b"; do
    step "$name: $var=$v python -m benchmarks.run (budget ${half}s)"
    # shellcheck disable=SC2086
    env "$var=$v" timeout --signal=TERM --kill-after=15 $(( half + 30 )) \
      "$PY" -m benchmarks.run --out "$OUT/$prefix-$v" --providers minc_kernels \
      --modes fwd+bwd --ema off --memory-case off --no-plots --no-progress \
      --time-budget "$half" $args > "$OUT/$prefix-$v.log" 2>&1
    rc=$?; [ "$rc" = 0 ] || rc_all=$rc
  done
  if [ -f "$OUT/$prefix-$a/results.json" ] && [ -f "$OUT/$prefix-$b/results.json" ]; then
    "$PY" -m benchmarks.report --ab "$OUT/$prefix-$a" "$OUT/$prefix-$b" \
      --labels "$a,$b" --out "$OUT/${prefix}_ab.md" > /dev/null 2>&1 || rc_all=1
    sed -n 1,20p "$OUT/${prefix}_ab.md"
  fi
  record "$name" "$rc_all" "${prefix}_ab.md, $prefix-$a/, $prefix-$b/"
}

# Opt-in (STEPS=...,gramab): the Gram layer's Triton kernels against its cuBLAS candidate
# (MINC_KERNELS_GRAM).
if want gramab; then
  env_ab gramab gram MINC_KERNELS_GRAM triton cublas "${GRAMAB_S:-200}" \
    "${GRAMAB_ARGS:---B 1024,4096,8192 --k 512,2048,8192}"
fi
# Opt-in (STEPS=...,splitab): bf16 rowmat with G's pieces formed in every program's loop
# (MINC_KERNELS_ROWMAT_SPLIT=never) against split once beforehand (=always), on the shapes
# where the size rule (ops.configs.rowmat_presplit) would split.
if want splitab; then
  env_ab splitab split MINC_KERNELS_ROWMAT_SPLIT never always "${SPLITAB_S:-120}" \
    "${SPLITAB_ARGS:---losses minc,spectral --dtype bf16 --B 2048,8192 --k 512,2048,8192}"
fi
# Opt-in (STEPS=...,wideab): rowmat on the rounded Grams with the default tiles
# (MINC_KERNELS_GRAM=triton) against the wide ones (=triton_wide), the bf16 k×k gradient
# paths (spectral, Barlow Twins) where auto runs them.
if want wideab; then
  env_ab wideab wide MINC_KERNELS_GRAM triton triton_wide "${WIDEAB_S:-120}" \
    "${WIDEAB_ARGS:---losses spectral,barlow_twins --dtype bf16 --B 4096,8192 --k 512,2048,8192}"
fi
# Opt-in (STEPS=...,orderab): the Gram kernels' tiles in launch order against the grouped
# order (the default; benchmarks/tile_order.py predicts less HBM traffic at k = 8192, B >= 4096).
if want orderab; then
  env_ab orderab order MINC_KERNELS_TILE_ORDER launch grouped "${ORDERAB_S:-120}" \
    "${ORDERAB_ARGS:---losses spectral,minc,barlow_twins --dtype bf16 --B 4096,8192 --k 2048,8192}"
fi

if want bench; then
  LEFT=$(left)
  want train && LEFT=$(( LEFT - TRAIN_RESERVE_S ))
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

if want train; then
  TT=$(capped "$TRAIN_TIMEOUT_S" 10)
  if [ "$TT" -lt 40 ]; then
    record train skip "no time left"
  else
    step "train step: python -m minc_train.bench_step (timeout ${TT}s)"
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=15 "$TT" "$PY" -m minc_train.bench_step \
      --out "$OUT" ${TRAIN_ARGS:---steps 10 --warmup 3} > "$OUT/train_step.txt" 2>&1
    rc=$?; tail -12 "$OUT/train_step.txt"
    record train "$rc" "$(crashnote "$rc")train_step.json, train_step.txt"
  fi
fi

if want rest; then
  LEFT=$(( $(left) - 20 ))
  if [ "$LEFT" -ge 60 ]; then
    step "the other tests: pytest -m 'not slow and not gpu' (timeout ${LEFT}s)"
    timeout --signal=INT --kill-after=15 "$LEFT" "$PY" -m pytest -q -m "not slow and not gpu" \
      -p no:cacheprovider --durations=10 tests > "$OUT/pytest_rest.txt" 2>&1
    rc=$?; tail -5 "$OUT/pytest_rest.txt"
    record rest $rc "$(crashnote "$rc")$(grep -E '(passed|failed|error)' "$OUT/pytest_rest.txt" | tail -1)"
  else
    record rest skip "no time left (${LEFT}s)"
  fi
fi

step "summary"
{
  if [ "$EXT_OK" = no ]; then
    echo "!!!!!!!! THE EXTENSION DID NOT BUILD OR LOAD: $(tail -1 "$OUT/ext.txt") (ext.txt, build.log)"
  fi
  echo "gpu_check: commit ${MINC_KERNELS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s"
  echo "failed steps:${FAILED:- none}"
  echo
  cat "$STATUS"
  if [ -f "$OUT/train_step.json" ]; then
    echo
    "$PY" - "$OUT/train_step.json" <<'EOF' 2>&1
import json, sys
d = json.load(open(sys.argv[1]))
print("train step:", d["meta"].get("device"), json.dumps(d["meta"].get("config")))
for method, r in d["results"].items():
    cells = [f"{p} {v['step_ms']:.1f} ms (loss {v['loss_fwd_bwd_ms']:.2f}, ema {v['ema_ms']:.2f}; "
             f"ema backend {v.get('ema_backend')})" for p, v in r.items() if isinstance(v, dict)]
    print(f"  {method}: " + "; ".join(cells) + f"; step speed-up {r.get('step_speedup', float('nan')):.3f}x")
EOF
  fi
  if [ -f "$OUT/calibration/calibration.md" ]; then
    echo
    echo "calibration (calibration/calibration.md):"
    grep -E '^## |differ from the choice' "$OUT/calibration/calibration.md"
  fi
  if want bench && [ -f "$OUT/results.json" ]; then
    echo
    "$PY" -m benchmarks.report "$OUT" --summary-only 2>&1
  fi
} > "$OUT/summary.txt.tmp"
mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
cat "$OUT/summary.txt"

if [ "$PACK" = 1 ]; then
  # A device run returns at most 8 files: one archive of everything, plus the summary, the
  # steps and the tables loose for a first look.
  LIST=$(mktemp)
  ( cd "$OUT" && find . -type f ! -name gpu_check.tar.gz | sort > "$LIST" \
      && tar -czf gpu_check.tar.gz -T "$LIST" \
      && while read -r f; do
           case "$f" in
             ./summary.txt|./steps.txt|./results.md|./calibration/table.json|./calibration/calibration.md) ;;
             *) rm -f "$f" ;;
           esac
         done < "$LIST"
    find . -mindepth 1 -type d -empty -delete )
  rm -f "$LIST"
  echo "packed: $OUT/gpu_check.tar.gz ($(du -h "$OUT/gpu_check.tar.gz" | cut -f1)); loose: $(cd "$OUT" && ls | tr '\n' ' ')"
fi
echo "=== done in $(elapsed) s; files in $OUT; failed steps:${FAILED:- none}"
[ -z "$FAILED" ]
