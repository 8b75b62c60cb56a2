"""Where one call of a small model's forward, and of its forward+backward, spends its time: the
module's Python, the operator's entry, dispatch and glue, autograd (the node, torch's engine and
torch.autograd.backward's Python), and the kernels (rnn_ext._C._cpu_phase_stats). Each part is the
difference of two timings taken in this process, alternated round by round (torch.utils.benchmark,
medians), so a part is only as exact as the spread of the timings around it; the load average is
printed.

    python benchmarks/call_cost.py                      # the seed model: 10,1,1,32,1 batch_first
    python benchmarks/call_cost.py --config 100,16,128,128,3 --threads 2 --rounds 5

Forward runs under torch.no_grad(); forward+backward drops the parameters' gradients and calls
torch.autograd.backward with given gradients of output and h_n, as benchmarks/bench.py does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch
from torch.utils import benchmark

import rnn_ext
from rnn_ext import machine


def kernel_seconds(call, repeats: int = 2000) -> float:
    """Seconds per call spent inside the CPU kernels' phases."""
    call()
    rnn_ext._C._cpu_phase_stats(True)
    for _ in range(repeats):
        call()
    stats = rnn_ext._C._cpu_phase_stats(True)
    return sum(phase["seconds"] for phase in stats.values()) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="10,1,1,32,1", help="T,B,I,H,layers")
    parser.add_argument("--time-major", action="store_true", help="batch_first=False")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, batch, inputs, hidden, layers = (int(v) for v in args.config.split(","))
    batch_first = not args.time_major
    torch.manual_seed(0)
    model = rnn_ext.RNN(inputs, hidden, layers, batch_first=batch_first)
    x = torch.randn(batch, steps, inputs) if batch_first else torch.randn(steps, batch, inputs)
    h0 = torch.randn(layers, batch, hidden)
    grad_output = torch.randn_like(model(x, h0)[0])
    grad_h_n = torch.randn_like(h0)
    parameters = list(model.parameters())
    weights = list(model._flat_weights)
    op = rnn_ext._C._elman_stack_eager  # what the module's eager call uses
    torch_ops = torch.ops.rnn_ext.elman_stack.default
    stack_forward = torch.ops.rnn_ext._elman_stack_forward.default
    stack_backward = torch.ops.rnn_ext.elman_stack_backward.default
    detached = [w.detach() for w in weights]
    output, _, layer_outputs = stack_forward(x, h0, detached, None, [], layers, False, False, batch_first)
    leaf = torch.randn(32, requires_grad=True)
    leaf_grad = torch.randn(32)

    def module_forward():
        with torch.no_grad():
            model(x, h0)

    def op_forward():
        with torch.no_grad():
            op(x, h0, weights, [], layers, False, False, batch_first)

    def torch_ops_forward():
        with torch.no_grad():
            torch_ops(x, h0, weights, None, [], layers, False, False, batch_first)

    def module_training():
        for parameter in parameters:
            parameter.grad = None
        out, h_n = model(x, h0)
        torch.autograd.backward((out, h_n), (grad_output, grad_h_n))

    def op_training():
        for parameter in parameters:
            parameter.grad = None
        out, h_n = op(x, h0, weights, [], layers, False, False, batch_first)
        torch.autograd.backward((out, h_n), (grad_output, grad_h_n))

    def bare_training():  # the forward and backward operators, no autograd
        stack_forward(x, h0, detached, None, [], layers, False, False, batch_first)
        stack_backward(
            grad_output, grad_h_n, x, h0, detached, None, [], layer_outputs, output, layers, False, False,
            batch_first, [False, False, True],
        )  # fmt: skip

    def trivial_backward():  # torch's engine on a one-node graph: its fixed cost per backward
        leaf.grad = None
        torch.autograd.backward(leaf * 2.0, leaf_grad)

    calls = {
        "module_forward": module_forward,
        "op_forward": op_forward,
        "torch_ops_forward": torch_ops_forward,
        "module_training": module_training,
        "op_training": op_training,
        "bare_training": bare_training,
        "trivial_backward": trivial_backward,
    }
    load_start = os.getloadavg()
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            timer = benchmark.Timer("call()", globals={"call": call}, num_threads=args.threads)
            times[name].append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
    t = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    with torch.no_grad():
        forward_kernels = kernel_seconds(lambda: model(x, h0)) * 1e6
    training_kernels = kernel_seconds(module_training, repeats=500) * 1e6

    cpu = f"{machine.cpu_model()} ({platform.machine()})"
    print(f"cpu: {cpu}, torch {torch.__version__}, threads {args.threads}")
    print(f"config T,B,I,H,layers = {args.config}, batch_first={batch_first}; median of {args.rounds} rounds")
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print("\nforward (no_grad), us per call")
    print(f"  module call                         {t['module_forward']:8.2f}")
    print(f"    module Python (module - op)       {t['module_forward'] - t['op_forward']:8.2f}")
    print(f"    op dispatch + glue (op - kernels) {t['op_forward'] - forward_kernels:8.2f}")
    print(f"    kernels                           {forward_kernels:8.2f}")
    print(
        f"  the same op through torch.ops       {t['torch_ops_forward']:8.2f}  (instead of the typed entry)"
    )
    print("forward+backward, us per call")
    print(f"  module call                         {t['module_training']:8.2f}")
    print(f"    module Python (module - op)       {t['module_training'] - t['op_training']:8.2f}")
    print(f"    autograd (op - bare ops)          {t['op_training'] - t['bare_training']:8.2f}")
    print(f"    ops dispatch + glue (bare - kern) {t['bare_training'] - training_kernels:8.2f}")
    print(f"    kernels                           {training_kernels:8.2f}")
    print(f"  torch's engine on a one-node graph  {t['trivial_backward']:8.2f}  (for scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
