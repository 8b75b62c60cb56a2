#!/usr/bin/env bash
# make check-cuda: compiles the CUDA sources against the CUDA torch wheel and checks that every
# rnn_ext op has a CUDA kernel. Needs nvcc, not a GPU (CI has no GPU). Builds out of tree in
# build-cuda/, so the CPU build in rnn_ext/ is never touched. Safe to rerun: the venv is reused and
# ninja rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "check-cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

PYTHON="${PYTHON:-python3}"
VENV="${CUDA_VENV:-.venv-cuda}"
CUDA_TORCH="${CUDA_TORCH:-torch==2.14.1}"
if ! "$VENV/bin/python" -c "import torch, ninja, pybind11, numpy; assert torch.version.cuda" 2>/dev/null; then
  echo "check-cuda: creating $VENV with $CUDA_TORCH"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$CUDA_TORCH" ninja pybind11 numpy
fi
PY="$(cd "$VENV/bin" && pwd)/python"

# The local toolkit has no cuBLAS/cuSPARSE headers; the wheel's nvidia packages do
# (../shared/ENVIRONMENT.md).
# The toolkit root: CUDA_HOME when it holds nvcc, else where nvcc says it lives (the nvcc on PATH
# may be a wrapper script or a symlink outside the toolkit).
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  CUDA_HOME="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  CUDA_HOME="$(cd "${CUDA_HOME:-$(dirname "$(readlink -f "$NVCC")")/..}" && pwd)"
fi
export CUDA_HOME
NVIDIA_INCLUDE="$("$PY" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))')"
export CPATH="$NVIDIA_INCLUDE${CPATH:+:$CPATH}"
export PATH="$CUDA_HOME/bin:$PATH"

echo "check-cuda: building with $NVCC into build-cuda/"
RNN_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py --quiet build --build-base build-cuda

LIB_DIR="$(ls -d "$PWD"/build-cuda/lib.* | head -n 1)"
# Import from the build directory, not the source tree (whose rnn_ext/ holds the CPU build).
cd "$LIB_DIR"
"$PY" - <<'EOF'
import sys

import torch

import rnn_ext

assert rnn_ext._C.built_with_cuda, "the extension was built without its CUDA sources"
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rnn_ext::"))
assert names, "no rnn_ext ops are registered"
missing = []
for name in names:
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    print(f"check-cuda: {name}: {'CUDA kernel' if has_kernel else 'NO CUDA kernel'}")
    if not has_kernel:
        missing.append(name)
if missing:
    sys.exit(f"check-cuda: no CUDA kernel for {', '.join(missing)}")
print(f"check-cuda: all {len(names)} rnn_ext ops have a CUDA kernel (torch {torch.__version__})")
EOF
