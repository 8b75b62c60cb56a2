"""Per-phase time and GFLOP/s of rnn_ext's CPU kernels (rnn_ext._C._cpu_phase_stats), with each
phase's fraction of the CPU's measured FMA peak (bench.py's probe).

    python benchmarks/phases.py
    python benchmarks/phases.py --configs "35,20,650,650,2;100,64,256,512,1" --threads 2 --repeats 9
    python benchmarks/phases.py --dtype bfloat16     # fractions of the bf16 (vdpbf16ps) peak

A config is T,B,I,H,layers[,bidir]; input time-major, h0 given, input without grad (as in
bench.py). Each phase's time is the fastest of --repeats forward+backward calls: a neighbour's load
only ever slows a call down.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import rnn_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import fma_peaks, parse_configs  # noqa: E402

PHASES = (
    "input_projection",
    "forward_recurrence",
    "backward_recurrence",
    "input_gradient",
    "weight_gradient",
)


def phase_flops(config) -> dict:
    """2 x multiply-adds per phase of one forward+backward (input without grad: the first layer
    computes no input gradient)."""
    seq_len, batch, inputs, hidden, layers = config[:5]
    directions = 2 if "bidir" in config[5:] else 1
    rows = seq_len * batch
    flops = dict.fromkeys(PHASES, 0.0)
    for layer in range(layers):
        layer_inputs = inputs if layer == 0 else directions * hidden
        flops["input_projection"] += 2.0 * rows * layer_inputs * directions * hidden
        flops["forward_recurrence"] += 2.0 * rows * hidden * hidden * directions
        flops["backward_recurrence"] += 2.0 * rows * hidden * hidden * directions
        if layer > 0:
            flops["input_gradient"] += 2.0 * rows * directions * hidden * layer_inputs
        flops["weight_gradient"] += 2.0 * rows * hidden * (layer_inputs + hidden) * directions
    return flops


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", type=parse_configs, default=parse_configs("35,20,650,650,2;100,64,256,512,1")
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    peak = fma_peaks(args.threads).get(kind, {}).get(str(args.threads), 0.0)
    print(
        f"{rnn_ext._C.cpu_kernel()} kernels, {args.dtype}, {args.threads} threads, {kind} peak "
        f"{peak:.0f} GFLOP/s, load average {os.getloadavg()[0]:.1f}"
    )
    for config in args.configs:
        seq_len, batch, inputs, hidden, layers = config[:5]
        bidirectional = "bidir" in config[5:]
        directions = 2 if bidirectional else 1
        torch.manual_seed(0)
        model = rnn_ext.RNN(inputs, hidden, layers, bidirectional=bidirectional).to(dtype)
        x = torch.randn(seq_len, batch, inputs, dtype=dtype)
        h0 = torch.randn(layers * directions, batch, hidden, dtype=dtype)
        best = dict.fromkeys(PHASES, float("inf"))
        for _ in range(args.repeats + 1):  # the first call warms up and is dropped
            rnn_ext._C._cpu_phase_stats(True)
            output, h_n = model(x, h0)
            (output.sum() + h_n.sum()).backward()
            stats = rnn_ext._C._cpu_phase_stats(True)
            if _ > 0:
                for phase in PHASES:
                    best[phase] = min(best[phase], stats[phase]["seconds"])
        flops = phase_flops(config)
        print(f"\n{','.join(str(v) for v in config)}")
        for phase in PHASES:
            seconds = best[phase]
            if flops[phase] == 0 or seconds == 0:
                continue
            rate = flops[phase] / seconds / 1e9
            share = f"{rate / peak:5.0%}" if peak else "  -"
            print(f"  {phase:<20} {seconds * 1e3:8.2f} ms {rate:7.1f} GFLOP/s {share} of peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
