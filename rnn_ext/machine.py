"""Facts about the machine, read without torch: the CPU's model and flags, what the CUDA driver says
about a device, and the names of the CUDA recurrence regimes. Shared by the build report
(rnn_ext.info()), the benchmark and the GPU tooling, which may load this file on its own by path."""

from __future__ import annotations

import ctypes
import platform
import re

# The values RNN_EXT_CUDA_REGIME accepts besides "auto" (csrc/cuda/recurrence_plan.cpp reads it).
CUDA_REGIMES = ("single_block", "cooperative", "step_gemm")

# CUdevice_attribute codes of the driver API that torch does not expose.
CUDA_DRIVER_ATTRIBUTES = {
    "sm_count": 16,  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    "l2_cache_bytes": 38,  # CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE
    "cooperative_launch": 95,  # CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH
    "shared_memory_per_block_optin": 97,  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
}


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    flags = _cpuinfo_field("flags")
    return set(flags.split()) if flags else set()


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def slug(text: str) -> str:
    """A file-name-safe form of a machine's name: lower case, runs of anything else as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cuda_driver_attributes(ordinal: int = 0) -> dict:
    """CUDA_DRIVER_ATTRIBUTES of one device and the driver's CUDA version, asked from libcuda
    directly; {"error": ...} where the driver or the device cannot be reached. A value the driver
    refuses is None; cooperative_launch is a bool."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return {"error": f"libcuda.so.1: {error}"}
    try:
        if driver.cuInit(0) != 0:
            return {"error": "cuInit failed"}
        device = ctypes.c_int()
        if driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return {"error": f"cuDeviceGet({ordinal}) failed"}
        result = {}
        for name, attribute in CUDA_DRIVER_ATTRIBUTES.items():
            value = ctypes.c_int()
            status = driver.cuDeviceGetAttribute(ctypes.byref(value), attribute, device)
            result[name] = value.value if status == 0 else None
        version = ctypes.c_int()
        if driver.cuDriverGetVersion(ctypes.byref(version)) == 0:
            result["driver_cuda_version"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except AttributeError as error:  # a libcuda without these entry points
        return {"error": f"libcuda.so.1: {error}"}
    if result["cooperative_launch"] is not None:
        result["cooperative_launch"] = bool(result["cooperative_launch"])
    return result
