#!/usr/bin/env bash
# make check-torch-range: the oldest torch a source build is claimed to work with, checked. From a
# clean export of the committed HEAD: a venv with that torch (kept in .venv-torch-oldest, so a second
# run reuses it), the C++ extension built in place against it, and a quick subset of the tests run.
#
#   bash scripts/check_torch_range.sh
#
# Environment: PYTHON (default python3), TORCH (default torch==2.11.0, the oldest claimed),
# MAX_JOBS (compile jobs, default 2), RNN_EXT_RANGE_VENV (the venv, default .venv-torch-oldest),
# RNN_EXT_RANGE_TESTS (the test files of the subset; the marker filter below applies to them).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.11.0}
export MAX_JOBS=${MAX_JOBS:-2}
VENV=${RNN_EXT_RANGE_VENV:-$ROOT/.venv-torch-oldest}
TESTS=${RNN_EXT_RANGE_TESTS:-tests/test_module.py tests/test_parity.py tests/test_programs.py tests/test_ecosystem.py}
MARKERS="not slow and not emulation and not tooling and not cuda"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rnn_ext-range.XXXXXX")
START=$SECONDS
trap 'rm -rf "$WORK"' EXIT

step() { echo "check-torch-range [$((SECONDS - START)) s]: $*"; }

if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "$TORCH" ]; then
  step "creating $VENV with $TORCH"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -qq --upgrade pip
  # The tests' own needs, as in the Makefile's DEPS, less the ONNX packages (their tests are not run).
  "$VENV/bin/python" -m pip install -qq "$TORCH" "setuptools>=77" wheel ninja pytest hypothesis numpy \
    expecttest opacus
  echo "$TORCH" > "$VENV/.installed"
fi
PY=$VENV/bin/python
step "torch $("$PY" -c 'import torch; print(torch.__version__)'), Python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

step "exporting HEAD ($(git -C "$ROOT" rev-parse --short HEAD)) into $WORK"
git -C "$ROOT" archive --format=tar HEAD | tar -xf - -C "$WORK"

step "building the C++ extension in place (MAX_JOBS=$MAX_JOBS, no CUDA sources)"
(cd "$WORK" && RNN_EXT_CUDA=0 "$PY" setup.py --quiet build_ext --inplace > build.log 2>&1) \
  || { tail -50 "$WORK/build.log" >&2; echo "check-torch-range: FAILED: the build" >&2; exit 1; }

step "running: pytest -q $TESTS -m \"$MARKERS\""
cd "$WORK"
# shellcheck disable=SC2086  # TESTS is a list of paths
PYTHONPATH=$WORK "$PY" -m pytest -q -p no:cacheprovider $TESTS -m "$MARKERS"
step "passed with $TORCH"
