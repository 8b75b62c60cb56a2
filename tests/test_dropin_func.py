"""rnn_ext.RNN under torch.func transforms and autograd's own tools (forward AD, batched gradients):
values compared with nn.RNN, with plain backward, with finite differences or with a Python loop."""

import itertools

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from helpers import DEVICES, float64_pair, layer_on, random_layer, seeded_randn, skip_if_expecttest_missing
from rnn_ext import reference

# CUDA cases are listed (and skipped) everywhere, so that a run without a GPU says so.

CONFIGS = list(itertools.product([1, 2], [False, True], [False, True], ["tanh", "relu"]))


def make_pair(config, device="cpu", input_size=3, hidden_size=4, seed=0):
    layers, bidirectional, batch_first, nonlinearity = config
    kwargs = dict(
        num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, nonlinearity=nonlinearity
    )
    return float64_pair(input_size, hidden_size, device=device, seed=seed, **kwargs)


def make_input(config, device="cpu", batch=2, steps=5, input_size=3, seed=1):
    batch_first = config[2]
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    return seeded_randn(*shape, seed=seed).to(device)


def make_hx(config, device="cpu", batch=2, hidden_size=4, seed=2):
    layers, bidirectional = config[0], config[1]
    return seeded_randn(layers * (2 if bidirectional else 1), batch, hidden_size, seed=seed).to(device)


def loss_of(module, params, x, hx=None):
    output, h_n = functional_call(module, params, (x,) if hx is None else (x, hx))
    return (output.sin() * torch.arange(output.numel(), device=x.device).view(output.shape).cos()).sum() + (
        h_n**2
    ).sum()


def params_of(module):
    return {name: p.detach() for name, p in module.named_parameters()}


def fused_op_calls(fn, op="rnn_ext::elman_forward"):
    """How often `op` ran while fn() ran (by default rnn_ext::elman_forward, the fused kernel), on
    one thread: there the stack op runs each layer through elman_forward (on more, a
    unidirectional CPU stack runs as the layer wavefront, which calls the layer kernel's pieces
    directly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            fn()
    finally:
        torch.set_num_threads(threads)
    return sum(event.count for event in profile.key_averages() if event.key == op)


def reference_layer(input, hx, weights, batch_sizes, relu):
    """One elman_forward call (same arguments, same results) by the oracle rnn_ext.reference,
    differentiable: packed rows go to a zero-padded [T, B, I] and come back as rows."""
    directions, per_direction = hx.shape[0], len(weights) // hx.shape[0]
    if batch_sizes is None:
        padded, lengths = input, None
    else:
        sizes = batch_sizes.tolist()
        steps, batch = len(sizes), sizes[0]
        offsets = [sum(sizes[:t]) for t in range(steps)]
        index = torch.tensor(
            [[offsets[t] + min(b, size - 1) for b in range(batch)] for t, size in enumerate(sizes)]
        )
        valid = torch.tensor([[float(b < sizes[t]) for b in range(batch)] for t in range(steps)])
        padded = input[index] * valid.to(input).unsqueeze(-1)
        lengths = [sum(1 for size in sizes if size > b) for b in range(batch)]
    outputs, finals = [], []
    for d in range(directions):
        output, h = reference.elman_layer(
            padded,
            hx[d],
            *weights[d * per_direction : (d + 1) * per_direction],
            nonlinearity="relu" if relu else "tanh",
            reverse=d == 1,
            lengths=lengths,
        )
        outputs.append(output)
        finals.append(h)
    output = torch.cat(outputs, -1)
    if batch_sizes is not None:
        output = torch.cat([output[t, :size] for t, size in enumerate(sizes)])
    return output, torch.stack(finals)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_func_grad_matches_nn_rnn_and_backward(device, config, with_hx):
    ours, theirs = make_pair(config, device)
    x = make_input(config, device)
    hx = make_hx(config, device) if with_hx else None
    ours_grads = grad(lambda p: loss_of(ours, p, x, hx))(params_of(ours))
    theirs_grads = grad(lambda p: loss_of(theirs, p, x, hx))(params_of(theirs))
    loss_of(ours, dict(ours.named_parameters()), x, hx).backward()  # the fused kernels
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours_grads[name], parameter.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[::3])
def test_vjp_jacrev_jacfwd_jvp_hessian_match_nn_rnn(device, config):
    ours, theirs = make_pair(config, device)
    x = make_input(config, device, batch=2, steps=3)
    hx = make_hx(config, device)
    tangent = torch.randn_like(x)

    def outputs(module):
        return lambda inp: module(inp, hx)[0]

    def scalar(module):
        return lambda inp: loss_of(module, params_of(module), inp, hx)

    for transform in (jacrev, jacfwd, hessian):
        fn = scalar if transform is hessian else outputs
        torch.testing.assert_close(transform(fn(ours))(x), transform(fn(theirs))(x), rtol=1e-10, atol=1e-10)

    def of_recurrent_bias(module):
        def fn(bias):
            params = params_of(module)
            params["bias_hh_l0"] = bias
            return loss_of(module, params, x, hx)

        return fn

    ours_hessian = hessian(of_recurrent_bias(ours))(ours.bias_hh_l0.detach())
    torch.testing.assert_close(
        ours_hessian, hessian(of_recurrent_bias(theirs))(theirs.bias_hh_l0.detach()), rtol=1e-10, atol=1e-10
    )
    assert ours_hessian.abs().max() > 1e-3
    ours_out, ours_tangent = jvp(outputs(ours), (x,), (tangent,))
    theirs_out, theirs_tangent = jvp(outputs(theirs), (x,), (tangent,))
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours_tangent, theirs_tangent, rtol=1e-10, atol=1e-10)
    assert ours_tangent.abs().max() > 0.01
    cotangent = torch.randn_like(ours_out)
    ours_out, ours_vjp = vjp(outputs(ours), x)
    theirs_out, theirs_vjp = vjp(outputs(theirs), x)
    torch.testing.assert_close(ours_vjp(cotangent), theirs_vjp(cotangent), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[::2])
def test_forward_ad_tangent_matches_nn_rnn_and_finite_difference(device, config):
    ours, theirs = make_pair(config, device)
    x = make_input(config, device)
    hx = make_hx(config, device)
    x_tangent, hx_tangent = torch.randn_like(x), torch.randn_like(hx)
    results = []
    for module in (ours, theirs):
        with forward_ad.dual_level():
            output, h_n = module(forward_ad.make_dual(x, x_tangent), forward_ad.make_dual(hx, hx_tangent))
            results.append([forward_ad.unpack_dual(output).tangent, forward_ad.unpack_dual(h_n).tangent])
    for ours_tangent, theirs_tangent in zip(*results):
        torch.testing.assert_close(ours_tangent, theirs_tangent, rtol=1e-10, atol=1e-10)
    eps = 1e-6
    plus, minus = (
        ours(x + eps * x_tangent, hx + eps * hx_tangent),
        ours(x - eps * x_tangent, hx - eps * hx_tangent),
    )
    for tangent, high, low in zip(results[0], plus, minus):
        torch.testing.assert_close(tangent, (high - low) / (2 * eps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_tangent_on_a_weight(device):
    config = (2, True, True, "tanh")
    ours, theirs = make_pair(config, device)
    x = make_input(config, device)
    tangent = torch.randn_like(ours.weight_hh_l1)
    results = []
    for module in (ours, theirs):
        with forward_ad.dual_level():
            params = params_of(module)
            params["weight_hh_l1"] = forward_ad.make_dual(params["weight_hh_l1"], tangent)
            output, _ = functional_call(module, params, (x,))
            results.append(forward_ad.unpack_dual(output).tangent)
    assert results[0] is not None and results[0].abs().max() > 1e-3
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[::3])
def test_vectorized_jacobian_matches_nn_rnn_and_runs_the_fused_forward(device, config):
    ours, theirs = make_pair(config, device)
    x = make_input(config, device, batch=2, steps=3)
    hx = make_hx(config, device)
    jacobians = [
        torch.autograd.functional.jacobian(lambda inp, h: module(inp, h), (x, hx), vectorize=True)  # noqa: B023
        for module in (ours, theirs)
    ]
    for ours_part, theirs_part in zip(
        torch.utils._pytree.tree_leaves(jacobians[0]), torch.utils._pytree.tree_leaves(jacobians[1])
    ):
        torch.testing.assert_close(ours_part, theirs_part, rtol=1e-10, atol=1e-10)
    assert (
        fused_op_calls(
            lambda: torch.autograd.functional.jacobian(lambda inp: ours(inp, hx)[0], x, vectorize=True)
        )
        == config[0]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [(1, False, False, "tanh"), (2, True, True, "relu")])
def test_gradcheck_with_batched_grad_and_forward_ad(device, config):
    x = make_input(config, device, batch=2, steps=3).requires_grad_(True)
    hx = make_hx(config, device).requires_grad_(True)
    for module in make_pair(config, device):  # nn.RNN passes the same checks
        names = [name for name, _ in module.named_parameters()]
        weights = [p.detach().clone().requires_grad_(True) for p in module.parameters()]

        def fn(inp, h, *ws):
            return functional_call(module, dict(zip(names, ws)), (inp, h))  # noqa: B023

        args = (x, hx, *weights)
        assert torch.autograd.gradcheck(
            fn, args, check_batched_grad=True, check_forward_ad=True, check_backward_ad=True
        )
        assert torch.autograd.gradgradcheck(fn, args, check_batched_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[::2])
def test_per_sample_grads_by_vmap_match_a_loop(device, config):
    ours, theirs = make_pair(config, device)
    batch_first = config[2]
    samples = 4
    inputs = make_input((1, False, True, "tanh"), device, batch=samples, steps=5)  # [N, T, I]
    targets = torch.randn(samples, 5, 4 * (2 if config[1] else 1), dtype=torch.float64, device=device)

    def sample_loss(module):
        def loss(params, sample, target):
            sample = sample.unsqueeze(0 if batch_first else 1)
            output, h_n = functional_call(module, params, (sample,))
            output = output.squeeze(0 if batch_first else 1)
            return ((output - target) ** 2).mean() + h_n.pow(2).mean()

        return loss

    per_sample = vmap(grad(sample_loss(ours)), in_dims=(None, 0, 0))(params_of(ours), inputs, targets)
    for index in range(samples):
        # nn.RNN cannot run under vmap(grad); its gradients one sample at a time are the truth.
        params = dict(theirs.named_parameters())
        expected = torch.autograd.grad(
            sample_loss(theirs)(params, inputs[index], targets[index]), list(params.values())
        )
        for name, value in zip(params, expected):
            torch.testing.assert_close(per_sample[name][index], value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_forward_matches_a_loop_with_unbatched_samples(device):
    config = (2, True, False, "tanh")
    ours, theirs = make_pair(config, device)
    inputs = torch.randn(3, 5, 2, 3, dtype=torch.float64, device=device)  # 3 samples of [T, B, I]
    hxs = torch.randn(3, 4, 2, 4, dtype=torch.float64, device=device)
    outputs, h_ns = vmap(ours)(inputs, hxs)
    (outputs.sin().sum() + h_ns.sum()).backward()  # plain autograd through the batching rule
    for index in range(3):
        expected_output, expected_h_n = theirs(inputs[index], hxs[index])
        torch.testing.assert_close(outputs[index], expected_output, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h_ns[index], expected_h_n, rtol=1e-10, atol=1e-10)
        (expected_output.sin().sum() + expected_h_n.sum()).backward()
    for ours_param, theirs_param in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(ours_param.grad, theirs_param.grad, rtol=1e-10, atol=1e-10)
    # vmap alone keeps the fused kernel: the batching rule folds the samples into one call
    assert fused_op_calls(lambda: vmap(ours)(inputs, hxs)) >= config[0]


def op_args(device, batch=3, steps=4, packed=False, seed=0):
    """Arguments of one bidirectional elman_forward call with bias, on device; packed ones have the
    same batch sizes whatever the seed (lengths steps, steps - 1, ..., 1)."""
    lengths = tuple(steps - i for i in range(batch - 1)) + (1,) if packed else None
    return layer_on(
        random_layer(seed, steps=steps, batch=batch, directions=2, packed_lengths=lengths), device
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batched", ["input", "hx", "input+hx", "weights"])
def test_elman_forward_batching_rule_matches_a_loop(device, packed, batched):
    samples = 3
    per_sample = [op_args(device, packed=packed, seed=seed) for seed in range(samples)]
    base_input, base_hx, base_weights, batch_sizes = per_sample[0]
    inputs = torch.stack([args[0] for args in per_sample], 1)  # vmapped on dim 1
    hxs = torch.stack([args[1] for args in per_sample], 2)  # vmapped on dim 2
    weights = [torch.stack(group) for group in zip(*[args[2] for args in per_sample])]
    in_input = 1 if "input" in batched else None
    in_hx = 2 if "hx" in batched else None
    in_weights = 0 if batched == "weights" else None
    op = torch.ops.rnn_ext.elman_forward

    def call(inp, h, ws):
        return op(inp, h, ws, batch_sizes, False)

    output, h_n = vmap(call, in_dims=(in_input, in_hx, in_weights))(
        inputs if in_input is not None else base_input,
        hxs if in_hx is not None else base_hx,
        weights if in_weights is not None else base_weights,
    )
    for index in range(samples):
        expected = op(
            inputs[:, index] if in_input is not None else base_input,
            hxs[:, :, index] if in_hx is not None else base_hx,
            [w[index] for w in weights] if in_weights is not None else base_weights,
            batch_sizes,
            False,
        )
        truth_of = reference_layer(
            inputs[:, index] if in_input is not None else base_input,
            hxs[:, :, index] if in_hx is not None else base_hx,
            [w[index] for w in weights] if in_weights is not None else base_weights,
            batch_sizes,
            False,
        )
        for got, want, truth in zip((output[index], h_n[index]), expected, truth_of):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, True)])
def test_elman_backward_batching_rule_matches_a_loop(device, packed, mask):
    input, hx, weights, batch_sizes = op_args(device, packed=packed)
    output, _ = torch.ops.rnn_ext.elman_forward(input, hx, weights, batch_sizes, True)
    generator = torch.Generator().manual_seed(5)
    grad_outputs = torch.randn((4, *output.shape), generator=generator, dtype=torch.float64).to(device)
    grad_h_ns = torch.randn((4, *hx.shape), generator=generator, dtype=torch.float64).to(device)
    op = torch.ops.rnn_ext.elman_backward

    def call(grad_output, grad_h_n):
        return op(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, True, list(mask))

    grad_input, grad_hx, grad_weights = vmap(call)(grad_outputs, grad_h_ns)
    for index in range(4):
        want_input, want_hx, want_weights = call(grad_outputs[index], grad_h_ns[index])
        if mask[0]:
            torch.testing.assert_close(grad_input[index], want_input, rtol=0, atol=0)
        else:
            assert grad_input.numel() == 0
        if mask[1]:
            torch.testing.assert_close(grad_hx[index], want_hx, rtol=0, atol=0)
        else:
            assert grad_hx.numel() == 0
        assert len(grad_weights) == (len(weights) if mask[2] else 0)
        for got, want in zip(grad_weights, want_weights):
            torch.testing.assert_close(got[index], want, rtol=0, atol=0)
        # and the values are the gradients: against autograd through the oracle
        leaves = [t.detach().requires_grad_(True) for t in [input, hx, *weights]]
        ref_output, ref_h_n = reference_layer(leaves[0], leaves[1], leaves[2:], batch_sizes, True)
        truth = torch.autograd.grad((ref_output, ref_h_n), leaves, (grad_outputs[index], grad_h_ns[index]))
        if mask[0]:
            torch.testing.assert_close(grad_input[index], truth[0], rtol=1e-10, atol=1e-10)
        if mask[2]:
            for got, want in zip(grad_weights, truth[2:]):
                torch.testing.assert_close(got[index], want, rtol=1e-10, atol=1e-10)


# (num_layers, bidirectional, batch_first, relu, packed, dropout masks)
STACK_CASES = [
    (1, True, False, False, True, False),
    (2, False, True, True, False, True),
    (3, True, True, False, True, True),
    (2, True, False, True, False, False),
]


def stack_call_args(case, seed=0):
    """Random float64 arguments of one elman_stack call with hx given (the composite operator's
    arguments): packed input has lengths 5, 4, 2; dropout masks are scaled 0/1 draws."""
    layers, bidirectional, batch_first, relu, packed, dropout = case
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    directions, hidden, input_size, batch, steps = (2 if bidirectional else 1), 4, 3, 3, 5
    weights = []
    for layer in range(layers):
        width = input_size if layer == 0 else directions * hidden
        for _ in range(directions):
            weights += [randn(hidden, width, scale=0.5), randn(hidden, hidden, scale=0.5)]
            weights += [randn(hidden, scale=0.1), randn(hidden, scale=0.1)]
    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 2, 1])
        input = randn(int(batch_sizes.sum()), input_size)
        rows = [input.shape[0]]
    else:
        batch_sizes = None
        input = randn(batch, steps, input_size) if batch_first else randn(steps, batch, input_size)
        rows = [steps, batch]
    hx = randn(layers * directions, batch, hidden)
    masks = []
    if dropout:
        for _ in range(layers - 1):
            keep = torch.rand(rows + [directions * hidden], generator=generator, dtype=torch.float64) > 0.3
            masks.append(keep.double() / 0.7)
    return input, hx, weights, batch_sizes, masks, layers, bidirectional, relu, batch_first


@pytest.mark.parametrize("case", STACK_CASES, ids=lambda case: "-".join(str(int(v)) for v in case))
def test_composite_op_matches_the_fused_op(case):
    args = stack_call_args(case)
    leaves = [t.requires_grad_(True) for t in [args[0], args[1], *args[2]]]
    composite = torch.ops.rnn_ext._elman_stack_composite(*args)
    fused = torch.ops.rnn_ext.elman_stack(*args)
    cotangents = [seeded_randn(*t.shape, seed=9 + i) for i, t in enumerate(fused)]
    composite_grads = torch.autograd.grad(composite, leaves, cotangents)
    fused_grads = torch.autograd.grad(fused, leaves, cotangents)
    assert fused[0].abs().max() > 0.1 and fused_grads[2].abs().max() > 1e-3
    for got, want in zip([*composite, *composite_grads], [*fused, *fused_grads]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_composite_op_passes_opcheck_on_padded_input():
    """The op has no fake kernel: under fake tensors and AOT tracing it decomposes into ATen ops.
    (Packed input is left out: the layout comes from batch_sizes' values, which a symbolic trace
    does not have; torch.compile and torch.export take the fused operator, whose fake kernel does.)"""
    args = stack_call_args((2, True, True, False, False, True))
    for tensor in [args[0], args[1], *args[2]]:
        tensor.requires_grad_(True)
    with skip_if_expecttest_missing():
        torch.library.opcheck(torch.ops.rnn_ext._elman_stack_composite.default, args)


def test_composite_op_checks_its_stack_arguments():
    input, hx, weights, batch_sizes, masks, layers, bidirectional, relu, batch_first = stack_call_args(
        STACK_CASES[2]
    )
    op = torch.ops.rnn_ext._elman_stack_composite
    with pytest.raises(RuntimeError, match="num_layers must be at least 1"):
        op(input, hx, weights, batch_sizes, masks, 0, bidirectional, relu, batch_first)
    with pytest.raises(RuntimeError, match="dropout_masks must be empty or hold one mask per layer"):
        op(input, hx, weights, batch_sizes, masks[:1], layers, bidirectional, relu, batch_first)
    with pytest.raises(RuntimeError, match="hx must be"):
        op(input, hx[1:], weights, batch_sizes, masks, layers, bidirectional, relu, batch_first)


def packed_dropout_pair(bidirectional, dropout=0.4):
    ours, theirs = float64_pair(3, 4, num_layers=3, bidirectional=bidirectional, dropout=dropout)
    return ours.train(), theirs.train()


def packed_outputs(module, hx, lengths, seed=11):
    """f(params, padded) -> (output rows, h_n) of module on the packed sequence, packed inside f
    (so that its batch sizes are made inside the transform), with dropout masks fixed by the seed
    (drawn in the same order by both modules)."""

    def fn(params, padded):
        torch.manual_seed(seed)
        sequence = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        output, h_n = functional_call(module, params, (sequence, hx))
        return output.data, h_n

    return fn


def rows_outputs(module, hx, sequence, seed=11):
    """f(params, rows) -> (output rows, h_n) of module on `sequence` with its data replaced by rows:
    torch's pack_padded_sequence has no derivative under torch.func, so transforms that
    differentiate the input take the packed rows."""

    def fn(params, rows):
        torch.manual_seed(seed)
        packed = PackedSequence(
            rows, sequence.batch_sizes, sequence.sorted_indices, sequence.unsorted_indices
        )
        output, h_n = functional_call(module, params, (packed, hx))
        return output.data, h_n

    return fn


def scalar_of(outputs):
    def fn(params, input):
        output, h_n = outputs(params, input)
        return (output.sin() * torch.arange(output.numel()).view(output.shape).cos()).sum() + h_n.pow(2).sum()

    return fn


@pytest.mark.parametrize("bidirectional", [False, True])
def test_transforms_with_packed_input_and_dropout_match_nn_rnn(bidirectional):
    # nn.RNN's packed path cannot run under torch.func (it reads batch_sizes' memory, which a
    # transform's wrapper does not have): its values come from plain autograd and forward AD.
    ours, theirs = packed_dropout_pair(bidirectional)
    padded = make_input((1, False, False, "tanh"), batch=3, steps=5)
    lengths = torch.tensor([5, 2, 4])
    sequence = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    rows = sequence.data
    hx = make_hx((3, bidirectional), batch=3)
    tangent = seeded_randn(*rows.shape, seed=4)
    results = []
    for module in (ours, theirs):
        params = params_of(module)
        outputs = rows_outputs(module, hx, sequence)
        loss = scalar_of(outputs)
        packing_loss = scalar_of(packed_outputs(module, hx, lengths))
        found = {"output": outputs(params, rows)[0]}
        if module is ours:
            found["params"] = grad(packing_loss)(params, padded)  # batch sizes made inside grad
            found["grad_input"] = grad(loss, argnums=1)(params, rows)
            found["jacrev"] = jacrev(lambda x: outputs(params, x)[0])(rows)  # noqa: B023
            found["jvp"] = jvp(lambda x: outputs(params, x), (rows,), (tangent,))[1]  # noqa: B023
        else:
            live = dict(module.named_parameters())
            found["params"] = dict(
                zip(live, torch.autograd.grad(packing_loss(live, padded), list(live.values())))
            )
            leaf = rows.clone().requires_grad_(True)
            found["grad_input"] = torch.autograd.grad(loss(params, leaf), leaf)[0]
            found["jacrev"] = torch.autograd.functional.jacobian(lambda x: outputs(params, x)[0], rows)  # noqa: B023
            found["jvp"] = torch.autograd.functional.jvp(lambda x: outputs(params, x), rows, tangent)[1]  # noqa: B023
        with forward_ad.dual_level():
            dual = outputs(params, forward_ad.make_dual(rows, tangent))
            found["forward_ad"] = [forward_ad.unpack_dual(t).tangent for t in dual]
        # double backward: the gradient's own gradient, through the module call
        leaf = rows.clone().requires_grad_(True)
        first = torch.autograd.grad(loss(dict(module.named_parameters()), leaf), leaf, create_graph=True)[0]
        found["double_backward"] = torch.autograd.grad(first.pow(2).sum(), leaf)[0]
        results.append(found)
    assert results[0]["grad_input"].abs().max() > 1e-3 and results[0]["double_backward"].abs().max() > 1e-3
    assert results[0]["jvp"][0].abs().max() > 1e-3
    without_dropout = rows_outputs(ours.eval(), hx, sequence)(params_of(ours), rows)[0]
    assert (results[0]["output"] - without_dropout).abs().max() > 1e-3  # the masks did apply
    for key in results[1]:
        for got, want in zip(
            torch.utils._pytree.tree_leaves(results[0][key]), torch.utils._pytree.tree_leaves(results[1][key])
        ):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=key)


def test_hessian_and_jacfwd_with_packed_input_match_nn_rnn():
    ours, theirs = packed_dropout_pair(True, dropout=0.0)
    padded = make_input((1, False, False, "tanh"), batch=3, steps=4)
    lengths = torch.tensor([4, 2, 3])
    sequence = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    hx = make_hx((3, True), batch=3)
    results = []
    for module in (ours, theirs):
        params = params_of(module)
        loss = scalar_of(rows_outputs(module, hx, sequence))

        def of_bias(bias):
            return loss({**params, "bias_hh_l1": bias}, sequence.data)  # noqa: B023

        def final_state(rows):
            return rows_outputs(module, hx, sequence)(params, rows)[1]  # noqa: B023

        if module is ours:
            results.append((hessian(of_bias)(params["bias_hh_l1"]), jacfwd(final_state)(sequence.data)))
        else:  # nn.RNN's packed path cannot run under torch.func: plain autograd
            functional = torch.autograd.functional
            results.append(
                (
                    functional.hessian(of_bias, params["bias_hh_l1"]),
                    functional.jacobian(final_state, sequence.data),
                )
            )
    assert results[0][0].abs().max() > 1e-3 and results[0][1].abs().max() > 1e-3
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_per_sample_grads_with_dropout_match_a_loop():
    ours, theirs = float64_pair(
        3, 4, num_layers=3, bidirectional=True, batch_first=True, dropout=0.3, nonlinearity="relu"
    )
    samples, steps = 3, 4
    inputs = seeded_randn(samples, steps, 3, seed=6)

    def sample_loss(module):
        def loss(params, sample):
            torch.manual_seed(21)
            output, h_n = functional_call(module, params, (sample.unsqueeze(0),))
            return output.sin().sum() + h_n.pow(2).sum()

        return loss

    # randomness="same": every sample gets the masks a plain call under the seed draws
    per_sample = vmap(grad(sample_loss(ours.train())), in_dims=(None, 0), randomness="same")(
        params_of(ours), inputs
    )
    theirs.train()
    for index in range(samples):
        params = dict(theirs.named_parameters())
        expected = torch.autograd.grad(sample_loss(theirs)(params, inputs[index]), list(params.values()))
        for name, value in zip(params, expected):
            torch.testing.assert_close(per_sample[name][index], value, rtol=1e-10, atol=1e-10)


def test_plain_call_runs_the_fused_op_and_transforms_do_not():
    config = (2, False, True, "tanh")
    ours, _ = make_pair(config)
    x = make_input(config)
    assert fused_op_calls(lambda: ours(x)) == 2
    assert fused_op_calls(lambda: ours(x)[0].sum().backward()) == 2
    assert fused_op_calls(lambda: grad(lambda p: loss_of(ours, p, x))(params_of(ours))) == 0
    composite = "rnn_ext::_elman_stack_composite"
    assert fused_op_calls(lambda: grad(lambda p: loss_of(ours, p, x))(params_of(ours)), composite) == 1
    assert fused_op_calls(lambda: ours(x), composite) == 0
    assert (
        fused_op_calls(
            lambda: vmap(grad(lambda p, sample: loss_of(ours, p, sample)), in_dims=(None, 0))(
                params_of(ours), x.unsqueeze(0)
            )
        )
        == 0
    )
    with forward_ad.dual_level():
        assert fused_op_calls(lambda: ours(forward_ad.make_dual(x, torch.ones_like(x)))) == 0
        assert fused_op_calls(lambda: ours(x)) == 2  # a dual level alone changes nothing


def test_packed_sequence_under_grad_matches_nn_rnn():
    config = (2, True, False, "relu")
    ours, theirs = make_pair(config)
    padded = make_input(config, batch=3, steps=5)
    lengths = torch.tensor([5, 2, 4])
    hx = make_hx(config, batch=3)

    def loss(module):
        def fn(params):
            sequence = pack_padded_sequence(padded, lengths, enforce_sorted=False)
            output, h_n = functional_call(module, params, (sequence, hx))
            return output.data.sin().sum() + h_n.pow(2).sum()

        return fn

    ours_grads = grad(loss(ours))(params_of(ours))
    theirs_grads = torch.autograd.grad(
        loss(theirs)(dict(theirs.named_parameters())), list(theirs.parameters())
    )
    for name, expected in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(ours_grads[name], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
def test_bad_input_under_transforms_raises_nn_rnn_error(transform):
    config = (1, False, False, "tanh")
    ours, theirs = make_pair(config)
    x = torch.randn(5, 2, 7, dtype=torch.float64)  # input_size is 3

    def failure(module):
        fn = {
            "grad": lambda: grad(lambda inp: module(inp)[0].sum())(x),
            "vmap": lambda: vmap(module)(x),
            "jvp": lambda: jvp(lambda inp: module(inp)[0], (x,), (x,)),
        }[transform]
        with pytest.raises(Exception) as info:
            fn()
        return info

    ours_error = failure(ours)
    theirs_error = failure(theirs) if transform != "vmap" else None
    assert ours_error.type is RuntimeError
    assert "input.size(-1) must be equal to input_size. Expected 3, got 7" in str(ours_error.value)
    if theirs_error is not None:
        assert theirs_error.type is ours_error.type and str(theirs_error.value) == str(ours_error.value)
