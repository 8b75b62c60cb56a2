"""Times rnn_ext.RNN against its peers carrying the same weights, in one process, alternating the
sides round by round; writes a table, a JSON record and a speedup plot under benchmarks/results/.

Peers: torch.nn.RNN everywhere; on the CPU also a torch.compile'd step loop (F.linear + tanh),
JAX (jax.jit of a lax.scan Elman stack; jax.value_and_grad for forward+backward) and, for the
forward, onnxruntime and OpenVINO (float32, and the CPU plugin's default precision: bf16 on a CPU
with avx512_bf16) running nn.RNN's ONNX export; each peer's max error against nn.RNN is recorded.
A peer whose package is missing is skipped (`make bench` installs them). The CPU's FMA peak (fp32,
and bf16 where the CPU has it) is measured in the same run by a small probe (benchmarks/fma_probe.c,
compiled at run time), on 1 thread and on the benchmark's threads; every row reports rnn_ext's
fraction of that peak beside its fraction of torch.mm's rate on the config's recurrent shape. Each
CPU config also gets a char-level LM training step and the peak memory of a long forward+backward
(each side in a fresh subprocess).

OpenVINO's TBB threads and XLA's pool may keep spinning beside torch's OpenMP threads: --isolate
times every side (rnn_ext and each peer) in a process of its own, one after the other.

    python benchmarks/bench.py                      # CPU grid, and CUDA if present
    python benchmarks/bench.py --quick --device cpu
    python benchmarks/bench.py --configs "100,32,64,128,1,tm;50,16,100,200,2,bidir" --threads 1
    python benchmarks/bench.py --device cpu --isolate --no-extras

A config is T,B,I,H,layers, then optional flags: bidir (bidirectional), tm (time-major input;
batch-first otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import numpy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as benchmark  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rnn_ext  # noqa: E402
from rnn_ext import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODES = ("forward", "forward+backward")

# (T, B, I, H, layers[, flags]): flags "bidir" (bidirectional) and "tm" (time-major; batch-first
# otherwise).
CPU_GRID = [
    (10, 1, 1, 32, 1),
    (1000, 1, 1, 32, 1),
    (100, 32, 64, 128, 1),
    (100, 32, 64, 128, 1, "tm"),
    (100, 32, 256, 256, 2),
    (200, 64, 256, 512, 1),
    (100, 64, 256, 512, 1),
    (35, 20, 650, 650, 2),
    (50, 16, 100, 200, 2, "bidir"),
    (256, 8, 40, 128, 3, "bidir"),
]
# Speedup over nn.RNN that each config must reach.
CPU_TARGETS = {
    (10, 1, 1, 32, 1): {"forward": 3.0, "forward+backward": 3.0},
    (1000, 1, 1, 32, 1): {"forward": 30.0, "forward+backward": 60.0},
    (100, 32, 64, 128, 1): {"forward": 3.0, "forward+backward": 3.0},
    (100, 32, 256, 256, 2): {"forward": 1.5, "forward+backward": 2.0},
    (200, 64, 256, 512, 1): {"forward": 1.0, "forward+backward": 1.5},
    (100, 64, 256, 512, 1): {"forward+backward": 1.3},
}
# One or two configs per hidden size, spread over the three CUDA regimes of docs/design.md (W_hh in one
# SM, W_hh across the chip, per-step GEMM) and over latency-bound (B=1, long T) and wider batches.
CUDA_GRID = [
    (1000, 1, 64, 64, 1),
    (100, 16, 64, 64, 1),
    (1000, 8, 128, 128, 1),
    (100, 64, 256, 256, 1),
    (10, 1, 256, 256, 1),
    (1000, 1, 512, 512, 1),
    (100, 32, 512, 512, 2),
    (100, 64, 1024, 1024, 1),
    (1000, 4, 1024, 1024, 1),
    (100, 16, 2048, 2048, 1),
]
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
CPU_DTYPES = ("float32", "float64")  # what rnn_ext's CPU kernels implement
# How far apart the two sides' outputs may be before the table flags it: a timing of two modules
# computing different things would be meaningless. Loose on purpose; the tests check parity.
OUTPUT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


FLAGS = ("bidir", "tm")


@dataclass
class Result:
    device: str
    dtype: str
    config: dict
    mode: str
    nn_us: float  # median over rounds of the per-round median per call
    ext_us: float
    ratio: float  # nn_us / ext_us: above 1 means rnn_ext is faster
    nn_us_per_step: float
    ext_us_per_step: float
    target: float | None
    met: bool | None
    max_abs_output_diff: float
    peers_us: dict = field(default_factory=dict)  # every peer's median, nn.RNN included
    best_peer: str = "nn.RNN"
    ratio_vs_best: float = 0.0  # best peer's time / rnn_ext's: the ">= 1.0x every peer" target
    ext_gflops: float = 0.0
    mm_gflops: float = 0.0  # torch.mm on the config's recurrent shape, same run, same threads
    fraction_of_mm: float = 0.0
    fma_peak_gflops: float = 0.0  # the probe's fp32 peak on the same threads (half for float64)
    fraction_of_peak: float | None = None
    peer_errors: dict = field(default_factory=dict)  # max |peer - nn.RNN| of each foreign peer's forward
    compile_s: float | None = None  # torch.compile of the loop peer, first call included
    rounds_us: dict = field(default_factory=dict)

    @property
    def spread(self) -> float:
        """(slowest - fastest round) / median, the worst side: how far to trust a ratio."""
        return max(
            (max(rounds) - min(rounds)) / statistics.median(rounds) for rounds in self.rounds_us.values()
        )


def parse_configs(text: str) -> list[tuple]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        parts = [v.strip() for v in item.split(",")]
        flags = tuple(v for v in parts[5:])
        try:
            values = tuple(int(v) for v in parts[:5])
        except ValueError:
            values = ()
        if len(values) != 5 or min(values) < 1 or any(f not in FLAGS for f in flags):
            raise argparse.ArgumentTypeError(
                f"config {item!r}: expected five positive integers T,B,I,H,layers, then optional "
                f"flags from {FLAGS}"
            )
        configs.append(values + flags)
    if not configs:
        raise argparse.ArgumentTypeError("--configs: no config given")
    return configs


def config_label(config) -> str:
    seq_len, batch, inputs, hidden, layers = config[:5]
    return f"T={seq_len} B={batch} I={inputs} H={hidden} L={layers}" + "".join(
        f" {flag}" for flag in config[5:]
    )


def config_flops(config) -> float:
    """Multiply-adds x 2 of one forward: the input projections and the recurrent products."""
    seq_len, batch, inputs, hidden, layers = config[:5]
    directions = 2 if "bidir" in config[5:] else 1
    total = 0
    for layer in range(layers):
        layer_inputs = inputs if layer == 0 else directions * hidden
        total += directions * seq_len * batch * hidden * (layer_inputs + hidden)
    return 2.0 * total


def cpu_flags() -> dict:
    """The flags that decide which kernels run, present or not (recorded with every run)."""
    present = machine.cpu_flags()
    if not present:
        return {}
    return {flag: flag in present for flag in ("avx2", "fma", "avx512f", "avx512_bf16")}


def fma_peaks(threads: int) -> dict:
    """GFLOP/s of the probe in benchmarks/fma_probe.c (independent FMA chains, no memory traffic) on
    1 thread and on `threads`: fp32 (AVX-512, else AVX2+FMA) and bf16 (vdpbf16ps) where the CPU has
    it; the best of several short runs, since a neighbour's load only ever slows a run down. Compiled
    at run time with the system C compiler (cc), so it needs no rebuild of the extension and measures
    the CPU, not how the extension was built. {} when there is no compiler or no FMA."""
    import ctypes
    import shutil
    import tempfile

    flags = cpu_flags()
    kinds = {}
    if flags.get("avx512f"):
        kinds["fp32"] = 0
    elif flags.get("avx2") and flags.get("fma"):
        kinds["fp32"] = 1
    if flags.get("avx512f") and flags.get("avx512_bf16"):
        kinds["bf16"] = 2
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if not kinds or compiler is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        library = Path(folder) / "fma_probe.so"
        source = REPO / "benchmarks" / "fma_probe.c"
        build = [compiler, "-O3", "-shared", "-fPIC", "-o", str(library), str(source), "-lpthread"]
        if subprocess.run(build, capture_output=True).returncode != 0:
            return {}
        probe = ctypes.CDLL(str(library))  # ctypes drops the GIL around each call
    probe.probe_seconds.restype = ctypes.c_double
    probe.probe_seconds.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    probe.probe_flops_per_iteration.restype = ctypes.c_double
    probe.probe_flops_per_iteration.argtypes = [ctypes.c_int]
    peaks = {"instruction_set": "AVX-512" if kinds.get("fp32") == 0 else "AVX2+FMA"}
    for name, kind in kinds.items():
        per_iteration = probe.probe_flops_per_iteration(kind)
        rates = {}
        for count in sorted({1, threads}):
            iterations = 200_000
            while True:  # about 20 ms a run on a quiet machine
                seconds = probe.probe_seconds(kind, count, iterations)
                if seconds < 0 or seconds >= 0.02:
                    break
                iterations *= 2
            best = min(probe.probe_seconds(kind, count, iterations) for _ in range(7))
            rates[str(count)] = per_iteration * iterations * count / best / 1e9 if best > 0 else 0.0
        peaks[name] = rates
    return peaks


def peak_for(peaks: dict, dtype: str, threads: int) -> float:
    """The fp32 FMA peak on `threads`; float64 vectors hold half the lanes, so half of it."""
    rate = peaks.get("fp32", {}).get(str(threads), 0.0)
    return rate / 2 if dtype == "float64" else rate


def cuda_usable() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "rnn_ext::elman_forward", "CUDA"
    )


def git_state() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def machine_record(devices, threads, git, load_at_start) -> dict:
    record = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": machine.cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "rnn_ext": rnn_ext.__version__,
        "git": git,
        # Other processes on the machine slow nn.RNN's OpenMP loops far more than they slow a
        # single fused call, which inflates ratios; the load shows whether a run was quiet.
        "load_average_1min_start": load_at_start,
        "load_average_1min_end": os.getloadavg()[0],
    }
    if "cuda" in devices:
        properties = torch.cuda.get_device_properties(0)
        record.update(
            {
                "cuda_device": torch.cuda.get_device_name(0),
                "cuda_capability": f"{properties.major}.{properties.minor}",
                "cuda_sm_count": properties.multi_processor_count,
                "cuda_runtime": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }
        )
    return record


def default_output(devices) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{machine.slug(machine.cpu_model())}-{os.cpu_count()}c"
    if "cuda" in devices:
        name += "-" + machine.slug(torch.cuda.get_device_name(0))
    return RESULTS / f"{stamp}-{name}.json"


def make_pair(config, device, dtype, seed):
    """nn.RNN and rnn_ext.RNN with the same weights, an input, h0 and upstream gradients."""
    seq_len, batch, inputs, hidden, layers = config[:5]
    bidirectional = "bidir" in config[5:]
    batch_first = "tm" not in config[5:]
    directions = 2 if bidirectional else 1
    torch.manual_seed(seed)
    kwargs = dict(
        num_layers=layers, batch_first=batch_first, bidirectional=bidirectional, device=device, dtype=dtype
    )
    reference = nn.RNN(inputs, hidden, **kwargs)
    candidate = rnn_ext.RNN(inputs, hidden, **kwargs)
    candidate.load_state_dict(reference.state_dict())
    shape = (batch, seq_len) if batch_first else (seq_len, batch)
    x = torch.randn(*shape, inputs, device=device, dtype=dtype)
    h0 = torch.randn(layers * directions, batch, hidden, device=device, dtype=dtype)
    grad_output = torch.randn(*shape, directions * hidden, device=device, dtype=dtype)
    grad_h_n = torch.randn(layers * directions, batch, hidden, device=device, dtype=dtype)
    return reference, candidate, (x, h0, grad_output, grad_h_n)


class LoopRNN(nn.Module):
    """nn.RNN's arithmetic as a plain Python loop of F.linear + tanh per step, for torch.compile."""

    def __init__(self, reference: nn.RNN):
        super().__init__()
        self.reference = reference

    def forward(self, x, h0):
        r = self.reference
        directions = 2 if r.bidirectional else 1
        layer_input = x.transpose(0, 1) if r.batch_first else x
        finals = []
        for layer in range(r.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = getattr(r, "weight_ih" + suffix), getattr(r, "weight_hh" + suffix)
                b_ih, b_hh = getattr(r, "bias_ih" + suffix), getattr(r, "bias_hh" + suffix)
                projected = F.linear(layer_input, w_ih, b_ih + b_hh)
                h = h0[layer * directions + direction]
                steps = range(x.shape[1] if r.batch_first else x.shape[0])
                states = [None] * len(steps)
                for t in reversed(steps) if direction else steps:
                    h = torch.tanh(projected[t] + F.linear(h, w_hh))
                    states[t] = h
                outputs.append(torch.stack(states))
                finals.append(h)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        output = layer_input.transpose(0, 1) if r.batch_first else layer_input
        return output, torch.stack(finals)


# torch.compile takes seconds per config: each compiled loop is built once per config and mode.
_COMPILED: dict = {}


def compiled_loop(reference, config, mode):
    key = (tuple(config), mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(LoopRNN(reference), dynamic=False)
    return _COMPILED[key]


def onnx_export(reference, tensors) -> bytes:
    """nn.RNN through the legacy exporter: one ONNX RNN node per layer."""
    import io

    x, h0, _, _ = tensors
    buffer = io.BytesIO()
    torch.onnx.export(
        reference, (x, h0), buffer, dynamo=False, input_names=["x", "h0"], output_names=["output", "h_n"]
    )
    return buffer.getvalue()


def onnx_forward(reference, tensors, threads):
    """An onnxruntime session on nn.RNN's ONNX export, or None when the ONNX packages are missing."""
    try:
        import onnxruntime
    except ImportError:
        return None
    x, h0, _, _ = tensors
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        onnx_export(reference, tensors), options, providers=["CPUExecutionProvider"]
    )
    feeds = {"x": x.numpy(), "h0": h0.numpy()}

    def call():
        return session.run(None, feeds)

    return call


def openvino_forward(reference, tensors, threads, precision):
    """OpenVINO's CPU plugin on nn.RNN's ONNX export (oneDNN's fused RNN primitive), or None when
    openvino is missing. precision "f32" forces float32; "default" keeps what the plugin picks
    (bf16 on a CPU with avx512_bf16)."""
    try:
        import openvino
    except ImportError:
        return None
    import tempfile

    x, h0, _, _ = tensors
    core = openvino.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rnn.onnx"
        path.write_bytes(onnx_export(reference, tensors))
        model = core.read_model(str(path))
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    feeds = {"x": x.numpy(), "h0": h0.numpy()}

    def call():
        request.infer(feeds)
        return [request.get_output_tensor(i).data for i in range(2)]

    return call


def jax_elman(reference, tensors, mode):
    """jax.jit of nn.RNN's arithmetic as a lax.scan per layer and direction, on the same weights;
    forward+backward is jax.value_and_grad of sum(output * grad_output) + sum(h_n * grad_h_n) over
    the parameters (the same gradients autograd computes here). None when jax is missing."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    r = reference
    directions = 2 if r.bidirectional else 1
    activation = jnp.tanh if r.nonlinearity == "tanh" else jax.nn.relu
    params = {name: jnp.asarray(p.detach().numpy()) for name, p in r.named_parameters()}
    x, h0, grad_output, grad_h_n = (jnp.asarray(t.numpy()) for t in tensors)

    def forward(params, x, h0):
        layer_input = jnp.swapaxes(x, 0, 1) if r.batch_first else x
        finals = []
        for layer in range(r.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = params["weight_ih" + suffix], params["weight_hh" + suffix]
                projected = layer_input @ w_ih.T
                if r.bias:
                    projected = projected + (params["bias_ih" + suffix] + params["bias_hh" + suffix])

                def step(h, p, w_hh=w_hh):
                    h = activation(p + h @ w_hh.T)
                    return h, h

                last, states = jax.lax.scan(
                    step, h0[layer * directions + direction], projected, reverse=bool(direction)
                )
                outputs.append(states)
                finals.append(last)
            layer_input = outputs[0] if directions == 1 else jnp.concatenate(outputs, -1)
        output = jnp.swapaxes(layer_input, 0, 1) if r.batch_first else layer_input
        return output, jnp.stack(finals)

    if mode == "forward":
        compiled = jax.jit(forward)

        def call():
            return jax.block_until_ready(compiled(params, x, h0))

        return call

    def loss(params):
        output, h_n = forward(params, x, h0)
        return jnp.sum(output * grad_output) + jnp.sum(h_n * grad_h_n)

    compiled = jax.jit(jax.value_and_grad(loss))

    def call():
        return jax.block_until_ready(compiled(params))

    return call


def peer_error(reference, call, tensors) -> float:
    """Max abs difference of a foreign peer's forward (output, h_n) from nn.RNN's."""
    x, h0, _, _ = tensors
    with torch.no_grad():
        output, h_n = reference(x, h0)
    theirs = [torch.from_numpy(numpy.array(t, dtype=numpy.float32)) for t in call()[:2]]
    return max((output - theirs[0]).abs().max().item(), (h_n - theirs[1]).abs().max().item())


def timed_call(module, mode, tensors):
    x, h0, grad_output, grad_h_n = tensors
    parameters = list(module.parameters())
    if mode == "forward":

        def call():
            return module(x, h0)

        return call

    def call():
        # Dropping the gradients is what optimizer.zero_grad() does by default, and costs nothing
        # either side; accumulating instead would add one add per parameter to every call.
        for parameter in parameters:
            parameter.grad = None
        output, h_n = module(x, h0)
        # Random upstream gradients on both outputs: every gradient path is exercised, and no
        # reduction op is added to the timed work.
        torch.autograd.backward((output, h_n), (grad_output, grad_h_n))

    return call


def output_difference(reference, candidate, tensors) -> float:
    x, h0, _, _ = tensors
    with torch.no_grad():
        out_a, h_a = reference(x, h0)
        out_b, h_b = candidate(x, h0)
    return max((out_a - out_b).abs().max().item(), (h_a - h_b).abs().max().item())


def measure(call, mode, threads, min_run_time) -> float:
    """Seconds per call: the median over the blocks of one blocked_autorange."""
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
    # Timer runs the statement in this thread, so the grad mode set here is the one it sees.
    with torch.set_grad_enabled(mode != "forward"):
        return timer.blocked_autorange(min_run_time=min_run_time).median


def mm_rate(config, device, dtype, threads, min_run_time) -> float:
    """torch.mm's GFLOP/s on the config's recurrent product over all rows ([T*B, H] @ [H, H])."""
    seq_len, batch, _, hidden = config[:4]
    a = torch.randn(seq_len * batch, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, hidden, device=device, dtype=dtype)
    seconds = measure(lambda: torch.mm(a, b), "forward", threads, min_run_time)
    return 2.0 * seq_len * batch * hidden * hidden / seconds / 1e9


PEERS = ("compiled", "onnxruntime", "openvino", "jax")
LOWER_PRECISION = ("openvino default",)


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def planned_sides(device, dtype, mode, args) -> list[str]:
    """rnn_ext and the peers that time this case: the foreign ones run float32 on the CPU, the
    ONNX ones the forward only, each when its package is installed."""
    sides = ["nn.RNN", "rnn_ext"]
    if device != "cpu":
        return sides
    if "compiled" in args.peers:
        sides.append("compiled loop")
    if dtype != torch.float32:
        return sides
    if mode == "forward" and "onnxruntime" in args.peers and available("onnxruntime"):
        sides.append("onnxruntime")
    if mode == "forward" and "openvino" in args.peers and available("openvino"):
        sides += ["openvino f32", "openvino default"]
    if "jax" in args.peers and available("jax"):
        sides.append("jax")
    return sides


def make_call(side, reference, candidate, config, mode, tensors, args):
    """(the timed call, seconds of its first call when that compiles, its max forward error
    against nn.RNN or None)."""
    if side in ("nn.RNN", "rnn_ext"):
        return timed_call(reference if side == "nn.RNN" else candidate, mode, tensors), None, None
    if side == "compiled loop":
        loop = compiled_loop(reference, config, mode)
        start = time.perf_counter()
        with torch.set_grad_enabled(mode != "forward"):
            timed_call(loop, mode, tensors)()
        return timed_call(loop, mode, tensors), time.perf_counter() - start, None
    if side == "onnxruntime":
        call = onnx_forward(reference, tensors, args.threads)
        return call, None, peer_error(reference, call, tensors)
    if side.startswith("openvino"):
        call = openvino_forward(reference, tensors, args.threads, side.split()[1])
        return call, None, peer_error(reference, call, tensors)
    if side == "jax":
        start = time.perf_counter()
        call = jax_elman(reference, tensors, mode)
        call()
        compile_s = time.perf_counter() - start
        # The forward case records the error; the gradient call returns no outputs to compare.
        return call, compile_s, peer_error(reference, call, tensors) if mode == "forward" else None
    raise ValueError(side)


def worker(args, modes) -> int:
    """--worker SIDE: time one side of one case in this process, print its rounds as JSON."""
    (config,), (mode,) = args.configs, modes
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    reference, candidate, tensors = make_pair(config, "cpu", dtype, args.seed)
    call, compile_s, error = make_call(args.worker, reference, candidate, config, mode, tensors, args)
    with torch.set_grad_enabled(mode != "forward"):
        call()
        call()
    rounds = [measure(call, mode, args.threads, args.min_run_time) * 1e6 for _ in range(args.rounds)]
    print(json.dumps({"rounds_us": rounds, "compile_s": compile_s, "error": error}))
    return 0


def isolated_rounds(side, config, mode, args) -> dict:
    """One side's rounds timed in a fresh process of this script."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--configs",
        ",".join(str(v) for v in config),
        "--modes",
        mode,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
        "--min-run-time",
        str(args.min_run_time),
        "--seed",
        str(args.seed),
        "--peers",
        ",".join(sorted(args.peers)),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{side} {config} {mode} in its own process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_case(device, dtype_name, config, mode, args, bar, peaks) -> Result:
    dtype = DTYPES[dtype_name]
    reference, candidate, tensors = make_pair(config, device, dtype, args.seed)
    difference = output_difference(reference, candidate, tensors)
    sides = planned_sides(device, dtype, mode, args)
    rounds = {side: [] for side in sides}
    errors, compile_seconds = {}, {}
    if args.isolate and device == "cpu":
        for side in sides:
            bar.set_postfix_str(f"{config_label(config)} {mode} {side} (own process)", refresh=True)
            record = isolated_rounds(side, config, mode, args)
            rounds[side] = record["rounds_us"]
            errors[side], compile_seconds[side] = record["error"], record["compile_s"]
            bar.update(args.rounds)
    else:
        calls = {}
        for side in sides:
            calls[side], compile_seconds[side], errors[side] = make_call(
                side, reference, candidate, config, mode, tensors, args
            )
        for call in calls.values():  # lazy initialisation and allocator warm-up stay out of round one
            with torch.set_grad_enabled(mode != "forward"):
                call()
                call()
        for round_index in range(args.rounds):
            # Rotating which side goes first each round spreads slow drifts (clock, neighbours'
            # load) evenly over all sides.
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                bar.set_postfix_str(f"{device} {config_label(config)} {mode} {side}", refresh=True)
                rounds[side].append(measure(calls[side], mode, args.threads, args.min_run_time) * 1e6)
                bar.update()
    errors = {side: e for side, e in errors.items() if e is not None}
    compile_s = compile_seconds.get("compiled loop")
    medians = {side: statistics.median(r) for side, r in rounds.items()}
    nn_us, ext_us = medians["nn.RNN"], medians["rnn_ext"]
    peers = {side: us for side, us in medians.items() if side != "rnn_ext"}
    # The plugin's default precision computes in bf16 on a CPU with avx512_bf16: reported, but not
    # a float32 peer to beat.
    best_peer = min((side for side in peers if side not in LOWER_PRECISION), key=peers.get)
    target = None
    if device == "cpu" and dtype == torch.float32:
        target = CPU_TARGETS.get(tuple(config), {}).get(mode)
    if difference > OUTPUT_TOLERANCE[dtype]:
        tqdm.write(
            f"warning: {config_label(config)} {device} {dtype_name}: outputs differ by "
            f"{difference:.2e}; the two sides may not compute the same thing"
        )
    flops = config_flops(config) * (3 if mode == "forward+backward" else 1)
    ext_gflops = flops / (ext_us * 1e-6) / 1e9
    mm_gflops = mm_rate(config, device, dtype, args.threads, args.min_run_time)
    return Result(
        device=device,
        dtype=dtype_name,
        config=dict(
            zip(("T", "B", "I", "H", "layers"), config[:5]),
            bidirectional="bidir" in config[5:],
            batch_first="tm" not in config[5:],
        ),
        mode=mode,
        nn_us=nn_us,
        ext_us=ext_us,
        ratio=nn_us / ext_us,
        nn_us_per_step=nn_us / config[0],
        ext_us_per_step=ext_us / config[0],
        target=target,
        met=None if target is None else nn_us / ext_us >= target,
        max_abs_output_diff=difference,
        peers_us=peers,
        best_peer=best_peer,
        ratio_vs_best=peers[best_peer] / ext_us,
        ext_gflops=ext_gflops,
        mm_gflops=mm_gflops,
        fraction_of_mm=ext_gflops / mm_gflops,
        fma_peak_gflops=peak_for(peaks, dtype_name, args.threads) if device == "cpu" else 0.0,
        fraction_of_peak=ext_gflops / peak_for(peaks, dtype_name, args.threads)
        if device == "cpu" and peak_for(peaks, dtype_name, args.threads) > 0
        else None,
        peer_errors=errors,
        compile_s=compile_s,
        rounds_us=rounds,
    )


class CharLM(nn.Module):
    """Embedding 64 -> 2-layer RNN (H=256) -> Linear head over the vocabulary."""

    def __init__(self, rnn_class, vocabulary=96):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 64)
        self.rnn = rnn_class(64, 256, 2)
        self.head = nn.Linear(256, vocabulary)

    def forward(self, tokens):
        output, _ = self.rnn(self.embedding(tokens))
        return self.head(output)


def training_step_case(args, bar) -> dict:
    """One whole Adam step of a char-level LM (T=64, B=32), nn.RNN against rnn_ext.RNN."""
    torch.manual_seed(args.seed)
    reference = CharLM(nn.RNN)
    candidate = CharLM(rnn_ext.RNN)
    candidate.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 96, (64, 32))
    targets = torch.randint(0, 96, (64, 32))
    calls = {}
    for name, model in (("nn.RNN", reference), ("rnn_ext", candidate)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            logits = model(tokens)
            F.cross_entropy(logits.reshape(-1, 96), targets.reshape(-1)).backward()
            optimizer.step()

        calls[name] = step
    for call in calls.values():
        call()
        call()
    rounds = {side: [] for side in calls}
    for round_index in range(args.rounds):
        order = ("nn.RNN", "rnn_ext") if round_index % 2 == 0 else ("rnn_ext", "nn.RNN")
        for side in order:
            bar.set_postfix_str(f"char-LM step {side}", refresh=True)
            rounds[side].append(measure(calls[side], "train", args.threads, args.min_run_time) * 1e6)
    nn_us, ext_us = statistics.median(rounds["nn.RNN"]), statistics.median(rounds["rnn_ext"])
    return {
        "nn_us": nn_us,
        "ext_us": ext_us,
        "ratio": nn_us / ext_us,
        "target": 1.6,
        "met": nn_us / ext_us >= 1.6,
        "rounds_us": rounds,
    }


_MEMORY_PROBE = """
import sys, torch
import rnn_ext


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB -> MiB
    raise RuntimeError(field)


torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
rnn_class = torch.nn.RNN if sys.argv[1] == "nn.RNN" else rnn_ext.RNN
model = rnn_class(128, 256, 2)
x = torch.randn(2000, 32, 128)
out, h = model(x[:3])
(out.sum() + h.sum()).backward()
model.zero_grad(set_to_none=True)
del out, h
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:  # "5" resets the peak (VmHWM) to the current RSS
    clear.write("5")
out, h = model(x)
(out.sum() + h.sum()).backward()
print(status("VmHWM") - before)
"""


def memory_case(threads) -> dict:
    """Growth of the peak resident set (VmHWM, reset just before) over one forward+backward at
    T=2000, B=32, I=128, H=256, two layers, each side in a fresh process: RSS sees the C++
    allocations that tracemalloc does not."""
    peaks = {}
    for side in ("nn.RNN", "rnn_ext"):
        result = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, side, str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[side] = float(result.stdout.strip().splitlines()[-1])
    return {
        "config": "T=2000 B=32 I=128 H=256 L=2, forward+backward",
        "nn_peak_mib": peaks["nn.RNN"],
        "ext_peak_mib": peaks["rnn_ext"],
        "met": peaks["rnn_ext"] <= peaks["nn.RNN"],
    }


def short_label(r) -> str:
    """T,B,I,H,layers plus bi (bidirectional) and tm (time-major): the config in a dozen characters."""
    c = r.config
    return (
        f"{c['T']},{c['B']},{c['I']},{c['H']},{c['layers']}"
        + (",bi" if c["bidirectional"] else "")
        + ("" if c["batch_first"] else ",tm")
    )


# (column header, peer name) of the table, in order.
TABLE_PEERS = (
    ("nn.RNN", "nn.RNN"),
    ("compiled", "compiled loop"),
    ("onnxrt", "onnxruntime"),
    ("ov f32", "openvino f32"),
    ("ov dflt", "openvino default"),
    ("jax", "jax"),
)


def print_table(results) -> None:
    header = (
        f"{'device':<6} {'T,B,I,H,L':<20} {'mode':<8} "
        + " ".join(f"{name:>9}" for name, _ in TABLE_PEERS)
        + f" {'rnn_ext':>9} {'vs nn':>7} {'vs best':>8} {'GFLOP/s':>8} {'of peak':>7} {'of mm':>6} "
        f"{'spread':>6}  target"
    )
    print("times in us")
    print(header)
    print("-" * len(header))
    for r in results:
        target = "" if r.target is None else f">={r.target:g}x {'met' if r.met else 'MISSED'}"
        best = f"{r.ratio_vs_best:.2f}x" + ("" if r.ratio_vs_best >= 1 else "!")
        peers = " ".join(
            f"{r.peers_us[side]:>9.1f}" if side in r.peers_us else f"{'-':>9}" for _, side in TABLE_PEERS
        )
        peak = f"{r.fraction_of_peak:>7.0%}" if r.fraction_of_peak is not None else f"{'-':>7}"
        mode = "fwd" if r.mode == "forward" else "fwd+bwd"
        print(
            f"{r.device:<6} {short_label(r):<20} {mode:<8} {peers} {r.ext_us:>9.1f} {r.ratio:>6.2f}x "
            f"{best:>8} {r.ext_gflops:>8.1f} {peak} {r.fraction_of_mm:>6.0%} {r.spread:>6.0%}  {target}"
        )


PEER_STYLE = {
    "nn.RNN": ("o", "tab:gray"),
    "compiled loop": ("s", "tab:brown"),
    "onnxruntime": ("^", "tab:purple"),
    "openvino f32": ("D", "tab:red"),
    "openvino default": ("d", "tab:pink"),
    "jax": ("v", "tab:green"),
}


def plot(results, path: Path, title: str) -> None:
    """Per device and dtype: one panel per mode with every peer's time over rnn_ext's (a marker per
    peer, log scale; above 1 = rnn_ext is faster), and a panel of rnn_ext's fraction of the FMA peak
    (CPU; bars per mode)."""
    groups = sorted({(r.device, r.dtype) for r in results}, key=lambda g: (g[0] != "cpu", g[1]))
    panels = []
    for device, dtype in groups:
        group = [r for r in results if (r.device, r.dtype) == (device, dtype)]
        for mode in MODES:
            if any(r.mode == mode for r in group):
                panels.append(("ratio", device, dtype, mode, group))
        if any(r.fraction_of_peak is not None for r in group):
            panels.append(("peak", device, dtype, None, group))
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(12, 3.4 * len(panels)), squeeze=False, constrained_layout=True
    )
    for axis, (kind, device, dtype, mode, group) in zip(axes[:, 0], panels):
        labels = list(dict.fromkeys(short_label(r) for r in group))
        positions = range(len(labels))
        if kind == "ratio":
            rows = {short_label(r): r for r in group if r.mode == mode}
            names = [side for side in PEER_STYLE if any(side in r.peers_us for r in rows.values())]
            spread = 0.5 / max(len(names), 1)
            for index, side in enumerate(names):
                marker, color = PEER_STYLE[side]
                xs, ys = [], []
                for position, label in zip(positions, labels):
                    r = rows.get(label)
                    if r is not None and side in r.peers_us:
                        xs.append(position + (index - (len(names) - 1) / 2) * spread)
                        ys.append(r.peers_us[side] / r.ext_us)
                axis.scatter(xs, ys, marker=marker, color=color, label=side, s=36, zorder=3)
            axis.axhline(1.0, color="0.3", linewidth=0.9, linestyle="--")
            axis.set_yscale("log")
            axis.set_ylabel("peer time / rnn_ext time")
            axis.set_title(f"{device} {dtype}, {mode}: above 1 = rnn_ext faster", fontsize=10)
            axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
            axis.margins(y=0.25)
        else:
            width = 0.38
            for offset, each, color in zip((-width / 2, width / 2), MODES, ("tab:blue", "tab:orange")):
                xs, ys = [], []
                for r in group:
                    if r.mode == each and r.fraction_of_peak is not None:
                        xs.append(labels.index(short_label(r)) + offset)
                        ys.append(100 * r.fraction_of_peak)
                bars = axis.bar(xs, ys, width, color=color, label=each)
                axis.bar_label(
                    bars, fmt=lambda v: f"{v:.0f}" if v >= 10 else f"{v:.1f}", fontsize=7, padding=1
                )
            peak = next(r.fma_peak_gflops for r in group if r.fraction_of_peak is not None)
            axis.set_ylabel("% of FMA peak")
            axis.set_title(
                f"{device} {dtype}: rnn_ext GFLOP/s as % of the measured FMA peak ({peak:.0f} GFLOP/s)",
                fontsize=10,
            )
            axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
            axis.margins(y=0.15)
        axis.set_xticks(list(positions), labels, fontsize=8, rotation=30, ha="right")
        axis.set_xlabel("T,B,I,H,layers (bi = bidirectional, tm = time-major)", fontsize=8)
        axis.grid(axis="y", color="0.9", zorder=0)
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="'all' = cpu, plus cuda when a GPU and rnn_ext's CUDA kernels exist",
    )
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=None,
        help='"T,B,I,H,layers;..." (default: the grid of each device)',
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads on the CPU (default: torch's own choice, %(default)s)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES)
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5)")
    parser.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per blocked_autorange (default 0.2)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 0.05 s: checks the harness, not a number to quote"
    )
    parser.add_argument(
        "--tf32", action="store_true", help="let cuDNN and cuBLAS use TF32 for float32 (off by default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="CPU peers besides nn.RNN, comma-separated: %(default)s (default: all; '' for none)",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="time every side of a CPU case in a process of its own (no peer's thread pool spins "
        "beside another's); sides then run one after the other, not alternating",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one side, for --isolate
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the CPU char-LM training step and the peak-memory comparison",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/<date>-<machine>.json); the plot goes next to it as .png",
    )
    args = parser.parse_args()
    args.peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    if args.peers - set(PEERS):
        parser.error("--peers: choose from " + ", ".join(PEERS))
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.threads == 1:  # XLA's CPU pool has no thread-count knob beyond single-threaded Eigen
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    if args.worker is not None:
        return worker(args, modes)

    if args.device == "cuda" and not cuda_usable():
        print("no CUDA: torch sees no GPU, or rnn_ext was built without CUDA kernels", file=sys.stderr)
        return 2
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if cuda_usable() else [])}[
        args.device
    ]
    if args.dtype not in CPU_DTYPES and "cpu" in devices:
        print(f"rnn_ext's CPU kernels take float32/float64, not {args.dtype}: skipping cpu")
        devices.remove("cpu")
    if not devices:
        return 2
    torch.set_num_threads(args.threads)
    git = git_state()  # before the run: others may commit while it goes on
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_at_start:.1f} on {os.cpu_count()} cores: other processes "
            "compete with the timed code, so these numbers are noisy",
            file=sys.stderr,
        )
    # Comparing against cuDNN in TF32 would compare different arithmetic; only on request.
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    cases = [
        (device, config, mode)
        for device in devices
        for config in (args.configs or (CPU_GRID if device == "cpu" else CUDA_GRID))
        for mode in modes
    ]
    peaks = fma_peaks(args.threads) if "cpu" in devices else {}
    results = []
    extras = {}
    timings = sum(len(planned_sides(d, DTYPES[args.dtype], m, args)) for d, _, m in cases) * args.rounds
    with tqdm(total=timings, unit="timing", dynamic_ncols=True) as bar:
        for device, config, mode in cases:
            results.append(run_case(device, args.dtype, config, mode, args, bar, peaks))
        if "cpu" in devices and not args.no_extras and args.dtype == "float32":
            extras["char_lm_training_step"] = training_step_case(args, bar)
            extras["peak_memory"] = memory_case(args.threads)

    host = machine_record(devices, args.threads, git, load_at_start)
    host["fma_peak_gflops"] = peaks
    print(
        f"\n{host['cpu_model']}, {host['usable_cores']} cores, torch {host['torch']}, "
        f"{args.threads} threads"
        + (f", {host['cuda_device']}" if "cuda" in devices else "")
        + f"; median of {args.rounds} "
        + ("rounds, each side in its own process" if args.isolate else "alternating rounds")
        + "; ratio = nn.RNN / rnn_ext; vs best = fastest float32 peer / rnn_ext; "
        "spread = (slowest - fastest round) / median, the worse side"
    )
    if peaks:
        rates = "; ".join(
            f"{kind} " + ", ".join(f"{rate:.0f} GFLOP/s on {n} thread(s)" for n, rate in by_threads.items())
            for kind, by_threads in peaks.items()
            if kind != "instruction_set"
        )
        print(f"FMA peak ({peaks['instruction_set']} probe, same run): {rates}")
    print_table(results)
    worst = {}
    for r in results:
        for side, error in r.peer_errors.items():
            worst[side] = max(worst.get(side, 0.0), error)
    if worst:
        print(
            "max |peer - nn.RNN| over the forward outputs: "
            + ", ".join(f"{side} {error:.1e}" for side, error in worst.items())
        )
    targets = [r for r in results if r.target is not None]
    if targets:
        print(f"speedup-over-nn.RNN targets met: {sum(r.met for r in targets)}/{len(targets)}")
    beaten = [r for r in results if r.ratio_vs_best >= 1.0]
    print(f"ahead of every peer: {len(beaten)}/{len(results)}")
    if "char_lm_training_step" in extras:
        step = extras["char_lm_training_step"]
        print(
            f"char-LM training step: nn.RNN {step['nn_us']:.0f} us, rnn_ext {step['ext_us']:.0f} us, "
            f"{step['ratio']:.2f}x (target >= 1.6x)"
        )
    if "peak_memory" in extras:
        memory = extras["peak_memory"]
        print(
            f"peak memory growth, {memory['config']}: nn.RNN {memory['nn_peak_mib']:.0f} MiB, "
            f"rnn_ext {memory['ext_peak_mib']:.0f} MiB"
        )

    path = args.out or default_output(devices)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host,
        "settings": {
            "rounds": args.rounds,
            "min_run_time_s": args.min_run_time,
            "dtype": args.dtype,
            "tf32": args.tf32,
            "seed": args.seed,
            "input_requires_grad": False,
            "h0": "given, random, no grad",
            "backward": "autograd.backward on (output, h_n) with random upstream gradients; "
            "param.grad set to None before each call",
            "timed": "the whole module call (Python included); forward under torch.no_grad()",
            "ratio": "nn.RNN time / rnn_ext time; ratio_vs_best: the fastest peer's time / rnn_ext's",
            "gflops": "forward FLOPs (2 x multiply-adds of projections and recurrent products), "
            "x3 for forward+backward, over rnn_ext's time",
            "mm_gflops": "torch.mm of [T*B, H] @ [H, H] in the same run on the same threads",
            "fma_peak": "benchmarks/fma_probe.c: independent FMA chains per thread, best of 7 runs; "
            "fraction_of_peak = ext_gflops / the fp32 peak on the same threads (half of it for float64)",
            "isolate": args.isolate,
            "peers": sorted(args.peers),
        },
        "results": [{**asdict(r), "spread": r.spread} for r in results],
        "extras": extras,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    plot_path = path.with_suffix(".png")
    commit = (host["git"]["commit"] or "unknown")[:10] + ("+dirty" if host["git"]["dirty"] else "")
    plot(
        results,
        plot_path,
        f"rnn_ext vs its peers, {host['cpu_model']} ({args.threads} threads"
        + (", each side in its own process)" if args.isolate else ")")
        + (f", {host['cuda_device']}" if "cuda" in devices else "")
        + f", torch {host['torch']}, {commit}, {record['created']}",
    )
    print(f"results: {path}\nplot:    {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
