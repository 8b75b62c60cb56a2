"""Builds rnn_ext._C: the C++ ops always, the CUDA kernels too when torch has CUDA and nvcc exists.

RNN_EXT_CUDA=1 forces the CUDA sources in (and fails without nvcc), RNN_EXT_CUDA=0 leaves them out.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    forced = os.environ.get("RNN_EXT_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "no")
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -Wno-psabi: the 32-byte vector types live only inside row_matmul.cpp, never across its ABI.
    cxx_flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
    extra_link = []
    if os.environ.get("RNN_EXT_SANITIZE"):
        # make check-asan: AddressSanitizer + UndefinedBehaviorSanitizer on the C++ sources.
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx_flags = ["-O1", "-g", "-ffp-contract=fast"] + sanitize
        extra_link = sanitize
    if os.environ.get("RNN_EXT_DEBUG"):
        cxx_flags = ["-O0", "-g"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "rnn_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link
        )
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    arch = os.environ.get("RNN_EXT_CUDA_ARCH", "-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90")
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"] + arch.split()
    if os.environ.get("RNN_EXT_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "rnn_ext._C",
        sources,
        define_macros=[("RNN_EXT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags + ["-DRNN_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=extra_link,
    )


setup(
    name="rnn_ext",
    version="0.1.0",
    description="A drop-in torch.nn.RNN on fused Elman RNN kernels (C++ CPU, CUDA)",
    packages=find_packages(include=["rnn_ext", "rnn_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
)
