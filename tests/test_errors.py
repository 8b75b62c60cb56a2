"""Bad arguments and impossible requests: each ends in a clear exception, never a crash, a hang or a
silent wrong answer. A module call raises what nn.RNN raises on the same call: where nn.RNN's own
argument checks raise, the same type with the same text; where its error is an accident of some inner
op (a matmul's shape or dtype complaint), the same type with a message naming the offending argument.
The ops called directly raise RuntimeError."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn

import rnn_ext
from helpers import (
    assert_same_module_results,
    ours_and_reference,
    random_layer,
    requires_cuda,
    seeded_randn,
    stable_seed,
)

forward_op = torch.ops.rnn_ext.elman_forward.default
backward_op = torch.ops.rnn_ext.elman_backward.default

# Under scripts/check_asan.sh (make check-asan), whose ASan runtime is preloaded.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def outcome(call):
    """("ok", result) or ("raised", the exception raised)."""
    try:
        return ("ok", call())
    except Exception as error:  # noqa: BLE001 - the exception is what is being compared
        return ("raised", error)


def raised_by_both(run_ours, run_reference):
    """The exceptions raised by our call and nn.RNN's (which runs first): both calls must raise."""
    reference = outcome(run_reference)
    assert reference[0] == "raised", f"nn.RNN did not raise; the test is wrong: {reference}"
    ours = outcome(run_ours)
    assert ours[0] == "raised", f"rnn_ext.RNN returned instead of raising {reference[1]!r}"
    return ours[1], reference[1]


def assert_same_error(run_ours, run_reference):
    """Both calls raise the same exception type with the same text."""
    ours, reference = raised_by_both(run_ours, run_reference)
    assert type(ours) is type(reference), (ours, reference)
    assert str(ours) == str(reference)


def assert_clear_error(run_ours, run_reference, names):
    """Both calls raise the same exception type; nn.RNN's text comes from an inner op, ours must name
    the argument: every regex in `names` must match our message."""
    ours, reference = raised_by_both(run_ours, run_reference)
    assert type(ours) is type(reference), (ours, reference)
    for name in names:
        assert re.search(name, str(ours)), (name, str(ours))


def on_both(modules, run):
    """The calls run(ours) and run(reference), for modules = (rnn_ext.RNN, nn.RNN)."""
    ours, reference = modules
    return (lambda: run(ours)), (lambda: run(reference))


def with_both_classes(build):
    """The calls build(rnn_ext.RNN) and build(nn.RNN)."""
    return (lambda: build(rnn_ext.RNN)), (lambda: build(nn.RNN))


# ---------------------------------------------------------------------------------------------
# The module's constructor and forward arguments.


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((3, 4), {"nonlinearity": "sigmoid"}),
        ((3, 4, 1, "gelu"), {}),
        ((3, 4), {"proj_size": 2}),
        ((3, 0), {}),
        ((0, 4), {}),
        ((3, 4, 0), {}),
        ((3.0, 4), {}),
        ((3, 4), {"dropout": 1.5}),
        ((3, 4), {"dropout": True}),
        ((3, 4), {"bias": 1}),
        ((3, 4), {"batch_first": "yes"}),
    ],
)
def test_constructor_errors(args, kwargs):
    assert_same_error(*with_both_classes(lambda cls: cls(*args, **kwargs)))


def test_dropout_warning_for_one_layer():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        rnn_ext.RNN(3, 4, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn_ext.RNN(3, 4, num_layers=2, dropout=0.5)


@pytest.mark.parametrize(
    "build_input",
    [
        lambda: (torch.randn(5, 3, 7),),  # wrong feature size
        lambda: (torch.randn(5, 3, 4), torch.randn(2, 3, 6)),  # wrong hx layers
        lambda: (torch.randn(5, 3, 4), torch.randn(1, 2, 6)),  # wrong hx batch
        lambda: (torch.randn(5, 3, 4), torch.randn(1, 3, 5)),  # wrong hx hidden
        lambda: (torch.randn(5, 3, 4), torch.randn(3, 6)),  # hx dims for batched input
        lambda: (torch.randn(5, 4), torch.randn(1, 1, 6)),  # hx dims for unbatched input
        lambda: (torch.randn(5, 4), torch.randn(2, 6)),  # unbatched hx wrong layers
        lambda: (torch.randn(2, 5, 3, 4),),  # 4-D input
        lambda: (torch.randn(4),),  # 1-D input
        lambda: (torch.randn(5, 3, 4, dtype=torch.float64),),  # dtype mismatch
        lambda: (torch.randint(0, 5, (5, 3, 4)),),  # integer input
        lambda: (torch.randn(0, 3, 4),),  # empty sequence
        lambda: (torch.randn(5, 3, 4), torch.randn(1, 3, 6, device="meta")),  # device mismatch
    ],
)
def test_forward_errors_match_nn_rnn(build_input):
    def call(cls):
        torch.manual_seed(0)
        module = cls(4, 6)
        return module(*build_input())

    assert_same_error(*with_both_classes(call))


def test_packed_input_errors_match_nn_rnn():
    packed = nn.utils.rnn.pack_sequence([torch.randn(4, 3), torch.randn(2, 3)])
    assert_same_error(*with_both_classes(lambda cls: cls(5, 6)(packed)))  # wrong feature size
    packed = nn.utils.rnn.pack_sequence([torch.randn(4, 5), torch.randn(2, 5)])
    assert_same_error(*with_both_classes(lambda cls: cls(5, 6)(packed, torch.randn(1, 3, 6))))  # hx batch


def test_weights_of_wrong_shape_are_rejected():
    module = rnn_ext.RNN(3, 4)
    module.weight_hh_l0 = nn.Parameter(torch.randn(5, 5))
    with pytest.raises(RuntimeError, match="weight_hh of direction 0 must have shape"):
        module(torch.randn(2, 1, 3))


# ---------------------------------------------------------------------------------------------
# Mismatched dtypes and devices, non-floating input, weights replaced by wrong tensors.


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda: (torch.ones(5, 2, 3, dtype=torch.int64),), id="int64 input"),
        pytest.param(lambda: (torch.ones(5, 2, 3, dtype=torch.bool),), id="bool input"),
        pytest.param(lambda: (torch.ones(5, 2, 3, dtype=torch.uint8),), id="uint8 input"),
        pytest.param(lambda: (torch.randn(5, 2, 3, dtype=torch.complex64),), id="complex input"),
        pytest.param(
            lambda: (torch.randn(5, 2, 3, dtype=torch.float64),), id="float64 input, float32 weights"
        ),
        pytest.param(lambda: (torch.randn(5, 2, 3).half(),), id="float16 input, float32 weights"),
        pytest.param(
            lambda: (torch.randn(5, 2, 3), torch.randn(1, 2, 4, device="meta")), id="hx on another device"
        ),
        pytest.param(lambda: (torch.randn(0, 2, 3),), id="no steps"),
        pytest.param(lambda: (torch.randn(0, 3),), id="no steps unbatched"),
    ],
)
def test_bad_inputs_raise_nn_rnns_error(make_input):
    assert_same_error(*on_both(ours_and_reference(3, 4), lambda m: m(*make_input())))


def test_input_on_another_device_raises_nn_rnns_error():
    """The input on another device than the weights (meta stands in for a second device)."""
    assert_same_error(*on_both(ours_and_reference(3, 4), lambda m: m(torch.randn(5, 2, 3, device="meta"))))


def test_weights_on_another_device_raise_nn_rnns_error():
    on_meta = [module.to("meta") for module in ours_and_reference(3, 4)]
    assert_same_error(*on_both(on_meta, lambda m: m(torch.randn(5, 2, 3))))


@pytest.mark.parametrize("hx_dtype", [torch.float64, torch.float16, torch.int64])
def test_hx_of_another_dtype_is_rejected(hx_dtype):
    """nn.RNN fails inside its matmul (the text is the matmul's); ours names hx and both dtypes."""
    assert_clear_error(
        *on_both(
            ours_and_reference(3, 4), lambda m: m(torch.randn(5, 2, 3), torch.ones(1, 2, 4, dtype=hx_dtype))
        ),
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

    assert_clear_error(
        *on_both(ours_and_reference(3, 4, 2, bidirectional=True), run), [name.split("_l")[0], "shape"]
    )


def test_bias_replaced_by_a_broadcastable_shape_is_rejected():
    """nn.RNN broadcasts a [1] bias silently (an accident of its addmm); we refuse a bias that is
    not [hidden_size] rather than guess. A deliberate difference: an error, never a wrong answer."""
    ours, reference = ours_and_reference(3, 4)
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

    assert_clear_error(*on_both(ours_and_reference(3, 4), run), ["weight_hh", "dtype"])


def test_weight_replaced_on_another_device_raises_nn_rnns_error():
    def run(module):
        module.weight_hh_l0 = nn.Parameter(torch.ones(4, 4, device="meta"))
        return module(torch.randn(5, 2, 3))

    assert_same_error(*on_both(ours_and_reference(3, 4), run))


def test_weight_replaced_by_none_raises_nn_rnns_error_type():
    def run(module):
        module.bias_hh_l0 = None
        return module(torch.randn(5, 2, 3))

    ours, reference = raised_by_both(*on_both(ours_and_reference(3, 4), run))
    assert type(ours) is type(reference) is TypeError, (ours, reference)


# ---------------------------------------------------------------------------------------------
# Buffers that cannot be allocated, sizes that overflow: a clean RuntimeError, and the module still
# works afterwards. The sizes are far past any machine's address space (2**47 bytes and up), so no
# allocation can succeed and the tests use no more memory than an ordinary small forward.


def _expanded_input(*shape):
    return torch.randn([1] * len(shape), dtype=torch.float64).expand(*shape)


def _still_works(ours, reference):
    assert_same_module_results(ours, reference, lambda: (seeded_randn(3, 2, 3),), "after")


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2**22, 2**22, 3), id="steps*batch*hidden bytes past the address space"),
        pytest.param((2, 2**44, 3), id="batch past the address space"),
    ],
)
def test_unallocatable_sizes_raise_like_nn_rnn(shape):
    ours, reference = ours_and_reference(3, 4, dtype=torch.float64)
    assert_clear_error(*on_both((ours, reference), lambda m: m(_expanded_input(*shape))), ["allocate"])
    _still_works(ours, reference)


@pytest.mark.skipif(
    UNDER_ASAN,
    reason="ASan's throwing operator new aborts the process on an impossible "
    "size (whatever allocator_may_return_null says) instead of throwing std::bad_alloc",
)
def test_unallocatable_number_of_steps_is_a_runtime_error():
    """2**46 steps: the per-step bookkeeping cannot be allocated either; that must surface as the
    RuntimeError (out of memory) nn.RNN raises, not as a Python MemoryError from std::bad_alloc."""
    ours, reference = ours_and_reference(3, 4, dtype=torch.float64)
    assert_clear_error(*on_both((ours, reference), lambda m: m(_expanded_input(2**46, 1, 3))), ["allocate"])
    _still_works(ours, reference)


def test_unallocatable_hidden_size_through_expanded_weights():
    """hidden_size 2**23 with zero-stride weights: W_hh alone would need 2**49 bytes."""
    hidden = 2**23

    def build():
        modules = []
        for cls in (rnn_ext.RNN, nn.RNN):
            module = cls(1, hidden, device="meta")
            for name in module._flat_weights_names:
                shape = getattr(module, name).shape
                setattr(module, name, nn.Parameter(torch.full([1] * len(shape), 0.5).expand(shape)))
            modules.append(module)
        return modules

    assert_clear_error(*on_both(build(), lambda m: m(torch.randn(1, 1, 1))), ["allocate"])


def test_overflowing_sizes_raise_like_nn_rnn():
    """steps * batch * input overflows int64 before anything is allocated."""
    ours, reference = ours_and_reference(3, 4, dtype=torch.float64)
    assert_same_error(*on_both((ours, reference), lambda m: m(_expanded_input(2**45, 2**45, 3))))
    _still_works(ours, reference)


def test_output_numel_overflow_raises_like_nn_rnn():
    """The input fits int64 ([2, 2**61, 1]) but the output ([2, 2**61, 4]) does not."""
    ours, reference = ours_and_reference(1, 4, dtype=torch.float64)
    ours_error, reference_error = raised_by_both(
        *on_both((ours, reference), lambda m: m(_expanded_input(2, 2**61, 1)))
    )
    assert type(ours_error) is type(reference_error) is RuntimeError


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
# The ops called directly: bad arguments raise RuntimeError, never crash.


def _layer(directions=1):
    """Small arguments whose shapes the bad calls below spell out: 3 steps, batch 2, input 3, hidden 4."""
    input, hx, weights, _ = random_layer(31, steps=3, batch=2, input_size=3, hidden=4, directions=directions)
    return input, hx, weights


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
        "all float16 hx float32": lambda: forward_op(
            x.half(), hx.float(), [t.half() for t in w], None, False
        ),
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
            packed, hx, w, torch.tensor([2, 9, 2, 9, 3, 9])[::2], False
        ),
        "weights not a list": lambda: forward_op(x, hx, w[0], None, False),
        "relu not a bool": lambda: forward_op(x, hx, w, None, "yes"),
        "hx None": lambda: forward_op(x, None, w, None, False),
    }


@pytest.mark.parametrize("name", sorted(_bad_forward_calls()))
def test_forward_op_rejects_bad_arguments(name):
    with pytest.raises(RuntimeError):
        _bad_forward_calls()[name]()


def _bad_backward_calls():
    """name -> (the op's arguments, a regex of its error). The arguments are built here, outside the
    test's pytest.raises, so that only the op's own check can satisfy it."""
    x, hx, w = _layer()
    output, h_n = forward_op(x, hx, w, None, False)
    go, gh = torch.randn_like(output), torch.randn_like(h_n)
    mask = [True, True, True]
    match_dtype = r"grad_output, grad_h_n and output must match the input's dtype and device"
    return {
        "grad_output shape": (
            (go[:2], gh, x, hx, w, output, None, False, mask),
            r"elman_backward: grad_output must have shape \[3, 2, 4\], got \[2, 2, 4\]",
        ),
        "grad_output dtype": ((go.float(), gh, x, hx, w, output, None, False, mask), match_dtype),
        "grad_h_n shape": (
            (go, gh[:, :1], x, hx, w, output, None, False, mask),
            r"elman_backward: grad_h_n must have shape \[1, 2, 4\], got \[1, 1, 4\]",
        ),
        "grad_h_n dtype": ((go, gh.float(), x, hx, w, output, None, False, mask), match_dtype),
        "output shape": (
            (go, gh, x, hx, w, output[:, :, :2], None, False, mask),
            r"elman_backward: output must have shape \[3, 2, 4\], got \[3, 2, 2\]",
        ),
        "output of another shape with matching grad": (
            (go[:2], gh, x, hx, w, output[:2], None, False, mask),
            r"elman_backward: output must have shape \[3, 2, 4\], got \[2, 2, 4\]",
        ),
        "output dtype": ((go, gh, x, hx, w, output.float(), None, False, mask), match_dtype),
        "input dtype": (
            (go, gh, x.float(), hx, w, output, None, False, mask),
            "elman_backward: hx dtype Double does not match input dtype Float",
        ),
        "weights count": (
            (go, gh, x, hx, w[:2] + w[:1], output, None, False, mask),
            r"elman_backward: weights must hold .* for each of the 1 direction\(s\), got 3 tensors",
        ),
        "weight shape": (
            (go, gh, x, hx, [w[1], w[1], *w[2:]], output, None, False, mask),
            r"elman_backward: weight_ih of direction 0 must have shape \[4, 3\], got \[4, 4\]",
        ),
        "mask length": (
            (go, gh, x, hx, w, output, None, False, [True, True]),
            "List with 2 elements to a fixed-size array of size 3",
        ),
        "batch_sizes mismatch": (
            (
                go.reshape(6, 4),
                gh,
                x.reshape(6, 3),
                hx,
                w,
                output.reshape(6, 4),
                torch.tensor([2, 2, 1]),
                False,
                mask,
            ),
            "elman_backward: packed input has 6 rows but batch_sizes sum to 5",
        ),
    }


@pytest.mark.parametrize("name", sorted(_bad_backward_calls()))
def test_backward_op_rejects_bad_arguments(name):
    arguments, message = _bad_backward_calls()[name]
    with pytest.raises(RuntimeError, match=message):
        backward_op(*arguments)


# A second device: the CPU when testing CUDA; on a CPU-only build, the meta device (whose kernels
# are the ops' fake implementations).
def _other_device(device):
    return "meta" if device == "cpu" else "cpu"


def _device_mismatches(device):
    """name -> (op, its arguments, a regex of its error), built outside the test's pytest.raises.
    The message comes from the CUDA op's argument checks, or from the fake (meta) implementation
    where a CPU call has a meta tensor, so some regexes allow either wording."""
    x, hx, w = _layer()
    x, hx, w = x.to(device), hx.to(device), [t.to(device) for t in w]
    other = _other_device(device)
    non_cpu = "meta" if device == "cpu" else device
    output, h_n = forward_op(x, hx, w, None, False)
    go, gh = torch.randn_like(output), torch.randn_like(h_n)
    packed = x.reshape(6, 3)
    mask = [True, True, True]
    parameter = "Input and parameter tensors are not at the same device"
    gradients = "grad_output, grad_h_n and output must match the input's dtype and device"
    return {
        "forward hx": (
            forward_op,
            (x, hx.to(other), w, None, False),
            "Input and hidden tensors are not at the same device",
        ),
        "forward weight": (forward_op, (x, hx, [w[0], w[1].to(other), *w[2:]], None, False), parameter),
        # batch_sizes must be on the CPU whatever the input's device.
        "forward batch_sizes": (
            forward_op,
            (packed, hx, w, torch.tensor([2, 2, 2], device=non_cpu), False),
            "batch_sizes must be (a CPU tensor|a 1-D int64 CPU tensor)",
        ),
        "backward grad_output": (
            backward_op,
            (go.to(other), gh, x, hx, w, output, None, False, mask),
            f"(rnn_ext: grad_output is on|{gradients})",
        ),
        "backward output": (
            backward_op,
            (go, gh, x, hx, w, output.to(other), None, False, mask),
            f"(rnn_ext: output is on|{gradients})",
        ),
        "backward weight": (
            backward_op,
            (go, gh, x, hx, [w[0], w[1].to(other), *w[2:]], output, None, False, mask),
            parameter,
        ),
    }


@pytest.mark.parametrize("name", sorted(_device_mismatches("cpu")))
def test_ops_reject_tensors_on_another_device(name, device, request):
    op, arguments, message = _device_mismatches(device)[name]
    with pytest.raises(RuntimeError, match=message):
        op(*arguments)


def test_ops_reject_bad_arguments_with_runtime_error():
    """The error names the op."""
    x, hx, weights, batch_sizes = random_layer(0, steps=4, batch=3, input_size=3, hidden=5)
    bad_calls = [
        lambda: forward_op(x, hx, weights[:3], None, False),  # wrong weight count
        lambda: forward_op(x, hx[:, :2], weights, None, False),  # hx batch
        lambda: forward_op(x[0], hx, weights, None, False),  # 2-D input without batch_sizes
        lambda: forward_op(x, hx.float(), weights, None, False),  # dtype mismatch
        lambda: forward_op(x, hx, [weights[1], weights[0], *weights[2:]], None, False),  # shapes
        lambda: forward_op(x.reshape(-1, 3), hx, weights, torch.tensor([3, 4, 2, 3]), False),  # increasing
        lambda: forward_op(x.reshape(-1, 3), hx, weights, torch.tensor([3, 3, 3]), False),  # row count
        lambda: forward_op(x.reshape(-1, 3), hx, weights, torch.tensor([3.0, 3, 3, 3]), False),  # dtype
        lambda: forward_op(x[:0], hx, weights, None, False),  # no steps
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError, match="rnn_ext::elman_forward"):
            call()


# ---------------------------------------------------------------------------------------------
# CUDA only.


@requires_cuda
def test_packed_input_refused_under_graph_capture():
    """Packed batch sizes reach the device through a pinned staging buffer that a replay could not
    trust; capture says so instead of recording it."""
    layer = random_layer(
        stable_seed("graph-packed"),
        steps=4,
        batch=3,
        input_size=2,
        hidden=8,
        directions=1,
        bias=False,
        packed=True,
    )
    input, hx, weights, batch_sizes = layer
    input, hx, weights = input.float().cuda(), hx.float().cuda(), [w.float().cuda() for w in weights]
    with torch.no_grad():
        forward_op(input, hx, weights, batch_sizes, False)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph), torch.no_grad():
            forward_op(input, hx, weights, batch_sizes, False)


@requires_cuda
def test_cuda_errors_name_the_argument(monkeypatch):
    input = torch.randn(3, 2, 4, device="cuda", dtype=torch.float32)
    hx = torch.zeros(1, 2, 5, device="cuda")
    weights = [torch.randn(5, 4, device="cuda"), torch.randn(5, 5, device="cuda")]
    with pytest.raises(RuntimeError, match="weight_hh"):
        forward_op(input, hx, [weights[0], torch.randn(5, 4, device="cuda")], None, False)
    with pytest.raises(RuntimeError, match="hx"):
        forward_op(input, hx.double(), weights, None, False)
    monkeypatch.setenv("RNN_EXT_CUDA_REGIME", "fastest")
    with pytest.raises(RuntimeError, match="RNN_EXT_CUDA_REGIME must be"):
        forward_op(input, hx, weights, None, False)
