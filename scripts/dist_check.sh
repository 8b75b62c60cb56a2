#!/usr/bin/env bash
# make dist-check: the release path as a new user meets it. From a clean export of the committed HEAD
# (so no local build output can leak in): the sdist, a wheel built from that sdist without build
# isolation in a fresh venv with the CPU torch, that wheel installed, then a smoke test run from a
# folder outside any source tree. Any problem exits non-zero.
#
#   bash scripts/dist_check.sh
#
# Environment: PYTHON (default python3), TORCH (the torch to build and run against, default
# torch==2.13.0), MAX_JOBS (compile jobs, default 2), RNN_EXT_DIST_REV (what to export, default
# HEAD), RNN_EXT_DIST_DIR (the work folder, default a new temporary one, removed at the end unless
# RNN_EXT_DIST_KEEP=1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
REV=${RNN_EXT_DIST_REV:-HEAD}
export MAX_JOBS=${MAX_JOBS:-2}
WORK=${RNN_EXT_DIST_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rnn_ext-dist.XXXXXX")}
START=$SECONDS

step() { echo "dist-check [$((SECONDS - START)) s]: $*"; }
fail() { echo "dist-check: FAILED: $*" >&2; exit 1; }
cleanup() {
  if [ "${RNN_EXT_DIST_KEEP:-0}" != 1 ] && [ -z "${RNN_EXT_DIST_DIR:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
  echo "dist-check: note: uncommitted changes are not checked; this exports $REV"
fi

SRC="$WORK/src"
DIST="$WORK/dist"
VENV="$WORK/venv"
ELSEWHERE="$WORK/elsewhere"
rm -rf "$SRC" "$DIST" "$VENV" "$ELSEWHERE"
mkdir -p "$SRC" "$DIST" "$ELSEWHERE"

step "exporting $REV ($(git -C "$ROOT" rev-parse --short "$REV")) into $SRC"
git -C "$ROOT" archive --format=tar "$REV" | tar -xf - -C "$SRC"

step "creating a fresh venv with $TORCH"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# -qq: errors only (the machine's pip configuration can add a warning per package looked up).
# No NumPy, on purpose: rnn_ext needs none (torch notes its absence when imported).
"$PY" -m pip install -qq --upgrade pip
"$PY" -m pip install -qq "$TORCH" "setuptools>=77" wheel build ninja

step "building the sdist (python -m build --sdist --no-isolation)"
(cd "$SRC" && "$PY" -m build --sdist --no-isolation --outdir "$DIST" . > "$WORK/sdist.log" 2>&1) \
  || { cat "$WORK/sdist.log" >&2; fail "the sdist did not build"; }
SDISTS=("$DIST"/rnn_ext-*.tar.gz)
[ ${#SDISTS[@]} = 1 ] && [ -f "${SDISTS[0]}" ] || fail "expected one sdist in $DIST, found: ${SDISTS[*]}"
SDIST=${SDISTS[0]}

step "checking that $(basename "$SDIST") carries every file a build needs"
"$PY" - "$SDIST" "$SRC" <<'EOF'
import os
import sys
import tarfile

sdist, src = sys.argv[1:]
with tarfile.open(sdist) as archive:
    top = archive.getnames()[0].split("/")[0]
    names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
required = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO"}
for folder in ("csrc", "rnn_ext"):
    for directory, _, files in os.walk(os.path.join(src, folder)):
        required.update(os.path.relpath(os.path.join(directory, f), src) for f in files)
missing = sorted(required - names)
if missing:
    sys.exit(f"dist-check: the sdist lacks {missing}")
leaked = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.py"))
if leaked:
    sys.exit(f"dist-check: the sdist carries build output {leaked}")
print(f"dist-check: {top}: {len(names)} entries, all {len(required)} required files present")
EOF

step "building a wheel from the sdist (pip wheel --no-build-isolation --no-deps, MAX_JOBS=$MAX_JOBS)"
(cd "$WORK" && "$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$DIST" "$SDIST" \
  > "$WORK/wheel.log" 2>&1) || { cat "$WORK/wheel.log" >&2; fail "the wheel did not build from the sdist"; }
WHEELS=("$DIST"/rnn_ext-*.whl)
[ ${#WHEELS[@]} = 1 ] && [ -f "${WHEELS[0]}" ] || fail "expected one wheel in $DIST, found: ${WHEELS[*]}"
WHEEL=${WHEELS[0]}

step "checking $(basename "$WHEEL"): files, licence, torch pin"
"$PY" - "$WHEEL" <<'EOF'
import re
import sys
import zipfile

import torch

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(metadata_name).decode()
problems = []
for pattern in (r"rnn_ext/_C\..*\.so", r"rnn_ext/_build_info\.py", r"rnn_ext/__init__\.py",
                r"rnn_ext/__main__\.py", r"rnn_ext/_extension\.py", r".*\.dist-info/licenses/LICENSE"):
    if not any(re.fullmatch(pattern, n) for n in names):
        problems.append(f"no file matching {pattern}")
major, minor = (int(part) for part in torch.__version__.split(".")[:2])
pin = f"Requires-Dist: torch<{major}.{minor + 1},>={major}.{minor}"
for line in ("License-Expression: BSD-3-Clause", pin, "Requires-Python: >=3.10"):
    if line not in metadata.splitlines():
        problems.append(f"METADATA lacks '{line}'")
if problems:
    sys.exit("dist-check: the wheel is wrong: " + "; ".join(problems))
print(f"dist-check: {len(names)} files; {pin}")
EOF

step "installing the wheel (pip install, so its torch requirement is checked)"
"$PY" -m pip install -qq "$WHEEL"

step "smoke test from $ELSEWHERE: the seed model against nn.RNN, python -m rnn_ext, a torch mismatch"
cd "$ELSEWHERE"
"$PY" - "$ROOT" "$SRC" "$WORK/mismatch" <<'EOF'
import os
import shutil
import subprocess
import sys

import torch
from torch import nn

import rnn_ext

sources = sys.argv[1:3]
mismatch_root = sys.argv[3]
package = os.path.dirname(os.path.abspath(rnn_ext.__file__))
assert "site-packages" in package and not any(package.startswith(s) for s in sources), \
    f"imported rnn_ext from {package}, not from the installed wheel"


class Seed(nn.Module):
    """The seed model: a 32-unit Elman RNN over one feature, and a linear head."""

    def __init__(self, rnn_class):
        super().__init__()
        self.rnn = rnn_class(1, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def run(model, x, target):
    x = x.detach().clone().requires_grad_()
    model.zero_grad()
    output = model(x)
    ((output - target) ** 2).mean().backward()
    return [output.detach(), x.grad] + [p.grad for p in model.parameters()]


torch.manual_seed(0)
reference = Seed(nn.RNN).double()
ours = Seed(rnn_ext.RNN).double()
ours.load_state_dict(reference.state_dict())
x, target = torch.randn(4, 10, 1, dtype=torch.float64), torch.randn(4, 10, 1, dtype=torch.float64)
truth = run(reference, x, target)
for got, want in zip(run(ours, x, target), truth):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
ours_float = Seed(rnn_ext.RNN)
ours_float.load_state_dict(reference.state_dict())
for got, want in zip(run(ours_float, x.float(), target.float()), truth):
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
print("dist-check: seed model: outputs and every gradient match nn.RNN "
      "(float64 at 1e-10, float32 against the float64 truth at 2e-5)")

report = subprocess.run([sys.executable, "-m", "rnn_ext"], capture_output=True, text=True, check=True).stdout
for field in ("rnn_ext:", "torch:", "built against:", "CUDA kernels:", "CPU kernel:", "threads:"):
    assert field in report, f"python -m rnn_ext printed no '{field}':\n{report}"
built_line = next(line for line in report.splitlines() if line.startswith("built against:"))
assert torch.__version__ in built_line, f"the report names another torch: {built_line}"
print("dist-check: python -m rnn_ext:\n" + report.rstrip())

# A simulated mismatch: a copy of the installed package whose build record names another torch.
# Its _C is replaced by junk, so the error must come from the check that runs before loading it.
major, minor = (int(part) for part in torch.__version__.split(".")[:2])
release = torch.__version__.split("+")[0]
other_build = (release + "+cpu", None) if torch.version.cuda else (release + "+cu130", "13.0")
cases = {
    f"torch {major}.{minor + 1}.0": (f"{major}.{minor + 1}.0", torch.version.cuda),
    f"torch {other_build[0]}": other_build,
}
for label, (fake_version, fake_cuda) in cases.items():
    shutil.rmtree(mismatch_root, ignore_errors=True)
    copy = os.path.join(mismatch_root, "rnn_ext")
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name in os.listdir(copy):
        if name.startswith("_C.") and name.endswith(".so"):
            with open(os.path.join(copy, name), "wb") as file:
                file.write(b"not a shared library")
    record = os.path.join(copy, "_build_info.py")
    text = open(record).read()
    text = text.replace(f"TORCH_VERSION = {torch.__version__!r}", f"TORCH_VERSION = {fake_version!r}")
    text = text.replace(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}", f"TORCH_CUDA_VERSION = {fake_cuda!r}")
    assert fake_version in text, "the build record has an unexpected form"
    open(record, "w").write(text)
    probe = ("import importlib.util, sys\n"
             f"assert importlib.util.find_spec('rnn_ext').origin.startswith({mismatch_root!r})\n"
             "try:\n    import rnn_ext\nexcept ImportError as error:\n    print(error)\n    sys.exit(0)\n"
             "sys.exit('import rnn_ext succeeded')\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=mismatch_root, capture_output=True, text=True)
    message = done.stdout.strip()
    assert done.returncode == 0, f"{label}: {done.stdout}{done.stderr}"
    for needle in (fake_version, torch.__version__, "pip install --no-build-isolation"):
        assert needle in message, f"{label}: the error does not name '{needle}': {message}"
    print(f"dist-check: mismatch ({label}): ImportError: {message}")
shutil.rmtree(mismatch_root)
EOF

step "passed: sdist $(basename "$SDIST"), wheel $(basename "$WHEEL")"
