# shellcheck shell=bash
# CUDA toolchain discovery shared by tools/gpu/check_cuda.sh and tools/gpu/gpu_check.sh; sourced,
# never run. `cuda_env_setup PYTHON` exports NVCC, CUDA_HOME, PATH and CPATH for building against the
# torch of PYTHON, and COMPUTE_SANITIZER when one is installed; it returns 1 when there is no nvcc.

# The nvcc to build with, in torch's order: CUDA_HOME's when CUDA_HOME is set, else the one on
# PATH, else the toolkit's usual place.
cuda_env_find_nvcc() {
  local candidate=""
  if [ -n "${CUDA_HOME:-}" ]; then
    if [ -x "$CUDA_HOME/bin/nvcc" ]; then candidate="$CUDA_HOME/bin/nvcc"; fi
  else
    candidate="$(command -v nvcc || true)"
    if [ -z "$candidate" ] && [ -x /usr/local/cuda/bin/nvcc ]; then candidate=/usr/local/cuda/bin/nvcc; fi
  fi
  printf '%s' "$candidate"
}

# The toolkit root: CUDA_HOME when it holds nvcc, else where nvcc says it lives. The nvcc on PATH may
# be a wrapper script or a symlink outside the toolkit, which would mislead torch's own guess.
cuda_env_find_home() {
  local nvcc="$1" top
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    printf '%s' "$CUDA_HOME"
    return
  fi
  top="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  if [ -z "$top" ]; then top="$(dirname "$(readlink -f "$nvcc")")/.."; fi
  (cd "$top" && pwd)
}

# Headers the toolkit may lack (cuBLAS, cuSPARSE) ship in torch's nvidia wheels: nvidia/cu13/include
# for the CUDA 13 wheels, nvidia/<library>/include for the CUDA 12 ones. Printed colon-separated.
cuda_env_wheel_includes() {
  "$1" - <<'EOF' 2>/dev/null || true
import glob
import os

try:
    import nvidia
except ImportError:
    raise SystemExit(0)
roots = list(nvidia.__path__)
found = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "cu*", "include")))]
if not found:
    found = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "include")))]
print(":".join(found))
EOF
}

# compute-sanitizer: on PATH, else in the toolkit.
cuda_env_find_sanitizer() {
  local candidate
  candidate="$(command -v compute-sanitizer || true)"
  for path in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -z "$candidate" ] && [ -x "$path" ]; then candidate="$path"; fi
  done
  printf '%s' "$candidate"
}

cuda_env_setup() {
  local python="$1" includes
  NVCC="$(cuda_env_find_nvcc)"
  if [ -z "$NVCC" ]; then
    COMPUTE_SANITIZER=""
    export NVCC COMPUTE_SANITIZER
    return 1
  fi
  CUDA_HOME="$(cuda_env_find_home "$NVCC")"
  case ":$PATH:" in *":$CUDA_HOME/bin:"*) ;; *) PATH="$CUDA_HOME/bin:$PATH" ;; esac
  includes="$(cuda_env_wheel_includes "$python")"
  # Appended after any CPATH already set (once: a nested call inherits it); nvcc's own -I of the
  # toolkit is searched before CPATH, so the toolkit's headers win where both have one.
  case ":${CPATH:-}:" in
    *":$includes:"*) ;;
    *) if [ -n "$includes" ]; then CPATH="${CPATH:+$CPATH:}$includes"; fi ;;
  esac
  COMPUTE_SANITIZER="$(cuda_env_find_sanitizer)"
  export NVCC CUDA_HOME PATH COMPUTE_SANITIZER
  if [ -n "${CPATH:-}" ]; then export CPATH; fi
  return 0
}
