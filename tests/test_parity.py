"""Numerical parity of rnn_ext.RNN with torch.nn.RNN: outputs, h_n and every gradient, over the
configuration grid, in float64 (against nn.RNN at 1e-10) and float32 (against a float64 truth)."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext
import rnn_ext.reference
from helpers import (
    assert_results_close,
    assert_within_scale,
    op_results,
    ours_and_reference,
    random_layer,
    relu_layer_away_from_zero,
    rounded_to,
    stable_seed,
)

GRID = list(
    itertools.product(
        [1, 2, 3],  # num_layers
        [False, True],  # bidirectional
        [False, True],  # batch_first
        [True, False],  # bias
        ["tanh", "relu"],
        [True, False],  # hx given
    )
)


def run(module, x, hx, grad_output_seed):
    """Forward, then backward of a random linear functional of (output, h_n); returns
    (output, h_n, grad x, grad hx, grads of the parameters)."""
    x = x.detach().clone().requires_grad_(True)
    hx = None if hx is None else hx.detach().clone().requires_grad_(True)
    output, h_n = module(x, hx) if hx is not None else module(x)
    generator = torch.Generator().manual_seed(grad_output_seed)
    weight_out = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output)
    weight_h = torch.randn(h_n.shape, generator=generator, dtype=torch.float64).to(h_n)
    ((output * weight_out).sum() + (h_n * weight_h).sum()).backward()
    grads = [p.grad for p in module.parameters()]
    return output, h_n, x.grad, None if hx is None else hx.grad, grads


def compare(ours_result, reference_result, rtol):
    names = ["output", "h_n", "grad input", "grad hx"]
    for name, a, b in zip(names, ours_result[:4], reference_result[:4]):
        if b is None:
            assert a is None, name
            continue
        try:
            assert_within_scale(a, b, rtol)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
    for index, (a, b) in enumerate(zip(ours_result[4], reference_result[4])):
        try:
            assert_within_scale(a, b, rtol)
        except AssertionError as error:
            raise AssertionError(f"grad of parameter {index}: {error}") from None


def inputs(seed, steps, batch, input_size, hidden_size, layers, directions, batch_first, dtype, device):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    hx = 0.5 * torch.randn(layers * directions, batch, hidden_size, generator=generator, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), hx.to(device=device, dtype=dtype)


@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,nonlinearity,with_hx", GRID)
def test_float64_matches_nn_rnn(device, layers, bidirectional, batch_first, bias, nonlinearity, with_hx):
    seed = stable_seed(layers, bidirectional, batch_first, bias, nonlinearity, with_hx)
    I, H, T, B = 5, 7, 6, 3
    ours, reference = ours_and_reference(
        I,
        H,
        layers,
        nonlinearity,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        device=device,
        dtype=torch.float64,
        seed=seed,
    )
    x, hx = inputs(
        seed + 1, T, B, I, H, layers, 2 if bidirectional else 1, batch_first, torch.float64, device
    )
    hx = hx if with_hx else None
    compare(run(ours, x, hx, seed), run(reference, x, hx, seed), rtol=1e-10)


@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,nonlinearity,with_hx", GRID)
def test_float32_matches_float64_truth(
    device, layers, bidirectional, batch_first, bias, nonlinearity, with_hx
):
    seed = 7 + stable_seed(layers, bidirectional, batch_first, bias, nonlinearity, with_hx)
    I, H, T, B = 6, 40, 9, 4  # H spans more than one register block of the CPU kernel
    ours, reference = ours_and_reference(
        I,
        H,
        layers,
        nonlinearity,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        dtype=torch.float32,
        device=device,
        seed=seed,
    )
    reference = reference.double()
    x, hx = inputs(
        seed + 1, T, B, I, H, layers, 2 if bidirectional else 1, batch_first, torch.float32, device
    )
    hx = hx if with_hx else None
    truth = run(reference, x.double(), None if hx is None else hx.double(), seed)
    compare(run(ours, x, hx, seed), truth, rtol=2e-5)


def test_matches_plain_reference_loop():
    """The readable definition in rnn_ext.reference agrees with the module (and so with nn.RNN)."""
    torch.manual_seed(3)
    module = rnn_ext.RNN(4, 6, 2, bidirectional=True).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    hx = torch.randn(4, 3, 6, dtype=torch.float64)
    layers = []
    for layer in range(2):
        directions = []
        for suffix in ("", "_reverse"):
            names = [f"{kind}_l{layer}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            directions.append(tuple(getattr(module, n) for n in names))
        layers.append(directions)
    expected_output, expected_h_n = rnn_ext.reference.elman_rnn(x, hx, layers, bidirectional=True)
    output, h_n = module(x, hx)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n, expected_h_n, rtol=0, atol=1e-12)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_packed_sequence(device, enforce_sorted, bidirectional, layers):
    seed = 100 + 10 * layers + 2 * bidirectional + enforce_sorted
    I, H, T = 3, 8, 7
    lengths = [7, 5, 5, 2, 1] if enforce_sorted else [2, 7, 1, 5, 4]
    ours, reference = ours_and_reference(
        I, H, layers, bidirectional=bidirectional, device=device, dtype=torch.float64, seed=seed
    )
    directions = 2 if bidirectional else 1
    x, hx = inputs(seed, T, len(lengths), I, H, layers, directions, False, torch.float64, device)

    def packed_run(module):
        xs = x.detach().clone().requires_grad_(True)
        h0 = hx.detach().clone().requires_grad_(True)
        packed = pack_padded_sequence(xs, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        out_packed, h_n = module(packed, h0)
        padded, out_lengths = pad_packed_sequence(out_packed)
        assert out_lengths.tolist() == lengths
        assert torch.equal(out_packed.batch_sizes, packed.batch_sizes)
        if not enforce_sorted:
            assert torch.equal(out_packed.sorted_indices, packed.sorted_indices)
            assert torch.equal(out_packed.unsorted_indices, packed.unsorted_indices)
        generator = torch.Generator().manual_seed(seed)
        loss = (padded * torch.randn(padded.shape, generator=generator, dtype=torch.float64).to(device)).sum()
        loss = (
            loss + (h_n * torch.randn(h_n.shape, generator=generator, dtype=torch.float64).to(device)).sum()
        )
        loss.backward()
        return padded, h_n, xs.grad, h0.grad, [p.grad for p in module.parameters()]

    compare(packed_run(ours), packed_run(reference), rtol=1e-10)


def test_packed_matches_per_sequence_runs():
    """Packing is exact: each sequence of a packed batch gives what it gives alone."""
    torch.manual_seed(11)
    module = rnn_ext.RNN(2, 5, 2, bidirectional=True).double()
    lengths = [4, 6, 1]
    sequences = [torch.randn(n, 2, dtype=torch.float64) for n in lengths]
    packed = torch.nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
    out_packed, h_n = module(packed)
    padded, _ = pad_packed_sequence(out_packed)
    for index, sequence in enumerate(sequences):
        alone, h_alone = module(sequence.unsqueeze(1))
        torch.testing.assert_close(padded[: lengths[index], index], alone[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(h_n[:, index], h_alone[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_input(device, batch_first, with_hx):
    ours, reference = ours_and_reference(
        4, 6, 2, bidirectional=True, batch_first=batch_first, device=device, dtype=torch.float64, seed=21
    )
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    hx = torch.randn(4, 6, dtype=torch.float64, device=device) if with_hx else None
    a, b = run(ours, x, hx, 1), run(reference, x, hx, 1)
    assert a[0].shape == (5, 12) and a[1].shape == (4, 6)
    compare(a, b, rtol=1e-10)


def test_non_contiguous_input_and_weights(device):
    ours, reference = ours_and_reference(6, 8, 2, device=device, dtype=torch.float64, seed=5)
    base = torch.randn(9, 12, 4, dtype=torch.float64, device=device)
    x = base.permute(2, 0, 1)[:, :, :6]  # [4 steps, 9 batch, 6 features]: permuted and sliced
    assert not x.is_contiguous()
    with torch.no_grad():
        for module in (ours, reference):
            module.weight_hh_l1.set_(module.weight_hh_l1.t().contiguous().t())
    compare(run(ours, x, None, 3), run(reference, x, None, 3), rtol=1e-10)


def test_zero_batch(device):
    ours, reference = ours_and_reference(
        3, 4, 2, bidirectional=True, device=device, dtype=torch.float64, seed=8
    )
    x = torch.randn(5, 0, 3, dtype=torch.float64, device=device)
    a, b = ours(x), reference(x)
    assert a[0].shape == b[0].shape and a[1].shape == b[1].shape


def test_seed_model_float32(device):
    """The seed model (input 1, hidden 32, batch_first) at float32 against a float64 truth."""
    ours, reference = ours_and_reference(1, 32, batch_first=True, dtype=torch.float32, device=device, seed=0)
    reference = reference.double()
    x = torch.sin(torch.linspace(0, 6.28, 50 * 4)).reshape(4, 50, 1).to(device)
    compare(run(ours, x, None, 9), run(reference, x.double(), None, 9), rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_half_types_against_float64_truth_on_cpu(dtype, relu):
    """The CPU op runs half types in float32 and rounds its results once: output, h_n and every
    gradient within two units of the type's last place of a float64 truth from the same rounded
    arguments. relu's inputs keep every pre-activation away from zero, where rounding could flip
    its derivative (an O(1) gradient difference that no kernel could avoid)."""
    seed = stable_seed("half-cpu", str(dtype), relu)
    if relu:
        layer = relu_layer_away_from_zero(seed, steps=8, batch=4, hidden=40, dtype=dtype)
    else:
        layer = rounded_to(random_layer(seed, steps=8, batch=4, input_size=5, hidden=40, directions=2), dtype)
    truth = op_results("cpu", torch.float64, layer, relu, seed, cotangent_dtype=dtype)
    actual = op_results("cpu", dtype, layer, relu, seed)
    assert_results_close(actual, truth, 2 * torch.finfo(dtype).eps)
