#!/usr/bin/env bash
# The one prepared run for a GPU machine: preflight, build, a smoke run per recurrence regime, the
# CUDA tests, compute-sanitizer on every kernel path, the benchmark against cuDNN. Needs no network.
#
#   bash tools/gpu/gpu_check.sh             # the run (from any folder; it works in the repo root)
#   bash tools/gpu/gpu_check.sh --dry-run   # the stages, commands and timeouts; runs nothing
#   GPU_CHECK_BUDGET_S=150 bash tools/gpu/gpu_check.sh --only build,tests_rest   # a shorter rerun
#
# On a lent GPU machine: this one command, with build-gpu/ carried along and a 480 s limit.
#
# Time: the whole run stays within GPU_CHECK_BUDGET_S (default 420 s, at most 480), so that a
# machine lent for 15 minutes, start-up included, has room for a second, shorter run. Each stage
# runs under `timeout --kill-after` for min(its cap, what is left of the budget, 15 s kept for the
# record), and is skipped when less than its minimum is left. Stages come in order of value; a
# failed or timed-out stage does not stop the later ones, except that a failed build or a missing
# GPU skips everything that needs them, and a regime whose smoke run hung is left out of the tests
# and sanitizer runs that follow (they would hang on it too).
#
# Outputs, in $OUT (the folder that comes back from the machine, at most 8 files; a temporary
# folder when unset), written as the run goes:
#   gpu_check.log          every stage's output, appended while the stage runs
#   stages.tsv             stage, status, rc, seconds, limit, note; rewritten after every stage
#   <stamp>-<gpu>.json     the record (tools/gpu/gpu_report.py): stage statuses, versions, device
#                          properties, test counts, smoke, sanitizer and benchmark results, ptxas
#                          report, csrc_sha256; rewritten after every stage, also kept in
#                          benchmarks/results/
#   junit-test_cuda.xml, junit-tests_rest.xml, ptxas.txt
#   rnn_ext_C-<key>.so     the built extension; a rerun on a fresh machine reuses it when copied
#                          into build-gpu/prebuilt/ (the key covers csrc/ and setup.py)
#
# expecttest (torch.library.opcheck needs it; the GPU machine lacks it): carried as a wheel.
# `bash tools/gpu/fetch_gpu_wheels.sh` once, here, puts it in build-gpu/wheels/ (ignored by git,
# named in carry); the run pip-installs it --no-index into a temporary folder on PYTHONPATH.
# Without it the opcheck tests skip and the run goes on.
set -uo pipefail
START="$(date +%s)"  # the budget counts from here: set-up time is the run's too
cd "$(dirname "$0")/../.." || exit 1
ROOT="$PWD"
SELF="$ROOT/tools/gpu/gpu_check.sh"
PY="${PYTHON:-python3}"

DRY_RUN=0
ONLY=""
STEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --step) STEP="${2:-}"; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

MAX_BUDGET=480
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "gpu_check: GPU_CHECK_BUDGET_S must be a number of seconds, got '$BUDGET'" >&2
  exit 2
fi
if ((BUDGET > MAX_BUDGET)); then
  echo "gpu_check: GPU_CHECK_BUDGET_S=$BUDGET is over $MAX_BUDGET s; using $MAX_BUDGET"
  BUDGET=$MAX_BUDGET
fi
KILL_AFTER=5  # seconds between timeout's TERM and its KILL
RESERVE=15    # kept for the last record and summary

# The stages in order of value, cheapest first where equal. CAP: the stage's timeout when the budget
# allows it; MIN: below this many seconds left the stage is skipped rather than started.
STAGES=(wheels preflight build smoke_single_block smoke_cooperative smoke_step_gemm test_cuda
  memcheck racecheck synccheck bench_float32 tests_rest bench_float16 bench_bfloat16)
declare -A CAP=([wheels]=20 [preflight]=30 [build]=150 [smoke_single_block]=30 [smoke_cooperative]=30
  [smoke_step_gemm]=30 [test_cuda]=150 [memcheck]=75 [racecheck]=75 [synccheck]=60 [bench_float32]=150
  [tests_rest]=150 [bench_float16]=60 [bench_bfloat16]=60)
declare -A MIN=([wheels]=5 [preflight]=10 [build]=60 [smoke_single_block]=15 [smoke_cooperative]=15
  [smoke_step_gemm]=15 [test_cuda]=30 [memcheck]=20 [racecheck]=20 [synccheck]=20 [bench_float32]=60
  [tests_rest]=45 [bench_float16]=30 [bench_bfloat16]=30)

# The benchmark grid: T=100, one layer, I=H. float32 on all of it; the half types on a corner.
GRID_FLOAT32=""
for batch in 1 16 64; do
  for hidden in 64 128 256 512 1024 2048; do GRID_FLOAT32+="100,$batch,$hidden,$hidden,1;"; done
done
GRID_HALF=""
for batch in 1 64; do
  for hidden in 128 512 2048; do GRID_HALF+="100,$batch,$hidden,$hidden,1;"; done
done
GRID_FLOAT32="${GRID_FLOAT32%;}"
GRID_HALF="${GRID_HALF%;}"

# shellcheck source=tools/gpu/cuda_env.sh
source "$ROOT/tools/gpu/cuda_env.sh"
HAVE_NVCC=1
cuda_env_setup "$PY" || HAVE_NVCC=0
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" RNN_EXT_CUDA=1 RNN_EXT_PTXAS_VERBOSE=1
# sm_90 machine code and compute_90 PTX (which newer GPUs compile at load), on two nvcc threads.
export RNN_EXT_CUDA_ARCH="${RNN_EXT_CUDA_ARCH:--gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90 --threads=2}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_MININTERVAL=5
WHEEL_SITE="/tmp/gpu_check_site"
export PYTHONPATH="$ROOT:$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"

# --step build (run by the build stage under its timeout): the carried prebuilt extension when its
# key matches, else a fresh build; then the op-kernel check, and a copy of the .so for a rerun.
if [ "$STEP" = build ]; then
  key="$("$PY" tools/gpu/gpu_report.py build-key)" || exit 1
  suffix="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" || exit 1
  prebuilt="build-gpu/prebuilt/rnn_ext_C-$key.so"
  if [ -f "$prebuilt" ]; then
    echo "build: reusing $prebuilt (built from these csrc/ and setup.py)"
    cp "$prebuilt" "rnn_ext/_C$suffix" || exit 1
  else
    echo "build: MAX_JOBS=$MAX_JOBS RNN_EXT_CUDA_ARCH='$RNN_EXT_CUDA_ARCH' CUDA_HOME=$CUDA_HOME"
    "$PY" setup.py build_ext --inplace || exit 1
  fi
  "$PY" tools/gpu/gpu_report.py ops || exit 1
  # Without its host debug information (-g makes it 24 MB, over the 16 MB a returned file may
  # have); the kernels' line information lives in the fatbinary and stays.
  copy="${OUT:-}/rnn_ext_C-$key.so"
  if [ -n "${OUT:-}" ] && strip --strip-debug -o "$copy" "rnn_ext/_C$suffix" &&
    [ "$(stat -c %s "$copy")" -gt $((16 * 1024 * 1024)) ]; then
    rm -f "$copy"
  fi
  exit 0
fi

XDIST_FEW=()
XDIST_MANY=()
if "$PY" -c 'import xdist' 2>/dev/null; then
  XDIST_FEW=(-n 4)
  XDIST_MANY=(-n 8)
fi
TIMEOUT_PLUGIN=0
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then TIMEOUT_PLUGIN=1; fi
SANITIZER_FILTER=(--kernel-name kns=rnn_ext)
if [ -n "${COMPUTE_SANITIZER:-}" ] && ((!DRY_RUN)); then
  sanitizer_help="$("$COMPUTE_SANITIZER" --help 2>&1 || true)"
  # An older compute-sanitizer: racecheck and synccheck see every kernel.
  if [[ "$sanitizer_help" != *--kernel-name* ]]; then SANITIZER_FILTER=(); fi
fi
HUNG_REGIMES=()

# pytest's arguments shared by the two test stages: a junit report, a per-test limit (pytest-timeout
# kills the test's process from a thread, which works even when the test is stuck in a CUDA call),
# a traceback dump before that, and no regime whose smoke run hung.
pytest_args() {
  local stage="$1" per_test="$2" select="$3" regime
  PYTEST=(-p no:cacheprovider -rfE --junitxml "$LOGS/junit-$stage.xml" -o "faulthandler_timeout=$((per_test * 2 / 3))")
  if ((TIMEOUT_PLUGIN)); then PYTEST+=(--timeout "$per_test" --timeout-method thread); fi
  for regime in ${HUNG_REGIMES[@]+"${HUNG_REGIMES[@]}"}; do select="${select:+$select and }not $regime"; done
  if [ -n "$select" ]; then PYTEST+=(-k "$select"); fi
}

sanitizer_args() {
  local skip
  skip="$(IFS=,; echo "${HUNG_REGIMES[*]:-}")"
  SANITIZE=("${COMPUTE_SANITIZER:-compute-sanitizer}" --tool "$1" --report-api-errors no --error-exitcode 1)
  # cuBLAS is not ours to race-check, and is slow under racecheck and synccheck.
  if [ "$1" != memcheck ]; then SANITIZE+=(${SANITIZER_FILTER[@]+"${SANITIZER_FILTER[@]}"}); fi
  SANITIZE+=("$PY" tools/gpu/sanitizer_cases.py)
  if [ -n "$skip" ]; then SANITIZE+=(--skip-regimes "$skip"); fi
}

# The command of a stage, into CMD.
stage_command() {
  local stage="$1"
  case "$stage" in
    wheels)
      CMD=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
        --target "$WHEEL_SITE" build-gpu/wheels/*.whl) ;;
    preflight) CMD=("$PY" tools/gpu/gpu_report.py probe --out "$LOGS/preflight.json") ;;
    build) CMD=(bash "$SELF" --step build) ;;
    smoke_*) CMD=("$PY" tools/gpu/gpu_smoke.py --regime "${stage#smoke_}") ;;
    test_cuda)
      pytest_args test_cuda 90 ""
      CMD=("$PY" -m pytest tests/test_cuda.py -v ${XDIST_FEW[@]+"${XDIST_FEW[@]}"} "${PYTEST[@]}") ;;
    tests_rest)
      # The CPU half of the suite ran in CI; here the cases parametrised on the cuda device.
      pytest_args tests_rest 120 "cuda"
      CMD=("$PY" -m pytest tests --ignore tests/test_cuda.py --ignore tools/gpu/tests/test_gpu_check.py -v
        ${XDIST_MANY[@]+"${XDIST_MANY[@]}"} "${PYTEST[@]}") ;;
    memcheck | racecheck | synccheck)
      sanitizer_args "$stage"
      CMD=("${SANITIZE[@]}") ;;
    bench_float32)
      CMD=("$PY" benchmarks/bench.py --device cuda --dtype float32 --rounds 3 --configs "$GRID_FLOAT32"
        --out "$LOGS/bench_float32.json") ;;
    bench_float16 | bench_bfloat16)
      CMD=("$PY" benchmarks/bench.py --device cuda --dtype "${stage#bench_}" --rounds 3 --configs "$GRID_HALF"
        --out "$LOGS/$stage.json") ;;
    *) echo "gpu_check: no stage '$stage'" >&2; return 1 ;;
  esac
}

in_list() { [[ ",$2," == *",$1,"* ]]; }

# A command as one could paste it into a shell: plain words bare, the others in single quotes.
quote_command() {
  local word words=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${words[*]}"
}

if [ -n "$ONLY" ]; then
  for stage in ${ONLY//,/ }; do
    if [ -z "${CAP[$stage]:-}" ]; then
      echo "gpu_check: --only: no stage '$stage' (stages: ${STAGES[*]})" >&2
      exit 2
    fi
  done
fi

if ((DRY_RUN)); then
  # shellcheck disable=SC2016  # the commands show where the logs would go
  LOGS='$LOGS'
  echo "gpu_check dry run: budget ${BUDGET} s (GPU_CHECK_BUDGET_S, at most ${MAX_BUDGET}), ${RESERVE} s kept" \
    "for the record, kill-after ${KILL_AFTER} s; nvcc: ${NVCC:-none}, compute-sanitizer: ${COMPUTE_SANITIZER:-none}"
  echo "csrc_sha256: $("$PY" tools/gpu/gpu_report.py csrc-sha256)"
  clock=0
  index=0
  for stage in "${STAGES[@]}"; do
    index=$((index + 1))
    if [ -n "$ONLY" ] && [ "$stage" != wheels ] && [ "$stage" != preflight ] && ! in_list "$stage" "$ONLY"; then
      echo "stage $index $stage timeout=${CAP[$stage]}s min=${MIN[$stage]}s worst_case=not-selected"
      continue
    fi
    # Worst case: every earlier stage ran to its timeout and its kill.
    left=$((BUDGET - RESERVE - clock - KILL_AFTER))
    limit=$((CAP[$stage] < left ? CAP[$stage] : left))
    if ((limit < MIN[$stage])); then
      worst="skipped"
    else
      worst="${limit}s"
      clock=$((clock + limit + KILL_AFTER))
    fi
    stage_command "$stage"
    echo "stage $index $stage timeout=${CAP[$stage]}s min=${MIN[$stage]}s worst_case=$worst: $(quote_command "${CMD[@]}")"
    if [ "$stage" = build ]; then
      echo "    which reuses build-gpu/prebuilt/rnn_ext_C-$("$PY" tools/gpu/gpu_report.py build-key).so if carried, else runs:"
      echo "    MAX_JOBS=$MAX_JOBS RNN_EXT_CUDA=1 RNN_EXT_PTXAS_VERBOSE=1 RNN_EXT_CUDA_ARCH='$RNN_EXT_CUDA_ARCH'" \
        "$PY setup.py build_ext --inplace; then $PY tools/gpu/gpu_report.py ops"
    fi
  done
  echo "total: budget=${BUDGET}s worst_case_stages=${clock}s worst_case_end=$((clock + RESERVE))s"
  exit 0
fi

elapsed() { echo $(($(date +%s) - START)); }
STAMP="$(date -u +%Y%m%d-%H%M%S)"
LOGS="$(mktemp -d /tmp/gpu_check_logs.XXXXXX)"
if [ -z "${OUT:-}" ]; then OUT="$(mktemp -d /tmp/gpu_check_out.XXXXXX)"; fi
export OUT
mkdir -p "$OUT"
COMBINED="$OUT/gpu_check.log"
: >"$COMBINED"
printf 'stage\tstatus\trc\tseconds\tlimit\tnote\n' >"$LOGS/stages.tsv"
GPU_SLUG=""
declare -A STATUS=()
FAILED=0
echo "gpu_check: budget ${BUDGET} s, outputs in $OUT, logs in $LOGS"

write_record() {
  if [ -n "$GPU_SLUG" ]; then
    timeout 30 "$PY" tools/gpu/gpu_report.py record --logs "$LOGS" --stamp "$STAMP" --name "$GPU_SLUG" \
      --out-dir "$OUT" --out-dir benchmarks/results --budget "$BUDGET" --elapsed "$(elapsed)" "$@"
  fi
}

# record_stage NAME STATUS RC SECONDS LIMIT NOTE
record_stage() {
  STATUS[$1]="$2"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$LOGS/stages.tsv"
  cp "$LOGS/stages.tsv" "$OUT/stages.tsv"
  if [ "$2" = skipped ]; then
    printf 'gpu_check: %-20s skipped: %s [%s s elapsed]\n' "$1" "$6" "$(elapsed)"
  else
    printf 'gpu_check: %-20s %-8s rc=%-4s %4s s (limit %s s) [%s s elapsed]\n' "$1" "$2" "$3" "$4" "$5" "$(elapsed)"
  fi
  write_record >/dev/null
}

# Why a stage cannot run now (empty: it can).
stage_blocker() {
  case "$1" in
    wheels) compgen -G "build-gpu/wheels/*.whl" >/dev/null || echo "no wheels in build-gpu/wheels" ;;
    preflight) ;;
    build) ((HAVE_NVCC)) || echo "nvcc not found" ;;
    *)
      if [ "${STATUS[preflight]:-}" != ok ]; then echo "no usable GPU (preflight)"; return; fi
      if ((!BUILT)); then echo "no CUDA build of rnn_ext"; return; fi
      case "$1" in
        memcheck | racecheck | synccheck)
          if [ -z "${COMPUTE_SANITIZER:-}" ]; then echo "compute-sanitizer not found"; return; fi
          if grep -qs "Device not supported" "$LOGS/memcheck.log"; then
            echo "compute-sanitizer does not support this device (memcheck)"
          fi ;;
      esac ;;
  esac
}

run_stage() {
  local stage="$1" blocker left limit begin rc status offset note
  if [ -n "$ONLY" ] && [ "$stage" != wheels ] && [ "$stage" != preflight ] && ! in_list "$stage" "$ONLY"; then
    record_stage "$stage" skipped "" 0 "" "not in --only"
    return
  fi
  blocker="$(stage_blocker "$stage")"
  if [ -n "$blocker" ]; then
    record_stage "$stage" skipped "" 0 "" "$blocker"
    return
  fi
  left=$((BUDGET - RESERVE - $(elapsed) - KILL_AFTER))
  limit=$((CAP[$stage] < left ? CAP[$stage] : left))
  if ((limit < MIN[$stage])); then
    record_stage "$stage" skipped "" 0 "" "budget: ${left} s left, needs ${MIN[$stage]} s"
    return
  fi
  stage_command "$stage"
  {
    echo "===== $stage: timeout ${limit} s, at $(elapsed) s of ${BUDGET} s, $(date -u +%H:%M:%S) UTC"
    quote_command "${CMD[@]}"
  } >>"$COMBINED"
  echo "gpu_check: $stage started (limit ${limit} s)"
  offset="$(stat -c %s "$COMBINED")"
  begin="$(date +%s)"
  # Straight into the file, no pipe: a process that outlives its stage cannot hold the run up.
  timeout --kill-after="$KILL_AFTER" "$limit" "${CMD[@]}" >>"$COMBINED" 2>&1 </dev/null
  rc=$?
  tail -c +"$((offset + 1))" "$COMBINED" >"$LOGS/$stage.log"
  case "$rc" in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  if [ "$status" != ok ]; then
    FAILED=1
    tail -n 25 "$LOGS/$stage.log" | sed "s/^/  $stage| /"
  fi
  if [ -f "$LOGS/junit-$stage.xml" ]; then cp "$LOGS/junit-$stage.xml" "$OUT/"; fi
  if [ "$stage" = build ]; then
    "$PY" tools/gpu/gpu_report.py ptxas "$LOGS/build.log" >"$OUT/ptxas.txt" 2>&1
  fi
  note=""
  if [[ "$stage" == smoke_* ]] && [ "$status" = timeout ]; then
    HUNG_REGIMES+=("${stage#smoke_}")
    note="hung: ${stage#smoke_} is left out of the later stages"
  fi
  record_stage "$stage" "$status" "$rc" "$(($(date +%s) - begin))" "$limit" "$note"
}

BUILT=0
for stage in "${STAGES[@]}"; do
  run_stage "$stage"
  case "$stage" in
    preflight) GPU_SLUG="$("$PY" tools/gpu/gpu_report.py gpu-slug "$LOGS/preflight.json")"; write_record >/dev/null ;;
    build)
      if [ "${STATUS[build]}" = ok ]; then
        BUILT=1
      elif [ "${STATUS[build]}" = skipped ] &&
        "$PY" -c 'import rnn_ext, sys; sys.exit(0 if rnn_ext._C.built_with_cuda else 1)' 2>/dev/null; then
        BUILT=1  # built earlier on this machine (a rerun with --only)
      fi ;;
  esac
done

echo "gpu_check: done in $(elapsed) s"
write_record --summary
exit "$FAILED"
