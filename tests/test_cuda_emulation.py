"""The CUDA path on the CPU: csrc/cuda's layer glue, launch code and kernels, unmodified, compiled with
g++ under a host emulation of CUDA's execution model (tests/cuda_emulation/: one thread per CUDA
thread, barriers for __syncthreads and the cooperative grid sync, per-block shared memory, plain CPU
products in place of cuBLAS), run as whole layers forward and backward on small fake devices and
checked against rnn_ext/reference.py. Also the planner's shared-memory and co-residency arithmetic at
H100/H200 limits. No GPU needed; what this cannot show
is in README.md ("CUDA kernels on the CPU")."""

import ctypes
import importlib.util
import itertools
import os
import shutil
import sys

import pytest
import torch

import helpers
from rnn_ext import reference

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "emulation_build", os.path.join(HERE, "cuda_emulation", "build.py")
)
emulation_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulation_build)

pytestmark = [
    pytest.mark.emulation,
    pytest.mark.skipif(
        shutil.which("g++") is None or not emulation_build.cuda_headers_available(),
        reason="needs g++ and the CUDA toolkit headers (cuda_fp16.h)",
    ),
]

SCALAR_TYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
REGIMES = {"auto": 0, "single_block": 1, "cooperative": 2, "step_gemm": 3}
PLAN_FIELDS = [
    "regime",
    "batch_tile",
    "slice_width",
    "slices",
    "rows_per_group",
    "groups",
    "k_split",
    "threads",
    "shared_bytes",
    "launch_directions",
    "rejected",
]
# Agreement with the float64 truth. The half types get their inputs rounded the same way, so what is
# left is float32 accumulation and the final rounding of each stored value (about one unit in the
# last place: 2^-11 for float16, 2^-8 for bfloat16), twice that for gradients (y is stored rounded).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The step-GEMM regime stores every state in the storage type, so a half-type run drifts from the
# float64 truth by a few rounding steps more than the persistent kernel (which carries float32).
STEP_GEMM_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
# H100/H200 (sm_90): 132 SMs, 227 KB of shared memory per block with the opt-in, 228 KB per SM.
H200 = dict(sm_count=132, optin=232448, per_sm=233472, cooperative=1)
int64_p = ctypes.POINTER(ctypes.c_int64)


@pytest.fixture(scope="module")
def lib():
    return load_library()


def load_library():
    library = ctypes.CDLL(emulation_build.build("library"))
    library.emu_define_device.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
    ]
    library.emu_plan.argtypes = [
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        int64_p,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    library.emu_layer_forward.argtypes = [ctypes.c_void_p] * 3 + [int64_p, ctypes.c_char_p, ctypes.c_int]
    library.emu_layer_backward.argtypes = [ctypes.c_void_p] * 7 + [int64_p, ctypes.c_char_p, ctypes.c_int]
    library.emu_gather_previous_states.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
    )
    return library


_device_indices = {}


def use_device(lib, sm_count, optin, per_sm, cooperative=1):
    """Makes a fake device with these limits current. The launch code caches a device's limits once,
    so each distinct set of limits gets its own device index."""
    key = (sm_count, optin, per_sm, cooperative)
    index = _device_indices.setdefault(key, len(_device_indices) + 1)
    assert lib.emu_define_device(index, sm_count, optin, per_sm, cooperative) == 0


def plan_of(lib, dtype, hidden, batch, directions, regime="auto", max_slice=0, steps=4):
    out = (ctypes.c_int64 * len(PLAN_FIELDS))()
    text = ctypes.create_string_buffer(256)
    assert (
        lib.emu_plan(
            SCALAR_TYPES[dtype], steps, batch, hidden, directions, REGIMES[regime], max_slice, out, text, 256
        )
        == 0
    )
    plan = dict(zip(PLAN_FIELDS, list(out)))
    plan["reason"] = text.value.decode()
    return plan


def ptr(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


# ---------------------------------------------------------------------------------------------
# Whole layers and their float64 truth (rnn_ext/reference.py).


class EmuLayer(ctypes.Structure):
    """One layer call, as tests/cuda_emulation/api.cpp declares it."""

    _fields_ = [
        ("scalar_type", ctypes.c_int32),
        ("relu", ctypes.c_int32),
        ("regime", ctypes.c_int32),
        ("max_slice_width", ctypes.c_int32),
        ("has_bias", ctypes.c_int32),
        ("packed", ctypes.c_int32),
        ("steps", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("input_size", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("directions", ctypes.c_int64),
        ("batch_sizes", ctypes.c_void_p),
        ("input", ctypes.c_void_p),
        ("hx", ctypes.c_void_p),
        ("weights", ctypes.c_void_p * 8),
    ]


class Layer:
    """One layer's arguments as the CUDA op receives them: input rows [rows, I] (packed or padded,
    time-major), hx, the flat weights per direction, and random gradients of output and h_n. Every
    tensor is float64 holding values representable in `dtype`, so the truth sees the kernels'
    inputs."""

    def __init__(
        self,
        seed,
        steps,
        batch,
        hidden,
        directions,
        packed,
        relu,
        dtype,
        input_size=5,
        bias=True,
        biased=False,
    ):
        g = torch.Generator().manual_seed(seed)
        self.steps, self.batch, self.hidden, self.directions = steps, batch, hidden, directions
        self.packed, self.relu, self.dtype, self.bias = packed, relu, dtype, bias
        self.input_size = input_size
        if packed:
            lengths = torch.randint(1, steps + 1, (batch,), generator=g).sort(descending=True).values
            lengths[0] = steps
            self.lengths = [int(n) for n in lengths]
        else:
            self.lengths = [steps] * batch
        self.batch_sizes = torch.tensor(
            [sum(n > t for n in self.lengths) for t in range(steps)], dtype=torch.int64
        )
        self.step_offsets = torch.cumsum(self.batch_sizes, 0) - self.batch_sizes
        self.rows = int(self.batch_sizes.sum())

        def draw(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).double()

        def uniform(*shape, scale):
            return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype).double()

        # `biased`: each unit's bias is 0.6 to 1.0 away from zero and the products are small beside
        # it, so that pre-activations stay clear of zero (see relu_margin).
        products = 0.2 if biased else 1.0
        self.input = draw(self.rows, input_size)
        self.weights = []  # nn.RNN's flat order: per direction w_ih, w_hh[, b_ih, b_hh]
        for _ in range(directions):
            self.weights.append(uniform(hidden, input_size, scale=0.7 * products * input_size**-0.5))
            self.weights.append(uniform(hidden, hidden, scale=1.2 * products * hidden**-0.5))
            if bias and biased:
                sign = torch.randint(0, 2, (hidden,), generator=g) * 2 - 1
                self.weights += [
                    (sign * (0.3 + 0.2 * torch.rand(hidden, generator=g, dtype=torch.float64)))
                    .to(dtype)
                    .double()
                    for _ in range(2)
                ]
            elif bias:
                self.weights += [uniform(hidden, scale=0.3), uniform(hidden, scale=0.3)]
        self.hx = draw(directions, batch, hidden, scale=0.7)
        self.grad_output = draw(self.rows, directions * hidden)
        self.grad_h_n = draw(directions, batch, hidden)

    def direction_weights(self, d):
        per = 4 if self.bias else 2
        return self.weights[d * per : (d + 1) * per]

    def padded(self, rows_tensor):
        """[rows, X] -> [T, B, X] (zeros where a row has ended), differentiably."""
        index = torch.zeros(self.steps, self.batch, dtype=torch.int64)
        valid = torch.zeros(self.steps, self.batch, 1, dtype=rows_tensor.dtype)
        for t in range(self.steps):
            o, n = int(self.step_offsets[t]), int(self.batch_sizes[t])
            index[t, :n] = torch.arange(o, o + n)
            valid[t, :n] = 1
        return rows_tensor[index] * valid

    def packed_rows(self, per_direction):
        """Per direction [T, B, H] -> [rows, D*H]."""
        rows = []
        for t in range(self.steps):
            n = int(self.batch_sizes[t])
            rows.append(torch.cat([per_direction[d][t, :n] for d in range(self.directions)], dim=1))
        return torch.cat(rows)

    def truth(self):
        """Float64 forward and backward by autograd through reference.elman_layer: a dict of output
        rows, h_n and the gradients of input rows, hx and every flat weight."""
        nonlinearity = "relu" if self.relu else "tanh"
        leaves = [t.clone().requires_grad_(True) for t in [self.input, self.hx, *self.weights]]
        input, hx, weights = leaves[0], leaves[1], leaves[2:]
        per = 4 if self.bias else 2
        outputs, finals = [], []
        for d in range(self.directions):
            out, h = reference.elman_layer(
                self.padded(input),
                hx[d],
                *weights[d * per : (d + 1) * per],
                nonlinearity=nonlinearity,
                reverse=d == 1,
                lengths=self.lengths,
            )
            outputs.append(out)
            finals.append(h)
        output, h_n = self.packed_rows(outputs), torch.stack(finals)
        grads = torch.autograd.grad((output, h_n), leaves, (self.grad_output, self.grad_h_n))
        return dict(
            output=output.detach(),
            h_n=h_n.detach(),
            grad_input=grads[0],
            grad_hx=grads[1],
            grad_weights=list(grads[2:]),
        )

    def relu_margin(self):
        """The smallest |pre-activation| of the truth over the rows each step runs. A half type's
        rounding moves a pre-activation by a few of its eps: closer to zero than that, relu's
        derivative may flip, and a correct kernel's gradient then differs from the truth by O(1)."""
        seen = []
        relu = torch.relu

        def recording_relu(pre):
            seen.append(pre.detach())
            return relu(pre)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "relu", recording_relu)
            self.truth()
        margin = float("inf")
        for index, pre in enumerate(seen):  # per direction, its steps in its own order
            t = index % self.steps if index < self.steps else self.steps - 1 - index % self.steps
            margin = min(margin, float(pre[: int(self.batch_sizes[t])].abs().min()))
        return margin

    def cast(self, tensor):
        return tensor.to(self.dtype, copy=True).contiguous()


def call_layer(lib, layer, regime, max_slice, forward_only=False):
    """The layer forward, then backward from the forward's own output (as the op's autograd runs
    it), through the real CUDA glue on the emulated device. Returns (results, forward plan, backward
    plan), results in the truth's keys and in `layer.dtype`."""
    D, B, H, I = layer.directions, layer.batch, layer.hidden, layer.input_size
    keep = []  # the cast tensors must outlive the calls

    def cast(tensor):
        keep.append(layer.cast(tensor))
        return keep[-1]

    description = EmuLayer()
    description.scalar_type = SCALAR_TYPES[layer.dtype]
    description.relu = int(layer.relu)
    description.regime = REGIMES[regime]
    description.max_slice_width = max_slice
    description.has_bias = int(layer.bias)
    description.packed = int(layer.packed)
    description.steps, description.batch, description.rows = layer.steps, B, layer.rows
    description.input_size, description.hidden, description.directions = I, H, D
    batch_sizes = layer.batch_sizes.contiguous()
    description.batch_sizes = batch_sizes.data_ptr() if layer.packed else None
    description.input = cast(layer.input).data_ptr()
    description.hx = cast(layer.hx).data_ptr()
    for d in range(D):
        for index, weight in enumerate(layer.direction_weights(d)):
            description.weights[4 * d + index] = cast(weight).data_ptr()

    def nan(*shape):
        return torch.full(shape, float("nan"), dtype=layer.dtype)

    error = ctypes.create_string_buffer(512)
    forward_plan = (ctypes.c_int64 * len(PLAN_FIELDS))()
    output, h_n = nan(layer.rows, D * H), nan(D, B, H)
    code = lib.emu_layer_forward(ctypes.byref(description), ptr(output), ptr(h_n), forward_plan, error, 512)
    assert code == 0, f"forward failed: {error.value.decode()}"
    results = dict(output=output, h_n=h_n)
    if not forward_only:
        grad_input, grad_hx = nan(layer.rows, I), nan(D, B, H)
        grad_weights = []
        pointers = (ctypes.c_void_p * (3 * D))()
        for d in range(D):
            gradients = [nan(H, I), nan(H, H)] + ([nan(H)] if layer.bias else [])
            for index, gradient in enumerate(gradients):
                pointers[3 * d + index] = gradient.data_ptr()
            # nn.RNN's flat order; b_ih and b_hh share one gradient.
            grad_weights += gradients + gradients[2:]
        backward_plan = (ctypes.c_int64 * len(PLAN_FIELDS))()
        code = lib.emu_layer_backward(
            ctypes.byref(description),
            ptr(cast(layer.grad_output)),
            ptr(cast(layer.grad_h_n)),
            ptr(output),
            ptr(grad_input),
            ptr(grad_hx),
            pointers,
            backward_plan,
            error,
            512,
        )
        assert code == 0, f"backward failed: {error.value.decode()}"
        results.update(grad_input=grad_input, grad_hx=grad_hx, grad_weights=grad_weights)
        backward_plan = dict(zip(PLAN_FIELDS, list(backward_plan)))
    else:
        backward_plan = None
    return results, dict(zip(PLAN_FIELDS, list(forward_plan))), backward_plan


def assert_agrees(actual, truth, dtype, what):
    tolerance = TOLERANCE[dtype]
    scale = max(1.0, float(truth.abs().max())) if truth.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), truth, rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"{what}: {m}"
    )


def assert_layer_agrees(results, truth, dtype):
    for key in ("output", "h_n", "grad_input", "grad_hx"):
        if key in results:
            assert_agrees(results[key], truth[key], dtype, key)
    for index, (actual, expected) in enumerate(zip(results.get("grad_weights", []), truth["grad_weights"])):
        assert_agrees(actual, expected, dtype, f"gradient of flat weight {index}")


# ---------------------------------------------------------------------------------------------
# Whole layers on every recurrence path.

# (name, fake device (SMs, opt-in shared bytes, shared bytes per SM), regime, max slice width,
#  batch, hidden, directions, what the plan must be). Small devices and caps force every path at
# a few hundred emulated threads.
SMALL = (8, 48 * 1024, 64 * 1024)
LAYER_CASES = [
    ("single_tile1_h21", SMALL, "single_block", 0, 1, 21, 2, dict(regime=1, batch_tile=1)),
    ("single_tile2_h16", SMALL, "single_block", 0, 2, 16, 2, dict(regime=1, batch_tile=2)),
    ("single_tile4_h21", SMALL, "single_block", 0, 3, 21, 2, dict(regime=1, batch_tile=4)),
    # 9 rows x 2 directions over 2 SMs: 8-row tiles; two blocks along the batch, the second part-full.
    (
        "single_tile8_h40",
        (2, 48 * 1024, 64 * 1024),
        "single_block",
        0,
        9,
        40,
        2,
        dict(regime=1, batch_tile=8, groups=2),
    ),
    # Both directions in one grid, 3 slices of 7 units, 2 row groups of 6 rows (8-row tile part-full).
    (
        "coop_slices_groups_h21",
        (16, 48 * 1024, 64 * 1024),
        "cooperative",
        8,
        12,
        21,
        2,
        dict(regime=2, batch_tile=8, slices=3, groups=2, launch_directions=2),
    ),
    # Too few SMs for both directions' slices at once: one launch per direction.
    (
        "coop_separate_h21",
        (4, 48 * 1024, 64 * 1024),
        "cooperative",
        8,
        4,
        21,
        2,
        dict(regime=2, batch_tile=4, launch_directions=1),
    ),
    # One row group of 20 rows: three register tiles per block and step; H a multiple of 4.
    (
        "coop_tiles_per_block_h24",
        (2, 48 * 1024, 64 * 1024),
        "cooperative",
        12,
        20,
        24,
        1,
        dict(regime=2, batch_tile=8, slices=2, groups=1, rows_per_group=20),
    ),
    ("coop_tile1_h21", (8, 48 * 1024, 64 * 1024), "cooperative", 8, 1, 21, 1, dict(regime=2, batch_tile=1)),
    ("coop_tile2_h16", (8, 48 * 1024, 64 * 1024), "cooperative", 8, 2, 16, 2, dict(regime=2, batch_tile=2)),
    # Per step a GEMM and a pointwise kernel; 23 rows x 21 units is more than one 256-thread block.
    ("step_gemm_h21", SMALL, "step_gemm", 0, 23, 21, 2, dict(regime=3)),
    ("step_gemm_h8_one_direction", SMALL, "step_gemm", 0, 3, 8, 1, dict(regime=3)),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer(lib, case, packed, relu, dtype):
    """A whole layer, forward and backward, through the CUDA glue (input projection, recurrence,
    packed staging, input and weight gradients) and the kernels, against the float64 truth."""
    name, device, regime, max_slice, batch, hidden, directions, expected_plan = case
    use_device(lib, *device)
    half_relu = relu and dtype in (torch.float16, torch.bfloat16)
    layer = Layer(
        helpers.stable_seed(name, packed, relu, str(dtype)),
        5,
        batch,
        hidden,
        directions,
        packed,
        relu,
        dtype,
        biased=half_relu,
    )
    if half_relu:
        assert layer.relu_margin() > 0.05, "pre-activations too close to zero for a half-type relu check"
    results, forward_plan, backward_plan = call_layer(lib, layer, regime, max_slice)
    for plan in (forward_plan, backward_plan):
        for field, value in expected_plan.items():
            assert plan[field] == value, f"plan {plan} has {field} != {value}"
    tolerances = STEP_GEMM_TOLERANCE if regime == "step_gemm" else TOLERANCE
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TOLERANCE, dtype, tolerances.get(dtype, TOLERANCE[dtype]))
        assert_layer_agrees(results, layer.truth(), dtype)


def test_layer_without_bias(lib):
    use_device(lib, *SMALL)
    for regime in ("single_block", "step_gemm"):
        layer = Layer(5, 4, 3, 12, 2, True, False, torch.float64, bias=False)
        results, _, _ = call_layer(lib, layer, regime, 0)
        assert_layer_agrees(results, layer.truth(), torch.float64)


def test_regimes_agree_bitwise_where_they_share_order(lib):
    """Single-block and cooperative plans with the same k-split reduce each unit's sum in the same
    order, so in float64 they agree to the last bit; a wrong exchange plane or a stale state would
    not."""
    use_device(lib, 16, 48 * 1024, 64 * 1024)
    layer = Layer(7, 6, 3, 21, 2, True, False, torch.float64)
    single, single_plan, _ = call_layer(lib, layer, "single_block", 0)
    coop, coop_plan, _ = call_layer(lib, layer, "cooperative", 21)
    assert single_plan["k_split"] == coop_plan["k_split"] and coop_plan["regime"] == 2
    for key in ("output", "h_n", "grad_input", "grad_hx"):
        assert torch.equal(single[key], coop[key]), key
    assert all(torch.equal(a, b) for a, b in zip(single["grad_weights"], coop["grad_weights"]))


def test_forced_regime_that_cannot_run_is_an_error_of_the_op(lib):
    use_device(lib, 8, 48 * 1024, 64 * 1024, cooperative=0)
    layer = Layer(3, 3, 2, 12, 1, False, False, torch.float32)
    with pytest.raises(AssertionError, match="RNN_EXT_CUDA_REGIME=cooperative cannot run hidden_size=12"):
        call_layer(lib, layer, "cooperative", 0, forward_only=True)


# ---------------------------------------------------------------------------------------------
# The GPU acceptance run's sanitizer cases (tools/gpu/sanitizer_cases.py), with their comparison.

_spec = importlib.util.spec_from_file_location(
    "sanitizer_cases", os.path.join(os.path.dirname(HERE), "tools", "gpu", "sanitizer_cases.py")
)
if "sanitizer_cases" not in sys.modules:  # its dataclass looks its module up there
    sys.modules["sanitizer_cases"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["sanitizer_cases"])
sanitizer_cases = sys.modules["sanitizer_cases"]
# The cases small enough for the emulation (the others need hundreds of emulated blocks).
SMALL_SANITIZER_CASES = [case for case in sanitizer_cases.CASES if case.hidden <= 64]


def emulated_case(lib, case, seed):
    """sanitizer_cases.forward_backward's results for `case`, run on the emulated device through the
    CUDA glue: output, h_n and the gradients of (input, hx, *weights), as float64 tensors."""
    dtype = sanitizer_cases.DTYPES[case.dtype]
    input, hx, weights, batch_sizes = sanitizer_cases.layer_arguments(case, seed)
    layer = Layer.__new__(Layer)
    layer.steps, layer.batch, layer.hidden = case.steps, case.batch, case.hidden
    layer.directions, layer.input_size = case.directions, case.input_size
    layer.packed, layer.relu, layer.dtype, layer.bias = case.packed, case.relu, dtype, case.bias
    layer.batch_sizes = batch_sizes if case.packed else torch.full((case.steps,), case.batch)
    layer.rows = int(layer.batch_sizes.sum())
    layer.input, layer.hx, layer.weights = input.reshape(layer.rows, -1), hx, weights
    # The output gradients as forward_backward draws them, for the op's output shapes.
    output_shape = (layer.rows,) if case.packed else (case.steps, case.batch)
    generator = torch.Generator().manual_seed(seed + 1)
    seeds = [
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).double()
        for shape in (output_shape + (case.directions * case.hidden,), tuple(hx.shape))
    ]
    layer.grad_output, layer.grad_h_n = seeds[0].reshape(layer.rows, -1), seeds[1]
    results, _, _ = call_layer(lib, layer, case.regime, case.max_slice_for(SMALL[0]) or 0)
    return [
        results["output"].reshape(output_shape + (-1,)).double(),
        results["h_n"].double(),
        results["grad_input"].reshape(input.shape).double(),
        results["grad_hx"].double(),
    ] + [g.double() for g in results["grad_weights"]]


@pytest.mark.parametrize("case", SMALL_SANITIZER_CASES, ids=[c.name for c in SMALL_SANITIZER_CASES])
def test_sanitizer_cases_meet_their_tolerance(lib, case, monkeypatch):
    """The comparison the GPU run makes (relative to the float64 CPU op on the same rounded
    arguments), with its tolerance, made on the emulated device: a correct kernel and glue meet it."""
    for name in ("RNN_EXT_CUDA_REGIME", "RNN_EXT_CUDA_MAX_SLICE"):
        monkeypatch.setenv(name, "")  # check_case sets them for the CPU op, which ignores them
    use_device(lib, *SMALL)
    dtype = sanitizer_cases.DTYPES[case.dtype]
    seed = 3
    arguments = sanitizer_cases.layer_arguments(case, seed)
    input, hx, weights, batch_sizes = arguments
    rounded = (
        input.to(dtype).double(),
        hx.to(dtype).double(),
        [w.to(dtype).double() for w in weights],
        batch_sizes,
    )
    expected = sanitizer_cases.forward_backward("cpu", torch.float64, rounded, case.relu, seed, dtype)
    error = sanitizer_cases.relative_error(emulated_case(lib, case, seed), expected)
    assert error <= sanitizer_cases.TOLERANCE[case.dtype], f"relative error {error:.2e}"


# ---------------------------------------------------------------------------------------------
# The gather of previous states (W_hh gradient of packed input), on its own.


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gather_previous_states(lib, packed, dtype):
    use_device(lib, *SMALL)
    layer = Layer(helpers.stable_seed("gather", packed, str(dtype)), 5, 6, 23, 2, packed, False, dtype)
    output = layer.cast(layer.grad_output)  # any values: the gather only moves them
    hx = layer.cast(layer.hx)
    previous = torch.full_like(output, float("nan"))
    batch_sizes, step_offsets = (
        (layer.batch_sizes.contiguous(), layer.step_offsets.contiguous()) if packed else (None, None)
    )
    assert (
        lib.emu_gather_previous_states(
            SCALAR_TYPES[dtype],
            ptr(previous),
            ptr(output),
            ptr(hx),
            ptr(batch_sizes),
            ptr(step_offsets),
            layer.steps,
            layer.batch,
            layer.hidden,
            layer.directions,
        )
        == 0
    )
    # The state each row read: h0 at the first step of its sequence in that direction, else its
    # output at the direction's previous step.
    H = layer.hidden
    padded_output = [layer.padded(output)[:, :, d * H : (d + 1) * H] for d in range(layer.directions)]
    expected = []
    for d in range(layer.directions):
        per_step = torch.zeros(layer.steps, layer.batch, H, dtype=dtype)
        for t in range(layer.steps):
            for b in range(int(layer.batch_sizes[t])):
                if d == 0:
                    starts = t == 0
                    source = t - 1
                else:
                    starts = t + 1 >= layer.lengths[b]
                    source = t + 1
                per_step[t, b] = hx[d, b] if starts else padded_output[d][source, b]
        expected.append(per_step)
    assert torch.equal(previous, layer.packed_rows(expected))


# ---------------------------------------------------------------------------------------------
# The planner at H100/H200 limits.


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64],
    ids=lambda t: str(t).replace("torch.", ""),
)
def test_plans_fit_h200(lib, dtype):
    use_device(lib, H200["sm_count"], H200["optin"], H200["per_sm"], H200["cooperative"])
    for hidden, batch, directions in itertools.product(
        [64, 100, 128, 256, 512, 1024, 2048], [1, 8, 64, 300], [1, 2]
    ):
        plan = plan_of(lib, dtype, hidden, batch, directions)
        where = f"{dtype} H={hidden} B={batch} D={directions}: {plan}"
        assert plan["rejected"] == 0, where
        if plan["regime"] == REGIMES["step_gemm"]:
            continue
        assert 0 < plan["shared_bytes"] <= H200["optin"], where
        assert plan["threads"] % 32 == 0 and 32 <= plan["threads"] <= 512, where
        assert plan["batch_tile"] in (1, 2, 4, 8), where
        assert plan["batch_tile"] * plan["slice_width"] <= 4 * plan["threads"], where
        assert plan["slices"] * plan["slice_width"] >= hidden, where
        assert plan["groups"] * plan["rows_per_group"] >= batch, where
        weights = -(-hidden // 4) * 4 * plan["slice_width"] * dtype.itemsize
        assert weights <= plan["shared_bytes"], where
        if plan["regime"] == REGIMES["cooperative"]:
            # Co-resident: every block of one launch on its own SM at these sizes.
            assert plan["slices"] * plan["groups"] * plan["launch_directions"] <= H200["sm_count"], where
        else:
            assert plan["slices"] == 1 and plan["launch_directions"] == directions, where


# (dtype, hidden, directions) -> regime auto picks on an H200. W_hh in one block: 227 KB holds fp32 up
# to about H = 236, the half types up to 336; past that the cooperative grid slices it, and past what
# 132 co-resident blocks hold the step-GEMM fallback runs.
H200_REGIMES = [
    (torch.float32, 64, 1, "single_block"),
    (torch.float32, 128, 2, "single_block"),
    (torch.float32, 256, 1, "cooperative"),
    (torch.float32, 2048, 1, "cooperative"),
    (torch.float16, 256, 2, "single_block"),
    (torch.float16, 512, 1, "cooperative"),
    (torch.float16, 2048, 2, "cooperative"),
    (torch.float64, 128, 1, "single_block"),
]


@pytest.mark.parametrize(
    "dtype, hidden, directions, regime",
    H200_REGIMES,
    ids=[f"{str(c[0]).replace('torch.', '')}-H{c[1]}-D{c[2]}" for c in H200_REGIMES],
)
def test_h200_regime_choice(lib, dtype, hidden, directions, regime):
    use_device(lib, H200["sm_count"], H200["optin"], H200["per_sm"], H200["cooperative"])
    plan = plan_of(lib, dtype, hidden, 16, directions)
    assert plan["regime"] == REGIMES[regime], plan


def test_forced_regime_that_cannot_run_is_rejected(lib):
    use_device(lib, H200["sm_count"], H200["optin"], H200["per_sm"], H200["cooperative"])
    plan = plan_of(lib, torch.float32, 1024, 8, 1, regime="single_block")
    assert plan["rejected"] == 1 and "512" in plan["reason"]
    use_device(lib, 8, 48 * 1024, 64 * 1024, cooperative=0)
    plan = plan_of(lib, torch.float32, 64, 8, 1, regime="cooperative")
    assert plan["rejected"] == 1 and "cooperative" in plan["reason"]
    assert plan_of(lib, torch.float32, 64, 8, 1)["regime"] == REGIMES["single_block"]


# (SMs, opt-in shared bytes per block, cooperative launch): an H100/H200, small devices, and one
# without cooperative launch. Each has 1 KB more shared memory per SM than a block may opt into.
RULE_DEVICES = [
    (132, 232448, 1),
    (8, 48 * 1024, 1),
    (2, 48 * 1024, 1),
    (1, 100 * 1024, 1),
    (16, 64 * 1024, 0),
]


@pytest.mark.parametrize(
    "device", RULE_DEVICES, ids=[f"sm{d[0]}-optin{d[1]}-coop{d[2]}" for d in RULE_DEVICES]
)
def test_forced_regime_rule_of_the_gpu_tests_matches_the_planner(lib, device):
    """tests/test_cuda.py lets a forced regime refuse a layer exactly where
    helpers.forced_regime_must_run says the planner must: the rule agrees with the planner itself."""
    sm_count, optin, cooperative = device
    use_device(lib, sm_count, optin, optin + 1024, cooperative)
    for dtype, hidden, directions, regime in itertools.product(
        DTYPES,
        [8, 21, 100, 200, 236, 256, 300, 512, 513, 600, 1100, 2048, 5000],
        [1, 2],
        ["single_block", "cooperative"],
    ):
        plan = plan_of(lib, dtype, hidden, 3, directions, regime)
        expected = helpers.forced_regime_must_run(regime, hidden, sm_count, optin, cooperative, dtype)
        assert (plan["rejected"] == 0) == expected, f"{regime} {dtype} H={hidden} D={directions}: {plan}"


def test_cooperative_with_fewer_sms_than_directions(lib):
    """One SM and two directions: the planner once divided by the SMs per direction (0 here) and
    died of SIGFPE; now each direction gets a launch of its own, and the results are right."""
    use_device(lib, 1, 48 * 1024, 64 * 1024)
    plan = plan_of(lib, torch.float32, 21, 4, 2, regime="cooperative")
    assert plan["rejected"] == 0 and plan["regime"] == REGIMES["cooperative"], plan
    assert plan["launch_directions"] == 1 and plan["slices"] * plan["groups"] == 1, plan
    layer = Layer(11, 5, 4, 21, 2, True, True, torch.float64)
    results, plan, _ = call_layer(lib, layer, "cooperative", 0)
    assert plan["launch_directions"] == 1, plan
    assert_layer_agrees(results, layer.truth(), torch.float64)
