"""Small forward+backward cases on every CUDA recurrence path, each checked against the CPU op in
float64. tools/gpu/gpu_check.sh runs them under compute-sanitizer (memcheck, racecheck, synccheck);
tools/gpu/gpu_smoke.py reuses the checker. Prints "start NAME" before each case, so that a hang
under the sanitizer is named, and exits non-zero on a mismatch or an error.

    python tools/gpu/sanitizer_cases.py [--cases NAME,...] [--skip-regimes REGIME,...] [--list]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from rnn_ext.machine import CUDA_REGIMES as REGIMES

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Relative to max(1, max |truth|), truth = the float64 CPU op on the arguments rounded to the dtype.
# The half types store every step's state in 11 or 8 bits and carry the rounding on: about 3x the
# worst error of the correct CUDA path measured on the CPU emulation (tests/test_cuda_emulation.py,
# every case small enough for it, seeds 0-15): 8.0e-4 for float16, 6.1e-3 for bfloat16.
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2.5e-3, "bfloat16": 2e-2}
# RNN_EXT_CUDA_MAX_SLICE value meaning ceil(hidden / SM count): the slices then need more than half
# the chip, so one direction gets a single batch group (every block walks all the row tiles) and
# two directions cannot share the chip (one cooperative launch per direction).
MAX_SLICE_CHIP_WIDE = "chip_wide"


@dataclass(frozen=True)
class Case:
    name: str
    regime: str  # RNN_EXT_CUDA_REGIME
    dtype: str
    steps: int
    batch: int
    input_size: int
    hidden: int
    directions: int = 1
    packed: bool = False
    relu: bool = False
    bias: bool = True
    max_slice: int | str | None = None  # RNN_EXT_CUDA_MAX_SLICE, or MAX_SLICE_CHIP_WIDE
    covers: str = ""  # the path of the kernels the case is there for

    def max_slice_for(self, sm_count: int) -> int | None:
        if self.max_slice == MAX_SLICE_CHIP_WIDE:
            return math.ceil(self.hidden / sm_count)
        return self.max_slice


# Tiny on purpose: under racecheck every shared-memory access is checked. H=21 is not a multiple of
# 4 (the kernels pad states to quads); cooperative cases cap the slice width so that small layers
# still span several blocks that exchange their states through the grid.
CASES = [
    Case(
        "single_block_h21_bidirectional",
        "single_block",
        "float32",
        5,
        3,
        4,
        21,
        directions=2,
        covers="H % 4 != 0, both directions in one launch",
    ),
    Case(
        "single_block_h21_packed_groups",
        "single_block",
        "float32",
        6,
        19,
        5,
        21,
        directions=2,
        packed=True,
        relu=True,
        covers="packed input, several batch groups, a partial last tile",
    ),
    Case(
        "single_block_h200_optin",
        "single_block",
        "float32",
        4,
        2,
        8,
        200,
        covers="W_hh of 160 KB: dynamic shared memory past 48 KB (the opt-in)",
    ),
    Case(
        "single_block_h40_float64",
        "single_block",
        "float64",
        5,
        3,
        4,
        40,
        directions=2,
        relu=True,
        covers="float64",
    ),
    Case(
        "single_block_h36_bfloat16_packed",
        "single_block",
        "bfloat16",
        5,
        5,
        6,
        36,
        directions=2,
        packed=True,
        covers="bfloat16, packed",
    ),
    Case(
        "single_block_h36_float16_no_bias",
        "single_block",
        "float16",
        5,
        3,
        6,
        36,
        bias=False,
        covers="float16, no bias",
    ),
    Case(
        "cooperative_h21_bidirectional",
        "cooperative",
        "float32",
        5,
        3,
        4,
        21,
        directions=2,
        max_slice=8,
        covers="3 slices per direction, both directions in one grid, H % 4 != 0",
    ),
    Case(
        "cooperative_h600_row_tiles",
        "cooperative",
        "float32",
        3,
        20,
        8,
        600,
        max_slice=MAX_SLICE_CHIP_WIDE,
        covers="one batch group: each block walks 3 register tiles (8+8+4)",
    ),
    Case(
        "cooperative_h600_split_directions",
        "cooperative",
        "float32",
        3,
        4,
        8,
        600,
        directions=2,
        max_slice=MAX_SLICE_CHIP_WIDE,
        covers="directions too wide to share the chip: one launch each",
    ),
    Case(
        "cooperative_h48_float64_packed",
        "cooperative",
        "float64",
        5,
        6,
        4,
        48,
        directions=2,
        packed=True,
        relu=True,
        max_slice=16,
        covers="float64, packed, relu",
    ),
    # tanh: a bfloat16 relu layer's pre-activations near zero flip relu's derivative under rounding,
    # and a correct kernel's gradients then miss the float64 truth by O(1) (seed 10 did, 9.5e-2).
    Case(
        "cooperative_h40_bfloat16",
        "cooperative",
        "bfloat16",
        5,
        4,
        5,
        40,
        directions=2,
        max_slice=16,
        covers="bfloat16",
    ),
    Case(
        "cooperative_h40_float16_packed",
        "cooperative",
        "float16",
        5,
        5,
        5,
        40,
        packed=True,
        max_slice=16,
        covers="float16, packed",
    ),
    Case(
        "step_gemm_h21_packed",
        "step_gemm",
        "float32",
        5,
        5,
        4,
        21,
        directions=2,
        packed=True,
        relu=True,
        covers="per-step GEMM and pointwise kernels, packed, previous-state gather",
    ),
    Case("step_gemm_h24_float64", "step_gemm", "float64", 4, 3, 4, 24, bias=False, covers="float64, no bias"),
    Case("step_gemm_h40_bfloat16", "step_gemm", "bfloat16", 5, 3, 4, 40, directions=2, covers="bfloat16"),
    Case("step_gemm_h40_float16_packed", "step_gemm", "float16", 5, 4, 4, 40, packed=True, covers="float16"),
]


def layer_arguments(case: Case, seed: int):
    """Random float64 CPU arguments of the case's layer: (input, hx, weights, batch_sizes)."""
    generator = torch.Generator().manual_seed(seed)
    scale = case.hidden**-0.5
    weights = []
    for _ in range(case.directions):
        shapes = [(case.hidden, case.input_size), (case.hidden, case.hidden)]
        shapes += [(case.hidden,), (case.hidden,)] if case.bias else []
        weights += [(torch.rand(s, generator=generator, dtype=torch.float64) * 2 - 1) * scale for s in shapes]
    hx = torch.randn(case.directions, case.batch, case.hidden, generator=generator, dtype=torch.float64)
    if not case.packed:
        input = torch.randn(case.steps, case.batch, case.input_size, generator=generator, dtype=torch.float64)
        return input, hx, weights, None
    lengths = (
        torch.randint(1, case.steps + 1, (case.batch,), generator=generator).sort(descending=True).values
    )
    lengths[0] = case.steps
    batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(case.steps)], dtype=torch.int64)
    input = torch.randn(int(batch_sizes.sum()), case.input_size, generator=generator, dtype=torch.float64)
    return input, hx, weights, batch_sizes


def forward_backward(device, dtype, arguments, relu, seed, seed_dtype, synchronize=None):
    """Output, h_n and the gradients of (input, hx, *weights) for random output gradients (rounded
    to seed_dtype, so that a float64 truth and a low-precision run share them), as float64 CPU
    tensors. `synchronize(stage)` runs after the forward and after the backward."""
    input, hx, weights, batch_sizes = arguments
    leaves = [input.to(device, dtype), hx.to(device, dtype)] + [w.to(device, dtype) for w in weights]
    for leaf in leaves:
        leaf.requires_grad_(True)
    output, h_n = torch.ops.rnn_ext.elman_forward(leaves[0], leaves[1], leaves[2:], batch_sizes, relu)
    if synchronize:
        synchronize("forward")
    generator = torch.Generator().manual_seed(seed + 1)
    seeds = [
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(seed_dtype) for t in (output, h_n)
    ]
    grads = torch.autograd.grad((output, h_n), leaves, [s.to(device, dtype) for s in seeds])
    if synchronize:
        synchronize("backward")
    return [t.detach().double().cpu() for t in (output, h_n, *grads)]


def relative_error(actual, expected) -> float:
    """The worst of max |a - e| / max(1, max |e|) over the tensors; NaN anywhere makes it inf."""
    worst = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return math.inf
        if e.numel():
            error = (a - e).abs().max().item() / max(1.0, e.abs().max().item())
            worst = max(worst, error if math.isfinite(error) else math.inf)
    return worst


def check_case(case: Case, seed: int, sm_count: int, synchronize=None, device="cuda") -> tuple[bool, float]:
    """Runs the case on `device` (CUDA, under its regime) and compares with the float64 CPU op on
    the same arguments rounded to the case's dtype. Returns (within tolerance, relative error)."""
    os.environ["RNN_EXT_CUDA_REGIME"] = case.regime
    max_slice = case.max_slice_for(sm_count)
    if max_slice is None:
        os.environ.pop("RNN_EXT_CUDA_MAX_SLICE", None)
    else:
        os.environ["RNN_EXT_CUDA_MAX_SLICE"] = str(max_slice)
    dtype = DTYPES[case.dtype]
    arguments = layer_arguments(case, seed)
    input, hx, weights, batch_sizes = arguments
    rounded = (
        input.to(dtype).double(),
        hx.to(dtype).double(),
        [w.to(dtype).double() for w in weights],
        batch_sizes,
    )
    expected = forward_backward("cpu", torch.float64, rounded, case.relu, seed, dtype)
    actual = forward_backward(device, dtype, arguments, case.relu, seed, dtype, synchronize)
    error = relative_error(actual, expected)
    return error <= TOLERANCE[case.dtype], error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--skip-regimes", default="", help="comma-separated regimes to leave out")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args()
    skip = {r for r in args.skip_regimes.split(",") if r}
    unknown = skip - set(REGIMES)
    if unknown:
        parser.error(f"--skip-regimes: unknown {', '.join(sorted(unknown))}")
    cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        by_name = {case.name: case for case in CASES}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            parser.error(f"--cases: unknown {', '.join(missing)}")
        cases = [by_name[name] for name in wanted]
    cases = [case for case in cases if case.regime not in skip]
    if args.list:
        for case in cases:
            print(f"{case.name}: {case.covers}")
        return 0
    if not torch.cuda.is_available():
        print("sanitizer_cases: no CUDA device", file=sys.stderr)
        return 2
    import rnn_ext  # noqa: F401  (registers torch.ops.rnn_ext)

    # The op's GEMMs follow torch's TF32 flag; the float64 truth needs them in float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    failures = 0
    for index, case in enumerate(cases):
        print(f"start {case.name}", flush=True)
        begin = time.monotonic()
        try:
            ok, error = check_case(case, seed=index, sm_count=sm_count)
            detail = f"relative error {error:.2e} (tolerance {TOLERANCE[case.dtype]:.0e})"
        except RuntimeError as exception:
            ok, detail = False, f"error: {exception}"
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {case.name} {detail}, {time.monotonic() - begin:.1f} s", flush=True
        )
    print(f"sanitizer_cases: {len(cases) - failures} of {len(cases)} cases match the CPU", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
