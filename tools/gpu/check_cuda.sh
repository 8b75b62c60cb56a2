#!/usr/bin/env bash
# make check-cuda: compiles the CUDA sources against the CUDA torch wheel and checks that every
# rnn_ext op has a CUDA kernel. Needs nvcc, not a GPU (CI has no GPU). Builds out of tree in
# build-cuda/, so the CPU build in rnn_ext/ is never touched. Safe to rerun: the venv is reused and
# ninja rebuilds only what changed. Without nvcc it says SKIPPED loudly, and fails under CI=true or
# CHECK_CUDA_REQUIRED=1, where a skip would hide that nothing was compiled.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
VENV="${CUDA_VENV:-.venv-cuda}"
# make check-cuda passes the Makefile's CUDA_TORCH; this default is for running the script alone.
CUDA_TORCH="${CUDA_TORCH:-torch==2.14.1}"

# shellcheck source=tools/gpu/cuda_env.sh
source tools/gpu/cuda_env.sh
if [ -z "$(cuda_env_find_nvcc)" ]; then
  echo "================================================================================"
  echo "check-cuda: SKIPPED: nvcc not found, so the CUDA sources were NOT compiled."
  echo "check-cuda: install the CUDA toolkit (nvcc) or put it on PATH to run this check."
  echo "================================================================================"
  if [ -n "${CI:-}" ] || [ "${CHECK_CUDA_REQUIRED:-0}" = 1 ]; then exit 1; fi
  exit 0
fi

# The venv is remade when it lacks a CUDA torch, or, for a pinned CUDA_TORCH (torch==X), when its
# torch is another version.
pinned=""
if [[ "$CUDA_TORCH" == torch==* ]]; then pinned="${CUDA_TORCH#torch==}"; fi
if ! "$VENV/bin/python" - "$pinned" 2>/dev/null <<'EOF'
import sys

import ninja, numpy, pybind11, torch  # noqa: E401,F401

pinned = sys.argv[1]
sys.exit(0 if torch.version.cuda and (not pinned or torch.__version__.split("+")[0] == pinned) else 1)
EOF
then
  echo "check-cuda: creating $VENV with $CUDA_TORCH"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$CUDA_TORCH" ninja pybind11 numpy
fi
PY="$(cd "$VENV/bin" && pwd)/python"
cuda_env_setup "$PY"

echo "check-cuda: building with $NVCC (CUDA_HOME=$CUDA_HOME) into build-cuda/"
RNN_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py --quiet build --build-base build-cuda

# Import from the build directory, not the source tree (whose rnn_ext/ holds the CPU build).
LIB_DIR="$(ls -d "$PWD"/build-cuda/lib.* | head -n 1)"
PYTHONPATH="$LIB_DIR" "$PY" tools/gpu/gpu_report.py ops
