"""Builds the host emulation of the CUDA kernels with g++: the real csrc/cuda layer glue, launch code
and kernels, the emulated runtime, and either the ctypes library the tests load or the
ThreadSanitizer race driver.

    python tests/cuda_emulation/build.py library          # prints the path of the shared library
    python tests/cuda_emulation/build.py races [--csrc D] # builds and runs the race driver under TSan
    python tests/cuda_emulation/build.py planted          # the same on copies with one barrier removed

Outputs go to build-emulation/<hash of flags and sources>/, so an unchanged tree is not rebuilt.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

COMMON = ["-std=c++20", "-pthread", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"]
OPTIMISED = ["-O2"]
TSAN = ["-O1", "-g", "-fsanitize=thread", "-fno-omit-frame-pointer"]


def cuda_headers_available():
    return os.path.isfile(os.path.join(CUDA_INCLUDE, "cuda_fp16.h"))


def sources(csrc):
    """(source, extra flags) of the emulation; the .cu is compiled as C++ with the emulation header
    forced in first."""
    emulation = ["-include", os.path.join(HERE, "cuda_emulation.h")]
    return [
        (os.path.join(csrc, "cuda", "elman_launch.cu"), ["-x", "c++"] + emulation),
        (os.path.join(csrc, "cuda", "recurrence_plan.cpp"), []),
        (os.path.join(csrc, "cuda", "layer_glue.cpp"), []),
        (os.path.join(HERE, "runtime.cpp"), emulation),
        (os.path.join(HERE, "api.cpp"), emulation),
    ]


def tree_hash(csrc, flags):
    digest = hashlib.sha256(" ".join(flags).encode())
    for folder in (csrc, HERE):
        for base, dirs, files in sorted(os.walk(folder)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith((".h", ".cuh", ".cu", ".cpp")):
                    path = os.path.join(base, name)
                    digest.update(os.path.relpath(path, folder).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()[:16]


def compile_objects(csrc, flags, out):
    include = ["-I", os.path.join(HERE, "include"), "-I", CUDA_INCLUDE]

    def one(item):
        source, extra = item
        obj = os.path.join(out, os.path.basename(source) + ".o")
        cmd = ["g++"] + flags + include + extra + ["-c", source, "-o", obj]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulation build failed: {' '.join(cmd)}\n{done.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, sources(csrc)))


def build(kind, csrc=None, build_root=None):
    """kind: 'library' (optimised shared library) or 'races' (TSan executable). Returns its path."""
    csrc = os.path.abspath(csrc or os.path.join(ROOT, "csrc"))
    build_root = build_root or os.path.join(ROOT, "build-emulation")
    flags = COMMON + (OPTIMISED if kind == "library" else TSAN)
    extra_sources = [os.path.join(HERE, "race_cases.cpp")] if kind == "races" else []
    out = os.path.join(build_root, f"{kind}-{tree_hash(csrc, flags)}")
    target = os.path.join(out, "libelman_emulation.so" if kind == "library" else "race_cases")
    if os.path.exists(target):
        return target
    os.makedirs(out, exist_ok=True)
    objects = compile_objects(csrc, flags, out)
    link = ["g++"] + flags + (["-shared"] if kind == "library" else []) + objects + extra_sources
    link += ["-I", os.path.join(HERE, "include"), "-I", CUDA_INCLUDE, "-o", target + ".partial"]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulation link failed: {' '.join(link)}\n{done.stderr}")
    os.replace(target + ".partial", target)
    return target


def run_races(csrc=None, expect_race=False):
    """Runs the race driver under TSan. Returns (clean, report text)."""
    driver = build("races", csrc)
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0")
    done = subprocess.run([driver], capture_output=True, text=True, env=env)
    report = done.stdout + done.stderr
    clean = done.returncode == 0 and "ThreadSanitizer" not in report
    return clean, report, done.returncode


# Barriers removed one at a time from a copy of the kernel file, each of which TSan must report: (what,
# the kernel text with the barrier, the same text without it).
PLANTED = [
    (
        "__syncthreads() between the partial sums and their reduction",
        "      }\n      __syncthreads();\n\n      // Finish each",
        "      }\n\n      // Finish each",
    ),
    (
        "the cooperative grid sync() at the end of each step",
        "    if (args.cooperative) cooperative_groups::this_grid().sync();\n  }\n}",
        "  }\n}",
    ),
]


def run_planted():
    """For each planted removal: copy csrc, remove the barrier, build and run the race driver, and
    require a ThreadSanitizer data-race report. Returns the number of removals TSan missed."""
    missed = 0
    for what, before, after in PLANTED:
        with tempfile.TemporaryDirectory(prefix="planted-") as folder:
            csrc = os.path.join(folder, "csrc")
            shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
            kernels = os.path.join(csrc, "cuda", "elman_kernels.cuh")
            with open(kernels) as f:
                text = f.read()
            if text.count(before) != 1:
                raise RuntimeError(
                    f"planted race: the barrier '{what}' is not in the kernel file exactly once"
                )
            with open(kernels, "w") as f:
                f.write(text.replace(before, after))
            clean, report, code = run_races(csrc)
        caught = "WARNING: ThreadSanitizer: data race" in report
        first = next((line for line in report.splitlines() if "elman_kernels.cuh" in line), "")
        print(
            f"planted: removed {what}: {'data race reported' if caught else 'NOT CAUGHT'} (exit code {code})"
        )
        if first:
            print(f"  first kernel frame: {first.strip()}")
        missed += 0 if caught else 1
    return missed


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["library", "races", "planted"])
    parser.add_argument("--csrc", help="the csrc tree to build (default: this checkout's)")
    args = parser.parse_args()
    if args.kind == "library":
        print(build("library", args.csrc))
        return 0
    if args.kind == "planted":
        return 1 if run_planted() else 0
    clean, report, code = run_races(args.csrc)
    sys.stdout.write(report)
    print(f"race driver: exit code {code}, {'no race reported' if clean else 'RACE or failure reported'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
