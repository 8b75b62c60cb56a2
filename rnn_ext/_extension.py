"""Loads rnn_ext._C, refusing one compiled for another torch or from older sources, and describes the
build and the machine for bug reports (rnn_ext.info(), python -m rnn_ext)."""

from __future__ import annotations

import importlib
import os
import platform
import re
import sys

import torch

from .machine import cpu_flags, cpu_model, cuda_driver_attributes

REBUILD_HINT = (
    "Rebuild rnn_ext against the running torch: from its source folder, "
    "`pip install --no-build-isolation --no-deps --force-reinstall .` "
    "(in a clone: `make build`, or `pip install --no-build-isolation --no-deps -e .` for an editable "
    "install)."
)


def _minor_release(version: str):
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _describe_torch(version, cuda_version) -> str:
    return f"torch {version} ({'CUDA ' + cuda_version if cuda_version else 'CPU-only build'})"


def check_torch_matches(
    built_version, built_cuda_version, cuda_kernels=False, running_version=None, running_cuda_version=None
):
    """Raises ImportError unless the torch that compiled the extension and the running one share the
    major.minor release, are both CUDA builds or both CPU-only, and, when the extension carries CUDA
    kernels, the CUDA major version. The running torch defaults to the imported one."""
    if running_version is None:
        running_version, running_cuda_version = torch.__version__, torch.version.cuda
    compatible = _minor_release(built_version) == _minor_release(running_version) and (
        built_cuda_version is None
    ) == (running_cuda_version is None)
    if compatible and cuda_kernels and built_cuda_version and running_cuda_version:
        compatible = built_cuda_version.split(".")[0] == running_cuda_version.split(".")[0]
    if not compatible:
        raise ImportError(
            f"rnn_ext was built against {_describe_torch(built_version, built_cuda_version)}, but "
            f"{_describe_torch(running_version, running_cuda_version)} is running; its compiled "
            "extension works only with the torch release (major.minor, CPU or CUDA) it was compiled "
            f"against. {REBUILD_HINT}"
        )


def build_record():
    """The generated rnn_ext/_build_info.py, or None when the build left none (an extension copied
    in by hand, or built before builds recorded their torch)."""
    name = f"{__package__}._build_info"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return None


def load_extension():
    record = build_record()
    if record is not None:
        # Before loading: a library built for another torch fails with an undefined symbol at best.
        check_torch_matches(
            record.TORCH_VERSION, record.TORCH_CUDA_VERSION, getattr(record, "CUDA_KERNELS", False)
        )
    name = f"{__package__}._C"
    try:
        extension = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise ImportError(
            "rnn_ext._C, the compiled extension, is not built: in a clone run `make build`, or "
            "`pip install --no-build-isolation .` next to the installed torch."
        ) from error
    except ImportError as error:
        built = f"it was built against torch {record.TORCH_VERSION}" if record else "its build left no record"
        raise ImportError(
            f"rnn_ext._C failed to load under {_describe_torch(torch.__version__, torch.version.cuda)} "
            f"({built}): {error}. {REBUILD_HINT}"
        ) from error
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rnn_ext::elman_forward", "Autograd"):
        # An extension built from older sources would train silently wrong: refuse it.
        raise ImportError(
            "rnn_ext._C has no autograd kernel for elman_forward; rebuild the extension "
            "(make build, or pip install --no-build-isolation -e .)"
        )
    return extension


_C = load_extension()


# --- build and machine report -------------------------------------------------------------------


def cpu_kernel_path() -> str:
    """The CPU kernel build that runs here, as the extension chose it at run time."""
    return _C.cpu_kernel()


def _openmp_in_extension() -> str:
    # GOMP_parallel is what `#pragma omp parallel` compiles to; without -fopenmp it is absent and
    # at::parallel_for in our code runs on one thread.
    try:
        with open(_C.__file__, "rb") as file:
            return "yes" if b"GOMP_parallel" in file.read() else "no (parallel loops in rnn_ext run serially)"
    except OSError as error:
        return f"unknown ({error})"


def _cuda_lines() -> list[tuple[str, str]]:
    if torch.version.cuda is None:
        return [("CUDA", "torch is a CPU-only build")]
    if not torch.cuda.is_available():
        return [("CUDA", f"torch built with CUDA {torch.version.cuda}; no GPU visible")]
    lines = [("CUDA", f"torch built with CUDA {torch.version.cuda}; {torch.cuda.device_count()} GPU(s)")]
    has_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("rnn_ext::elman_forward", "CUDA")
    forced = os.environ.get("RNN_EXT_CUDA_REGIME")
    for ordinal in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(ordinal)
        shared = getattr(props, "shared_memory_per_block_optin", None)
        cooperative = cuda_driver_attributes(ordinal).get("cooperative_launch")
        lines.append(
            (
                f"GPU {ordinal}",
                f"{props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.1f} GiB",
            )
        )
        if not has_kernels:
            lines.append((f"GPU {ordinal} regimes", "none: rnn_ext._C has no CUDA kernels"))
            continue
        regimes = [
            "single_block (when W_hh fits in one block's "
            + (f"{shared // 1024} KiB of shared memory)" if shared else "shared memory)"),
            "cooperative"
            + {
                True: "",
                False: " NOT available (no cooperative launch)",
                None: " (cooperative launch support unknown)",
            }[cooperative],
            "step_gemm (always)",
        ]
        lines.append(
            (
                f"GPU {ordinal} regimes",
                "; ".join(regimes) + (f"; forced by RNN_EXT_CUDA_REGIME={forced}" if forced else ""),
            )
        )
    return lines


def describe() -> list[tuple[str, str]]:
    """The report as (field, value) pairs."""
    from . import __version__

    record = build_record()
    if record is None:
        built = "unknown (no rnn_ext/_build_info.py beside rnn_ext._C)"
        cuda_kernels = "yes" if getattr(_C, "built_with_cuda", False) else "no"
    else:
        built = f"{_describe_torch(record.TORCH_VERSION, record.TORCH_CUDA_VERSION)}, {record.VARIANT} build"
        cuda_kernels = f"yes ({record.CUDA_ARCH})" if record.CUDA_KERNELS else "no"
    flags = cpu_flags()
    simd = [name for name in ("avx512f", "avx2", "fma", "avx") if name in flags]
    parallel = torch.__config__.parallel_info()
    backend = re.search(r"ATen parallel backend: (.*)", parallel)
    threads = f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    if backend:
        threads += f" ({backend.group(1).strip()})"
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(variable):
            threads += f"; {variable}={os.environ[variable]}"
    return [
        ("rnn_ext", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("torch", _describe_torch(torch.__version__, torch.version.cuda)),
        ("built against", built),
        ("CUDA kernels", cuda_kernels),
        ("Python", f"{platform.python_version()} on {platform.platform()}"),
        (
            "CPU",
            f"{cpu_model()}; {os.cpu_count()} logical CPUs; "
            f"SIMD: {' '.join(simd) or 'none of avx/fma/avx2/avx512f'}",
        ),
        ("CPU kernel", cpu_kernel_path()),
        ("threads", threads),
        ("OpenMP in rnn_ext._C", _openmp_in_extension()),
        *_cuda_lines(),
    ]


def info(file=None) -> None:
    """Prints what a bug report needs: versions, the torch the extension was built against, CUDA
    kernels, the CPU kernel path, threads, and the GPUs and CUDA regimes where there are any."""
    pairs = describe()
    width = max(len(field) for field, _ in pairs)
    for field, value in pairs:
        print(f"{field + ':':<{width + 1}} {value}", file=file or sys.stdout)
