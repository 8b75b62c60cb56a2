"""Small forward+backward cases on every CUDA recurrence path (each regime forced, padded and packed,
one and two directions, float32 and float16), each checked against the CPU op in float64. Sized to
stay quick under compute-sanitizer: benchmarks/gpu_check.sh runs it under memcheck, racecheck and
synccheck. Exits non-zero on a mismatch or an error.

    python benchmarks/sanitizer_cases.py [--regimes single_block,cooperative,step_gemm]
"""
import argparse
import itertools
import os
import sys

import torch

import rnn_ext  # noqa: F401  (registers torch.ops.rnn_ext)

REGIMES = ["single_block", "cooperative", "step_gemm"]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}


def make_case(seed, steps, batch, input_size, hidden, directions, packed):
    generator = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5
    weights = []
    for _ in range(directions):
        for shape in [(hidden, input_size), (hidden, hidden), (hidden,), (hidden,)]:
            weights.append((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale)
    hx = torch.randn(directions, batch, hidden, generator=generator, dtype=torch.float64)
    batch_sizes = None
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator).sort(descending=True).values
        lengths[0] = steps
        batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(steps)], dtype=torch.int64)
        input = torch.randn(int(batch_sizes.sum()), input_size, generator=generator, dtype=torch.float64)
    else:
        input = torch.randn(steps, batch, input_size, generator=generator, dtype=torch.float64)
    return input, hx, weights, batch_sizes


def run(device, dtype, case, relu, seed, seed_dtype):
    """Output, h_n and all gradients as float64 CPU tensors; the output gradients are random,
    rounded to seed_dtype so that the float64 truth and the low-precision run share them."""
    input, hx, weights, batch_sizes = case
    leaves = [input.to(device, dtype), hx.to(device, dtype)] + [w.to(device, dtype) for w in weights]
    for leaf in leaves:
        leaf.requires_grad_(True)
    output, h_n = torch.ops.rnn_ext.elman_forward(leaves[0], leaves[1], leaves[2:], batch_sizes, relu)
    generator = torch.Generator().manual_seed(seed)
    seeds = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(seed_dtype) for t in (output, h_n)]
    grads = torch.autograd.grad((output, h_n), leaves, [s.to(device, dtype) for s in seeds])
    return [t.detach().double().cpu() for t in (output, h_n, *grads)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(REGIMES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sanitizer_cases: no CUDA device")
    failures = 0
    count = 0
    grid = itertools.product(
        args.regimes.split(","), [False, True], [1, 2], [torch.float32, torch.float16]
    )
    for index, (regime, packed, directions, dtype) in enumerate(grid):
        os.environ["RNN_EXT_CUDA_REGIME"] = regime
        # At most 8 units per cooperative block: 24 units make 3 blocks that exchange states.
        os.environ["RNN_EXT_CUDA_MAX_SLICE"] = "8"
        relu = index % 3 == 0
        # 19 rows: several register tiles per block and a partial last one.
        batch = 19 if index % 4 == 1 else 3
        case = make_case(index, steps=5, batch=batch, input_size=4, hidden=24, directions=directions, packed=packed)
        # The truth starts from the arguments rounded to the run's dtype: it measures the kernels.
        input, hx, weights, batch_sizes = case
        rounded = (input.to(dtype).double(), hx.to(dtype).double(), [w.to(dtype).double() for w in weights], batch_sizes)
        expected = run("cpu", torch.float64, rounded, relu, index, dtype)
        actual = run("cuda", dtype, case, relu, index, dtype)
        torch.cuda.synchronize()
        worst = 0.0
        for a, e in zip(actual, expected):
            if e.numel():
                worst = max(worst, (a - e).abs().max().item() / max(1.0, e.abs().max().item()))
        ok = worst <= TOLERANCE[dtype]
        failures += not ok
        count += 1
        print(f"{'ok  ' if ok else 'FAIL'} {regime:12s} packed={packed!s:5s} directions={directions} "
              f"{str(dtype):14s} batch={batch:2d} relu={relu!s:5s} relative error {worst:.2e}", flush=True)
    print(f"sanitizer_cases: {count - failures} of {count} cases match the CPU")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
