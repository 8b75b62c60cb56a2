"""The operator layer: torch.library.opcheck on both ops (schemas, fake kernels, autograd
registration) and torch.autograd.gradcheck of the layer op in float64."""
import pytest
import torch

import rnn_ext  # noqa: F401  (registers the ops)

forward_op = torch.ops.rnn_ext.elman_forward.default
backward_op = torch.ops.rnn_ext.elman_backward.default


def layer_args(device, steps=4, batch=3, input_size=3, hidden=5, directions=1, bias=True,
               packed_lengths=None, requires_grad=False, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)

    if packed_lengths is None:
        x = rand(steps, batch, input_size)
        batch_sizes = None
    else:
        batch = len(packed_lengths)
        steps = max(packed_lengths)
        batch_sizes = torch.tensor([sum(n > t for n in packed_lengths) for t in range(steps)])
        x = rand(int(batch_sizes.sum()), input_size)
    hx = rand(directions, batch, hidden, scale=0.5)
    weights = []
    for _ in range(directions):
        weights += [rand(hidden, input_size, scale=0.4), rand(hidden, hidden, scale=0.4)]
        if bias:
            weights += [rand(hidden, scale=0.2), rand(hidden, scale=0.2)]
    if requires_grad:
        for t in [x, hx, *weights]:
            t.requires_grad_(True)
    return x, hx, weights, batch_sizes


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
    torch.library.opcheck(forward_op, (x, hx, weights, batch_sizes, relu))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
def test_opcheck_backward(device, case, mask):
    x, hx, weights, batch_sizes = layer_args(device, **case)
    output, h_n = forward_op(x, hx, weights, batch_sizes, False)
    grad_output = torch.randn_like(output)
    grad_h_n = torch.randn_like(h_n)
    torch.library.opcheck(backward_op, (grad_output, grad_h_n, x, hx, weights, output, batch_sizes, False, mask))


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
        out, h = torch.func.functional_call(module, dict(zip([n for n, _ in module.named_parameters()], flat)), (x, hx))
        return out, h

    assert torch.autograd.gradcheck(run, (x, hx, *params))


def test_ops_reject_bad_arguments_with_runtime_error():
    x, hx, weights, batch_sizes = layer_args("cpu")
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_gradgradcheck(device, case):
    """Double backward (create_graph=True) works as it does for nn.RNN on the CPU."""
    x, hx, weights, batch_sizes = layer_args(device, steps=3, batch=2, hidden=3, requires_grad=True, **case)

    def layer(x, hx, *weights):
        return forward_op(x, hx, list(weights), batch_sizes, False)

    assert torch.autograd.gradgradcheck(layer, (x, hx, *weights))


def test_double_backward_matches_nn_rnn():
    torch.manual_seed(0)
    ours = rnn_ext.RNN(3, 4, 2, bidirectional=True).double()
    theirs = torch.nn.RNN(3, 4, 2, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module in (ours, theirs):
        xs = x.clone().requires_grad_(True)
        output, h_n = module(xs)
        (grad_x,) = torch.autograd.grad(output.pow(2).sum() + h_n.sum(), xs, create_graph=True)
        penalty = grad_x.pow(2).sum()  # a gradient penalty, as in WGAN-GP
        penalty.backward()
        results.append([grad_x.detach()] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
