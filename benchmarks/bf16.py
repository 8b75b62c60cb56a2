"""bfloat16 on the CPU: rnn_ext bf16 against nn.RNN bf16, against rnn_ext float32 and (forward)
against OpenVINO at the CPU plugin's default precision (bf16 on a CPU with avx512_bf16; skipped when
openvino is not installed), with each side's largest output difference from nn.RNN in float64 on the
same (bf16-rounded) inputs, and rnn_ext bf16's GFLOP/s as a fraction of the bf16 FMA peak measured
by bench.py's probe in the same run. torch.utils.benchmark, every side in this one process, the
sides alternated round by round; the machine, its CPU flags, the kernel rnn_ext chose and the load
are printed.

    python benchmarks/bf16.py [--configs "T,B,I,H,L[,bidir];..."] [--rounds 3] [--min-run-time 0.3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch

# bench.py sits beside this script (the script's folder is on sys.path when it runs).
from bench import config_flops, fma_peaks, openvino_forward  # noqa: E402
from torch import nn
from torch.utils import benchmark

import rnn_ext
from rnn_ext import machine

DEFAULT_CONFIGS = "100,32,64,128,1;100,64,256,512,1;35,20,650,650,2;10,1,1,32,1;50,16,100,200,2,bidir"


def parse_configs(text):
    configs = []
    for item in text.split(";"):
        fields = item.strip().split(",")
        steps, batch, inputs, hidden, layers = (int(f) for f in fields[:5])
        configs.append((steps, batch, inputs, hidden, layers, len(fields) > 5 and fields[5] == "bidir"))
    return configs


def label(config):
    steps, batch, inputs, hidden, layers, bidir = config
    return f"{steps},{batch},{inputs},{hidden},{layers}" + (" bidir" if bidir else "")


def sides(config):
    steps, batch, inputs, hidden, layers, bidir = config
    torch.manual_seed(0)
    reference = nn.RNN(inputs, hidden, layers, bidirectional=bidir).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    x = torch.randn(steps, batch, inputs).to(torch.bfloat16)
    h0 = torch.randn(layers * (2 if bidir else 1), batch, hidden).to(torch.bfloat16)

    def make(cls, dtype):
        module = cls(inputs, hidden, layers, bidirectional=bidir).to(dtype)
        module.load_state_dict(reference.state_dict())
        return module, x.to(dtype), h0.to(dtype)

    return reference, {
        "rnn_ext bf16": make(rnn_ext.RNN, torch.bfloat16),
        "nn.RNN bf16": make(nn.RNN, torch.bfloat16),
        "rnn_ext f32": make(rnn_ext.RNN, torch.float32),
    }


def callable_for(module, x, h0, mode):
    if mode == "forward":

        def call():
            with torch.no_grad():
                module(x, h0)

        return call
    xg = x.clone().requires_grad_()

    def call():
        out, h_n = module(xg, h0)
        (out.float().sum() + h_n.float().sum()).backward()

    return call


def max_error(reference, module, x, h0):
    with torch.no_grad():
        want, _ = reference(x.double(), h0.double())
        got, _ = module(x, h0)
    return (got.double() - want).abs().max().item()


def openvino_side(reference, x, h0, threads):
    """OpenVINO's default-precision forward of the float32 model on the same (bf16-rounded) inputs,
    and its max output difference from the float64 reference; (None, None) without openvino."""
    f32 = nn.RNN(
        reference.input_size,
        reference.hidden_size,
        reference.num_layers,
        bidirectional=reference.bidirectional,
    )
    f32.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    call = openvino_forward(f32, (x.float(), h0.float(), None, None), threads, "default")
    if call is None:
        return None, None
    with torch.no_grad():
        want, _ = reference(x.double(), h0.double())
    got = torch.from_numpy(call()[0].astype("float64"))
    return call, (got - want).abs().max().item()


def measure(call, threads, min_run_time):
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = sorted(f for f in machine.cpu_flags() if f.startswith(("avx512", "amx", "fma", "avx2")))
    print(f"cpu: {machine.cpu_model()} ({platform.machine()}), threads {args.threads}")
    print(f"flags: {' '.join(flags)}")
    print(f"rnn_ext CPU kernel: {rnn_ext._C.cpu_kernel()}; torch {torch.__version__}")
    print(f"load average at start: {os.getloadavg()}")
    peaks = fma_peaks(args.threads)
    bf16_peak = peaks.get("bf16", {}).get(str(args.threads), 0.0)
    print(
        "FMA probe, same run: "
        + (", ".join(f"{k} {v}" for k, v in peaks.items()) if peaks else "unavailable")
        + " (GFLOP/s by thread count)"
    )
    header = (
        f"{'T,B,I,H,L':<20}{'mode':<9}{'ext bf16':>10}{'nn bf16':>10}{'ext f32':>10}{'ov dflt':>10}"
        f"{'vs nn':>8}{'vs f32':>8}{'vs ov':>8}{'of bf16 peak':>13}"
        "   max err ext bf16 / nn bf16 / ext f32 / ov dflt"
    )
    print(header)
    for config in parse_configs(args.configs):
        reference, table = sides(config)
        errors = {name: max_error(reference, *table[name]) for name in table}
        _, x, h0 = table["rnn_ext bf16"]
        openvino, errors["ov dflt"] = openvino_side(reference, x, h0, args.threads)
        steps, batch, inputs, hidden, layers, bidir = config
        flops = config_flops((steps, batch, inputs, hidden, layers) + (("bidir",) if bidir else ()))
        for mode in ("forward", "fwd+bwd"):
            calls = {name: callable_for(*table[name], mode) for name in table}
            if mode == "forward" and openvino is not None:
                calls["ov dflt"] = openvino
            times = {name: [] for name in calls}
            for _ in range(args.rounds):  # alternate the sides round by round
                for name, call in calls.items():
                    times[name].append(measure(call, args.threads, args.min_run_time))
            t = {name: statistics.median(v) for name, v in times.items()}
            ext = t["rnn_ext bf16"]
            work = flops * (3 if mode == "fwd+bwd" else 1)  # backward: about twice the forward
            rate = work / ext / 1e9
            ov = t.get("ov dflt")
            print(
                f"{label(config):<20}{mode:<9}"
                f"{ext * 1e3:>8.2f}ms{t['nn.RNN bf16'] * 1e3:>8.2f}ms{t['rnn_ext f32'] * 1e3:>8.2f}ms"
                + (f"{ov * 1e3:>8.2f}ms" if ov else f"{'-':>10}")
                + f"{t['nn.RNN bf16'] / ext:>7.2f}x{t['rnn_ext f32'] / ext:>7.2f}x"
                + (f"{ov / ext:>7.2f}x" if ov else f"{'-':>8}")
                + (f"{100 * rate / bf16_peak:>12.0f}%" if bf16_peak else f"{'-':>13}")
                + f"   {errors['rnn_ext bf16']:.1e} / {errors['nn.RNN bf16']:.1e}"
                f" / {errors['rnn_ext f32']:.1e}"
                + (f" / {errors['ov dflt']:.1e}" if errors["ov dflt"] is not None else " / -")
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
