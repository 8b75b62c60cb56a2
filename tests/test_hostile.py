"""Hostile input: NaN and infinity, odd memory layouts (transposed, zero-stride, overlapping, shared
weights), gradients for only some inputs, several threads on one module. Every case ends in nn.RNN's
own answer (or, for the ops called directly, the answer of the full call), never a crash, a hang or a
silent wrong answer. Hostile input that must be refused is in test_errors.py."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from helpers import (
    assert_same_module_results,
    assert_same_values,
    ours_and_reference,
    random_layer,
    seeded_randn,
)

forward_op = torch.ops.rnn_ext.elman_forward.default
backward_op = torch.ops.rnn_ext.elman_backward.default


# ---------------------------------------------------------------------------------------------
# NaN and infinity propagate exactly as in nn.RNN.


def _poisoned(shape, where, value, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
    tensor[where] = value
    return tensor


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "place", ["input", "hx", "weight_ih_l0", "weight_hh_l0", "bias_hh_l0", "weight_hh_l0_reverse"]
)
def test_nan_and_inf_propagate_like_nn_rnn(nonlinearity, value, place, request):
    ours, reference = ours_and_reference(3, 5, 2, nonlinearity, bidirectional=True, dtype=torch.float64)
    if place.startswith(("weight", "bias")):
        with torch.no_grad():
            for module in (reference, ours):
                getattr(module, place).view(-1)[2] = value

    def inputs():
        x = _poisoned((4, 2, 3), (1, 0, 2), value if place == "input" else 0.5, seed=3)
        hx = _poisoned((4, 2, 5), (0, 1, 3), value if place == "hx" else 0.25, seed=4)
        return x.requires_grad_(), hx.requires_grad_()

    assert_same_module_results(ours, reference, inputs, f"{nonlinearity} {value} in {place}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_in_one_packed_sequence_stays_in_it(nonlinearity, request):
    """A NaN in one sequence of a packed batch must poison exactly what it poisons in nn.RNN."""
    ours, reference = ours_and_reference(3, 4, 2, nonlinearity, dtype=torch.float64)

    def inputs():
        x = _poisoned((5, 3, 3), (2, 1, 0), math.nan, seed=5).requires_grad_()
        return pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False), None, [x]

    assert_same_module_results(ours, reference, inputs, f"packed {nonlinearity}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_and_inf_in_float32(nonlinearity, request):
    """The float32 path (its own vectorised tanh) keeps NaN where nn.RNN has NaN, and agrees
    elsewhere (infinities included) to float32 accuracy."""
    ours, reference = ours_and_reference(3, 20, 1, nonlinearity)
    x = seeded_randn(6, 2, 3, seed=9, dtype=torch.float32)
    x[1, 0, 0] = math.nan
    x[2, 1, 1] = math.inf
    x[4, 1, 2] = -math.inf
    want, _ = reference(x)
    got, _ = ours(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_weights_replaced_by_odd_layouts_give_nn_rnns_answer():
    """Right shapes, unusual memory: a transposed view, a zero-stride expand, a strided slice."""
    ours, reference = ours_and_reference(4, 4, 2, bidirectional=True, dtype=torch.float64)
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
    assert_same_module_results(ours, reference, lambda: (seeded_randn(5, 3, 4).requires_grad_(),))


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
    ours, reference = ours_and_reference(3, 5, 2, bidirectional=True, dtype=torch.float64)
    for module in (reference, ours):
        for name, parameter in module.named_parameters():
            if (
                frozen == "all"
                or name == frozen
                or (frozen == "layer 0" and "_l0" in name)
                or (frozen == "all but bias_hh_l1_reverse" and name != "bias_hh_l1_reverse")
            ):
                parameter.requires_grad_(False)

    def inputs():
        x = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        hx = torch.randn(4, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        return x.requires_grad_(input_grad), hx.requires_grad_(hx_grad)

    assert_same_module_results(ours, reference, inputs)


def test_nothing_requires_grad():
    ours, reference = ours_and_reference(3, 5, dtype=torch.float64)
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
    ours, reference = ours_and_reference(
        3, 5, 2, bidirectional=True, batch_first=batch_first, dtype=torch.float64
    )

    def inputs():
        generator = torch.Generator().manual_seed(11)
        x_row = torch.randn(1, 1, 3, generator=generator, dtype=torch.float64, requires_grad=True)
        hx_row = torch.randn(4, 1, 1, generator=generator, dtype=torch.float64, requires_grad=True)
        return x_row.expand(6, 6, 3), hx_row.expand(4, 6, 5), [x_row, hx_row]

    assert_same_module_results(ours, reference, inputs)


def test_input_and_hx_overlap_in_memory():
    """hx is a view into the same storage as the input (H == I), and the input's steps overlap
    each other (a sliding window with step 1)."""
    ours, reference = ours_and_reference(4, 4, 2, dtype=torch.float64)

    def inputs():
        base = torch.randn(
            64, generator=torch.Generator().manual_seed(12), dtype=torch.float64, requires_grad=True
        )
        x = base.as_strided((6, 2, 4), (1, 4, 1))  # step t starts one element after step t-1
        hx = base.as_strided((2, 2, 4), (2, 3, 1), storage_offset=3)
        return x, hx, [base]

    assert_same_module_results(ours, reference, inputs)


def test_weight_shared_between_two_slots():
    """One Parameter used as weight_ih and weight_hh (I == H): both gradients accumulate into it."""
    ours, reference = ours_and_reference(5, 5, dtype=torch.float64)
    for module in (reference, ours):
        module.weight_hh_l0 = module.weight_ih_l0
    assert_same_module_results(ours, reference, lambda: (seeded_randn(4, 3, 5).requires_grad_(),))


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
        x = torch.randn(
            5 + index, 3 + index, 40, generator=generator, dtype=torch.float64, requires_grad=True
        )
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
# The backward op asked for only some gradients.


@pytest.mark.parametrize(
    "mask", [[False, False, False], [True, False, False], [False, True, False], [False, False, True]]
)
def test_backward_op_output_mask_combinations(mask):
    """Each mask gives exactly the requested gradients, equal to the full call's."""
    x, hx, w, _ = random_layer(31, steps=3, batch=2, input_size=3, hidden=4)
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
