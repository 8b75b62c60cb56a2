"""One forward+backward of one CUDA recurrence regime against the float64 CPU op: the first thing a
GPU run tries after the build. tools/gpu/gpu_check.sh runs each regime in its own process under
`timeout`, so a regime that hangs is named by its stage, and the progress lines below say whether
the forward or the backward hung.

    python tools/gpu/gpu_smoke.py --regime single_block|cooperative|step_gemm

The last line is "smoke: regime=... status=ok|mismatch|error max_relative_error=... seconds=...".
"""

import argparse
import sys
import time

import torch
from sanitizer_cases import REGIMES, Case, check_case

# float32, both directions, a batch of several register tiles; the cooperative one is capped at 32
# units per block so that its 128 units span 4 blocks per direction exchanging states.
SMOKE = {
    "single_block": Case("smoke_single_block", "single_block", "float32", 16, 11, 32, 128, directions=2),
    "cooperative": Case(
        "smoke_cooperative", "cooperative", "float32", 16, 11, 32, 128, directions=2, max_slice=32
    ),
    "step_gemm": Case("smoke_step_gemm", "step_gemm", "float32", 16, 11, 32, 128, directions=2),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=REGIMES, required=True)
    args = parser.parse_args()
    case = SMOKE[args.regime]
    say = lambda text: print(f"smoke: {text}", flush=True)  # noqa: E731
    if not torch.cuda.is_available():
        say(f"regime={args.regime} status=error reason=no-cuda-device")
        return 2
    import rnn_ext  # noqa: F401  (registers torch.ops.rnn_ext)

    # The GEMMs of the op follow torch's TF32 flag; the float64 truth needs them in float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    begin = time.monotonic()

    def progress(stage):
        torch.cuda.synchronize()
        say(f"{args.regime}: {stage} finished after {time.monotonic() - begin:.2f} s")

    say(
        f"{args.regime}: T={case.steps} B={case.batch} I={case.input_size} H={case.hidden} "
        f"directions={case.directions} {case.dtype}"
    )
    try:
        ok, error = check_case(
            case,
            seed=0,
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
            synchronize=progress,
        )
    except RuntimeError as exception:
        say(
            f"regime={args.regime} status=error seconds={time.monotonic() - begin:.2f} "
            f"reason={str(exception).splitlines()[0].replace(' ', '_')}"
        )
        return 1
    say(
        f"regime={args.regime} status={'ok' if ok else 'mismatch'} max_relative_error={error:.2e} "
        f"seconds={time.monotonic() - begin:.2f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
