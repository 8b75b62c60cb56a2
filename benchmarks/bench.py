"""Times rnn_ext.RNN against its peers carrying the same weights, in one process, alternating the
sides round by round; writes a table, a JSON record and a speedup plot under benchmarks/results/.

Peers: torch.nn.RNN everywhere; on the CPU also a torch.compile'd step loop (F.linear + tanh) and,
for the forward, onnxruntime running nn.RNN's ONNX export. Each CPU config also gets a torch.mm
FLOP rate measured in the same run on the same threads, a char-level LM training step, and the
peak memory of a long forward+backward (each side in a fresh subprocess).

    python benchmarks/bench.py                      # CPU grid, and CUDA if present
    python benchmarks/bench.py --quick --device cpu
    python benchmarks/bench.py --configs "100,32,64,128,1,tm;50,16,100,200,2,bidir" --threads 1

A config is T,B,I,H,layers, then optional flags: bidir (bidirectional), tm (time-major input;
batch-first otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as benchmark  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rnn_ext  # noqa: E402

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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return {flag: flag in present for flag in ("avx2", "fma", "avx512f", "avx512_bf16")}
    except OSError:
        pass
    return {}


def cuda_usable() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "rnn_ext::elman_forward", "CUDA"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
        "cpu_model": cpu_model(),
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


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_output(devices) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    machine = f"{slug(cpu_model())}-{os.cpu_count()}c"
    if "cuda" in devices:
        machine += "-" + slug(torch.cuda.get_device_name(0))
    return RESULTS / f"{stamp}-{machine}.json"


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


def onnx_forward(reference, tensors, threads):
    """An onnxruntime session on nn.RNN's ONNX export (one RNN node per layer), or None when the
    ONNX packages are missing."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import io

    x, h0, _, _ = tensors
    buffer = io.BytesIO()
    torch.onnx.export(
        reference, (x, h0), buffer, dynamo=False, input_names=["x", "h0"], output_names=["output", "h_n"]
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "h0": h0.numpy()}

    def call():
        return session.run(None, feeds)

    return call


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


def run_case(device, dtype_name, config, mode, args, bar) -> Result:
    dtype = DTYPES[dtype_name]
    reference, candidate, tensors = make_pair(config, device, dtype, args.seed)
    difference = output_difference(reference, candidate, tensors)
    calls = {"nn.RNN": timed_call(reference, mode, tensors), "rnn_ext": timed_call(candidate, mode, tensors)}
    compile_s = None
    if device == "cpu" and "compiled" in args.peers:
        loop = compiled_loop(reference, config, mode)
        start = time.perf_counter()
        with torch.set_grad_enabled(mode != "forward"):
            timed_call(loop, mode, tensors)()
        compile_s = time.perf_counter() - start
        calls["compiled loop"] = timed_call(loop, mode, tensors)
    if device == "cpu" and mode == "forward" and dtype == torch.float32 and "onnxruntime" in args.peers:
        onnx_call = onnx_forward(reference, tensors, args.threads)
        if onnx_call is not None:
            calls["onnxruntime"] = onnx_call
    for call in calls.values():  # lazy initialisation and allocator warm-up stay out of round one
        with torch.set_grad_enabled(mode != "forward"):
            call()
            call()
    rounds = {side: [] for side in calls}
    sides = list(calls)
    for round_index in range(args.rounds):
        # Rotating which side goes first each round spreads slow drifts (clock, neighbours' load)
        # evenly over all sides.
        shift = round_index % len(sides)
        for side in sides[shift:] + sides[:shift]:
            bar.set_postfix_str(f"{device} {config_label(config)} {mode} {side}", refresh=True)
            rounds[side].append(measure(calls[side], mode, args.threads, args.min_run_time) * 1e6)
            bar.update()
    medians = {side: statistics.median(r) for side, r in rounds.items()}
    nn_us, ext_us = medians["nn.RNN"], medians["rnn_ext"]
    peers = {side: us for side, us in medians.items() if side != "rnn_ext"}
    best_peer = min(peers, key=peers.get)
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


def print_table(results) -> None:
    header = (
        f"{'device':<6} {'config':<28} {'mode':<16} {'nn.RNN us':>10} {'compiled us':>11} "
        f"{'onnxrt us':>10} {'rnn_ext us':>10} {'vs nn':>7} {'vs best':>7} {'GFLOP/s':>8} "
        f"{'of mm':>6} {'spread':>6}  target"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        label = ",".join(str(v) for v in list(r.config.values())[:5])
        label += (",bidir" if r.config["bidirectional"] else "") + ("" if r.config["batch_first"] else ",tm")
        target = "" if r.target is None else f">={r.target:g}x {'met' if r.met else 'MISSED'}"
        best = f"{r.ratio_vs_best:.2f}x" + ("" if r.ratio_vs_best >= 1 else "!")

        def peer(name):
            value = r.peers_us.get(name)  # noqa: B023 (called within this iteration)
            return f"{value:>10.1f}" if value is not None else f"{'-':>10}"

        print(
            f"{r.device:<6} {label:<28} {r.mode:<16} {r.nn_us:>10.1f} {peer('compiled loop'):>11} "
            f"{peer('onnxruntime')} {r.ext_us:>10.1f} {r.ratio:>6.2f}x {best:>7} "
            f"{r.ext_gflops:>8.1f} {r.fraction_of_mm:>6.0%} {r.spread:>6.0%}  {target}"
        )


def plot(results, path: Path, title: str) -> None:
    groups = sorted({(r.device, r.dtype) for r in results}, key=lambda g: (g[0] != "cpu", g[1]))
    figure, axes = plt.subplots(
        len(groups), 1, figsize=(13, 4.6 * len(groups)), squeeze=False, constrained_layout=True
    )
    width = 0.38
    colors = {"forward": "tab:blue", "forward+backward": "tab:orange"}
    for axis, (device, dtype) in zip(axes[:, 0], groups):
        group = [r for r in results if (r.device, r.dtype) == (device, dtype)]

        def label_of(r):
            extra = (" bidir" if r.config["bidirectional"] else "") + (
                "" if r.config["batch_first"] else " tm"
            )
            return config_label(tuple(r.config.values())[:5]) + extra

        labels = list(dict.fromkeys(label_of(r) for r in group))
        for offset, mode in zip((-width / 2, width / 2), MODES):
            for r in (r for r in group if r.mode == mode):
                position = labels.index(label_of(r)) + offset
                axis.bar(position, r.ratio_vs_best, width, color=colors[mode], label=mode)
                axis.annotate(
                    f"{r.ratio_vs_best:.2f}x\\n{r.fraction_of_mm:.0%}mm",
                    (position, r.ratio_vs_best),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        axis.axhline(1.0, color="0.4", linewidth=0.8, linestyle="--")
        axis.set_yscale("log")
        axis.set_xticks(range(len(labels)), [label.replace(" ", "\\n", 2) for label in labels], fontsize=7)
        axis.set_ylabel("best peer time / rnn_ext time")
        axis.set_title(
            f"{device} {dtype}: speedup over the fastest peer (label: and fraction of torch.mm's FLOP rate)"
        )
        handles, names = axis.get_legend_handles_labels()
        unique = dict(zip(names, handles))  # one entry per name, though every bar carries one
        axis.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
        axis.margins(y=0.2)
    figure.suptitle(title, fontsize=10)
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
        default="compiled,onnxruntime",
        help="CPU peers besides nn.RNN, comma-separated: compiled, onnxruntime (default: both; '' for none)",
    )
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
    if args.peers - {"compiled", "onnxruntime"}:
        parser.error("--peers: choose from compiled, onnxruntime")
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")

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
    results = []
    extras = {}
    with tqdm(total=len(cases) * args.rounds * 4, unit="timing", dynamic_ncols=True) as bar:
        for device, config, mode in cases:
            results.append(run_case(device, args.dtype, config, mode, args, bar))
        if "cpu" in devices and not args.no_extras and args.dtype == "float32":
            extras["char_lm_training_step"] = training_step_case(args, bar)
            extras["peak_memory"] = memory_case(args.threads)

    machine = machine_record(devices, args.threads, git, load_at_start)
    print(
        f"\n{machine['cpu_model']}, {machine['usable_cores']} cores, torch {machine['torch']}, "
        f"{args.threads} threads"
        + (f", {machine['cuda_device']}" if "cuda" in devices else "")
        + f"; median of {args.rounds} alternating rounds; ratio = nn.RNN / rnn_ext; "
        "spread = (slowest - fastest round) / median, the worse side"
    )
    print_table(results)
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
        "machine": machine,
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
            "peers": sorted(args.peers),
        },
        "results": [{**asdict(r), "spread": r.spread} for r in results],
        "extras": extras,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    plot_path = path.with_suffix(".png")
    commit = (machine["git"]["commit"] or "unknown")[:10] + ("+dirty" if machine["git"]["dirty"] else "")
    plot(
        results,
        plot_path,
        f"rnn_ext vs its peers, {machine['cpu_model']} ({args.threads} threads)"
        + (f", {machine['cuda_device']}" if "cuda" in devices else "")
        + f", torch {machine['torch']}, {commit}, {record['created']}",
    )
    print(f"results: {path}\nplot:    {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
