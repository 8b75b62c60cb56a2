"""The CPU layer wavefront of unidirectional stacks: its bits equal the layer loop's (one thread)
whatever the thread count, for every kind of stack it runs, and it matches nn.RNN in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from rnn_ext import _C


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _run(module, x, h0, lengths=None, seed=0, input_grad=True):
    """Forward and backward of one call: outputs, final states and every gradient."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_(input_grad)
    h0 = None if h0 is None else h0.detach().clone().requires_grad_(True)
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(
            x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False
        )
    torch.manual_seed(seed)
    output, h_n = module(inp, h0)
    if lengths is not None:
        output = output.data
    # Weights on every element, so that each gradient depends on every output value.
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(output.shape, generator=gen, dtype=output.dtype)
    w_h = torch.randn(h_n.shape, generator=gen, dtype=h_n.dtype)
    ((output * w_out).sum() + (h_n * w_h).sum()).backward()
    results = [output.detach(), h_n.detach()]
    if input_grad:
        results.append(x.grad)
    if h0 is not None:
        results.append(h0.grad)
    results += [p.grad for p in module.parameters()]
    return results


# (steps, batch, input, hidden, layers): chunks that do and do not divide the steps, a single
# chunk, batches of one, more layers than threads.
SHAPES = [
    (37, 5, 12, 40, 3),
    (9, 16, 7, 33, 2),
    (3, 2, 5, 8, 4),
    (70, 1, 3, 16, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("shape", SHAPES)
def test_bits_do_not_depend_on_threads(threads, shape, dropout, bias, nonlinearity, dtype):
    steps, batch, input_size, hidden, layers = shape
    torch.manual_seed(0)
    module = rnn_ext.RNN(
        input_size, hidden, layers, nonlinearity=nonlinearity, bias=bias, dropout=dropout, dtype=dtype
    )
    x = torch.randn(steps, batch, input_size, dtype=dtype)
    h0 = torch.randn(layers, batch, hidden, dtype=dtype)
    results = {}
    for count in (1, 2, 3):
        threads(count)
        results[count] = _run(module, x, h0)
    for count in (2, 3):
        for a, b in zip(results[1], results[count], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_packed_and_batch_first_bits(threads, batch_first, dropout):
    lengths = [11, 4, 9, 11, 1, 7]
    torch.manual_seed(1)
    module = rnn_ext.RNN(6, 24, 3, dropout=dropout, batch_first=batch_first)
    x = torch.randn(len(lengths), 11, 6) if batch_first else torch.randn(11, len(lengths), 6)
    h0 = torch.randn(3, len(lengths), 24)
    results = {}
    for count in (1, 2):
        threads(count)
        results[count] = _run(module, x, h0, lengths=lengths)
    for a, b in zip(results[1], results[2], strict=True):
        assert torch.equal(a, b)


def test_without_h0_or_input_gradient(threads):
    torch.manual_seed(2)
    module = rnn_ext.RNN(10, 20, 2, nonlinearity="relu")
    x = torch.randn(15, 4, 10)
    results = {}
    for count in (1, 2):
        threads(count)
        results[count] = _run(module, x, None, input_grad=False)
    for a, b in zip(results[1], results[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_matches_nn_rnn_in_float64(threads, packed, nonlinearity):
    threads(2)
    torch.manual_seed(3)
    shape = dict(input_size=9, hidden_size=30, num_layers=3, nonlinearity=nonlinearity, dropout=0.25)
    reference = nn.RNN(**shape, dtype=torch.float64)
    candidate = rnn_ext.RNN(**shape, dtype=torch.float64)
    candidate.load_state_dict(reference.state_dict())
    lengths = [23, 5, 17, 23, 9, 2, 14] if packed else None
    x = torch.randn(23, 7, 9, dtype=torch.float64)
    h0 = torch.randn(3, 7, 30, dtype=torch.float64)
    expected = _run(reference, x, h0, lengths=lengths, seed=5)
    actual = _run(candidate, x, h0, lengths=lengths, seed=5)
    for a, b in zip(expected, actual, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_both_threads_work_on_a_three_layer_stack(threads):
    threads(2)
    torch.manual_seed(4)
    module = rnn_ext.RNN(16, 32, 3)
    x = torch.randn(40, 4, 16, requires_grad=True)
    _C._cpu_phase_stats(reset=True)
    output, h_n = module(x)
    (output.sum() + h_n.sum()).backward()
    stats = _C._cpu_phase_stats(reset=True)
    # A layer of this size never splits its steps, so only the wavefront puts a recurrence on the
    # second thread.
    for phase in ("input_projection", "forward_recurrence", "backward_recurrence", "input_gradient"):
        assert stats[phase]["thread_mask"] == 0b11, (phase, stats[phase])
        assert stats[phase]["seconds"] > 0


def test_one_thread_runs_the_layer_loop(threads):
    threads(1)
    module = rnn_ext.RNN(16, 32, 3)
    _C._cpu_phase_stats(reset=True)
    output, h_n = module(torch.randn(40, 4, 16, requires_grad=True))
    (output.sum() + h_n.sum()).backward()
    stats = _C._cpu_phase_stats(reset=True)
    assert all(entry["thread_mask"] in (0, 0b1) for entry in stats.values()), stats
