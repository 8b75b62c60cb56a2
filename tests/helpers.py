"""Helpers the test files share (imported as a plain module; conftest.py holds the fixtures): the
devices to test on, per-case seeds, rnn_ext.RNN paired with nn.RNN, random arguments of one layer op
call, the comparisons of results, and the guard for tests that may need the expecttest package."""

import contextlib
import zlib

import pytest
import torch
from torch import nn

import rnn_ext
from rnn_ext import machine

# --- Devices -----------------------------------------------------------------------------------

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rnn_ext::elman_forward", "CUDA"
)
# The one device parametrisation: CUDA cases are always collected, marked `cuda`, and reported as
# skipped (conftest.py) where there is no GPU or no CUDA build, never silently left out.
requires_cuda = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
CUDA_SKIP_REASON = "needs a GPU and rnn_ext built with its CUDA kernels"
# The values of RNN_EXT_CUDA_REGIME, which the CUDA op reads at every call.
CUDA_REGIMES = ["auto", *machine.CUDA_REGIMES]


def recurrence_shared_bytes(hidden, slice_width, element_bytes, accumulator_bytes, batch_tile=1, k_split=1):
    """Dynamic shared memory of one recurrence block (csrc/cuda/recurrence_plan.h, shared_layout):
    its W_hh columns, its tile's states and the per-warp partial sums, each rounded up to 16 bytes."""

    def up(value, multiple):
        return -(-value // multiple) * multiple

    hidden4 = up(hidden, 4)
    return (
        up(hidden4 * slice_width * element_bytes, 16)
        + up(batch_tile * hidden4 * accumulator_bytes, 16)
        + up(k_split * batch_tile * slice_width * accumulator_bytes, 16)
    )


def forced_regime_must_run(regime, hidden, sm_count, optin_bytes, cooperative_launch, dtype):
    """Whether the planner's arithmetic leaves RNN_EXT_CUDA_REGIME=`regime` no reason to refuse a layer
    of `hidden` units on a device with these limits (no RNN_EXT_CUDA_MAX_SLICE cap). The smallest block
    a regime may use (a 1-row tile, no k-split, its narrowest slice) must fit in the shared memory one
    block may opt into, and a block of at most 512 units must do: a block that fits is resident one
    per SM (the kernel's launch bounds cap it at 512 threads of 128 registers), so a cooperative grid
    of one block per SM is co-resident. Where this is false the planner must refuse."""
    element = torch.tensor([], dtype=dtype).element_size()
    accumulator = 8 if dtype == torch.float64 else 4
    if regime == "single_block":
        width = hidden
    elif regime == "cooperative":
        if not cooperative_launch:
            return False
        # One launch per direction at worst: the units spread over every SM.
        width = -(-hidden // max(1, sm_count))
    else:
        return True
    return width <= 512 and recurrence_shared_bytes(hidden, width, element, accumulator) <= optin_bytes


# --- Seeds and module pairs --------------------------------------------------------------------


def stable_seed(*parts):
    """A seed per test case that is the same in every process, unlike Python's salted str hash."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def ours_and_reference(*args, seed=0, **kwargs):
    """(rnn_ext.RNN, nn.RNN) of the same arguments, each built right after torch.manual_seed(seed):
    rnn_ext.RNN initialises as nn.RNN does, so both get bit-identical weights."""
    torch.manual_seed(seed)
    ours = rnn_ext.RNN(*args, **kwargs)
    torch.manual_seed(seed)
    reference = nn.RNN(*args, **kwargs)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        if not a.is_meta:
            assert torch.equal(a, b), f"{name}: rnn_ext.RNN's init differs from nn.RNN's under one seed"
    return ours, reference


def float64_pair(*args, device="cpu", **kwargs):
    """ours_and_reference(*args, **kwargs), both moved to `device` in float64."""
    ours, reference = ours_and_reference(*args, **kwargs)
    return ours.to(device=device, dtype=torch.float64), reference.to(device=device, dtype=torch.float64)


def seeded_randn(*shape, seed=0, dtype=torch.float64):
    """A standard normal tensor from its own generator, so the same in every test order."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- Arguments of one layer op call -------------------------------------------------------------


def random_layer(
    seed, steps=4, batch=3, input_size=3, hidden=5, directions=1, bias=True, packed=False, packed_lengths=None
):
    """Random float64 CPU arguments of one elman_forward call: (input, hx, weights, batch_sizes).
    Weights are uniform in +-hidden**-0.5 (nn.RNN's init), hx and the input standard normal. The
    input is packed when packed_lengths (per sequence, longest first; they set steps and batch) is
    given, or when `packed` is set (random lengths, the longest `steps`)."""
    generator = torch.Generator().manual_seed(seed)
    if packed_lengths is not None:
        steps, batch = max(packed_lengths), len(packed_lengths)
    scale = hidden**-0.5
    weights = []
    for _ in range(directions):
        shapes = [(hidden, input_size), (hidden, hidden)] + ([(hidden,), (hidden,)] if bias else [])
        weights += [
            (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale for shape in shapes
        ]
    hx = torch.randn(directions, batch, hidden, generator=generator, dtype=torch.float64)
    if packed_lengths is None and not packed:
        return (
            torch.randn(steps, batch, input_size, generator=generator, dtype=torch.float64),
            hx,
            weights,
            None,
        )
    if packed_lengths is None:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator).sort(descending=True).values
        lengths[0] = steps
    else:
        lengths = torch.tensor(packed_lengths)
    batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(steps)], dtype=torch.int64)
    rows = int(batch_sizes.sum())
    return torch.randn(rows, input_size, generator=generator, dtype=torch.float64), hx, weights, batch_sizes


def layer_on(layer, device, dtype=torch.float64, requires_grad=False):
    """The layer's input, hx and weights moved to device and dtype (batch_sizes stays on the CPU), as
    new leaves: the layer itself is left as it was, whatever the calls do with them."""
    input, hx, weights, batch_sizes = layer
    moved = [t.detach().to(device, dtype).requires_grad_(requires_grad) for t in (input, hx, *weights)]
    return moved[0], moved[1], moved[2:], batch_sizes


def rounded_to(layer, dtype):
    """The layer's arguments rounded to `dtype` and back, so that a float64 truth computed from them
    measures only the kernels' rounding, not the inputs'."""
    input, hx, weights, batch_sizes = layer
    return (
        input.to(dtype).double(),
        hx.to(dtype).double(),
        [w.to(dtype).double() for w in weights],
        batch_sizes,
    )


def relu_pre_activations(layer):
    """The float64 pre-activations [directions, steps, batch, hidden] of a padded relu layer."""
    input, hx, weights, batch_sizes = layer
    assert batch_sizes is None, "padded input only"
    steps, per_direction = input.shape[0], len(weights) // hx.shape[0]
    result = []
    for direction in range(hx.shape[0]):
        w_ih, w_hh, *biases = weights[direction * per_direction : (direction + 1) * per_direction]
        h, pre = hx[direction], [None] * steps
        for t in reversed(range(steps)) if direction == 1 else range(steps):
            pre[t] = input[t] @ w_ih.T + h @ w_hh.T + sum(biases)
            h = pre[t].clamp(min=0)
        result.append(torch.stack(pre))
    return torch.stack(result)


def relu_layer_away_from_zero(seed, steps, batch, hidden, dtype, margin=0.2):
    """Arguments of a bidirectional relu layer with bias (as random_layer returns them, already
    rounded to `dtype`) whose float64 pre-activations all lie at least margin / 2 from zero.

    A half type's rounding moves a pre-activation by a few of its eps: near zero that flips relu's
    derivative, and a correct kernel's gradient then differs from the float64 truth by O(1). So the
    inputs are solved for: input_size is 2 * hidden, the forward direction reads the first half of
    an input row through an orthogonal block and the reverse direction the second half through
    another (and the first half through a random one), so each step's input gives pre-activations of
    random sign and of magnitude in [margin, 1.5], chosen beforehand, exactly; rounding to `dtype`
    then moves them by far less than margin / 2 (checked)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * hidden**-0.5

    def orthogonal():
        return torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))[0]

    def targets():
        magnitude = margin + (1.5 - margin) * torch.rand(
            steps, batch, hidden, generator=generator, dtype=torch.float64
        )
        return magnitude * (torch.randint(0, 2, magnitude.shape, generator=generator) * 2 - 1)

    forward_block, reverse_block, reverse_cross = orthogonal(), orthogonal(), uniform(hidden, hidden)
    forward_weights = [
        torch.cat([forward_block, torch.zeros(hidden, hidden, dtype=torch.float64)], 1),
        uniform(hidden, hidden),
        uniform(hidden),
        uniform(hidden),
    ]
    reverse_weights = [
        torch.cat([reverse_cross, reverse_block], 1),
        uniform(hidden, hidden),
        uniform(hidden),
        uniform(hidden),
    ]
    hx = torch.randn(2, batch, hidden, generator=generator, dtype=torch.float64)
    forward_targets, reverse_targets = targets(), targets()
    first = torch.empty(steps, batch, hidden, dtype=torch.float64)
    second = torch.empty(steps, batch, hidden, dtype=torch.float64)
    h = hx[0]
    for t in range(steps):
        rest = h @ forward_weights[1].T + forward_weights[2] + forward_weights[3]
        first[t] = (
            forward_targets[t] - rest
        ) @ forward_block  # the block is orthogonal: its inverse is its transpose
        h = forward_targets[t].clamp(min=0)
    h = hx[1]
    for t in reversed(range(steps)):
        rest = first[t] @ reverse_cross.T + h @ reverse_weights[1].T + reverse_weights[2] + reverse_weights[3]
        second[t] = (reverse_targets[t] - rest) @ reverse_block
        h = reverse_targets[t].clamp(min=0)
    layer = rounded_to((torch.cat([first, second], 2), hx, forward_weights + reverse_weights, None), dtype)
    nearest = relu_pre_activations(layer).abs().min().item()
    assert nearest >= margin / 2, f"a pre-activation {nearest:.3g} from zero after rounding to {dtype}"
    return layer


# --- Results and their comparison ---------------------------------------------------------------

# float64 against float64: outputs and gradients agree to 1e-10, relative to each tensor's scale.
FLOAT64_TOLERANCE = 1e-10


def op_results(device, dtype, layer, relu, seed, cotangent_dtype=None):
    """Output, h_n and the gradients of (input, hx, *weights) of elman_forward for random output
    gradients, as float64 CPU tensors. Everything is computed on `device` in `dtype` from the same
    float64 arguments; the output gradients are rounded to `cotangent_dtype` first when given (for
    the truth of a half-type run)."""
    input, hx, weights, batch_sizes = layer_on(layer, device, dtype, requires_grad=True)
    output, h_n = torch.ops.rnn_ext.elman_forward(input, hx, weights, batch_sizes, relu)
    generator = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (output, h_n)]
    if cotangent_dtype is not None:
        cotangents = [t.to(cotangent_dtype).double() for t in cotangents]
    grad_output, grad_h_n = [t.to(device, dtype) for t in cotangents]
    grads = torch.autograd.grad((output, h_n), [input, hx, *weights], (grad_output, grad_h_n))
    return [t.detach().double().cpu() for t in (output, h_n, *grads)]


OP_RESULT_NAMES = ["output", "h_n", "grad input", "grad hx"]


def assert_within_scale(actual, expected, rtol, name="", min_scale=1.0):
    """The largest difference within rtol times the tensor's scale: max(min_scale, max |expected|).
    Relative to the tensor's largest magnitude, because half-precision rounding is, and elementwise
    relative error means nothing for entries near zero. Compared in float64 on the CPU."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(min_scale, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3e} > {rtol:.1e} * {scale:.3g}"


def assert_results_close(actual, expected, rtol):
    """op_results of two runs: each tensor within rtol * max(1, max |expected|)."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        name = (
            OP_RESULT_NAMES[index]
            if index < len(OP_RESULT_NAMES)
            else f"grad weight {index - len(OP_RESULT_NAMES)}"
        )
        assert_within_scale(a, e, rtol, name)


def assert_all_close(actual, expected, tolerance=FLOAT64_TOLERANCE):
    """Two equally long sequences of tensors, pairwise within rtol = atol = tolerance."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            a, e, rtol=tolerance, atol=tolerance, msg=lambda m, index=index: f"result {index}: {m}"
        )


def module_results(module, x, hx=None, leaves=None, seed=1):
    """Output (its data if packed), h_n and the gradients of a fixed random projection of both, for
    `leaves` (default: x and hx where they require grad) and every parameter that requires grad."""
    output, h_n = module(x, hx)
    data = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    generator = torch.Generator().manual_seed(seed)
    loss = (data * torch.randn(data.shape, generator=generator, dtype=data.dtype)).sum() + (
        h_n * torch.randn(h_n.shape, generator=generator, dtype=h_n.dtype)
    ).sum()
    if leaves is None:
        leaves = [t for t in (x, hx) if t is not None and t.requires_grad]
    leaves = leaves + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves) if leaves else []
    return [data.detach(), h_n.detach(), *grads]


def assert_same_values(got, want, what=""):
    """Same shape and dtype; the same NaN and infinity positions; finite values within
    FLOAT64_TOLERANCE (relative to the tensor's largest finite magnitude)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf positions differ"
    finite = torch.isfinite(want)
    scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(
        got[finite],
        want[finite],
        rtol=FLOAT64_TOLERANCE,
        atol=FLOAT64_TOLERANCE * scale,
        msg=lambda m: f"{what}: {m}",
    )


def assert_same_module_results(ours, reference, make_inputs, what=""):
    """Runs both modules on fresh copies of make_inputs() (the arguments of module_results after the
    module) and compares everything with assert_same_values."""
    want = module_results(reference, *make_inputs())
    got = module_results(ours, *make_inputs())
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want)):
        assert_same_values(g, w, f"{what} tensor {index}")


# --- The expecttest package ---------------------------------------------------------------------


@contextlib.contextmanager
def skip_if_expecttest_missing():
    """Skips the running test when the code inside fails only because the expecttest package is not
    installed: torch.testing._internal (behind torch.library.opcheck, for one) imports it, and the
    machines that run the CUDA tests need not have it."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the missing package
        cause = error
        while cause is not None:
            if isinstance(cause, ModuleNotFoundError) and cause.name == "expecttest":
                pytest.skip(
                    "needs the expecttest package (torch.testing._internal imports it), "
                    "which is not installed"
                )
            cause = cause.__cause__ or cause.__context__
        raise
