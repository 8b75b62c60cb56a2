"""rnn_ext::elman_stack, the operator behind every rnn_ext.RNN call: against nn.RNN with dropout in
training mode (same seed, same masks), its schema and fake kernels (opcheck), its gradients
(gradcheck, gradgradcheck, dropout masks included), and whole-model checkpoints of rnn_ext 0.1.0."""

import pathlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from helpers import ours_and_reference, seeded_randn, skip_if_expecttest_missing

stack_op = torch.ops.rnn_ext.elman_stack.default
stack_backward_op = torch.ops.rnn_ext.elman_stack_backward.default

# (num_layers, bidirectional, batch_first, nonlinearity, bias)
CONFIGS = [
    (2, False, False, "tanh", True),
    (3, False, True, "relu", True),
    (2, True, False, "tanh", False),
    (3, True, True, "tanh", True),
]


def config_id(config):
    layers, bidirectional, batch_first, nonlinearity, bias = config
    parts = [f"L{layers}", "bi" if bidirectional else "uni", "bf" if batch_first else "tm", nonlinearity]
    return "-".join(parts + ([] if bias else ["nobias"]))


def pair(config, dropout=0.0, seed=0):
    layers, bidirectional, batch_first, nonlinearity, bias = config
    return ours_and_reference(
        3,
        6,
        layers,
        nonlinearity=nonlinearity,
        bias=bias,
        batch_first=batch_first,
        dropout=dropout,
        bidirectional=bidirectional,
        seed=seed,
    )


def results(module, x, hx, seed):
    """Outputs and the gradients of every leaf for one training step under torch.manual_seed(seed)
    (which fixes the dropout masks)."""
    packed = isinstance(x, torch.nn.utils.rnn.PackedSequence)
    leaves = [x.data if packed else x] + ([hx] if hx is not None else []) + list(module.parameters())
    torch.manual_seed(seed)
    output, h_n = module(x, hx)
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output = output.data
    weights = seeded_randn(*output.shape, seed=seed + 1)
    loss = (output * weights).sum() + (h_n * h_n).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [output.detach(), h_n.detach(), *grads]


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("with_hx", [False, True])
def test_dropout_in_training_matches_nn_rnn_under_one_seed(config, with_hx):
    ours, theirs = pair(config, dropout=0.3, seed=5)
    ours.double().train()
    theirs.double().train()
    layers, bidirectional, batch_first, _, _ = config
    directions = 2 if bidirectional else 1
    shape = (4, 7, 3) if batch_first else (7, 4, 3)
    x = seeded_randn(*shape, seed=2).requires_grad_(True)
    hx = seeded_randn(layers * directions, 4, 6, seed=3).requires_grad_(True) if with_hx else None
    got = results(ours, x, hx, seed=11)
    want = results(theirs, x, hx, seed=11)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # Another seed draws other masks: the test would see a mask-order mistake.
    other = results(theirs, x, hx, seed=12)
    assert not torch.allclose(other[0], want[0])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_with_packed_input_matches_nn_rnn(bidirectional):
    ours, theirs = pair((3, bidirectional, True, "tanh", True), dropout=0.4, seed=7)
    ours.double().train()
    theirs.double().train()
    padded = seeded_randn(5, 6, 3, seed=4).requires_grad_(True)
    lengths = torch.tensor([6, 2, 5, 1, 4])
    got = results(ours, pack_padded_sequence(padded, lengths, True, enforce_sorted=False), None, 21)
    want = results(theirs, pack_padded_sequence(padded, lengths, True, enforce_sorted=False), None, 21)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_eval_mode_and_dropout_one_match_nn_rnn():
    for dropout, train in ((0.5, False), (1.0, True)):
        ours, theirs = pair(CONFIGS[0], dropout=dropout, seed=3)
        ours.double().train(train)
        theirs.double().train(train)
        x = seeded_randn(5, 2, 3, seed=9).requires_grad_(True)
        for a, b in zip(results(ours, x, None, 1), results(theirs, x, None, 1)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def stack_args(config, packed=False, with_hx=True, dropout=False, requires_grad=False, seed=0):
    """float64 arguments of one elman_stack call: a module's weights, random input, hx and masks."""
    layers, bidirectional, batch_first, nonlinearity, bias = config
    module, _ = pair(config, seed=seed)
    weights = [w.detach().double().requires_grad_(requires_grad) for w in module._flat_weights]
    directions = 2 if bidirectional else 1
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 1], dtype=torch.int64)
        x = seeded_randn(9, 3, seed=seed + 1)
        rows = [9]
    else:
        x = seeded_randn(*((3, 4, 3) if batch_first else (4, 3, 3)), seed=seed + 1)
        rows = [4, 3]
    hx = (
        seeded_randn(layers * directions, 3, 6, seed=seed + 2).requires_grad_(requires_grad)
        if with_hx
        else None
    )
    masks = []
    if dropout:
        generator = torch.Generator().manual_seed(seed + 3)
        for _ in range(layers - 1):
            mask = torch.empty(rows + [directions * 6], dtype=torch.float64).bernoulli_(
                0.7, generator=generator
            )
            masks.append(mask / 0.7)
    x.requires_grad_(requires_grad)
    return x, hx, weights, batch_sizes, masks, layers, bidirectional, nonlinearity == "relu", batch_first


STACK_CASES = [
    (CONFIGS[0], dict()),
    (CONFIGS[1], dict(dropout=True)),
    (CONFIGS[2], dict(packed=True, dropout=True)),
    (CONFIGS[3], dict(with_hx=False, dropout=True)),
    ((1, False, True, "tanh", True), dict(with_hx=False)),
]


def case_id(case):
    config, options = case
    return config_id(config) + "".join(f"-{key}" for key, value in options.items() if value)


@pytest.mark.parametrize("case", STACK_CASES, ids=case_id)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_stack(case, requires_grad):
    config, options = case
    args = stack_args(config, requires_grad=requires_grad, **options)
    with skip_if_expecttest_missing():
        torch.library.opcheck(stack_op, args)


@pytest.mark.parametrize("case", STACK_CASES, ids=case_id)
@pytest.mark.parametrize("mask", [[True, True, True], [False, False, True], [True, True, False]])
def test_opcheck_stack_backward(case, mask):
    config, options = case
    x, hx, weights, batch_sizes, masks, layers, bidirectional, relu, batch_first = stack_args(
        config, **options
    )
    if hx is None:
        hx = torch.zeros(layers * (2 if bidirectional else 1), 3, 6, dtype=torch.float64)
    output, h_n, layer_outputs = torch.ops.rnn_ext._elman_stack_forward(
        x, hx, weights, batch_sizes, masks, layers, bidirectional, relu, batch_first
    )
    grad_output = seeded_randn(*output.shape, seed=8)
    if batch_first and batch_sizes is None:
        grad_output = grad_output.transpose(0, 1).contiguous().transpose(0, 1)
    grad_h_n = seeded_randn(*h_n.shape, seed=9)
    args = (
        grad_output,
        grad_h_n,
        x,
        hx,
        weights,
        batch_sizes,
        masks,
        layer_outputs,
        output,
        layers,
        bidirectional,
        relu,
        batch_first,
        mask,
    )
    with skip_if_expecttest_missing():
        torch.library.opcheck(stack_backward_op, args)


@pytest.mark.parametrize("case", STACK_CASES, ids=case_id)
def test_gradcheck_and_gradgradcheck_stack(case):
    config, options = case
    x, hx, weights, batch_sizes, masks, layers, bidirectional, relu, batch_first = stack_args(
        config, requires_grad=True, **options
    )
    leaves = [x] + ([hx] if hx is not None else []) + weights

    def run(*tensors):
        inp, rest = tensors[0], list(tensors[1:])
        h = rest.pop(0) if hx is not None else None
        return stack_op(inp, h, rest, batch_sizes, masks, layers, bidirectional, relu, batch_first)

    assert torch.autograd.gradcheck(run, leaves)
    assert torch.autograd.gradgradcheck(run, leaves)


def test_output_is_free_for_in_place_use():
    module = rnn_ext.RNN(3, 5, 2, dropout=0.2, batch_first=True).double()
    reference = nn.RNN(3, 5, 2, dropout=0.2, batch_first=True).double()
    reference.load_state_dict(module.state_dict())
    x = seeded_randn(2, 4, 3).requires_grad_(True)
    grads = []
    for m in (module, reference):
        torch.manual_seed(0)
        output, _ = m(x)
        output += 1.0  # in place on the result, as nn.RNN allows
        grads.append(torch.autograd.grad((output * output).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def test_weights_swapped_between_calls_are_used():
    module = rnn_ext.RNN(2, 4, 2).double()
    reference = nn.RNN(2, 4, 2).double()
    x = seeded_randn(3, 2, 2)
    module(x)  # the fast path has seen the parameters
    reference.load_state_dict(module.state_dict())
    new = seeded_randn(4, 4, seed=5)
    module.weight_hh_l1 = nn.Parameter(new.clone())
    reference.weight_hh_l1 = nn.Parameter(new.clone())
    torch.testing.assert_close(module(x), reference(x), rtol=1e-10, atol=1e-10)
    swapped = {name: p.detach() * 2 for name, p in module.named_parameters()}
    torch.testing.assert_close(
        torch.func.functional_call(module, swapped, (x,)),
        torch.func.functional_call(reference, swapped, (x,)),
        rtol=1e-10,
        atol=1e-10,
    )


CHECKPOINT = pathlib.Path(__file__).parent / "data" / "rnn_ext_0_1_0_models.pt"


def test_loads_a_whole_model_checkpoint_of_release_0_1_0():
    # Made by tests/data/make_checkpoint.py with rnn_ext 0.1.0.
    models = torch.load(CHECKPOINT, weights_only=False)
    for name, module in models.items():
        assert type(module) is rnn_ext.RNN and type(module).__module__ == "rnn_ext.module"
        reference = nn.RNN(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            nonlinearity=module.nonlinearity,
            bias=module.bias,
            batch_first=module.batch_first,
            bidirectional=module.bidirectional,
        )
        reference.load_state_dict(module.state_dict())
        reference.train(module.training)
        x = seeded_randn(2, 5, module.input_size, dtype=torch.float32)
        if not module.batch_first:
            x = x.transpose(0, 1).contiguous()
        x.requires_grad_(True)
        got, want = results(module, x, None, 0), results(reference, x, None, 0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_runs_a_torchscript_program_saved_by_release_0_1_0():
    # Made by tests/data/make_checkpoint.py with rnn_ext 0.1.0: its graph calls rnn_ext::elman_forward.
    scripted = torch.jit.load(str(CHECKPOINT.with_name("rnn_ext_0_1_0_scripted.pt")))
    models = torch.load(CHECKPOINT, weights_only=False)
    reference = nn.RNN(3, 5, 2, nonlinearity="relu", bidirectional=True).eval()
    reference.load_state_dict(models["stack"].state_dict())
    x = seeded_randn(6, 2, 3, dtype=torch.float32)
    hx = seeded_randn(4, 2, 5, seed=1, dtype=torch.float32)
    for args in ((x,), (x, hx)):
        for a, b in zip(scripted(*args), reference(*args)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
