"""The CUDA kernels on the CPU: csrc/cuda's kernel and launch source, unmodified, compiled with g++ under
a host emulation of CUDA's execution model (tests/cuda_emulation/: one thread per CUDA thread,
barriers for __syncthreads and the cooperative grid sync, per-block shared memory), driven by the real
planner on small fake devices and checked against rnn_ext/reference.py. Also the planner's
shared-memory and co-residency arithmetic at H100/H200 limits. No GPU needed; what this cannot show
is in README.md ("CUDA kernels on the CPU")."""

import ctypes
import importlib.util
import itertools
import os
import shutil
import zlib

import pytest
import torch

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
# H100/H200 (sm_90): 132 SMs, 227 KB of shared memory per block with the opt-in, 228 KB per SM.
H200 = dict(sm_count=132, optin=232448, per_sm=233472, cooperative=1)
int64_p = ctypes.POINTER(ctypes.c_int64)


def stable_seed(*parts):
    return zlib.crc32(repr(parts).encode()) % 100_000


@pytest.fixture(scope="module")
def lib():
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
    library.emu_run_recurrence.argtypes = (
        [ctypes.c_int] * 3
        + [ctypes.c_int64] * 4
        + [ctypes.c_void_p] * 9
        + [ctypes.c_int, ctypes.c_int, int64_p]
    )
    library.emu_step_activation.argtypes = (
        [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        + [ctypes.c_int64] * 5
        + [ctypes.c_void_p, ctypes.c_int64]
    )
    library.emu_step_gradient.argtypes = (
        [ctypes.c_int, ctypes.c_int]
        + [ctypes.c_void_p] * 3
        + [ctypes.c_int64] * 5
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64]
    )
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
# Problems and their float64 truth (rnn_ext/reference.py).


class Layer:
    """One layer's recurrence in the kernels' terms: P (the input projection, already in the output
    rows), W_hh and hx per direction, packed or padded rows, and random output gradients. Every
    tensor is float64 holding values representable in `dtype`, so the truth sees the kernel's inputs."""

    def __init__(self, seed, steps, batch, hidden, directions, packed, relu, dtype):
        g = torch.Generator().manual_seed(seed)
        self.steps, self.batch, self.hidden, self.directions = steps, batch, hidden, directions
        self.packed, self.relu, self.dtype = packed, relu, dtype
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

        self.pre = draw(self.rows, directions * hidden, scale=0.7)
        self.weight_hh = [
            ((torch.rand(hidden, hidden, generator=g, dtype=torch.float64) * 2 - 1) * 1.2 * hidden**-0.5)
            .to(dtype)
            .double()
            for _ in range(directions)
        ]
        self.hx = draw(directions, batch, hidden, scale=0.7)
        self.grad_output = draw(self.rows, directions * hidden)
        self.grad_h_n = draw(directions, batch, hidden)

    def padded(self, rows_tensor, d):
        """[rows, D*H] -> direction d's [T, B, H] (zeros where a row has ended)."""
        H = self.hidden
        out = torch.zeros(self.steps, self.batch, H, dtype=rows_tensor.dtype)
        for t in range(self.steps):
            o, n = int(self.step_offsets[t]), int(self.batch_sizes[t])
            out[t, :n] = rows_tensor[o : o + n, d * H : (d + 1) * H]
        return out

    def packed_rows(self, per_direction):
        """Per direction [T, B, H] -> [rows, D*H]."""
        rows = []
        for t in range(self.steps):
            n = int(self.batch_sizes[t])
            rows.append(torch.cat([per_direction[d][t, :n] for d in range(self.directions)], dim=1))
        return torch.cat(rows)

    def truth(self):
        """Float64 forward (output rows, h_n) and backward (dL/dP rows, dL/dhx) by autograd through
        reference.elman_layer, with P as its input and W_ih = I."""
        eye = torch.eye(self.hidden, dtype=torch.float64)
        nonlinearity = "relu" if self.relu else "tanh"
        pre = [self.padded(self.pre, d).requires_grad_(True) for d in range(self.directions)]
        hx = self.hx.clone().requires_grad_(True)
        outputs, finals = [], []
        for d in range(self.directions):
            out, h = reference.elman_layer(
                pre[d],
                hx[d],
                eye,
                self.weight_hh[d],
                nonlinearity=nonlinearity,
                reverse=d == 1,
                lengths=self.lengths,
            )
            outputs.append(out)
            finals.append(h)
        output, h_n = self.packed_rows(outputs), torch.stack(finals)
        grads = torch.autograd.grad((output, h_n), pre + [hx], (self.grad_output, self.grad_h_n))
        grad_pre = self.packed_rows([g for g in grads[: self.directions]])
        return output.detach(), h_n.detach(), grad_pre, grads[-1]

    def device_steps(self):
        """batch_sizes and step_offsets as the kernels read them: absent for a padded input."""
        if not self.packed:
            return None, None
        return self.batch_sizes.contiguous(), self.step_offsets.contiguous()

    def cast(self, tensor):
        return tensor.to(self.dtype, copy=True).contiguous()


def assert_agrees(actual, truth, dtype, what):
    tolerance = TOLERANCE[dtype]
    scale = max(1.0, float(truth.abs().max())) if truth.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), truth, rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"{what}: {m}"
    )


def run_persistent(lib, layer, regime, max_slice, backward, output=None):
    """Runs the persistent kernel on `layer` as the CUDA glue does. Returns (sequence, final, plan)."""
    D, B, H = layer.directions, layer.batch, layer.hidden
    batch_sizes, step_offsets = layer.device_steps()
    weights = [layer.cast(w) for w in layer.weight_hh]
    plan_out = (ctypes.c_int64 * len(PLAN_FIELDS))()
    final = torch.full((D, B, H), float("nan"), dtype=layer.dtype)
    if not backward:
        sequence = layer.cast(layer.pre)
        initial, grad_output, out = layer.cast(layer.hx), None, None
    else:
        sequence = torch.full((layer.rows, D * H), float("nan"), dtype=layer.dtype)
        initial, grad_output, out = (
            layer.cast(layer.grad_h_n),
            layer.cast(layer.grad_output),
            layer.cast(output),
        )
    code = lib.emu_run_recurrence(
        SCALAR_TYPES[layer.dtype],
        int(layer.relu),
        int(backward),
        layer.steps,
        B,
        H,
        D,
        ptr(batch_sizes),
        ptr(step_offsets),
        ptr(weights[0]),
        ptr(weights[-1]),
        ptr(initial),
        ptr(final),
        ptr(sequence),
        ptr(grad_output),
        ptr(out),
        REGIMES[regime],
        max_slice,
        plan_out,
    )
    plan = dict(zip(PLAN_FIELDS, list(plan_out)))
    assert code == 0, f"launch failed with {code}, plan {plan}"
    return sequence, final, plan


# ---------------------------------------------------------------------------------------------
# The persistent recurrence kernel.

# (name, fake device (SMs, opt-in shared bytes, shared bytes per SM), regime, max slice width,
#  batch, hidden, directions, what the plan must be). Small devices and caps force every path at
# a few hundred emulated threads.
SMALL = (8, 48 * 1024, 64 * 1024)
PERSISTENT_CASES = [
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
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=[c[0] for c in PERSISTENT_CASES])
def test_persistent_recurrence(lib, case, packed, relu, dtype):
    name, device, regime, max_slice, batch, hidden, directions, expected_plan = case
    use_device(lib, *device)
    layer = Layer(
        stable_seed(name, packed, relu, str(dtype)), 5, batch, hidden, directions, packed, relu, dtype
    )
    output, h_n, grad_pre, grad_hx = layer.truth()

    sequence, final, plan = run_persistent(lib, layer, regime, max_slice, backward=False)
    for field, value in expected_plan.items():
        assert plan[field] == value, f"plan {plan} has {field} != {value}"
    assert_agrees(sequence, output, dtype, "output")
    assert_agrees(final, h_n, dtype, "h_n")

    # Backward reads h off the forward output as stored in `dtype`, as the CUDA glue passes it.
    sequence, final, plan = run_persistent(lib, layer, regime, max_slice, backward=True, output=output)
    for field, value in expected_plan.items():
        assert plan[field] == value, f"backward plan {plan} has {field} != {value}"
    assert_agrees(sequence, grad_pre, dtype, "dL/dP")
    assert_agrees(final, grad_hx, dtype, "dL/dhx")


def test_persistent_regimes_agree_bitwise_where_they_share_order(lib):
    """Single-block and cooperative plans with the same k-split reduce each unit's sum in the same
    order, so in float64 they agree to the last bit; a wrong exchange plane or a stale state would
    not."""
    use_device(lib, 16, 48 * 1024, 64 * 1024)
    layer = Layer(7, 6, 3, 21, 2, True, False, torch.float64)
    single, single_final, single_plan = run_persistent(lib, layer, "single_block", 0, backward=False)
    coop, coop_final, coop_plan = run_persistent(lib, layer, "cooperative", 21, backward=False)
    assert single_plan["k_split"] == coop_plan["k_split"] and coop_plan["regime"] == 2
    assert torch.equal(single, coop) and torch.equal(single_final, coop_final)


# ---------------------------------------------------------------------------------------------
# The step-GEMM regime's pointwise kernels, with the GEMMs (cuBLAS on the device) done here.


def step_gemm_forward(lib, layer):
    """The forward of the step-GEMM regime as the CUDA glue runs it: per step, the product added into
    the step's rows (in float64, rounded to the storage type as cuBLAS rounds its output), then the
    step-activation kernel."""
    D, H = layer.directions, layer.hidden
    sequence = layer.cast(layer.pre)
    h_n = torch.full((D, layer.batch, H), float("nan"), dtype=layer.dtype)
    hx = layer.cast(layer.hx)
    offsets, sizes = layer.step_offsets, layer.batch_sizes
    for d in range(D):
        reverse = d == 1
        weight = layer.cast(layer.weight_hh[d]).double()
        order = range(layer.steps - 1, -1, -1) if reverse else range(layer.steps)
        previous = None
        for t in order:
            o, n = int(offsets[t]), int(sizes[t])
            columns = slice(d * H, (d + 1) * H)
            state = hx[d, :n].double().clone()
            if previous is not None:  # rows that continue read the previous step's output
                carried = min(n, int(sizes[previous]))
                po = int(offsets[previous])
                state[:carried] = sequence[po : po + carried, columns].double()
            current = sequence[o : o + n, columns].double() + state @ weight.T
            sequence[o : o + n, columns] = current.to(layer.dtype)
            # Rows past the next step's batch size end here (every row, at the direction's last step).
            if reverse:
                first_final = 0 if t == 0 else n
            else:
                first_final = 0 if t == layer.steps - 1 else int(sizes[t + 1])
            assert (
                lib.emu_step_activation(
                    SCALAR_TYPES[layer.dtype],
                    int(layer.relu),
                    ptr(sequence),
                    o,
                    n,
                    H,
                    D,
                    d,
                    ptr(h_n[d]),
                    first_final,
                )
                == 0
            )
            previous = t
    return sequence, h_n


def step_gemm_backward(lib, layer, output):
    """The backward of the step-GEMM regime: per step in reverse, the step-gradient kernel, then
    dP W_hh carried to the previous step or, for rows that start here, into grad_hx."""
    D, H = layer.directions, layer.hidden
    grad_pre = torch.full((layer.rows, D * H), float("nan"), dtype=layer.dtype)
    grad_hx = torch.full((D, layer.batch, H), float("nan"), dtype=layer.dtype)
    grad_output, output, grad_h_n = (
        layer.cast(layer.grad_output),
        layer.cast(output),
        layer.cast(layer.grad_h_n),
    )
    carry = torch.full((layer.batch, H), float("nan"), dtype=layer.dtype)
    offsets, sizes = layer.step_offsets, layer.batch_sizes
    for d in range(D):
        reverse = d == 1
        weight = layer.cast(layer.weight_hh[d]).double()
        order = range(layer.steps) if reverse else range(layer.steps - 1, -1, -1)
        for t in order:
            o, n = int(offsets[t]), int(sizes[t])
            if reverse:
                first_final = 0 if t == 0 else n
                carried = 0 if t == layer.steps - 1 else int(sizes[t + 1])
            else:
                first_final = 0 if t == layer.steps - 1 else int(sizes[t + 1])
                carried = 0 if t == 0 else n
            assert (
                lib.emu_step_gradient(
                    SCALAR_TYPES[layer.dtype],
                    int(layer.relu),
                    ptr(grad_pre),
                    ptr(grad_output),
                    ptr(output),
                    o,
                    n,
                    H,
                    D,
                    d,
                    ptr(carry),
                    ptr(grad_h_n[d].contiguous()),
                    first_final,
                )
                == 0
            )
            current = grad_pre[o : o + n, d * H : (d + 1) * H].double()
            if carried > 0:
                carry[:carried] = (current[:carried] @ weight).to(layer.dtype)
            if carried < n:
                grad_hx[d, carried:n] = (current[carried:] @ weight).to(layer.dtype)
    return grad_pre, grad_hx


# The step-GEMM regime stores every state in the storage type, so a half-type run drifts from the
# float64 truth by a few rounding steps more than the persistent kernel (which carries float32).
STEP_GEMM_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_step_gemm_pointwise_kernels(lib, packed, relu, dtype, monkeypatch):
    use_device(lib, *SMALL)
    monkeypatch.setitem(TOLERANCE, dtype, STEP_GEMM_TOLERANCE.get(dtype, TOLERANCE[dtype]))
    # 23 rows x 21 units: more elements than one 256-thread block, so the grid has two.
    layer = Layer(stable_seed("step_gemm", packed, relu, str(dtype)), 4, 23, 21, 2, packed, relu, dtype)
    output, h_n, grad_pre, grad_hx = layer.truth()
    sequence, final = step_gemm_forward(lib, layer)
    assert_agrees(sequence, output, dtype, "output")
    assert_agrees(final, h_n, dtype, "h_n")
    sequence, final = step_gemm_backward(lib, layer, output)
    assert_agrees(sequence, grad_pre, dtype, "dL/dP")
    assert_agrees(final, grad_hx, dtype, "dL/dhx")


# ---------------------------------------------------------------------------------------------
# The gather of previous states (W_hh gradient of packed input).


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gather_previous_states(lib, packed, dtype):
    use_device(lib, *SMALL)
    layer = Layer(stable_seed("gather", packed, str(dtype)), 5, 6, 23, 2, packed, False, dtype)
    output = layer.cast(layer.pre)  # any values: the gather only moves them
    hx = layer.cast(layer.hx)
    previous = torch.full_like(output, float("nan"))
    batch_sizes, step_offsets = layer.device_steps()
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
    padded_output = [layer.padded(output, d) for d in range(layer.directions)]
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


def test_cooperative_with_fewer_sms_than_directions(lib):
    """One SM and two directions: the planner once divided by the SMs per direction (0 here) and
    died of SIGFPE; now each direction gets a launch of its own, and the results are right."""
    use_device(lib, 1, 48 * 1024, 64 * 1024)
    plan = plan_of(lib, torch.float32, 21, 4, 2, regime="cooperative")
    assert plan["rejected"] == 0 and plan["regime"] == REGIMES["cooperative"], plan
    assert plan["launch_directions"] == 1 and plan["slices"] * plan["groups"] == 1, plan
    layer = Layer(11, 5, 4, 21, 2, True, True, torch.float64)
    output, h_n, _, _ = layer.truth()
    sequence, final, _ = run_persistent(lib, layer, "cooperative", 0, backward=False)
    assert_agrees(sequence, output, torch.float64, "output")
    assert_agrees(final, h_n, torch.float64, "h_n")
