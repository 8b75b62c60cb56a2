"""Times rnn_ext.RNN against torch.nn.RNN carrying the same weights, in one process, alternating the
two sides round by round; writes a table, a JSON record and a speedup plot under benchmarks/results/.

    python benchmarks/bench.py                      # CPU grid (issue 3's table), and CUDA if present
    python benchmarks/bench.py --quick --device cpu
    python benchmarks/bench.py --configs "100,32,64,128,1;1000,1,1,32,1" --threads 1
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import torch  # noqa: E402
import torch.utils.benchmark as benchmark  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rnn_ext  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODES = ("forward", "forward+backward")

# (T, B, I, H, layers), batch_first. The CPU grid is issue 3's table; the targets are its speedups.
CPU_GRID = [
    (10, 1, 1, 32, 1),
    (1000, 1, 1, 32, 1),
    (100, 32, 64, 128, 1),
    (100, 32, 256, 256, 2),
    (200, 64, 256, 512, 1),
]
CPU_TARGETS = {
    (10, 1, 1, 32, 1): {"forward": 3.0, "forward+backward": 3.0},
    (1000, 1, 1, 32, 1): {"forward": 20.0, "forward+backward": 30.0},
    (100, 32, 64, 128, 1): {"forward": 3.0, "forward+backward": 3.0},
    (100, 32, 256, 256, 2): {"forward": 1.5, "forward+backward": 2.0},
    (200, 64, 256, 512, 1): {"forward": 1.0, "forward+backward": 1.5},
}
# One or two configs per hidden size, spread over the three CUDA regimes of DESIGN.md (W_hh in one
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
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_DTYPES = ("float32", "float64")  # what rnn_ext's CPU kernels implement
# How far apart the two sides' outputs may be before the table flags it: a timing of two modules
# computing different things would be meaningless. Loose on purpose; the tests check parity.
OUTPUT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2,
                    torch.bfloat16: 1e-1}


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
    nn_rounds_us: list = field(default_factory=list)
    ext_rounds_us: list = field(default_factory=list)

    @property
    def spread(self) -> float:
        """(slowest - fastest round) / median, the worse of the two sides: how far to trust a ratio."""
        return max((max(rounds) - min(rounds)) / statistics.median(rounds)
                   for rounds in (self.nn_rounds_us, self.ext_rounds_us))


def parse_configs(text: str) -> list[tuple[int, ...]]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        values = tuple(int(v) for v in item.split(","))
        if len(values) != 5 or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"config {item!r}: expected five positive integers T,B,I,H,layers")
        configs.append(values)
    if not configs:
        raise argparse.ArgumentTypeError("--configs: no config given")
    return configs


def config_label(config) -> str:
    seq_len, batch, inputs, hidden, layers = config
    return f"T={seq_len} B={batch} I={inputs} H={hidden} L={layers}"


def cuda_usable() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "rnn_ext::elman_forward", "CUDA")


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
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def machine_record(devices, threads, git, load_at_start) -> dict:
    record = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
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
        record.update({
            "cuda_device": torch.cuda.get_device_name(0),
            "cuda_capability": f"{properties.major}.{properties.minor}",
            "cuda_sm_count": properties.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        })
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
    """nn.RNN and rnn_ext.RNN with the same weights, a batch-first input, h0 and upstream gradients."""
    seq_len, batch, inputs, hidden, layers = config
    torch.manual_seed(seed)
    reference = nn.RNN(inputs, hidden, layers, batch_first=True, device=device, dtype=dtype)
    candidate = rnn_ext.RNN(inputs, hidden, layers, batch_first=True, device=device, dtype=dtype)
    candidate.load_state_dict(reference.state_dict())
    x = torch.randn(batch, seq_len, inputs, device=device, dtype=dtype)
    h0 = torch.randn(layers, batch, hidden, device=device, dtype=dtype)
    grad_output = torch.randn(batch, seq_len, hidden, device=device, dtype=dtype)
    grad_h_n = torch.randn(layers, batch, hidden, device=device, dtype=dtype)
    return reference, candidate, (x, h0, grad_output, grad_h_n)


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


def run_case(device, dtype_name, config, mode, args, bar) -> Result:
    dtype = DTYPES[dtype_name]
    reference, candidate, tensors = make_pair(config, device, dtype, args.seed)
    difference = output_difference(reference, candidate, tensors)
    calls = {"nn": timed_call(reference, mode, tensors), "ext": timed_call(candidate, mode, tensors)}
    for call in calls.values():  # lazy initialisation and allocator warm-up stay out of round one
        with torch.set_grad_enabled(mode != "forward"):
            call()
            call()
    rounds = {"nn": [], "ext": []}
    for round_index in range(args.rounds):
        # Swapping which side goes first each round spreads slow drifts (clock, neighbours' load)
        # evenly over both.
        order = ("nn", "ext") if round_index % 2 == 0 else ("ext", "nn")
        for side in order:
            bar.set_postfix_str(f"{device} {config_label(config)} {mode} {side}", refresh=True)
            rounds[side].append(measure(calls[side], mode, args.threads, args.min_run_time) * 1e6)
            bar.update()
    nn_us, ext_us = statistics.median(rounds["nn"]), statistics.median(rounds["ext"])
    ratio = nn_us / ext_us
    target = None
    if device == "cpu" and dtype == torch.float32:
        target = CPU_TARGETS.get(tuple(config), {}).get(mode)
    if difference > OUTPUT_TOLERANCE[dtype]:
        tqdm.write(f"warning: {config_label(config)} {device} {dtype_name}: outputs differ by "
                   f"{difference:.2e}; the two sides may not compute the same thing")
    return Result(
        device=device, dtype=dtype_name,
        config=dict(zip(("T", "B", "I", "H", "layers"), config)),
        mode=mode, nn_us=nn_us, ext_us=ext_us, ratio=ratio,
        nn_us_per_step=nn_us / config[0], ext_us_per_step=ext_us / config[0],
        target=target, met=None if target is None else ratio >= target,
        max_abs_output_diff=difference,
        nn_rounds_us=rounds["nn"], ext_rounds_us=rounds["ext"],
    )


def print_table(results) -> None:
    header = (f"{'device':<6} {'dtype':<8} {'config (T,B,I,H,L)':<22} {'mode':<16} "
              f"{'nn.RNN us':>11} {'rnn_ext us':>11} {'nn us/step':>10} {'ext us/step':>11} "
              f"{'ratio':>7} {'spread':>6}  target")
    print(header)
    print("-" * len(header))
    for r in results:
        config = ",".join(str(v) for v in r.config.values())
        target = "" if r.target is None else f">={r.target:g}x {'met' if r.met else 'MISSED'}"
        print(f"{r.device:<6} {r.dtype:<8} {config:<22} {r.mode:<16} {r.nn_us:>11.1f} "
              f"{r.ext_us:>11.1f} {r.nn_us_per_step:>10.2f} {r.ext_us_per_step:>11.2f} "
              f"{r.ratio:>6.2f}x {r.spread:>6.0%}  {target}")


def plot(results, path: Path, title: str) -> None:
    groups = sorted({(r.device, r.dtype) for r in results}, key=lambda g: (g[0] != "cpu", g[1]))
    figure, axes = plt.subplots(len(groups), 1, figsize=(11, 4.2 * len(groups)), squeeze=False,
                                constrained_layout=True)
    width = 0.38
    colors = {"forward": "tab:blue", "forward+backward": "tab:orange"}
    for axis, (device, dtype) in zip(axes[:, 0], groups):
        group = [r for r in results if (r.device, r.dtype) == (device, dtype)]
        labels = list(dict.fromkeys(config_label(tuple(r.config.values())) for r in group))
        for offset, mode in zip((-width / 2, width / 2), MODES):
            for r in (r for r in group if r.mode == mode):
                position = labels.index(config_label(tuple(r.config.values()))) + offset
                axis.bar(position, r.ratio, width, color=colors[mode], label=mode)
                axis.annotate(f"{r.ratio:.1f}x", (position, r.ratio), ha="center", va="bottom",
                              fontsize=8, xytext=(0, 2), textcoords="offset points")
                if r.target is not None:
                    axis.hlines(r.target, position - width / 2, position + width / 2,
                                colors="black", linewidth=2, label="issue 3 target")
        axis.axhline(1.0, color="0.4", linewidth=0.8, linestyle="--")
        axis.set_yscale("log")
        axis.set_xticks(range(len(labels)), [label.replace(" ", "\n", 2) for label in labels],
                        fontsize=8)
        axis.set_ylabel("speedup (nn.RNN time / rnn_ext time)")
        axis.set_title(f"{device} {dtype}")
        handles, names = axis.get_legend_handles_labels()
        unique = dict(zip(names, handles))  # one entry per name, though every bar carries one
        axis.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
        axis.margins(y=0.15)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="'all' = cpu, plus cuda when a GPU and rnn_ext's CUDA kernels exist")
    parser.add_argument("--configs", type=parse_configs, default=None,
                        help='"T,B,I,H,layers;..." (default: the grid of each device)')
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads on the CPU (default: torch's own choice, %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per blocked_autorange (default 0.2)")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of 0.05 s: checks the harness, not a number to quote")
    parser.add_argument("--tf32", action="store_true",
                        help="let cuDNN and cuBLAS use TF32 for float32 (off by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/<date>-<machine>.json); "
                             "the plot goes next to it as .png")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")

    if args.device == "cuda" and not cuda_usable():
        print("no CUDA: torch sees no GPU, or rnn_ext was built without CUDA kernels",
              file=sys.stderr)
        return 2
    devices = {"cpu": ["cpu"], "cuda": ["cuda"],
               "all": ["cpu"] + (["cuda"] if cuda_usable() else [])}[args.device]
    if args.dtype not in CPU_DTYPES and "cpu" in devices:
        print(f"rnn_ext's CPU kernels take float32/float64, not {args.dtype}: skipping cpu")
        devices.remove("cpu")
    if not devices:
        return 2
    torch.set_num_threads(args.threads)
    git = git_state()  # before the run: others may commit while it goes on
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_at_start:.1f} on {os.cpu_count()} cores: other processes "
              "compete with the timed code, so these numbers are noisy", file=sys.stderr)
    # Comparing against cuDNN in TF32 would compare different arithmetic; only on request.
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    cases = [(device, config, mode)
             for device in devices
             for config in (args.configs or (CPU_GRID if device == "cpu" else CUDA_GRID))
             for mode in modes]
    results = []
    with tqdm(total=len(cases) * args.rounds * 2, unit="timing", dynamic_ncols=True) as bar:
        for device, config, mode in cases:
            results.append(run_case(device, args.dtype, config, mode, args, bar))

    machine = machine_record(devices, args.threads, git, load_at_start)
    print(f"\n{machine['cpu_model']}, {machine['usable_cores']} cores, torch {machine['torch']}, "
          f"{args.threads} threads" + (f", {machine['cuda_device']}" if "cuda" in devices else "")
          + f"; median of {args.rounds} alternating rounds; ratio = nn.RNN / rnn_ext; "
          "spread = (slowest - fastest round) / median, the worse side")
    print_table(results)
    targets = [r for r in results if r.target is not None]
    if targets:
        print(f"issue 3 targets met: {sum(r.met for r in targets)}/{len(targets)}")

    path = args.out or default_output(devices)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "settings": {
            "rounds": args.rounds, "min_run_time_s": args.min_run_time, "dtype": args.dtype,
            "tf32": args.tf32, "batch_first": True, "seed": args.seed,
            "input_requires_grad": False, "h0": "given, random, no grad",
            "backward": "autograd.backward on (output, h_n) with random upstream gradients; "
                        "param.grad set to None before each call",
            "timed": "the whole module call (Python included); forward under torch.no_grad()",
            "ratio": "nn.RNN time / rnn_ext time",
        },
        "results": [{**asdict(r), "spread": r.spread} for r in results],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    plot_path = path.with_suffix(".png")
    commit = (machine["git"]["commit"] or "unknown")[:10] + ("+dirty" if machine["git"]["dirty"] else "")
    plot(results, plot_path, f"rnn_ext vs nn.RNN, {machine['cpu_model']} ({args.threads} threads)"
         + (f", {machine['cuda_device']}" if "cuda" in devices else "")
         + f", torch {machine['torch']}, {commit}, {record['created']}")
    print(f"results: {path}\nplot:    {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
