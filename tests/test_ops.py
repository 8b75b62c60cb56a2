"""The operator layer: torch.library.opcheck on both ops (schemas, fake kernels, autograd
registration) and torch.autograd.gradcheck of the layer op in float64."""

import pytest
import torch

import rnn_ext
from helpers import layer_on, ours_and_reference, random_layer, skip_if_expecttest_missing

forward_op = torch.ops.rnn_ext.elman_forward.default
backward_op = torch.ops.rnn_ext.elman_backward.default


def layer_args(device, requires_grad=False, **shape):
    """float64 arguments of one layer on `device`: random_layer's, with `shape` (its keywords)."""
    return layer_on(random_layer(0, **shape), device, requires_grad=requires_grad)


CASES = [
    dict(),
    dict(directions=2),
    dict(bias=False),
    dict(directions=2, packed_lengths=[4, 3, 3, 1]),
    dict(packed_lengths=[2, 2, 1]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(device, case, relu, requires_grad):
    x, hx, weights, batch_sizes = layer_args(device, requires_grad=requires_grad, **case)
    with skip_if_expecttest_missing():
        torch.library.opcheck(forward_op, (x, hx, weights, batch_sizes, relu))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
def test_opcheck_backward(device, case, mask):
    x, hx, weights, batch_sizes = layer_args(device, **case)
    output, h_n = forward_op(x, hx, weights, batch_sizes, False)
    grad_output = torch.randn_like(output)
    grad_h_n = torch.randn_like(h_n)
    with skip_if_expecttest_missing():
        torch.library.opcheck(
            backward_op, (grad_output, grad_h_n, x, hx, weights, output, batch_sizes, False, mask)
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck(device, case, relu):
    x, hx, weights, batch_sizes = layer_args(device, requires_grad=True, **case)

    def layer(x, hx, *weights):
        return forward_op(x, hx, list(weights), batch_sizes, relu)

    assert torch.autograd.gradcheck(layer, (x, hx, *weights))


def test_module_gradcheck():
    torch.manual_seed(0)
    module = rnn_ext.RNN(3, 4, 2, bidirectional=True).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    def run(x, hx, *flat):
        out, h = torch.func.functional_call(
            module, dict(zip([n for n, _ in module.named_parameters()], flat)), (x, hx)
        )
        return out, h

    assert torch.autograd.gradcheck(run, (x, hx, *params))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_gradgradcheck(device, case):
    """Double backward (create_graph=True) works as it does for nn.RNN on the CPU."""
    x, hx, weights, batch_sizes = layer_args(device, steps=3, batch=2, hidden=3, requires_grad=True, **case)

    def layer(x, hx, *weights):
        return forward_op(x, hx, list(weights), batch_sizes, False)

    assert torch.autograd.gradgradcheck(layer, (x, hx, *weights))


def test_double_backward_matches_nn_rnn():
    ours, reference = (module.double() for module in ours_and_reference(3, 4, 2, bidirectional=True))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module in (ours, reference):
        xs = x.clone().requires_grad_(True)
        output, h_n = module(xs)
        (grad_x,) = torch.autograd.grad(output.pow(2).sum() + h_n.sum(), xs, create_graph=True)
        penalty = grad_x.pow(2).sum()  # a gradient penalty, as in WGAN-GP
        penalty.backward()
        results.append([grad_x.detach()] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
