"""Hostile input: every case ends in a clear error or in nn.RNN's own answer, never a crash, a hang or
a silent wrong answer. Module-level cases run nn.RNN on the same input in the same test: where
nn.RNN raises from its own argument checks we raise the same type with the same text; where its error
is an accident of some inner op (a matmul's shape or dtype complaint) we raise the same type with a
message naming the offending argument. Direct calls of the ops with bad arguments raise RuntimeError.
"""
from __future__ import annotations

import math
import os
import re
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext

forward_op = torch.ops.rnn_ext.elman_forward.default
backward_op = torch.ops.rnn_ext.elman_backward.default

# float64 against float64: outputs and gradients agree to 1e-10 (design tolerance).
TOLERANCE = 1e-10

# Under scripts/check_asan.sh (make check-asan), whose ASan runtime is preloaded.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def make_pair(*args, seed=0, **kwargs):
    """nn.RNN and rnn_ext.RNN with the same weights (nn.RNN's init under `seed`)."""
    torch.manual_seed(seed)
    reference = nn.RNN(*args, **kwargs)
    ours = rnn_ext.RNN(*args, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def outcome(call):
    """("ok", result) or the exception raised."""
    try:
        return ("ok", call())
    except Exception as error:  # noqa: BLE001 - the exception is what is being compared
        return ("raised", error)


def raise_same_error(call_with):
    """call_with(module) is run on nn.RNN's and our module; both must raise the same type and text."""
    reference, ours = call_with("reference"), call_with("ours")
    assert reference[0] == "raised", f"nn.RNN did not raise; the test is wrong: {reference}"
    assert ours[0] == "raised", f"rnn_ext.RNN returned instead of raising {reference[1]!r}"
    assert type(ours[1]) is type(reference[1]), (ours[1], reference[1])
    assert str(ours[1]) == str(reference[1])


def raise_clear_error(call_with, names):
    """Both must raise the same type; nn.RNN's text comes from an inner op, ours must name the
    argument: every regex in `names` must match our message."""
    reference, ours = call_with("reference"), call_with("ours")
    assert reference[0] == "raised", f"nn.RNN did not raise; the test is wrong: {reference}"
    assert ours[0] == "raised", f"rnn_ext.RNN returned instead of raising {reference[1]!r}"
    assert type(ours[1]) is type(reference[1]), (ours[1], reference[1])
    for name in names:
        assert re.search(name, str(ours[1])), (name, str(ours[1]))


def pair_call(build, run):
    """A call_with for raise_same_error / raise_clear_error: build() -> (nn.RNN, rnn_ext.RNN);
    run(module) is the call."""
    modules = dict(zip(("reference", "ours"), build()))
    return lambda which: outcome(lambda: run(modules[which]))


def seeded(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_same_values(got, want, what=""):
    """Same shape and dtype; the same NaN and infinity positions; finite values within TOLERANCE
    (relative to the tensor's largest finite magnitude)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf positions differ"
    finite = torch.isfinite(want)
    scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(got[finite], want[finite], rtol=TOLERANCE, atol=TOLERANCE * scale,
                               msg=lambda m: f"{what}: {m}")


def forward_backward(module, x, hx=None, leaves=None, seed=1):
    """Output, h_n and the gradients of a fixed random projection of both, for `leaves` (default:
    x and hx where they require grad) and every parameter that requires grad."""
    output, h_n = module(x, hx)
    data = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    generator = torch.Generator().manual_seed(seed)
    loss = (data * torch.randn(data.shape, generator=generator, dtype=data.dtype)).sum() + (
        h_n * torch.randn(h_n.shape, generator=generator, dtype=h_n.dtype)).sum()
    if leaves is None:
        leaves = [t for t in (x, hx) if t is not None and t.requires_grad]
    leaves = leaves + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves) if leaves else []
    return [data.detach(), h_n.detach(), *grads]


def assert_same_run(reference, ours, make_inputs, what=""):
    """Runs both modules on fresh copies of make_inputs() and compares everything."""
    want = forward_backward(reference, *make_inputs())
    got = forward_backward(ours, *make_inputs())
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want)):
        assert_same_values(g, w, f"{what} tensor {index}")


# ---------------------------------------------------------------------------------------------
# NaN and infinity propagate exactly as in nn.RNN.


def _poisoned(shape, where, value, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
    tensor[where] = value
    return tensor


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("place", ["input", "hx", "weight_ih_l0", "weight_hh_l0", "bias_hh_l0", "weight_hh_l0_reverse"])
def test_nan_and_inf_propagate_like_nn_rnn(nonlinearity, value, place, request):
    reference, ours = make_pair(3, 5, 2, nonlinearity, bidirectional=True, dtype=torch.float64)
    if place.startswith(("weight", "bias")):
        with torch.no_grad():
            for module in (reference, ours):
                getattr(module, place).view(-1)[2] = value

    def inputs():
        x = _poisoned((4, 2, 3), (1, 0, 2), value if place == "input" else 0.5, seed=3)
        hx = _poisoned((4, 2, 5), (0, 1, 3), value if place == "hx" else 0.25, seed=4)
        return x.requires_grad_(), hx.requires_grad_()

    assert_same_run(reference, ours, inputs, f"{nonlinearity} {value} in {place}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_in_one_packed_sequence_stays_in_it(nonlinearity, request):
    """A NaN in one sequence of a packed batch must poison exactly what it poisons in nn.RNN."""
    reference, ours = make_pair(3, 4, 2, nonlinearity, dtype=torch.float64)

    def inputs():
        x = _poisoned((5, 3, 3), (2, 1, 0), math.nan, seed=5).requires_grad_()
        return pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False), None, [x]

    assert_same_run(reference, ours, inputs, f"packed {nonlinearity}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_and_inf_in_float32(nonlinearity, request):
    """The float32 path (its own vectorised tanh) keeps NaN where nn.RNN has NaN, and agrees
    elsewhere (infinities included) to float32 accuracy."""
    reference, ours = make_pair(3, 20, 1, nonlinearity)
    x = seeded(6, 2, 3, seed=9, dtype=torch.float32)
    x[1, 0, 0] = math.nan
    x[2, 1, 1] = math.inf
    x[4, 1, 2] = -math.inf
    want, _ = reference(x)
    got, _ = ours(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Buffers that cannot be allocated, sizes that overflow: a clean RuntimeError, and the module still
# works afterwards. The sizes are far past any machine's address space (2**47 bytes and up), so no
# allocation can succeed and the tests use no more memory than an ordinary small forward.


def _expanded_input(*shape):
    return torch.randn([1] * len(shape), dtype=torch.float64).expand(*shape)


def _still_works(reference, ours):
    assert_same_run(reference, ours, lambda: (seeded(3, 2, 3),), "after")


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2**22, 2**22, 3), id="steps*batch*hidden bytes past the address space"),
        pytest.param((2, 2**44, 3), id="batch past the address space"),
    ],
)
def test_unallocatable_sizes_raise_like_nn_rnn(shape):
    reference, ours = make_pair(3, 4, dtype=torch.float64)
    call_with = pair_call(lambda: (reference, ours), lambda m: m(_expanded_input(*shape)))
    raise_clear_error(call_with, ["allocate"])
    _still_works(reference, ours)


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's throwing operator new aborts the process on an impossible "
                    "size (whatever allocator_may_return_null says) instead of throwing std::bad_alloc")
def test_unallocatable_number_of_steps_is_a_runtime_error():
    """2**46 steps: the per-step bookkeeping cannot be allocated either; that must surface as the
    RuntimeError (out of memory) nn.RNN raises, not as a Python MemoryError from std::bad_alloc."""
    reference, ours = make_pair(3, 4, dtype=torch.float64)
    call_with = pair_call(lambda: (reference, ours), lambda m: m(_expanded_input(2**46, 1, 3)))
    raise_clear_error(call_with, ["allocate"])
    _still_works(reference, ours)


def test_unallocatable_hidden_size_through_expanded_weights():
    """hidden_size 2**23 with zero-stride weights: W_hh alone would need 2**49 bytes."""
    hidden = 2**23

    def build():
        modules = []
        for cls in (nn.RNN, rnn_ext.RNN):
            module = cls(1, hidden, device="meta")
            for name in module._flat_weights_names:
                shape = getattr(module, name).shape
                setattr(module, name, nn.Parameter(torch.full([1] * len(shape), 0.5).expand(shape)))
            modules.append(module)
        return modules

    raise_clear_error(pair_call(build, lambda m: m(torch.randn(1, 1, 1))), ["allocate"])


def test_overflowing_sizes_raise_like_nn_rnn():
    """steps * batch * input overflows int64 before anything is allocated."""
    reference, ours = make_pair(3, 4, dtype=torch.float64)
    call_with = pair_call(lambda: (reference, ours), lambda m: m(_expanded_input(2**45, 2**45, 3)))
    raise_same_error(call_with)
    _still_works(reference, ours)


def test_output_numel_overflow_raises_like_nn_rnn():
    """The input fits int64 ([2, 2**61, 1]) but the output ([2, 2**61, 4]) does not."""
    reference, ours = make_pair(1, 4, dtype=torch.float64)
    call_with = pair_call(lambda: (reference, ours), lambda m: m(_expanded_input(2, 2**61, 1)))
    reference_outcome, ours_outcome = call_with("reference"), call_with("ours")
    assert reference_outcome[0] == ours_outcome[0] == "raised"
    assert type(ours_outcome[1]) is type(reference_outcome[1]) is RuntimeError


def test_op_output_numel_overflow_is_a_runtime_error():
    """input [2, 2**60, 1] and hx [1, 2**60, 4] fit int64; the output [2, 2**60, 4] does not."""
    x = _expanded_input(2, 2**60, 1)
    hx = torch.zeros(1, 1, 4, dtype=torch.float64).expand(1, 2**60, 4)
    weights = [torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)]
    with pytest.raises(RuntimeError):
        forward_op(x, hx, weights, None, False)


def test_op_batch_sizes_whose_sum_overflows_are_rejected():
    """Four steps of 2**62 rows sum to 2**64, which wraps to 0 in int64: a packed input of 0 rows
    would then pass the row-count check."""
    x = torch.zeros(0, 1, dtype=torch.float64)
    hx = torch.zeros(1, 1, 1, dtype=torch.float64).expand(1, 2**62, 1)
    weights = [torch.randn(1, 1, dtype=torch.float64), torch.randn(1, 1, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="batch_sizes"):
        forward_op(x, hx, weights, torch.full((4,), 2**62, dtype=torch.int64), False)


# ---------------------------------------------------------------------------------------------
# Mismatched dtypes and devices, non-floating input, weights replaced by wrong tensors.


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda: (torch.ones(5, 2, 3, dtype=torch.int64),), id="int64 input"),
        pytest.param(lambda: (torch.ones(5, 2, 3, dtype=torch.bool),), id="bool input"),
        pytest.param(lambda: (torch.ones(5, 2, 3, dtype=torch.uint8),), id="uint8 input"),
        pytest.param(lambda: (torch.randn(5, 2, 3, dtype=torch.complex64),), id="complex input"),
        pytest.param(lambda: (torch.randn(5, 2, 3, dtype=torch.float64),), id="float64 input, float32 weights"),
        pytest.param(lambda: (torch.randn(5, 2, 3).half(),), id="float16 input, float32 weights"),
        pytest.param(lambda: (torch.randn(5, 2, 3), torch.randn(1, 2, 4, device="meta")), id="hx on another device"),
        pytest.param(lambda: (torch.randn(0, 2, 3),), id="no steps"),
        pytest.param(lambda: (torch.randn(0, 3),), id="no steps unbatched"),
    ],
)
def test_bad_inputs_raise_nn_rnns_error(make_input):
    raise_same_error(pair_call(lambda: make_pair(3, 4), lambda m: m(*make_input())))


def test_input_on_another_device_raises_nn_rnns_error():
    """The input on another device than the weights (meta stands in for a second device)."""
    raise_same_error(pair_call(lambda: make_pair(3, 4), lambda m: m(torch.randn(5, 2, 3, device="meta"))))


def test_weights_on_another_device_raise_nn_rnns_error():
    def build():
        return [m.to("meta") for m in make_pair(3, 4)]

    raise_same_error(pair_call(build, lambda m: m(torch.randn(5, 2, 3))))


@pytest.mark.parametrize("hx_dtype", [torch.float64, torch.float16, torch.int64])
def test_hx_of_another_dtype_is_rejected(hx_dtype):
    """nn.RNN fails inside its matmul (the text is the matmul's); ours names hx and both dtypes."""
    raise_clear_error(
        pair_call(lambda: make_pair(3, 4), lambda m: m(torch.randn(5, 2, 3), torch.ones(1, 2, 4, dtype=hx_dtype))),
        ["hx", "dtype"],
    )


@pytest.mark.parametrize(
    "name, shape",
    [
        ("weight_ih_l0", (4, 5)),
        ("weight_ih_l0", (5, 3)),
        ("weight_hh_l0", (4, 3)),
        ("weight_hh_l0", (5, 5)),
        ("weight_hh_l0", (1, 4, 4)),
        ("bias_ih_l0", (5,)),
        ("bias_hh_l0", (4, 1)),
        ("weight_hh_l1_reverse", (4, 5)),
    ],
)
def test_weights_replaced_by_wrong_shapes_are_rejected(name, shape):
    def run(module):
        setattr(module, name, nn.Parameter(torch.randn(*shape)))
        return module(torch.randn(5, 2, 3))

    raise_clear_error(pair_call(lambda: make_pair(3, 4, 2, bidirectional=True), run),
                      [name.split("_l")[0], "shape"])


def test_bias_replaced_by_a_broadcastable_shape_is_rejected():
    """nn.RNN broadcasts a [1] bias silently (an accident of its addmm); we refuse a bias that is
    not [hidden_size] rather than guess. A deliberate difference: an error, never a wrong answer."""
    reference, ours = make_pair(3, 4)
    for module in (reference, ours):
        module.bias_ih_l0 = nn.Parameter(torch.ones(1))
    reference(torch.randn(5, 2, 3))
    with pytest.raises(RuntimeError, match="bias_ih of direction 0 must have shape"):
        ours(torch.randn(5, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_weight_replaced_by_another_dtype_is_rejected(dtype):
    def run(module):
        module.weight_hh_l0 = nn.Parameter(torch.ones(4, 4, dtype=dtype), requires_grad=False)
        return module(torch.randn(5, 2, 3))

    raise_clear_error(pair_call(lambda: make_pair(3, 4), run), ["weight_hh", "dtype"])


def test_weight_replaced_on_another_device_raises_nn_rnns_error():
    def run(module):
        module.weight_hh_l0 = nn.Parameter(torch.ones(4, 4, device="meta"))
        return module(torch.randn(5, 2, 3))

    raise_same_error(pair_call(lambda: make_pair(3, 4), run))


def test_weight_replaced_by_none_raises_nn_rnns_error_type():
    def run(module):
        module.bias_hh_l0 = None
        return module(torch.randn(5, 2, 3))

    call_with = pair_call(lambda: make_pair(3, 4), run)
    reference, ours = call_with("reference"), call_with("ours")
    assert reference[0] == ours[0] == "raised"
    assert type(ours[1]) is type(reference[1]) is TypeError, (ours[1], reference[1])


def test_weights_replaced_by_odd_layouts_give_nn_rnns_answer():
    """Right shapes, unusual memory: a transposed view, a zero-stride expand, a strided slice."""
    reference, ours = make_pair(4, 4, 2, bidirectional=True, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    replacements = {
        "weight_hh_l0": torch.randn(4, 4, generator=generator, dtype=torch.float64).t(),
        "weight_ih_l1": torch.randn(1, 8, generator=generator, dtype=torch.float64).expand(4, 8),
        "bias_ih_l0_reverse": torch.randn(8, generator=generator, dtype=torch.float64)[::2],
        "weight_ih_l0_reverse": torch.randn(8, 8, generator=generator, dtype=torch.float64)[1::2, ::2],
    }
    for module in (reference, ours):
        for name, value in replacements.items():
            setattr(module, name, nn.Parameter(value))
    assert_same_run(reference, ours, lambda: (seeded(5, 3, 4).requires_grad_(),))


# ---------------------------------------------------------------------------------------------
# requires_grad on only some inputs.


@pytest.mark.parametrize(
    "input_grad, hx_grad, frozen",
    [
        pytest.param(True, False, "all", id="input only, parameters frozen"),
        pytest.param(False, True, "all", id="hx only, parameters frozen"),
        pytest.param(True, True, "all", id="input and hx, parameters frozen"),
        pytest.param(False, False, "weight_hh_l0", id="one weight frozen"),
        pytest.param(True, False, "layer 0", id="first layer frozen"),
        pytest.param(False, False, "all but bias_hh_l1_reverse", id="one bias trainable"),
    ],
)
def test_gradients_for_only_some_inputs(input_grad, hx_grad, frozen):
    reference, ours = make_pair(3, 5, 2, bidirectional=True, dtype=torch.float64)
    for module in (reference, ours):
        for name, parameter in module.named_parameters():
            if frozen == "all" or name == frozen or (frozen == "layer 0" and "_l0" in name) or (
                    frozen == "all but bias_hh_l1_reverse" and name != "bias_hh_l1_reverse"):
                parameter.requires_grad_(False)

    def inputs():
        x = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        hx = torch.randn(4, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        return x.requires_grad_(input_grad), hx.requires_grad_(hx_grad)

    assert_same_run(reference, ours, inputs)


def test_nothing_requires_grad():
    reference, ours = make_pair(3, 5, dtype=torch.float64)
    for module in (reference, ours):
        module.requires_grad_(False)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want, got = reference(x), ours(x)
    assert not got[0].requires_grad and not got[1].requires_grad
    assert_same_values(got[0], want[0])
    assert_same_values(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# Zero strides and overlapping memory.


@pytest.mark.parametrize("batch_first", [False, True])
def test_zero_stride_input_and_hx(batch_first):
    reference, ours = make_pair(3, 5, 2, bidirectional=True, batch_first=batch_first, dtype=torch.float64)

    def inputs():
        generator = torch.Generator().manual_seed(11)
        x_row = torch.randn(1, 1, 3, generator=generator, dtype=torch.float64, requires_grad=True)
        hx_row = torch.randn(4, 1, 1, generator=generator, dtype=torch.float64, requires_grad=True)
        return x_row.expand(6, 6, 3), hx_row.expand(4, 6, 5), [x_row, hx_row]

    assert_same_run(reference, ours, inputs)


def test_input_and_hx_overlap_in_memory():
    """hx is a view into the same storage as the input (H == I), and the input's steps overlap
    each other (a sliding window with step 1)."""
    reference, ours = make_pair(4, 4, 2, dtype=torch.float64)

    def inputs():
        base = torch.randn(64, generator=torch.Generator().manual_seed(12), dtype=torch.float64,
                           requires_grad=True)
        x = base.as_strided((6, 2, 4), (1, 4, 1))  # step t starts one element after step t-1
        hx = base.as_strided((2, 2, 4), (2, 3, 1), storage_offset=3)
        return x, hx, [base]

    assert_same_run(reference, ours, inputs)


def test_weight_shared_between_two_slots():
    """One Parameter used as weight_ih and weight_hh (I == H): both gradients accumulate into it."""
    reference, ours = make_pair(5, 5, dtype=torch.float64)
    for module in (reference, ours):
        module.weight_hh_l0 = module.weight_ih_l0
    assert_same_run(reference, ours, lambda: (seeded(4, 3, 5).requires_grad_(),))


# ---------------------------------------------------------------------------------------------
# Several threads on one module.


@pytest.mark.parametrize("packed", [False, True])
def test_concurrent_calls_match_serial_results(packed):
    """Six threads, four rounds each, on one module: every result bitwise equal to the serial run.
    Sizes large enough that each call also splits its own work over torch's intra-op threads."""
    torch.manual_seed(21)
    module = rnn_ext.RNN(40, 96, 2, bidirectional=True, batch_first=True, dtype=torch.float64)
    params = list(module.parameters())
    threads_count, rounds = 6, 4

    def job(index):
        generator = torch.Generator().manual_seed(100 + index)
        x = torch.randn(5 + index, 3 + index, 40, generator=generator, dtype=torch.float64, requires_grad=True)
        lengths = torch.randint(1, 4 + index, (5 + index,), generator=generator)
        inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) if packed else x
        output, h_n = module(inp)
        data = output.data if packed else output
        loss = (data * data.detach().cos()).sum() + h_n.sin().sum()
        return [data.detach(), h_n.detach(), *torch.autograd.grad(loss, [x, *params])]

    serial = [job(i) for i in range(threads_count)]
    results = {}
    errors = []

    def worker(index):
        try:
            for _ in range(rounds):
                got = job(index)
                assert all(torch.equal(a, b) for a, b in zip(got, serial[index])), f"thread {index} differs"
            results[index] = True
        except BaseException as error:  # noqa: BLE001 - reported below, the thread must not die silently
            errors.append((index, error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a thread hung"
    assert not errors, errors
    assert sorted(results) == list(range(threads_count))


# ---------------------------------------------------------------------------------------------
# The ops called directly: bad arguments raise RuntimeError, never crash.


def _layer(dtype=torch.float64, steps=3, batch=2, input_size=3, hidden=4, directions=1, bias=True):
    generator = torch.Generator().manual_seed(31)

    def rand(*shape):
        return torch.randn(shape, generator=generator, dtype=dtype)

    weights = []
    for _ in range(directions):
        weights += [rand(hidden, input_size), rand(hidden, hidden)]
        if bias:
            weights += [rand(hidden), rand(hidden)]
    return rand(steps, batch, input_size), rand(directions, batch, hidden), weights


def _bad_forward_calls():
    x, hx, w = _layer()
    x2, hx2, w2 = _layer(directions=2)
    packed = x.reshape(6, 3)
    sizes = torch.tensor([2, 2, 2])
    return {
        "input int": lambda: forward_op(x.long(), hx, w, None, False),
        "input bool": lambda: forward_op(x.bool(), hx, w, None, False),
        "input complex": lambda: forward_op(x.to(torch.complex128), hx, w, None, False),
        "input 1-D": lambda: forward_op(x.reshape(-1), hx, w, None, False),
        "input 4-D": lambda: forward_op(x.unsqueeze(0), hx, w, None, False),
        "input no steps": lambda: forward_op(x[:0], hx, w, None, False),
        "input size": lambda: forward_op(x[..., :2], hx, w, None, False),
        "hx 2-D": lambda: forward_op(x, hx[0], w, None, False),
        "hx 3 directions": lambda: forward_op(x, hx.expand(3, 2, 4), w * 3, None, False),
        "hx 0 directions": lambda: forward_op(x, hx[:0], [], None, False),
        "hx batch": lambda: forward_op(x, hx[:, :1], w, None, False),
        "hx dtype": lambda: forward_op(x, hx.float(), w, None, False),
        "weights none": lambda: forward_op(x, hx, [], None, False),
        "weights count 3": lambda: forward_op(x, hx, w[:3], None, False),
        "weights count for 2 directions": lambda: forward_op(x, hx, w2, None, False),
        "weights of 1 direction for 2": lambda: forward_op(x2, hx2, w, None, False),
        "weight_ih shape": lambda: forward_op(x, hx, [w[0].t(), *w[1:]], None, False),
        "weight_hh shape": lambda: forward_op(x, hx, [w[0], w[1][:3], *w[2:]], None, False),
        "bias shape": lambda: forward_op(x, hx, [*w[:3], w[3][:2]], None, False),
        "weight dtype": lambda: forward_op(x, hx, [w[0].float(), *w[1:]], None, False),
        "weight int": lambda: forward_op(x, hx, [w[0], w[1].long(), *w[2:]], None, False),
        "all float16 hx float32": lambda: forward_op(x.half(), hx.float(), [t.half() for t in w], None, False),
        "packed 3-D input": lambda: forward_op(x, hx, w, sizes, False),
        "batch_sizes int32": lambda: forward_op(packed, hx, w, sizes.int(), False),
        "batch_sizes float": lambda: forward_op(packed, hx, w, sizes.double(), False),
        "batch_sizes 2-D": lambda: forward_op(packed, hx, w, sizes.reshape(1, 3), False),
        "batch_sizes empty": lambda: forward_op(packed[:0], hx, w, sizes[:0], False),
        "batch_sizes increasing": lambda: forward_op(packed, hx, w, torch.tensor([1, 2, 2, 1]), False),
        "batch_sizes negative": lambda: forward_op(packed, hx, w, torch.tensor([2, 2, 2, 2, -2]), False),
        "batch_sizes zero": lambda: forward_op(packed, hx, w, torch.tensor([2, 2, 2, 0]), False),
        "batch_sizes sum short": lambda: forward_op(packed, hx, w, torch.tensor([2, 2, 1]), False),
        "batch_sizes sum long": lambda: forward_op(packed, hx, w, torch.tensor([2, 2, 2, 1]), False),
        "batch_sizes above hx batch": lambda: forward_op(packed, hx, w, torch.tensor([3, 3]), False),
        "batch_sizes non-contiguous increasing": lambda: forward_op(
            packed, hx, w, torch.tensor([2, 9, 2, 9, 3, 9])[::2], False),
        "weights not a list": lambda: forward_op(x, hx, w[0], None, False),
        "relu not a bool": lambda: forward_op(x, hx, w, None, "yes"),
        "hx None": lambda: forward_op(x, None, w, None, False),
    }


@pytest.mark.parametrize("name", sorted(_bad_forward_calls()))
def test_forward_op_rejects_bad_arguments(name):
    with pytest.raises(RuntimeError):
        _bad_forward_calls()[name]()


def _bad_backward_calls():
    x, hx, w = _layer()
    output, h_n = forward_op(x, hx, w, None, False)
    go, gh = torch.randn_like(output), torch.randn_like(h_n)
    mask = [True, True, True]
    return {
        "grad_output shape": lambda: backward_op(go[:2], gh, x, hx, w, output, None, False, mask),
        "grad_output dtype": lambda: backward_op(go.float(), gh, x, hx, w, output, None, False, mask),
        "grad_h_n shape": lambda: backward_op(go, gh[:, :1], x, hx, w, output, None, False, mask),
        "grad_h_n dtype": lambda: backward_op(go, gh.float(), x, hx, w, output, None, False, mask),
        "output shape": lambda: backward_op(go, gh, x, hx, w, output[:, :, :2], None, False, mask),
        "output of another shape with matching grad": lambda: backward_op(
            go[:2], gh, x, hx, w, output[:2], None, False, mask),
        "output dtype": lambda: backward_op(go, gh, x, hx, w, output.float(), None, False, mask),
        "input dtype": lambda: backward_op(go, gh, x.float(), hx, w, output, None, False, mask),
        "weights count": lambda: backward_op(go, gh, x, hx, w[:2] + w[:1], output, None, False, mask),
        "weight shape": lambda: backward_op(go, gh, x, hx, [w[1], w[1], *w[2:]], output, None, False, mask),
        "mask length": lambda: backward_op(go, gh, x, hx, w, output, None, False, [True, True]),
        "batch_sizes mismatch": lambda: backward_op(go.reshape(6, 4), gh, x.reshape(6, 3), hx, w,
                                                    output.reshape(6, 4), torch.tensor([2, 2, 1]), False, mask),
    }


@pytest.mark.parametrize("name", sorted(_bad_backward_calls()))
def test_backward_op_rejects_bad_arguments(name):
    with pytest.raises(RuntimeError):
        _bad_backward_calls()[name]()


# A second device: the CPU when testing CUDA; on a CPU-only build, the meta device (whose kernels
# are the ops' fake implementations).
def _other_device(device):
    return "meta" if device == "cpu" else "cpu"


def _device_mismatches(device):
    x, hx, w = _layer()
    x, hx, w = x.to(device), hx.to(device), [t.to(device) for t in w]
    other = _other_device(device)
    non_cpu = "meta" if device == "cpu" else device
    output, h_n = forward_op(x, hx, w, None, False)
    go, gh = torch.randn_like(output), torch.randn_like(h_n)
    packed = x.reshape(6, 3)
    mask = [True, True, True]
    return {
        "forward hx": lambda: forward_op(x, hx.to(other), w, None, False),
        "forward weight": lambda: forward_op(x, hx, [w[0], w[1].to(other), *w[2:]], None, False),
        # batch_sizes must be on the CPU whatever the input's device.
        "forward batch_sizes": lambda: forward_op(packed, hx, w, torch.tensor([2, 2, 2], device=non_cpu), False),
        "backward grad_output": lambda: backward_op(go.to(other), gh, x, hx, w, output, None, False, mask),
        "backward output": lambda: backward_op(go, gh, x, hx, w, output.to(other), None, False, mask),
        "backward weight": lambda: backward_op(go, gh, x, hx, [w[0], w[1].to(other), *w[2:]], output, None,
                                               False, mask),
    }


@pytest.mark.parametrize("name", sorted(_device_mismatches("cpu")))
def test_ops_reject_tensors_on_another_device(name, device, request):
    with pytest.raises(RuntimeError):
        _device_mismatches(device)[name]()


@pytest.mark.parametrize("mask", [[False, False, False], [True, False, False], [False, True, False], [False, False, True]])
def test_backward_op_output_mask_combinations(mask):
    """Each mask gives exactly the requested gradients, equal to the full call's."""
    x, hx, w = _layer()
    output, h_n = forward_op(x, hx, w, None, True)
    go, gh = torch.randn_like(output), torch.randn_like(h_n)
    full = backward_op(go, gh, x, hx, w, output, None, True, [True, True, True])
    part = backward_op(go, gh, x, hx, w, output, None, True, mask)
    for index in (0, 1):
        if mask[index]:
            assert torch.equal(part[index], full[index])
        else:
            assert part[index].numel() == 0
    if mask[2]:
        assert len(part[2]) == len(full[2]) and all(torch.equal(a, b) for a, b in zip(part[2], full[2]))
    else:
        assert len(part[2]) == 0
