"""Instructions executed per call of a small model, counted by valgrind's callgrind instead of
timed: a count does not move with the machine's load, so it shows what a change to the per-call
glue saves where timings of 10-100 us are lost in the noise.

    python benchmarks/step_instructions.py                 # the seed model, rnn_ext and nn.RNN
    python benchmarks/step_instructions.py --steps 200 --mode forward

Needs valgrind (with its callgrind.h header) and a C compiler. The script runs itself under
`valgrind --tool=callgrind --collect-atstart=no`; inside, collection is switched on around the
timed loop only (CALLGRIND_TOGGLE_COLLECT through a small library built at run time), after a
warm-up, with one torch thread. "training step" is bench.py's forward+backward call: gradients
dropped, forward with grad, torch.autograd.backward with given gradients of output and h_n.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOGGLE_SOURCE = "#include <valgrind/callgrind.h>\nvoid toggle_collect(void) { CALLGRIND_TOGGLE_COLLECT; }\n"


def run_inside(args) -> None:
    """The measured process: build the model, warm up, count `args.steps` calls."""
    import torch

    import rnn_ext

    toggle = ctypes.CDLL(args.toggle_library).toggle_collect
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps, batch, inputs, hidden, layers = (int(v) for v in args.config.split(","))
    module_class = rnn_ext.RNN if args.side == "rnn_ext" else torch.nn.RNN
    model = module_class(inputs, hidden, layers, batch_first=True)
    x = torch.randn(batch, steps, inputs)
    h0 = torch.randn(layers, batch, hidden)
    grad_output = torch.randn(batch, steps, hidden)
    grad_h_n = torch.randn(layers, batch, hidden)
    parameters = list(model.parameters())

    def training_step():
        for parameter in parameters:
            parameter.grad = None
        output, h_n = model(x, h0)
        torch.autograd.backward((output, h_n), (grad_output, grad_h_n))

    def forward():
        with torch.no_grad():
            model(x, h0)

    call = training_step if args.mode == "training-step" else forward
    for _ in range(20):
        call()
    toggle()
    for _ in range(args.steps):
        call()
    toggle()


def count(args, side: str, library: Path) -> float:
    """Instructions per call of `side`, from callgrind's summary line."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        f"--callgrind-out-file={library.parent / ('callgrind.' + side)}",
        sys.executable,
        __file__,
        "--inside",
        "--side",
        side,
        "--toggle-library",
        str(library),
        "--config",
        args.config,
        "--mode",
        args.mode,
        "--steps",
        str(args.steps),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError("callgrind printed no summary:\n" + result.stderr[-2000:])
    return int(match.group(1)) / args.steps


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="10,1,1,32,1", help="T,B,I,H,layers (batch_first)")
    parser.add_argument("--mode", choices=("training-step", "forward"), default="training-step")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sides", default="rnn_ext,nn.RNN")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="rnn_ext", help=argparse.SUPPRESS)
    parser.add_argument("--toggle-library", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        run_inside(args)
        return 0
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if shutil.which("valgrind") is None or compiler is None:
        print("needs valgrind and a C compiler", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "toggle.c"
        source.write_text(TOGGLE_SOURCE)
        library = Path(folder) / "toggle.so"
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
        print(f"config {args.config} (batch_first), {args.mode}, one torch thread, {args.steps} calls")
        for side in args.sides.split(","):
            print(f"  {side:8s} {count(args, side, library) / 1000:9.1f} thousand instructions per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
