"""rnn_ext.RNN's forward and forward+backward times on a few configs, for comparing two builds of
rnn_ext: run it once per build (PYTHONPATH pointing at each checkout), alternating, and compare
the printed medians. Time-major, h0 given, float32, the whole module call; forward under
torch.no_grad(), forward+backward as benchmarks/bench.py times it.

    PYTHONPATH=/path/to/other/checkout python benchmarks/stack_times.py --configs "100,16,128,128,3"
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils import benchmark

import rnn_ext


def times(config, threads, min_run_time):
    steps, batch, inputs, hidden, layers = config
    torch.manual_seed(0)
    model = rnn_ext.RNN(inputs, hidden, layers)
    x = torch.randn(steps, batch, inputs)
    h0 = torch.randn(layers, batch, hidden)
    grad_output = torch.randn(steps, batch, hidden)
    grad_h_n = torch.randn_like(h0)
    parameters = list(model.parameters())

    def forward():
        with torch.no_grad():
            model(x, h0)

    def training():
        for parameter in parameters:
            parameter.grad = None
        output, h_n = model(x, h0)
        torch.autograd.backward((output, h_n), (grad_output, grad_h_n))

    result = {}
    for name, call in (("fwd", forward), ("fwd+bwd", training)):
        timer = benchmark.Timer("call()", globals={"call": call}, num_threads=threads)
        result[name] = timer.blocked_autorange(min_run_time=min_run_time).median
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="100,16,128,128,3;200,8,64,256,4", help="T,B,I,H,layers;...")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [tuple(int(v) for v in item.split(",")) for item in args.configs.split(";")]
    record = {
        "rnn_ext": os.path.dirname(rnn_ext.__file__),
        "threads": args.threads,
        "load_start": os.getloadavg()[0],
        "seconds": {",".join(map(str, c)): times(c, args.threads, args.min_run_time) for c in configs},
        "load_end": os.getloadavg()[0],
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
