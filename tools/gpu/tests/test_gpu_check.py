"""The GPU-run harness without a GPU: tools/gpu/gpu_check.sh's dry run (stages, order, timeouts,
budget), the sanitizer case list, the csrc/ hash against its shell pipeline, the JSON record from
fake stage outputs, and make check-cuda's loud skip without nvcc."""

import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tooling

REPO = Path(__file__).resolve().parents[3]
TOOLS = REPO / "tools" / "gpu"
GPU_CHECK = TOOLS / "gpu_check.sh"
STAGES = [
    "wheels",
    "preflight",
    "build",
    "smoke_single_block",
    "smoke_cooperative",
    "smoke_step_gemm",
    "test_cuda",
    "memcheck",
    "racecheck",
    "synccheck",
    "bench_float32",
    "tests_rest",
    "bench_float16",
    "bench_bfloat16",
]
KILL_AFTER = 5
LIMIT = 480  # seconds a run may take, so that two fit in a 15-minute lease with the machine's start
STAGE_LINE = re.compile(r"^stage (\d+) (\S+) timeout=(\d+)s min=(\d+)s worst_case=(\S+?): (.*)$")
TOTAL_LINE = re.compile(r"^total: budget=(\d+)s worst_case_stages=(\d+)s worst_case_end=(\d+)s$")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


report = load("gpu_report", TOOLS / "gpu_report.py")
sanitizer_cases = load("sanitizer_cases", TOOLS / "sanitizer_cases.py")


def dry_run(*args, budget=None, out=None):
    return cached_dry_run(args, budget, out)


@functools.lru_cache(maxsize=None)
def cached_dry_run(args, budget, out):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("GPU_CHECK_BUDGET_S", None)
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    if out is not None:
        env["OUT"] = str(out)
    done = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    stages = [STAGE_LINE.match(line).groups() for line in done.stdout.splitlines() if STAGE_LINE.match(line)]
    totals = [TOTAL_LINE.match(line).groups() for line in done.stdout.splitlines() if TOTAL_LINE.match(line)]
    assert len(totals) == 1, done.stdout
    return done.stdout, stages, [int(v) for v in totals[0]]


@pytest.fixture(scope="module")
def untouched_out(tmp_path_factory):
    """An $OUT for the dry runs, which must leave it empty."""
    return tmp_path_factory.mktemp("out")


def test_dry_run_lists_every_stage_in_order_with_a_timeout(untouched_out):
    output, stages, _ = dry_run(out=untouched_out)
    assert [name for _, name, *_ in stages] == STAGES
    assert [int(index) for index, *_ in stages] == list(range(1, len(STAGES) + 1))
    commands = {}
    for _, name, timeout, minimum, _, command in stages:
        assert 0 < int(minimum) <= int(timeout) <= 150, name
        assert command.strip(), name
        commands[name] = command
    for regime in ("single_block", "cooperative", "step_gemm"):
        assert f"tools/gpu/gpu_smoke.py --regime {regime}" in commands[f"smoke_{regime}"]
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"--tool {tool}" in commands[tool] and "tools/gpu/sanitizer_cases.py" in commands[tool]
    assert "tests/test_cuda.py" in commands["test_cuda"]
    assert "faulthandler_timeout=60" in commands["test_cuda"]
    assert "--ignore tests/test_cuda.py" in commands["tests_rest"]
    # The build: every core, sm_90 machine code and compute_90 PTX, the ptxas report.
    assert "setup.py build_ext --inplace" in output
    assert "code=sm_90" in output and "code=compute_90" in output and "RNN_EXT_PTXAS_VERBOSE=1" in output


def test_dry_run_benchmark_grid_is_float32_without_tf32_against_cudnn(untouched_out):
    _, stages, _ = dry_run(out=untouched_out)
    command = {name: command for _, name, *_, command in stages}["bench_float32"]
    assert "--device cuda" in command and "--dtype float32" in command and "--tf32" not in command
    configs = re.search(r"--configs '([^']+)'", command).group(1).split(";")
    parsed = {tuple(int(v) for v in config.split(",")) for config in configs}
    expected = {(100, b, h, h, 1) for b in (1, 16, 64) for h in (64, 128, 256, 512, 1024, 2048)}
    assert parsed == expected and len(configs) == len(expected)


@pytest.mark.parametrize("budget", [None, 120, 9999])
def test_dry_run_worst_case_stays_within_the_budget(budget, untouched_out):
    _, stages, (total_budget, worst_stages, worst_end) = dry_run(budget=budget, out=untouched_out)
    assert total_budget <= LIMIT
    if budget is not None:
        assert total_budget == min(budget, LIMIT)
    # The worst case: every stage that starts runs to its timeout and then its kill.
    started = [int(worst[:-1]) for *_, worst, _ in stages if worst.endswith("s")]
    assert started, "no stage would start"
    assert worst_stages == sum(limit + KILL_AFTER for limit in started)
    assert worst_end <= total_budget
    skipped = [name for _, name, *_, worst, _ in stages if worst == "skipped"]
    assert all(name in STAGES for name in skipped)


def test_dry_run_writes_nothing(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = sorted(results.iterdir())
    dry_run("--only", "preflight", out=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert sorted(results.iterdir()) == before


def test_only_selects_stages_and_rejects_unknown_ones():
    _, stages, _ = dry_run("--only", "build,memcheck")
    selected = [name for _, name, *_, worst, _ in stages if worst != "not-selected"]
    assert selected == ["wheels", "preflight", "build", "memcheck"]  # preflight always runs
    done = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run", "--only", "build,nonsense"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "nonsense" in done.stderr


# ------------------------------------------------------------------------------------------------
# The sanitizer cases.

CASES = sanitizer_cases.CASES


def cases_where(**conditions):
    return [c for c in CASES if all(predicate(getattr(c, key)) for key, predicate in conditions.items())]


def test_sanitizer_case_names_are_unique_and_sizes_valid():
    assert len({case.name for case in CASES}) == len(CASES)
    for case in CASES:
        assert case.regime in sanitizer_cases.REGIMES, case.name
        assert case.dtype in sanitizer_cases.TOLERANCE, case.name
        assert case.directions in (1, 2) and min(case.steps, case.batch, case.input_size, case.hidden) >= 1
        assert case.covers, f"{case.name} says nothing about the path it covers"


@pytest.mark.parametrize("regime", ["single_block", "cooperative", "step_gemm"])
def test_sanitizer_cases_cover_each_regime_in_every_dtype_packed_and_odd_hidden(regime):
    mine = cases_where(regime=lambda r: r == regime)
    assert {case.dtype for case in mine} == {"float32", "float64", "float16", "bfloat16"}
    assert any(case.packed for case in mine)
    assert any(case.directions == 2 for case in mine)
    assert any(case.hidden % 4 for case in mine), "H not a multiple of 4"
    assert any(case.relu for case in mine) and any(not case.relu for case in mine)


def test_sanitizer_cases_cover_the_shared_memory_opt_in():
    # One block's W_hh past the 48 KB every kernel gets without cudaFuncSetAttribute.
    optin = cases_where(
        regime=lambda r: r == "single_block", dtype=lambda d: d == "float32", hidden=lambda h: h == 200
    )
    assert optin and all(case.hidden**2 * 4 > 48 * 1024 for case in optin)


def cooperative_layout(case, sm_count):
    """The planner's (csrc/cuda/recurrence_plan.cpp) launch directions and batch groups for a
    chip-wide-capped cooperative case, for the arithmetic that decides them."""
    width = case.max_slice_for(sm_count)
    for launch_directions in range(case.directions, 0, -1):
        budget = sm_count // launch_directions
        if math.ceil(case.hidden / budget) > width:
            continue  # too few SMs for this width: fewer directions per launch
        slices = math.ceil(case.hidden / width)
        groups = max(1, min(budget // slices, math.ceil(case.batch / 8)))
        return launch_directions, groups
    return None


@pytest.mark.parametrize("sm_count", [132, 114])  # H200 / H100 SXM, H100 PCIe
def test_sanitizer_cases_cover_cooperative_row_tiles_and_split_directions(sm_count):
    wide = cases_where(
        regime=lambda r: r == "cooperative",
        hidden=lambda h: h == 600,
        max_slice=lambda m: m == sanitizer_cases.MAX_SLICE_CHIP_WIDE,
    )
    one = [c for c in wide if c.directions == 1]
    two = [c for c in wide if c.directions == 2]
    assert one and two
    for case in one:
        # One batch group holding every row: each block walks several 8-row register tiles, the last
        # one partial.
        assert cooperative_layout(case, sm_count) == (1, 1)
        assert case.batch > 8 and case.batch % 8
    for case in two:
        assert cooperative_layout(case, sm_count)[0] == 1  # one launch per direction


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_sanitizer_cases_run_and_meet_their_tolerance_on_the_cpu(case, monkeypatch):
    """The same comparison on the CPU op: the arguments are valid for the op and the tolerance
    model holds for a correct kernel, so that a GPU failure is the GPU's."""
    import rnn_ext  # noqa: F401  (registers torch.ops.rnn_ext)

    for name in ("RNN_EXT_CUDA_REGIME", "RNN_EXT_CUDA_MAX_SLICE"):
        monkeypatch.setenv(name, "")  # restored after the case sets them
    ok, error = sanitizer_cases.check_case(case, seed=3, sm_count=132, device="cpu")
    assert ok, f"relative error {error:.2e} over {sanitizer_cases.TOLERANCE[case.dtype]:.0e}"


def test_smoke_covers_every_regime(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    smoke = load("gpu_smoke", TOOLS / "gpu_smoke.py")
    assert set(smoke.SMOKE) == set(sanitizer_cases.REGIMES)
    assert all(case.regime == regime for regime, case in smoke.SMOKE.items())


def test_relative_error_catches_nan_and_shape_changes():
    import torch

    a = [torch.zeros(3, dtype=torch.float64)]
    assert sanitizer_cases.relative_error(a, [torch.full((3,), 0.5, dtype=torch.float64)]) == 0.5
    assert sanitizer_cases.relative_error([torch.tensor([float("nan")])], [torch.zeros(1)]) == math.inf
    assert sanitizer_cases.relative_error(a, [torch.zeros(4, dtype=torch.float64)]) == math.inf


# ------------------------------------------------------------------------------------------------
# The csrc/ hash.

PIPELINE = "find csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1"


def shell_hash(root):
    return subprocess.run(
        PIPELINE, shell=True, cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_csrc_hash_matches_the_shell_pipeline_on_the_sources():
    assert report.csrc_sha256(REPO) == shell_hash(REPO)


def test_csrc_hash_matches_the_shell_pipeline_on_awkward_trees(tmp_path):
    # Byte order (upper case, '_', '-', '.' sort differently in other locales), nesting, an empty
    # file, and a symbolic link, which find -type f leaves out.
    files = {
        "csrc/b.cpp": "b",
        "csrc/B.h": "B",
        "csrc/_x.h": "",
        "csrc/a-b/z.cu": "z",
        "csrc/a.b/y": "y",
        "csrc/a/Z.cpp": "Z\n",
        "csrc/a/z.cpp": "z\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "csrc" / "link.cpp").symlink_to(tmp_path / "csrc" / "b.cpp")
    expected = shell_hash(tmp_path)
    assert report.csrc_sha256(tmp_path) == expected
    (tmp_path / "csrc" / "a" / "z.cpp").write_text("changed")
    assert report.csrc_sha256(tmp_path) == shell_hash(tmp_path) != expected


# ------------------------------------------------------------------------------------------------
# The record.

KERNEL = "_ZN7rnn_ext3gpu12_GLOBAL__N_123elman_recurrence_kernelIfLi1EEEvNS1_14RecurrenceArgsE"
BUILD_LOG = f"""[3/5] nvcc ... elman_launch.cu
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{KERNEL}' for 'sm_90'
ptxas info    : Function properties for {KERNEL}
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size, 416 bytes cmem[0]
ptxas info    : Function properties for helper_device_function
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'step_activation_kernel' for 'sm_90'
ptxas info    : Function properties for step_activation_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 64 bytes smem, 400 bytes cmem[0]
"""
JUNIT = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"\n'
    'skipped="1" tests="3" time="12.5">'
    '<testcase classname="tests.test_cuda" name="test_a[cooperative]" time="1"/>\n'
    '<testcase classname="tests.test_cuda" name="test_b[step_gemm]" time="1">'
    '<failure message="x">x</failure></testcase>\n'
    '<testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="y"/></testcase>'
    "</testsuite></testsuites>\n"
)


def fake_run(tmp_path):
    """A source tree and the files a run's stages leave behind: some ran, one timed out, one never ran."""
    root = tmp_path / "repo"
    (root / "csrc").mkdir(parents=True)
    (root / "csrc" / "ops.cpp").write_text("// ops\n")
    (root / "setup.py").write_text("# setup\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [
        ("preflight", "ok", "0", "8", "30", ""),
        ("build", "ok", "0", "95", "240", ""),
        ("smoke_cooperative", "failed", "1", "9", "45", ""),
        ("synccheck", "timeout", "124", "60", "60", ""),
        ("bench_float16", "skipped", "", "0", "", "budget: 12 s left, needs 30 s"),
    ]
    (logs / "stages.tsv").write_text(
        "stage\tstatus\trc\tseconds\tlimit\tnote\n" + "".join("\t".join(row) + "\n" for row in rows)
    )
    (logs / "preflight.json").write_text(
        json.dumps(
            {
                "versions": {
                    "torch": "2.11.0+cu130",
                    "cuda_runtime": "13.0",
                    "nvcc": "13.0",
                    "python": "3.12.3",
                    "driver": "580.159.04",
                    "compute_sanitizer": "2025.3.1",
                    "expecttest": None,
                },
                "device": {
                    "name": "NVIDIA H200",
                    "capability": "9.0",
                    "sm_count": 132,
                    "shared_memory_per_block_optin": 232448,
                    "cooperative_launch": True,
                },
                "problems": ["expecttest is missing: torch.library.opcheck tests skip"],
            }
        )
    )
    (logs / "build.log").write_text(BUILD_LOG)
    (logs / "junit-test_cuda.xml").write_text(JUNIT)
    (logs / "smoke_cooperative.log").write_text(
        "smoke: cooperative: forward finished after 0.50 s\n"
        "smoke: regime=cooperative status=mismatch max_relative_error=3.10e-02 seconds=1.20\n"
    )
    (logs / "memcheck.log").write_text(
        "start case_a\nok   case_a relative error 1e-07\nstart case_b\nFAIL case_b relative error 1e-01\n"
        "sanitizer_cases: 1 of 2 cases match the CPU\n========= ERROR SUMMARY: 0 errors\n"
    )
    (logs / "racecheck.log").write_text(
        "start case_a\n========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)\n"
    )
    (logs / "synccheck.log").write_text("start case_a\nok   case_a\nstart case_b\n")
    (logs / "tests_rest.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_ops.py::test_gradcheck[cuda-case0-False] \n"
        "[gw1] [ 20%] FAILED tests/test_fuzz.py::test_matches_nn_rnn[cuda-packed] \n"
        "tests/test_parity.py::test_zero_batch[cuda] PASSED                 [ 30%]\n"
        "[gw0] [ 40%] SKIPPED tests/test_toolchain.py::test_cuda_graph_forward_replays_new_inputs \n"
        "Timeout (0:02:00)!\n"
    )
    (logs / "bench_float32.json").write_text(json.dumps({"results": [{"ratio": 2.0}, {"ratio": 0.5}]}))
    return root, logs


def test_record_holds_what_the_stages_left(tmp_path):
    root, logs = fake_run(tmp_path)
    record = report.build_record(logs, "20261129-120000", "nvidia-h200", root=root, budget=420, elapsed=300)
    assert record["csrc_sha256"] == shell_hash(root)
    assert record["gpu"] == "nvidia-h200" and record["budget_s"] == 420 and record["elapsed_s"] == 300
    stages = {row["stage"]: row for row in record["stages"]}
    assert list(stages) == ["preflight", "build", "smoke_cooperative", "synccheck", "bench_float16"]
    assert stages["build"] == {
        "stage": "build",
        "status": "ok",
        "rc": 0,
        "seconds": 95,
        "limit": 240,
        "note": "",
    }
    assert stages["synccheck"]["status"] == "timeout" and stages["synccheck"]["rc"] == 124
    assert stages["bench_float16"]["rc"] is None and stages["bench_float16"]["note"].startswith("budget")
    assert record["versions"]["torch"] == "2.11.0+cu130" and record["versions"]["nvcc"] == "13.0"
    assert record["device"]["sm_count"] == 132 and record["device"]["cooperative_launch"] is True
    assert record["preflight_problems"]
    assert record["tests"]["test_cuda"] == {
        "tests": 3,
        "passed": 1,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "seconds": 12.5,
        "not_passed": ["tests.test_cuda::test_b[step_gemm]"],
        "complete": True,
    }
    # Killed at its limit: no junit report, so what its -v progress lines say, marked incomplete.
    assert record["tests"]["tests_rest"] == {
        "complete": False,
        "tests": 4,
        "passed": 2,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "not_passed": ["tests/test_fuzz.py::test_matches_nn_rnn[cuda-packed]"],
    }
    assert record["smoke"]["cooperative"]["status"] == "mismatch"
    assert record["smoke"]["cooperative"]["max_relative_error"] == "3.10e-02"
    assert record["smoke"]["single_block"] is None
    memcheck, racecheck, synccheck = (
        record["sanitizer"][tool] for tool in ("memcheck", "racecheck", "synccheck")
    )
    assert (memcheck["errors"], memcheck["cases_matching"], memcheck["cases"]) == (0, 1, 2)
    assert memcheck["mismatching_cases"] == ["case_b"]
    assert racecheck["hazards"] == 3
    assert synccheck["errors"] is None and synccheck["last_case_started"] == "case_b"  # where it hung
    assert record["bench"]["float32"]["results"][0]["ratio"] == 2.0 and record["bench"]["float16"] is None
    kernels = record["ptxas"]
    assert len(kernels) == 2  # the device function's frame belongs to no kernel
    recurrence = next(row for name, row in kernels.items() if "elman_recurrence_kernel" in name)
    assert recurrence == {
        "arch": "sm_90",
        "registers": 128,
        "spill_stores": 8,
        "spill_loads": 4,
        "stack_frame": 16,
        "static_shared_bytes": 0,
    }
    assert kernels["step_activation_kernel"]["static_shared_bytes"] == 64
    summary = report.summary(record)
    assert "synccheck" in summary and "timeout" in summary and "0.50..2.00" in summary


def test_record_is_written_to_every_folder_under_one_name(tmp_path):
    root, logs = fake_run(tmp_path)
    record = report.build_record(logs, "20261129-120000", "nvidia-h200", root=root)
    paths = report.write_record(record, [tmp_path / "out", tmp_path / "results"])
    assert [path.name for path in paths] == ["20261129-120000-nvidia-h200.json"] * 2
    for path in paths:
        assert json.loads(path.read_text()) == record
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_record_of_an_empty_run(tmp_path):
    root, _ = fake_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    record = report.build_record(empty, "s", "no-gpu", root=root)
    assert record["stages"] == [] and record["versions"] == {} and record["ptxas"] == {}
    assert all(value is None for value in record["tests"].values())  # never ran: not zero tests
    assert report.gpu_slug(empty / "preflight.json") == "no-gpu"


def test_probe_records_a_gpu_machine(tmp_path, monkeypatch):
    """The preflight's GPU branch, with torch's and the tools' answers replaced by an H200's."""
    import torch

    answers = {
        "nvidia-smi -L": "GPU 0: NVIDIA H200 (UUID: GPU-0)",
        "nvidia-smi": "NVIDIA H200, 580.159.04, 143771 MiB",
        "nvcc": "Cuda compilation tools, release 13.0, V13.0.88",
        "/opt/compute-sanitizer": "NVIDIA (R) Compute Sanitizer\nVersion 2025.3.1.0 (build 123)",
    }
    monkeypatch.setattr(
        report,
        "run_tool",
        lambda command, timeout=15: answers.get(" ".join(command[:2]), answers.get(command[0], "not found")),
    )
    monkeypatch.setenv("COMPUTE_SANITIZER", "/opt/compute-sanitizer")
    properties = type(
        "Properties",
        (),
        dict(
            name="NVIDIA H200",
            major=9,
            minor=0,
            multi_processor_count=132,
            total_memory=150_000_000_000,
            shared_memory_per_block=49152,
            shared_memory_per_block_optin=232448,
        ),
    )()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        report,
        "driver_attributes",
        lambda ordinal: {
            "sm_count": 132,
            "l2_cache_bytes": 62914560,
            "cooperative_launch": True,
            "shared_memory_per_block_optin": 232448,
            "driver_cuda_version": "13.0",
        },
    )
    touched = []
    monkeypatch.setattr(report, "touch_device", lambda torch: touched.append(True))
    out = tmp_path / "preflight.json"
    assert report.probe(out) == 0 and touched
    info = json.loads(out.read_text())
    assert info["versions"]["driver"] == "580.159.04" and info["versions"]["nvcc"] == "13.0"
    assert info["versions"]["compute_sanitizer"] == "2025.3.1.0"
    assert info["device"] == {
        "name": "NVIDIA H200",
        "capability": "9.0",
        "sm_count": 132,
        "total_memory_bytes": 150_000_000_000,
        "shared_memory_per_block": 49152,
        "shared_memory_per_block_optin": 232448,
        "device_count": 1,
        "l2_cache_bytes": 62914560,
        "cooperative_launch": True,
        "driver_cuda_version": "13.0",
    }
    assert report.gpu_slug(out) == "nvidia-h200"


def test_probe_writes_its_record_when_it_breaks(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(report, "run_tool", lambda command, timeout=15: "not found")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: 1 / 0)
    out = tmp_path / "preflight.json"
    assert report.probe(out) == 1
    assert any("ZeroDivisionError" in problem for problem in json.loads(out.read_text())["problems"])


# ------------------------------------------------------------------------------------------------
# make check-cuda without nvcc.


def test_check_cuda_without_nvcc_skips_loudly_and_fails_under_ci():
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": "/nonexistent", "HOME": os.environ.get("HOME", "/")}
    script = str(TOOLS / "check_cuda.sh")
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "SKIPPED" in done.stdout and "NOT compiled" in done.stdout
    done = subprocess.run(
        ["bash", script], capture_output=True, text=True, env=dict(env, CI="true"), timeout=60
    )
    assert done.returncode == 1 and "SKIPPED" in done.stdout
