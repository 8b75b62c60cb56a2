"""Builds rnn_ext._C against the installed torch: the C++ ops always, the CUDA kernels too when torch
has CUDA and nvcc exists. The metadata is in pyproject.toml; this file adds the extension, the torch
requirement of the built wheel and rnn_ext/_build_info.py (the torch the build used).

Build with `pip install --no-build-isolation .` (or `pip wheel --no-build-isolation --no-deps .`):
the extension must be compiled against the torch it will run with, so the build has to see that
torch, not one that an isolated build environment would fetch.

Environment switches (all read at build time):
  RNN_EXT_CUDA=1|0          1 forces the CUDA sources in (and fails without nvcc); 0 leaves them out.
                            Unset: built when torch has CUDA and nvcc is found (CUDA_HOME).
  RNN_EXT_CUDA_ARCH="..."   nvcc's architecture flags, verbatim, in place of the default list, e.g.
                            "-gencode=arch=compute_90,code=sm_90" for a one-architecture compile.
  TORCH_CUDA_ARCH_LIST      torch's own switch ("8.0;9.0+PTX"), used when RNN_EXT_CUDA_ARCH is unset.
                            Unset too: DEFAULT_CUDA_ARCH_LIST below.
  RNN_EXT_PTXAS_VERBOSE=1   nvcc -Xptxas=-v: registers, shared memory and spills per kernel.
  RNN_EXT_SANITIZE=1        AddressSanitizer + UndefinedBehaviorSanitizer on the C++ (make check-asan).
  RNN_EXT_DEBUG=1           -O0 -g on the C++, for a debugger.
  MAX_JOBS                  parallel compile jobs (torch's switch; ninja's default otherwise).
"""

import platform
import sys


def check_platform():
    """Stops the build, before any compiler runs, where the sources cannot build: the CPU kernels
    are x86-64 AVX/AVX-512 intrinsics, built with GCC's OpenMP."""
    machine = platform.machine()
    if sys.platform.startswith("linux") and machine.lower() in ("x86_64", "amd64"):
        return
    sys.exit(
        f"rnn_ext builds on Linux x86-64 only, and this is {sys.platform} {machine}: its CPU kernels "
        "are x86-64 AVX2/AVX-512 code built with GCC and OpenMP. On this platform use torch.nn.RNN, "
        "which rnn_ext.RNN replaces one for one."
    )


# First of all: setuptools and torch themselves may not even import on another platform.
check_platform()

import glob  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from setuptools import setup  # noqa: E402

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:
    sys.exit(
        f"rnn_ext builds against the installed torch, and this Python cannot import it ({error}). "
        "Install torch first, then build without build isolation: "
        "pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))

# Ampere (A100, RTX 30), Ada (RTX 40, L4/L40), Hopper (H100/H200) as machine code, and Hopper's PTX,
# which newer GPUs compile when the extension loads.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def want_cuda():
    forced = os.environ.get("RNN_EXT_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "no")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cuda_arch_flags():
    """The nvcc architecture flags, and how they were chosen (for the build record)."""
    verbatim = os.environ.get("RNN_EXT_CUDA_ARCH")
    if verbatim:
        return verbatim.split(), f"RNN_EXT_CUDA_ARCH={verbatim}"
    # No -gencode of our own: torch's build turns TORCH_CUDA_ARCH_LIST into them.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    return [], f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"


def build_variant():
    names = [name for name in ("sanitize", "debug") if os.environ.get(f"RNN_EXT_{name.upper()}")]
    return "+".join(names) or "release"


def cxx_and_link_flags():
    # -fopenmp, compile and link, in every variant: at::parallel_for is an inline template whose
    # `#pragma omp parallel` is compiled into our objects, and without the flag it runs serially.
    # -Wno-psabi: the vector types of vector_math.h live only inside the kernel files, never across
    # their ABI.
    cxx = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi", "-fopenmp"]
    link = ["-fopenmp"]
    # The variants append: a later -O wins, and everything else in the base flags stays.
    if os.environ.get("RNN_EXT_SANITIZE"):
        # make check-asan: AddressSanitizer + UndefinedBehaviorSanitizer on the C++ sources.
        sanitize = [
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=undefined",
        ]
        cxx += ["-O1", "-g"] + sanitize
        link += sanitize
    if os.environ.get("RNN_EXT_DEBUG"):
        cxx += ["-O0", "-g"]
    return cxx, link


def extension():
    sources = sources_in("csrc", "*.cpp") + sources_in("csrc/cpu", "*.cpp")
    cxx_flags, link_flags = cxx_and_link_flags()
    if not want_cuda():
        return cpp_extension.CppExtension(
            "rnn_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        ), None
    sources += sources_in("csrc/cuda", "*.cpp") + sources_in("csrc/cuda", "*.cu")
    arch_flags, arch_choice = cuda_arch_flags()
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"] + arch_flags
    if os.environ.get("RNN_EXT_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "rnn_ext._C",
        sources,
        define_macros=[("RNN_EXT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags + ["-DRNN_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    ), arch_choice


def sources_in(folder, pattern):
    # Relative to the project folder, where pip and `python setup.py` run.
    return sorted(glob.glob(os.path.join(folder, pattern)))


def torch_requirement():
    """The torch minor release the build compiles against: the C++ ABI of torch changes between
    minor releases, so a built wheel must never be installed beside another one."""
    match = re.match(r"(\d+)\.(\d+)(.*)", torch.__version__)
    major, minor, rest = int(match.group(1)), int(match.group(2)), match.group(3).split("+")[0]
    # A pre-release or source build of torch (2.13.0a0, 2.13.0.dev20260101) sorts below 2.13.
    lower = f"{major}.{minor}.0.dev0" if re.search(r"[a-z]", rest) else f"{major}.{minor}"
    return f"torch>={lower},<{major}.{minor + 1}"


EXTENSION, CUDA_ARCH_CHOICE = extension()

BUILD_INFO = '''\
"""Written by setup.py when rnn_ext._C was built: the torch it was compiled against, which
rnn_ext/_extension.py compares with the running torch before loading _C."""
TORCH_VERSION = {torch_version!r}
TORCH_CUDA_VERSION = {cuda_version!r}
CUDA_KERNELS = {cuda_kernels!r}
CUDA_ARCH = {cuda_arch!r}
VARIANT = {variant!r}
'''


class BuildWithRecord(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, then rnn_ext/_build_info.py beside the built _C: in the build folder
    (so wheels carry it) and, for in-place and editable builds, in the source tree as well."""

    def run(self):
        super().run()
        text = BUILD_INFO.format(
            torch_version=torch.__version__,
            cuda_version=torch.version.cuda,
            cuda_kernels=CUDA_ARCH_CHOICE is not None,
            cuda_arch=CUDA_ARCH_CHOICE,
            variant=build_variant(),
        )
        targets = [os.path.join(self.build_lib, "rnn_ext", "_build_info.py")]
        if self.inplace:
            targets.append(os.path.join(HERE, "rnn_ext", "_build_info.py"))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as file:
                file.write(text)


setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildWithRecord},
    install_requires=[torch_requirement()],
)
