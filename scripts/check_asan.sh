#!/usr/bin/env bash
# make check-asan: builds rnn_ext's C++ extension with AddressSanitizer + UndefinedBehaviorSanitizer in a
# copy of the sources under build/asan (the in-tree rnn_ext/_C*.so is never touched) and runs the tests
# against that build with the sanitizer runtimes preloaded. Any sanitizer report fails the run.
#
#   bash scripts/check_asan.sh                                  # the whole test suite
#   bash scripts/check_asan.sh tests/test_hostile.py -k nan     # any pytest arguments instead
#
# Environment: PYTHON (default .venv/bin/python), MAX_JOBS (compile jobs, default 1), CXX (default c++,
# the compiler torch's build uses), RNN_EXT_ASAN_DIR (the build copy, default build/asan; kept between
# runs so that rebuilds are incremental).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TREE=${RNN_EXT_ASAN_DIR:-$ROOT/build/asan}
CXX=${CXX:-c++}

if [ ! -x "$PYTHON" ]; then
  echo "check_asan: no Python at $PYTHON (make venv creates .venv)" >&2
  exit 2
fi

# The sources the build and the tests need. ninja goes by timestamps, so a file whose content changed
# is copied afresh (its time is now) and an unchanged one is left alone; files gone from the
# checkout go from the copy. The build outputs (build/, rnn_ext/_C*.so) are kept between runs.
SOURCES="setup.py csrc rnn_ext tests"
STAGE="$TREE/build/staging"
rm -rf "$STAGE"
mkdir -p "$STAGE"
(cd "$ROOT" && tar --exclude='*.so' --exclude='__pycache__' -cf - $SOURCES) | tar -xf - -C "$STAGE"
(cd "$STAGE" && find $SOURCES -type f) | while read -r file; do
  if ! cmp -s "$STAGE/$file" "$TREE/$file"; then
    mkdir -p "$(dirname "$TREE/$file")"
    cp "$STAGE/$file" "$TREE/$file"
  fi
done
(cd "$TREE" && find $SOURCES -type f ! -name '*.so' ! -path '*/__pycache__/*') | while read -r file; do
  [ -e "$STAGE/$file" ] || rm -f "$TREE/$file"
done

# setup.py adds -fsanitize=address,undefined (RNN_EXT_SANITIZE=1). CFLAGS replaces Python's own
# compile flags, which carry -fwrapv (signed overflow defined, so invisible to UBSan) and -DNDEBUG.
echo "check_asan: building the sanitized extension in $TREE (MAX_JOBS=${MAX_JOBS:-1})"
(cd "$TREE" && RNN_EXT_SANITIZE=1 RNN_EXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-1} CFLAGS="-fno-wrapv" \
  "$PYTHON" setup.py --quiet build_ext --inplace)

EXTENSION=$(ls "$TREE"/rnn_ext/_C*.so)
LINKED=$(ldd "$EXTENSION")  # captured first: grep -q closing the pipe early would fail pipefail
if ! grep -q libasan <<< "$LINKED" || ! grep -q libubsan <<< "$LINKED"; then
  echo "check_asan: $EXTENSION is not linked against libasan and libubsan" >&2
  exit 2
fi

# The runtimes must be loaded before anything else (python itself is not instrumented).
ASAN_RUNTIME=$("$CXX" -print-file-name=libasan.so)
UBSAN_RUNTIME=$("$CXX" -print-file-name=libubsan.so)
for runtime in "$ASAN_RUNTIME" "$UBSAN_RUNTIME"; do
  if [ ! -e "$runtime" ]; then
    echo "check_asan: sanitizer runtime $runtime not found ($CXX -print-file-name)" >&2
    exit 2
  fi
done
PRELOAD="$ASAN_RUNTIME $UBSAN_RUNTIME"

# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# allocator_may_return_null=1: malloc/posix_memalign (torch's CPU allocator) of an impossible size
#   fail with ENOMEM as without ASan, so torch raises its usual out-of-memory RuntimeError. (The
#   throwing operator new aborts regardless; tests/test_errors.py skips the one case needing it.)
# halt_on_error / abort_on_error and UBSan's halt_on_error: the first report ends the run (non-zero).
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

# Positive controls: a heap overflow and a signed overflow in a library built with the same flags
# must each be reported and end the process, or a clean run below would prove nothing.
CONTROL="$TREE/build/sanitizer_control"
mkdir -p "$CONTROL"
cat > "$CONTROL/control.cpp" <<'CPP'
#include <cstdint>
#include <cstdlib>
// Out of line, so the access is AddressSanitizer's to catch (UBSan cannot see the buffer's size).
__attribute__((noinline)) int read_at(const int* values, int index) { return values[index]; }
extern "C" int heap_overflow(int index) {
  int* values = static_cast<int*>(std::calloc(4, sizeof(int)));
  const int result = read_at(values, index);
  std::free(values);
  return result;
}
extern "C" int64_t signed_overflow(int64_t value) { return value + INT64_MAX; }
CPP
"$CXX" -shared -fPIC -O1 -g -fno-wrapv -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -o "$CONTROL/libcontrol.so" "$CONTROL/control.cpp"
for call in "heap_overflow(4)" "signed_overflow(1)"; do
  # In an inner shell that outlives python, so the shell's "Aborted" notice lands in the report.
  if bash -c 'LD_PRELOAD="$1" "$2" -c "$3"; exit $?' control "$PRELOAD" "$PYTHON" \
      "import ctypes; ctypes.CDLL('$CONTROL/libcontrol.so').$call" 2> "$CONTROL/report.txt"; then
    echo "check_asan: the control $call ran without a sanitizer report; the setup is broken" >&2
    exit 2
  fi
  grep -q -E "AddressSanitizer: heap-buffer-overflow|runtime error: signed integer overflow" "$CONTROL/report.txt" || {
    echo "check_asan: the control $call failed without the expected report:" >&2
    cat "$CONTROL/report.txt" >&2
    exit 2
  }
done
echo "check_asan: controls reported as expected (heap overflow, signed overflow)"

cd "$TREE"
# From $TREE, `python -m` puts the sanitized copy of rnn_ext first on sys.path; make sure it did.
LD_PRELOAD="$PRELOAD" "$PYTHON" -c "
import rnn_ext
path = rnn_ext._C.__file__
assert path.startswith('$TREE/'), f'imported {path}, not the sanitized build'
print('check_asan: testing', path)
"

# Reports go to files: pytest captures the test process's stderr, and an aborting process takes
# the captured text with it.
LOGS="$TREE/build/sanitizer_logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
export ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$LOGS/asan"
export UBSAN_OPTIONS="$UBSAN_OPTIONS:log_path=$LOGS/ubsan"
echo "check_asan: ASAN_OPTIONS=$ASAN_OPTIONS"
if [ $# -eq 0 ]; then
  set -- tests
fi
status=0
LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider "$@" || status=$?
# allocator_may_return_null=1 logs a WARNING for each impossible allocation the hostile-input tests
# make; those are expected. An ERROR (ASan) or a "runtime error" (UBSan) is a finding.
if compgen -G "$LOGS/*" > /dev/null; then
  if grep -q -E "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOGS"/*; then
    echo "check_asan: sanitizer reports:" >&2
    cat "$LOGS"/* >&2
    exit 1
  fi
  echo "check_asan: expected ASan warnings only ($(cat "$LOGS"/* | grep -c "failed to allocate") failed impossible allocations)"
fi
if [ "$status" -ne 0 ]; then
  echo "check_asan: the tests failed (exit $status) without a sanitizer report" >&2
  exit "$status"
fi
echo "check_asan: clean (no AddressSanitizer or UBSan report)"
