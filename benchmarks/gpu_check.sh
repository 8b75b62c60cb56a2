#!/usr/bin/env bash
# The one prepared run for a GPU machine (see ../shared/ENVIRONMENT.md): build with every core, the
# whole test suite on CUDA, compute-sanitizer (memcheck, racecheck, synccheck) on every recurrence
# path, the benchmark against cuDNN; writes benchmarks/results/<date>-<gpu>.json and copies it, with
# a tarball of the logs, to $OUT. Runs in the repository root; needs no network.
#
# Under 8 minutes in all: every step has its own timeout, cut to what is left of the budget
# (GPU_CHECK_BUDGET_S, default 450 s), so one hang cannot eat the rest. A step that fails does not
# stop the later ones (except a failed build); the JSON says what each step did.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
LOGS="$(mktemp -d /tmp/gpu_check.XXXXXX)"
OUT="${OUT:-$LOGS/out}"  # the device tool sets $OUT; elsewhere the copies stay out of the tree
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START="$(date +%s)"
STATUS="$LOGS/steps.tsv"
: >"$STATUS"

elapsed() { echo $(($(date +%s) - START)); }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, for at most
# CAP_SECONDS or what is left of the budget (10 s kept for the report), and records rc and seconds.
run_step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - $(elapsed) - 10))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    printf '%s\tskipped\t0\n' "$name" >>"$STATUS"
    echo "gpu_check: $name skipped (budget spent)"
    return 124
  fi
  local begin rc
  begin="$(date +%s)"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - begin))" >>"$STATUS"
  echo "gpu_check: $name rc=$rc in $(($(date +%s) - begin)) s (limit $limit s)"
  return "$rc"
}

# The toolkit root, where nvcc says it lives when CUDA_HOME does not hold it (the nvcc on PATH may
# be a wrapper script outside the toolkit, which would mislead torch's own guess).
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
  CUDA_HOME="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  CUDA_HOME="$(cd "${CUDA_HOME:-/usr/local/cuda}" && pwd)"
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

# CUDA headers the toolkit may lack (cuBLAS) come from torch's nvidia wheels when they are there;
# -I of the toolkit is searched first, so its own headers win where both exist.
NVIDIA_INCLUDE="$("$PY" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))' 2>/dev/null || true)"
if [ -n "$NVIDIA_INCLUDE" ] && [ -d "$NVIDIA_INCLUDE" ]; then export CPATH="$NVIDIA_INCLUDE${CPATH:+:$CPATH}"; fi
SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER="$candidate"; fi
done

# 1. Build in place (the CUDA kernels, -Xptxas -v for the register report). nvcc compiles the SASS
#    and the PTX of the one .cu file on two threads.
export RNN_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" RNN_EXT_PTXAS_VERBOSE=1
export RNN_EXT_CUDA_ARCH="${RNN_EXT_CUDA_ARCH:--gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90 --threads=2}"
if ! run_step build 240 "$PY" setup.py build_ext --inplace; then
  tail -n 40 "$LOGS/build.log"
fi
BUILT=0
"$PY" -c 'import rnn_ext, sys; sys.exit(0 if rnn_ext._C.built_with_cuda else 1)' 2>/dev/null && BUILT=1

if ((BUILT)); then
  # 2. The whole suite; tests/conftest.py adds the "cuda" device when the CUDA kernels are there.
  #    Four pytest-xdist workers where it is installed: the suite's torch.compile cases are slow,
  #    and the GPU runs the workers' kernels side by side (each cooperative grid is co-resident on
  #    its own, the driver time-slices between processes).
  WORKERS=()
  if "$PY" -c 'import xdist' 2>/dev/null; then WORKERS=(-n 4); fi
  run_step tests 200 "$PY" -m pytest -q -p no:cacheprovider ${WORKERS[@]+"${WORKERS[@]}"} tests \
    --junitxml="$LOGS/pytest.xml"
  tail -n 15 "$LOGS/tests.log"

  # 3. compute-sanitizer on small cases of every path. racecheck and synccheck look only at our
  #    kernels (their names hold "rnn_ext"): cuBLAS is not ours to check and is slow under them.
  if [ -n "$SANITIZER" ]; then
    run_step memcheck 60 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitizer_cases.py
    for tool in racecheck synccheck; do
      run_step "$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 1 --kernel-name kns=rnn_ext \
        "$PY" benchmarks/sanitizer_cases.py
      # An older sanitizer without --kernel-name: check every kernel instead.
      if ! grep -q "ERROR SUMMARY" "$LOGS/$tool.log" && grep -qi "option" "$LOGS/$tool.log"; then
        run_step "$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitizer_cases.py
      fi
    done
  else
    echo "gpu_check: compute-sanitizer not found"
  fi

  # 4. The benchmark against cuDNN (benchmarks/bench.py, where it exists).
  if [ -f benchmarks/bench.py ]; then
    # The full grid when the budget allows it, else bench.py's quick settings (fewer, shorter rounds).
    QUICK=()
    if (($(elapsed) > BUDGET - 200)); then QUICK=(--quick); fi
    run_step bench 150 "$PY" benchmarks/bench.py --device cuda ${QUICK[@]+"${QUICK[@]}"} --out "$LOGS/bench.json"
    tail -n 30 "$LOGS/bench.log"
  else
    echo "gpu_check: benchmarks/bench.py not found; no benchmark"
  fi
fi

# 5. The report.
RESULT="$(GPU_CHECK_LOGS="$LOGS" GPU_CHECK_BUILT="$BUILT" GPU_CHECK_SECONDS="$(elapsed)" "$PY" - <<'EOF'
import datetime
import hashlib
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ElementTree

logs = os.environ["GPU_CHECK_LOGS"]


def read(name):
    path = os.path.join(logs, name)
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()


steps = {}
for line in read("steps.tsv").splitlines():
    name, rc, seconds = line.split("\t")
    steps[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds), "skipped": rc == "skipped"}

csrc_sha256 = subprocess.run(
    "find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1",
    shell=True, capture_output=True, text=True, check=True,
).stdout.strip()

device = "unknown"
torch_version = "unknown"
try:
    import torch

    torch_version = torch.__version__
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
except Exception as error:  # the report is still written, saying what it could not read
    device = f"unknown ({error})"

tests = {"passed": 0, "failed": 0, "skipped": 0}
junit = os.path.join(logs, "pytest.xml")
if os.path.exists(junit):
    root = ElementTree.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    for suite in suites:
        total = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        tests["passed"] += total - failed - skipped
        tests["failed"] += failed
        tests["skipped"] += skipped
    tests["cuda_passed"] = sum(
        1
        for case in root.iter("testcase")
        if "cuda" in case.get("name", "") + case.get("classname", "")
        and not any(child.tag in ("failure", "error", "skipped") for child in case)
    )
else:
    # No report: the suite did not run (failed build, budget spent) or died before writing one.
    tests = {"passed": None, "failed": None, "skipped": None}

sanitizer = {}
for tool in ("memcheck", "racecheck", "synccheck"):
    text = read(f"{tool}.log")
    if not text:
        continue
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    cases = re.findall(r"sanitizer_cases: (\d+) of (\d+) cases match", text)
    sanitizer[tool] = {
        "errors": int(summary[-1]) if summary else None,
        "cases_matching_cpu": f"{cases[-1][0]}/{cases[-1][1]}" if cases else None,
        "rc": steps.get(tool, {}).get("rc"),
    }

speedup = {}
bench = {}
if os.path.exists(os.path.join(logs, "bench.json")):
    try:
        with open(os.path.join(logs, "bench.json")) as handle:
            bench = json.load(handle)
    except ValueError as error:
        bench = {"unreadable": str(error)}
# bench.py's format belongs to its author: take {"speedup_vs_cudnn": {case: ratio}} when it is
# there, else any list of records with a case name and a speedup.
if isinstance(bench, dict) and isinstance(bench.get("speedup_vs_cudnn"), dict):
    speedup = bench["speedup_vs_cudnn"]
else:
    records = bench if isinstance(bench, list) else bench.get("results", bench.get("cases", [])) if isinstance(bench, dict) else []
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict):
            continue
        ratio = record.get("speedup", record.get("ratio"))  # bench.py: ratio = nn.RNN time / ours
        if ratio is None:
            continue
        config = record.get("config")
        if isinstance(config, dict):
            name = " ".join(f"{key}{value}" for key, value in config.items())
            name = f"{record.get('device', '')} {record.get('dtype', '')} {name} {record.get('mode', '')}".strip()
        else:
            name = str(record.get("case", record.get("name", len(speedup))))
        speedup[name] = ratio



def demangle(name):
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


# ptxas -v of the kernels (the build log): registers, spills and stack per kernel.
registers = {}
for match in re.finditer(
    r"Function properties for (\w+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\n[^\n]*?Used (\d+) registers",
    read("build.log"),
):
    name, stack, spill_stores, spill_loads, used = match.groups()
    short = re.sub(r"rnn_ext::gpu::\(anonymous namespace\)::", "", demangle(name))
    registers[short] = {
        "registers": int(used),
        "spill_stores": int(spill_stores),
        "spill_loads": int(spill_loads),
        "stack_frame": int(stack),
    }

report = {
    "date": datetime.date.today().isoformat(),
    "device": device,
    "torch": torch_version,
    "csrc_sha256": csrc_sha256,
    "built_with_cuda": os.environ["GPU_CHECK_BUILT"] == "1",
    "tests": tests,
    "sanitizer": sanitizer,
    "speedup_vs_cudnn": speedup,
    "bench": bench,
    "ptxas": registers,
    "steps": steps,
    "seconds": int(os.environ["GPU_CHECK_SECONDS"]),
}
slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"
path = os.path.join("benchmarks", "results", f"{report['date']}-{slug}.json")
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as handle:
    json.dump(report, handle, indent=2, sort_keys=False)
    handle.write("\n")
print(path)
EOF
)"
echo "gpu_check: wrote $RESULT"
if [ -n "$RESULT" ] && [ -f "$RESULT" ]; then
  cp "$RESULT" "$OUT/"
  cat "$RESULT"
fi
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$LOGS" --exclude=./out . 2>/dev/null || true
echo "gpu_check: done in $(elapsed) s"
