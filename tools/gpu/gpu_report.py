"""Helpers of the CUDA checks (tools/gpu/gpu_check.sh, tools/gpu/check_cuda.sh): the csrc/ hash, the
device probe, the ptxas report, the op-kernel check and the JSON record of a GPU run.

    python tools/gpu/gpu_report.py csrc-sha256
    python tools/gpu/gpu_report.py probe --out preflight.json      # needs torch (and a GPU to pass)
    python tools/gpu/gpu_report.py ptxas build.log                  # registers/spills/stack per kernel
    python tools/gpu/gpu_report.py ops                              # every rnn_ext op has a CUDA kernel
    python tools/gpu/gpu_report.py record --logs DIR --stamp S --name GPU --out-dir OUT
    python tools/gpu/gpu_report.py summary RECORD.json

Only `probe` and `ops` import torch: the record is rewritten after every stage of a GPU run and must
stay cheap and work whatever state the run is in.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_machine():
    # rnn_ext/machine.py by path: it needs no torch, and importing the rnn_ext package would load the
    # compiled extension, which the commands that run before the build must not need.
    spec = importlib.util.spec_from_file_location("rnn_ext_machine", REPO / "rnn_ext" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_machine = _load_machine()
REGIMES = _machine.CUDA_REGIMES
slug = _machine.slug
driver_attributes = _machine.cuda_driver_attributes
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
PYTEST_STAGES = ("test_cuda", "tests_rest")
BENCH_DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------
# The sources' fingerprint.


def csrc_sha256(root: Path | str = REPO) -> str:
    """The hash that `find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1`
    prints in `root`: sha256sum's lines ("<hex>  <path>") of every regular file under csrc/ (links
    are not followed, as find does not), in byte order of the paths, hashed once more."""
    root = Path(root)
    paths = []
    for directory, _, files in os.walk(root / "csrc"):
        for name in files:
            full = os.path.join(directory, name)
            if os.path.isfile(full) and not os.path.islink(full):
                paths.append(os.path.relpath(full, root))
    lines = []
    for path in sorted(paths, key=os.fsencode):
        digest = hashlib.sha256(Path(root, path).read_bytes()).hexdigest()
        lines.append(f"{digest}  {path}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def build_key(root: Path | str = REPO) -> str:
    """Names a prebuilt extension: the sources and the build script that made it."""
    setup = hashlib.sha256(Path(root, "setup.py").read_bytes()).hexdigest()
    return hashlib.sha256(f"{csrc_sha256(root)} {setup}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# The device probe (preflight).


def run_tool(command: list[str], timeout: float = 15) -> str:
    """A tool's output, or why there is none."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return "not found"
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    return (done.stdout + done.stderr).strip() or f"exit status {done.returncode}"


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def touch_device(torch) -> None:
    """A context and a kernel: the device really works."""
    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()


def probe(out: Path | None) -> int:
    """Prints and records what the run depends on; exits 1 when torch sees no usable CUDA device.
    The record is written whatever goes wrong on the way."""
    info: dict = {"versions": {}, "device": {}, "problems": []}
    try:
        return probe_into(info)
    except Exception as error:  # noqa: BLE001  (the record says what went wrong, whatever it was)
        info["problems"].append(f"preflight: {error!r}")
        print(f"preflight: PROBLEM: {error!r}", flush=True)
        return 1
    finally:
        if out is not None:
            out.write_text(json.dumps(info, indent=2) + "\n")


def probe_into(info: dict) -> int:
    say = lambda text: print(f"preflight: {text}", flush=True)  # noqa: E731
    versions = info["versions"]
    smi = run_tool(["nvidia-smi", "-L"])
    say(f"nvidia-smi -L: {smi}")
    info["nvidia_smi"] = smi
    query = run_tool(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    versions["driver"] = query.split(",")[1].strip() if query.count(",") >= 2 else None
    nvcc = re.findall(r"release ([\d.]+)", run_tool(["nvcc", "--version"]))
    versions["nvcc"] = nvcc[0] if nvcc else None
    sanitizer_path = os.environ.get("COMPUTE_SANITIZER") or shutil.which("compute-sanitizer") or ""
    sanitizer = run_tool([sanitizer_path, "--version"]) if sanitizer_path else "not found"
    versions["compute_sanitizer"] = (re.findall(r"Version ([\w.]+)", sanitizer) or [sanitizer])[0]
    info["compute_sanitizer_path"] = sanitizer_path or None
    versions["python"] = platform.python_version()
    plugins = ("pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "expecttest")
    for package in plugins + ("numpy", "ninja"):
        versions[package] = package_version(package)
    say(
        f"nvcc {versions['nvcc']}, compute-sanitizer {versions['compute_sanitizer']}, "
        f"driver {versions['driver']}, python {versions['python']}"
    )
    say("packages: " + ", ".join(f"{name} {versions[name]}" for name in plugins))
    if versions["expecttest"] is None:
        info["problems"].append("expecttest is missing: torch.library.opcheck tests skip")

    import torch

    versions["torch"] = torch.__version__
    versions["cuda_runtime"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cuda = torch.cuda.is_available()
    say(
        f"torch {versions['torch']}, CUDA runtime {versions['cuda_runtime']}, cuDNN {versions['cudnn']}, "
        f"CUDA available: {cuda}"
    )
    if not cuda:
        info["problems"].append("torch sees no CUDA device")
    else:
        properties = torch.cuda.get_device_properties(0)
        device = info["device"]
        device.update(
            {
                "name": properties.name,
                "capability": f"{properties.major}.{properties.minor}",
                "sm_count": properties.multi_processor_count,
                "total_memory_bytes": properties.total_memory,
                "shared_memory_per_block": getattr(properties, "shared_memory_per_block", None),
                "shared_memory_per_block_optin": getattr(properties, "shared_memory_per_block_optin", None),
                "device_count": torch.cuda.device_count(),
            }
        )
        driver = driver_attributes(0)
        if "error" in driver:
            info["problems"].append(driver["error"])
        else:
            for key, value in driver.items():
                if device.get(key) is None:
                    device[key] = value
                elif device[key] != value:
                    info["problems"].append(f"{key}: torch says {device[key]}, the driver {value}")
        say(
            f"device: {device['name']} (sm_{properties.major}{properties.minor}), {device['sm_count']} SMs, "
            f"{device['total_memory_bytes'] / 2**30:.0f} GiB, shared memory per block opt-in "
            f"{device.get('shared_memory_per_block_optin')} B, "
            f"cooperative launch {device.get('cooperative_launch')}"
        )
        touch_device(torch)
    for problem in info["problems"]:
        say(f"PROBLEM: {problem}")
    return 0 if cuda else 1


def gpu_slug(preflight: Path) -> str:
    try:
        name = json.loads(preflight.read_text()).get("device", {}).get("name")
    except (OSError, ValueError):
        name = None
    return slug(name) if name else "no-gpu"


# ------------------------------------------------------------------------------------------------
# ptxas -v.

PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SHARED = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> dict[str, str]:
    try:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=20)
        plain = done.stdout.splitlines()
        if len(plain) == len(names):
            return dict(zip(names, plain))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {name: name for name in names}


def ptxas_report(log_text: str) -> dict:
    """Registers, spills, stack frame and static shared memory of each kernel ptxas compiled
    (`-Xptxas=-v`), keyed by the demangled name without the project's namespaces. ptxas prints, per
    kernel: "Compiling entry function 'NAME' for 'sm_XX'", then its frame (stack, spills), then
    "Used N registers"; device functions' frames between them are not the kernel's."""
    rows = []
    entry = frame = None
    for line in log_text.splitlines():
        match = PTXAS_ENTRY.search(line)
        if match:
            entry, frame = match.groups(), None
            continue
        match = PTXAS_FRAME.search(line)
        if match and entry is not None and frame is None:
            frame = [int(value) for value in match.groups()]
            continue
        match = PTXAS_REGISTERS.search(line)
        if match and entry is not None:
            shared = PTXAS_SHARED.search(line)
            stack, spill_stores, spill_loads = frame or (0, 0, 0)
            rows.append(
                (
                    entry[0],
                    entry[1],
                    int(match.group(1)),
                    spill_stores,
                    spill_loads,
                    stack,
                    int(shared.group(1)) if shared else 0,
                )
            )
            entry = frame = None
    names = demangle([row[0] for row in rows])
    report = {}
    for name, arch, registers, spill_stores, spill_loads, stack, shared in rows:
        short = re.sub(r"rnn_ext::gpu::\(anonymous namespace\)::", "", names[name])
        report[short] = {
            "arch": arch,
            "registers": registers,
            "spill_stores": spill_stores,
            "spill_loads": spill_loads,
            "stack_frame": stack,
            "static_shared_bytes": shared,
        }
    return report


def format_ptxas(report: dict) -> str:
    lines = [f"{'registers':>9} {'spill st':>8} {'spill ld':>8} {'stack':>6}  kernel"]
    for name, row in sorted(report.items()):
        lines.append(
            f"{row['registers']:>9} {row['spill_stores']:>8} {row['spill_loads']:>8} "
            f"{row['stack_frame']:>6}  {name}"
        )
    if not report:
        lines.append("(no ptxas -v lines in the build log)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The op-kernel check (make check-cuda, and after the build on a GPU machine).


def check_ops() -> int:
    import torch

    import rnn_ext

    if not rnn_ext._C.built_with_cuda:
        print("check-cuda: the extension was built without its CUDA sources")
        return 1
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rnn_ext::"))
    if not names:
        print("check-cuda: no rnn_ext ops are registered")
        return 1
    missing = []
    for name in names:
        # A composite kernel (defined from other ops) serves every backend, CUDA included.
        composite = next(
            (
                key
                for key in ("CompositeExplicitAutograd", "CompositeImplicitAutograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            ),
            None,
        )
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        kind = "CUDA kernel" if has_kernel else f"{composite} kernel" if composite else "NO CUDA kernel"
        print(f"check-cuda: {name}: {kind}")
        if not (has_kernel or composite):
            missing.append(name)
    if missing:
        print(f"check-cuda: no CUDA kernel for {', '.join(missing)}")
        return 1
    print(f"check-cuda: all {len(names)} rnn_ext ops run on CUDA (torch {torch.__version__})")
    return 0


# ------------------------------------------------------------------------------------------------
# The record.

STAGE_COLUMNS = ("stage", "status", "rc", "seconds", "limit", "note")


def read_stages(path: Path) -> list[dict]:
    """The stage table the shell keeps: a header, then one tab-separated row per stage."""
    stages = []
    if not path.exists():
        return stages
    for line in path.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) < len(STAGE_COLUMNS) - 1:
            continue
        row = dict(zip(STAGE_COLUMNS, fields + [""] * (len(STAGE_COLUMNS) - len(fields))))
        for key in ("rc", "seconds", "limit"):
            row[key] = int(row[key]) if re.fullmatch(r"-?\d+", row[key]) else None
        stages.append(row)
    return stages


def junit_counts(path: Path) -> dict | None:
    """Counts of one pytest run from its junit XML; None when the run wrote none (killed, skipped)."""
    if not path.exists():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"unreadable": str(error)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0}
    for suite in suites:
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
        counts["seconds"] += float(suite.get("time", 0) or 0)
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(counts["seconds"], 1)
    bad = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if any(child.tag in ("failure", "error") for child in case)
    ]
    counts["not_passed"] = bad[:30]
    counts["complete"] = True
    return counts


PYTEST_OUTCOME = re.compile(
    r"(?:(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+))"
    r"|(?:(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))"
)


def pytest_log_counts(text: str) -> dict | None:
    """Outcomes of a pytest -v run that wrote no junit XML (killed at its limit), from its progress
    lines: "tests/x.py::t[a] PASSED", or with pytest-xdist "[gw0] [ 5%] PASSED tests/x.py::t[a]"."""
    outcomes = {}
    for match in PYTEST_OUTCOME.finditer(text):
        outcome, test = (
            (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        )
        outcomes[test] = outcome
    if not outcomes:
        return None
    counts = {"complete": False, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {
        "PASSED": "passed",
        "XPASS": "passed",
        "FAILED": "failed",
        "ERROR": "errors",
        "SKIPPED": "skipped",
        "XFAIL": "skipped",
    }
    for outcome in outcomes.values():
        counts[key[outcome]] += 1
    counts["tests"] = sum(counts[k] for k in ("passed", "failed", "errors", "skipped"))
    counts["not_passed"] = [t for t, o in outcomes.items() if o in ("FAILED", "ERROR")][:30]
    return counts


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def smoke_result(logs: Path, regime: str) -> dict | None:
    text = read_text(logs / f"smoke_{regime}.log")
    if not text:
        return None
    lines = [line for line in text.splitlines() if line.startswith("smoke:")]
    verdict = [line for line in lines if " status=" in line]
    result = {"last_line": lines[-1] if lines else None}
    if verdict:
        result.update(dict(re.findall(r"(\w+)=(\S+)", verdict[-1])))
    return result


def sanitizer_result(logs: Path, tool: str) -> dict | None:
    text = read_text(logs / f"{tool}.log")
    if not text:
        return None
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
    cases = re.findall(r"sanitizer_cases: (\d+) of (\d+) cases match", text)
    started = re.findall(r"^start (\S+)", text, flags=re.M)
    failed = re.findall(r"^FAIL (\S+)", text, flags=re.M)
    return {
        "errors": int(errors[-1]) if errors else None,
        "hazards": int(hazards[-1]) if hazards else None,
        "cases_matching": int(cases[-1][0]) if cases else None,
        "cases": int(cases[-1][1]) if cases else None,
        "last_case_started": started[-1] if started else None,
        "mismatching_cases": failed,
    }


def bench_result(logs: Path, dtype: str):
    path = logs / f"bench_{dtype}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        return {"unreadable": str(error)}


def git_commit(root: Path) -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def build_record(
    logs: Path,
    stamp: str,
    name: str,
    root: Path = REPO,
    budget: int | None = None,
    elapsed: int | None = None,
) -> dict:
    """Everything a GPU run found, from the files its stages left in `logs`."""
    try:
        preflight = json.loads((logs / "preflight.json").read_text())
    except (OSError, ValueError):
        preflight = {}
    return {
        "kind": "gpu_check",
        "stamp": stamp,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": name,
        "csrc_sha256": csrc_sha256(root),
        "git_commit": git_commit(root),
        "budget_s": budget,
        "elapsed_s": elapsed,
        "stages": read_stages(logs / "stages.tsv"),
        "versions": preflight.get("versions", {}),
        "device": preflight.get("device", {}),
        "preflight_problems": preflight.get("problems", []),
        "tests": {
            stage: junit_counts(logs / f"junit-{stage}.xml")
            or pytest_log_counts(read_text(logs / f"{stage}.log"))
            for stage in PYTEST_STAGES
        },
        "smoke": {regime: smoke_result(logs, regime) for regime in REGIMES},
        "sanitizer": {tool: sanitizer_result(logs, tool) for tool in SANITIZER_TOOLS},
        "ptxas": ptxas_report(read_text(logs / "build.log")),
        "bench": {dtype: bench_result(logs, dtype) for dtype in BENCH_DTYPES},
    }


def write_record(record: dict, out_dirs: list[Path]) -> list[Path]:
    written = []
    for directory in out_dirs:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{record['stamp']}-{record['gpu']}.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(path)  # a run killed mid-write leaves the previous record whole
        written.append(path)
    return written


def summary(record: dict) -> str:
    """The record in a few lines, for the end of a run's console output."""
    lines = [
        f"gpu_check {record['stamp']} on {record['gpu']}, csrc {record['csrc_sha256'][:16]}, "
        f"{record.get('elapsed_s')} s of {record.get('budget_s')} s"
    ]
    for stage in record["stages"]:
        if stage["status"] == "skipped":
            lines.append(f"  {stage['stage']:<20} skipped: {stage['note']}")
        else:
            lines.append(
                f"  {stage['stage']:<20} {stage['status']:<8} rc={stage['rc']!s:<4} "
                f"{stage['seconds']!s:>4} s of {stage['limit']!s:>4} s  {stage['note']}".rstrip()
            )
    for regime, result in record["smoke"].items():
        if result:
            lines.append(
                f"  smoke {regime}: {result.get('status', '?')} "
                f"(max relative error {result.get('max_relative_error', '?')})"
            )
    for stage, counts in record["tests"].items():
        if counts and "tests" in counts:
            lines.append(
                f"  {stage}: {counts['passed']} passed, {counts['failed']} failed, "
                f"{counts['errors']} errors, {counts['skipped']} skipped"
                + ("" if counts["complete"] else " (cut short: counted from its log)")
            )
    for tool, result in record["sanitizer"].items():
        if result:
            lines.append(
                f"  {tool}: errors {result['errors']}, hazards {result['hazards']}, cases "
                f"{result['cases_matching']}/{result['cases']}, last started {result['last_case_started']}"
            )
    for dtype, bench in record["bench"].items():
        if isinstance(bench, dict) and isinstance(bench.get("results"), list):
            ratios = [r.get("ratio") for r in bench["results"] if isinstance(r, dict) and r.get("ratio")]
            if ratios:
                lines.append(
                    f"  bench {dtype}: {len(ratios)} timings, cuDNN/rnn_ext ratio "
                    f"{min(ratios):.2f}..{max(ratios):.2f}"
                )
    spills = [name for name, row in record["ptxas"].items() if row["spill_stores"] or row["spill_loads"]]
    if record["ptxas"]:
        lines.append(f"  ptxas: {len(record['ptxas'])} kernels, spilling: {', '.join(spills) or 'none'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    hashing = commands.add_parser("csrc-sha256")
    hashing.add_argument("--root", type=Path, default=REPO)
    key = commands.add_parser("build-key")
    key.add_argument("--root", type=Path, default=REPO)
    probing = commands.add_parser("probe")
    probing.add_argument("--out", type=Path, default=None)
    naming = commands.add_parser("gpu-slug")
    naming.add_argument("preflight", type=Path)
    ptxas = commands.add_parser("ptxas")
    ptxas.add_argument("build_log", type=Path)
    commands.add_parser("ops")
    recording = commands.add_parser("record")
    recording.add_argument("--logs", type=Path, required=True)
    recording.add_argument("--stamp", required=True)
    recording.add_argument("--name", required=True)
    recording.add_argument("--out-dir", type=Path, action="append", default=[])
    recording.add_argument("--root", type=Path, default=REPO)
    recording.add_argument("--budget", type=int, default=None)
    recording.add_argument("--elapsed", type=int, default=None)
    recording.add_argument("--summary", action="store_true", help="print the summary too")
    summarizing = commands.add_parser("summary")
    summarizing.add_argument("record", type=Path)
    args = parser.parse_args(argv)

    if args.command == "csrc-sha256":
        print(csrc_sha256(args.root))
    elif args.command == "build-key":
        print(build_key(args.root))
    elif args.command == "probe":
        return probe(args.out)
    elif args.command == "gpu-slug":
        print(gpu_slug(args.preflight))
    elif args.command == "ptxas":
        print(format_ptxas(ptxas_report(read_text(args.build_log))), end="")
    elif args.command == "ops":
        return check_ops()
    elif args.command == "record":
        record = build_record(args.logs, args.stamp, args.name, args.root, args.budget, args.elapsed)
        for path in write_record(record, args.out_dir):
            print(path)
        if args.summary:
            print(summary(record))
    elif args.command == "summary":
        print(summary(json.loads(args.record.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
