"""The CPU engine's large products (input projection, input gradient, weight gradients) on the
packed kernel, at the shapes where its blocking has edges: widths that are not a multiple of a
column panel, row counts that are not a multiple of the row block, depths past one depth slice
(1024), a single input feature, packed sequences. Each shape is large enough for the split, threaded
path of every product it has. Checked against nn.RNN in float64 (1e-10), against a float64 truth
in float32, and for the same bits on 1, 2 and 3 threads."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from helpers import assert_same_values

# name: (module kwargs, steps, batch, lengths or None)
SHAPES = {
    # 1073 rows: past one depth slice of the weight gradients, not a multiple of 6 or 12; H = 45
    # ends in a partial panel; both directions, and a second layer whose input is 90 wide.
    "bidir-odd": (dict(input_size=17, hidden_size=45, num_layers=2, bidirectional=True), 37, 29, None),
    # I = 1100: the projection's depth runs past one slice.
    "deep-input": (dict(input_size=1100, hidden_size=33, num_layers=1), 13, 23, None),
    # I = 1 (the seed model's input) under a wide second layer.
    "one-feature": (dict(input_size=1, hidden_size=130, num_layers=2), 5, 64, None),
    "batch-first-no-bias": (dict(input_size=64, hidden_size=97, batch_first=True, bias=False), 20, 31, None),
    "relu": (dict(input_size=40, hidden_size=64, nonlinearity="relu"), 30, 12, None),
    "packed": (
        dict(input_size=50, hidden_size=70, num_layers=2, bidirectional=True),
        40,
        9,
        [40, 3, 17, 40, 1, 29, 22, 5, 33],
    ),
}


def _results(module, steps, batch, lengths, dtype):
    """Output, h_n and the gradients of input, h0 and every parameter for a random projection."""
    generator = torch.Generator().manual_seed(11)
    shape = (batch, steps) if module.batch_first else (steps, batch)
    x = torch.randn(*shape, module.input_size, generator=generator, dtype=torch.float64)
    directions = 2 if module.bidirectional else 1
    hx = torch.randn(module.num_layers * directions, batch, module.hidden_size, generator=generator)
    x = x.to(dtype).requires_grad_()
    hx = hx.to(dtype).requires_grad_()
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(
            x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False
        )
    output, h_n = module(inp, hx)
    data = output.data if lengths is not None else output
    grad_output = torch.randn(data.shape, generator=generator, dtype=torch.float64).to(dtype)
    grad_h_n = torch.randn(h_n.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad([data, h_n], [x, hx, *module.parameters()], [grad_output, grad_h_n])
    return [data.detach(), h_n.detach(), *grads]


def _pair(kwargs, dtype):
    torch.manual_seed(3)
    reference = nn.RNN(**kwargs, dtype=torch.float64)
    ours = rnn_ext.RNN(**kwargs, dtype=dtype)
    with torch.no_grad():
        for mine, theirs in zip(ours.parameters(), reference.parameters()):
            mine.copy_(theirs)
    return ours, reference


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_matches_nn_rnn_in_float64(name):
    kwargs, steps, batch, lengths = SHAPES[name]
    ours, reference = _pair(kwargs, torch.float64)
    want = _results(reference, steps, batch, lengths, torch.float64)
    got = _results(ours, steps, batch, lengths, torch.float64)
    assert any(t.abs().sum() > 0 for t in want), "an all-zero reference proves nothing"
    for index, (g, w) in enumerate(zip(got, want)):
        assert_same_values(g, w, f"{name} tensor {index}")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_float32_is_close_to_a_float64_truth(name):
    """float32 rounding only: each tensor within a few 1e-5 of its float64 value, relative to the
    tensor's largest magnitude (sums of a few hundred terms of order one)."""
    kwargs, steps, batch, lengths = SHAPES[name]
    ours, reference = _pair(kwargs, torch.float32)
    want = _results(reference, steps, batch, lengths, torch.float64)
    got = _results(ours, steps, batch, lengths, torch.float32)
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape
        scale = max(1.0, w.abs().max().item())
        error = (g.double() - w).abs().max().item()
        assert error <= 5e-5 * scale, f"{name} tensor {index}: max error {error:.2e} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_bits_do_not_depend_on_the_thread_count(name, dtype):
    kwargs, steps, batch, lengths = SHAPES[name]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ours, _ = _pair(kwargs, dtype)
            results[threads] = _results(ours, steps, batch, lengths, dtype)
    finally:
        torch.set_num_threads(before)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for threads in (2, 3):
        for index, (g, w) in enumerate(zip(results[threads], results[1])):
            assert torch.equal(g.contiguous().view(bits), w.contiguous().view(bits)), (
                f"{name} tensor {index}: {threads} threads differ from 1"
            )
