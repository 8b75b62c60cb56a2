#!/usr/bin/env bash
# Downloads the Python packages the GPU machine lacks (it has no network) into build-gpu/wheels/,
# which git ignores and the device tool carries (carry ["build-gpu"]); tools/gpu/gpu_check.sh
# installs them there. Today that is expecttest, which torch.library.opcheck imports. Run it here,
# once, before a GPU run; it needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."

# The GPU machine's Python (3.12) and platform, not this machine's. expecttest is pure Python and
# has no requirements, so --no-deps brings all it needs.
WHEELS=(expecttest)
mkdir -p build-gpu/wheels
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d build-gpu/wheels "${WHEELS[@]}"
ls -l build-gpu/wheels
