"""rnn_ext.RNN keeps torch.nn.RNN's module contract: constructor, parameters, init, state_dict,
repr, copying and saving, dropout, convert(), and it runs our ops. (Its errors: test_errors.py.)"""

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rnn_ext
from helpers import ours_and_reference


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((10, 20), {}),
        ((10, 20, 2, "relu"), {}),
        ((10, 20, 3), {"nonlinearity": "relu", "bias": False, "batch_first": True}),
        ((4, 5), {"num_layers": 2, "dropout": 0.3, "bidirectional": True}),
        ((4, 5, 2, "tanh", False, True, 0.5, True), {}),
    ],
)
def test_parameters_names_shapes_and_init_are_nn_rnns(args, kwargs):
    ours, reference = ours_and_reference(*args, **kwargs)
    ours_params = list(ours.named_parameters())
    reference_params = list(reference.named_parameters())
    assert [n for n, _ in ours_params] == [n for n, _ in reference_params]
    for (name, a), (_, b) in zip(ours_params, reference_params):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: init differs under the same seed"
    for attribute in (
        "mode",
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
        "nonlinearity",
        "_flat_weights_names",
        "_all_weights",
    ):
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    assert [[p.shape for p in layer] for layer in ours.all_weights] == [
        [p.shape for p in layer] for layer in reference.all_weights
    ]
    assert repr(ours) == repr(reference)
    assert ours.extra_repr() == reference.extra_repr()


def test_defaults():
    module = rnn_ext.RNN(3, 4)
    assert (
        module.num_layers,
        module.nonlinearity,
        module.bias,
        module.batch_first,
        module.dropout,
        module.bidirectional,
    ) == (1, "tanh", True, False, 0.0, False)


def test_factory_kwargs():
    module = rnn_ext.RNN(3, 4, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in module.parameters())


def test_state_dict_round_trips_both_ways():
    ours, reference = ours_and_reference(3, 5, 2, bidirectional=True, seed=1)
    fresh_reference = nn.RNN(3, 5, 2, bidirectional=True)
    fresh_reference.load_state_dict(ours.state_dict())
    fresh_ours = rnn_ext.RNN(3, 5, 2, bidirectional=True)
    fresh_ours.load_state_dict(reference.state_dict())
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(fresh_ours(x)[0], reference(x)[0])
    torch.testing.assert_close(fresh_reference(x)[0], ours(x)[0])


def test_weight_tying_by_assignment():
    module = rnn_ext.RNN(4, 4, 2)
    module.weight_hh_l1 = module.weight_hh_l0
    assert module.weight_hh_l1 is module.weight_hh_l0
    x = torch.randn(3, 2, 4)
    output, _ = module(x)
    output.sum().backward()
    reference = nn.RNN(4, 4, 2)
    reference.load_state_dict(module.state_dict())
    reference.weight_hh_l1 = reference.weight_hh_l0
    expected, _ = reference(x)
    expected.sum().backward()
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(module.weight_hh_l0.grad, reference.weight_hh_l0.grad)


def test_assigned_parameter_is_used():
    module = rnn_ext.RNN(2, 3)
    x = torch.randn(4, 1, 2)
    before, _ = module(x)
    module.weight_ih_l0 = nn.Parameter(torch.zeros(3, 2))
    after, _ = module(x)
    reference = nn.RNN(2, 3)
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(after, reference(x)[0])
    assert not torch.allclose(before, after)


def test_to_double_and_half_round_trip():
    module = rnn_ext.RNN(3, 4, 2).double()
    assert all(p.dtype == torch.float64 for p in module._flat_weights)
    output, h_n = module(torch.randn(2, 1, 3, dtype=torch.float64))
    assert output.dtype == h_n.dtype == torch.float64
    module = module.to(torch.float32)
    assert module(torch.randn(2, 1, 3))[0].dtype == torch.float32


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_and_saves_of_the_whole_module(how):
    module = rnn_ext.RNN(3, 4, 2, "relu", bidirectional=True, batch_first=True)
    if how == "deepcopy":
        clone = copy.deepcopy(module)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(module))
    else:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert type(clone) is rnn_ext.RNN
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(clone(x)[0], module(x)[0], rtol=0, atol=0)
    assert clone.weight_ih_l0.data_ptr() != module.weight_ih_l0.data_ptr()


def test_dropout_between_layers_statistics():
    """Dropout follows every layer but the last, in training only, with nn.RNN's statistics:
    with all-ones weights the second layer's output counts the surviving units exactly."""
    hidden, p = 1000, 0.3
    module = rnn_ext.RNN(10, hidden, 2, "relu", bias=False, dropout=p)
    with torch.no_grad():
        for weight in module.parameters():
            weight.fill_(1)
    x = torch.ones(1, 1, 10)
    hx = torch.zeros(2, 1, hidden)
    module.eval()
    output, h_n = module(x, hx)
    assert torch.all(output == 10 * hidden) and torch.all(h_n[0] == 10)
    module.train()
    torch.manual_seed(0)
    values = []
    for _ in range(20):
        output, h_n = module(x, hx)
        assert output.min() == output.max()  # every unit of layer 2 sees the same dropped input
        assert torch.all(h_n[0] == 10)  # the last layer's input only is dropped
        kept = output[0, 0, 0].item() * (1 - p) / 10
        assert abs(kept - round(kept)) < 1e-2
        values.append(kept / hidden)
    mean = sum(values) / len(values)
    assert abs(mean - (1 - p)) < 0.02, mean  # 20000 Bernoulli draws: std of the mean ~0.003


def test_dropout_read_at_every_call():
    module = rnn_ext.RNN(10, 50, 2, "relu", bias=False, dropout=0.0)
    with torch.no_grad():
        for weight in module.parameters():
            weight.fill_(1)
    x = torch.ones(1, 1, 10)
    assert module(x)[0][0, 0, 0].item() == 500
    module.dropout = 1.0
    assert module(x)[0][0, 0, 0].item() == 0
    module.eval()
    assert module(x)[0][0, 0, 0].item() == 500


def test_hx_permuted_for_unsorted_packed_input():
    ours, reference = ours_and_reference(3, 4, 2, bidirectional=True, seed=4)
    ours, reference = ours.double(), reference.double()
    sequences = [torch.randn(n, 3, dtype=torch.float64) for n in (2, 5, 3)]
    packed = nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
    hx = torch.randn(4, 3, 4, dtype=torch.float64)
    out_a, h_a = ours(packed, hx)
    out_b, h_b = reference(packed, hx)
    torch.testing.assert_close(out_a.data, out_b.data, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_a, h_b, rtol=0, atol=1e-12)


def test_runs_our_ops_not_torchs_rnn_kernel(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch's RNN kernel was called")

    for name in ("rnn_tanh", "rnn_relu"):
        monkeypatch.setattr(torch._VF, name, forbidden, raising=False)
    module = rnn_ext.RNN(3, 4, 2, bidirectional=True)
    with torch.profiler.profile() as profile:
        output, h_n = module(torch.randn(5, 2, 3, requires_grad=True))
        (output.sum() + h_n.sum()).backward()
    names = {event.name for event in profile.events()}
    assert "rnn_ext::elman_forward" in names and "rnn_ext::elman_backward" in names
    assert not any(re.search(r"aten::(rnn_tanh|rnn_relu)", name) for name in names)


def test_convert_swaps_every_rnn_with_same_weights():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.RNN(3, 8, 2, "relu", batch_first=True, bidirectional=True)
            self.blocks = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
            self.inner = nn.ModuleDict({"rnn": nn.RNN(16, 4, bias=False, batch_first=True)})

        def forward(self, x):
            y, _ = self.encoder(x)
            y, _ = self.inner["rnn"](self.blocks(y))
            return y

    torch.manual_seed(0)
    model = Model().eval()
    converted = rnn_ext.convert(model)
    assert type(converted.encoder) is rnn_ext.RNN and type(converted.inner["rnn"]) is rnn_ext.RNN
    assert type(model.encoder) is nn.RNN  # not in place by default
    assert converted.encoder.nonlinearity == "relu" and converted.encoder.bidirectional
    assert converted.inner["rnn"].bias is False
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(converted(x), model(x))
    assert converted.state_dict().keys() == model.state_dict().keys()

    in_place = rnn_ext.convert(model, inplace=True)
    assert in_place is model and type(model.encoder) is rnn_ext.RNN
    standalone = rnn_ext.convert(nn.RNN(2, 3))
    assert type(standalone) is rnn_ext.RNN


def test_convert_keeps_parameter_identity_in_place():
    model = nn.Sequential(nn.RNN(2, 3))
    weight = model[0].weight_ih_l0
    rnn_ext.convert(model, inplace=True)
    assert model[0].weight_ih_l0 is weight


@pytest.mark.parametrize("batch_first", [False, True])
def test_output_can_be_modified_in_place_before_backward(batch_first):
    """As with nn.RNN: `out += residual` or Dropout(inplace=True) on the output, then backward."""
    ours, reference = ours_and_reference(3, 4, 2, batch_first=batch_first, seed=2)
    x = torch.randn(2, 5, 3)
    grads = []
    for module in (ours, reference):
        output, h_n = module(x)
        assert not output._is_view()
        output.mul_(2).add_(1)
        (output.pow(2).sum() + h_n.sum()).backward()
        grads.append([p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_norm_on_a_recurrent_weight():
    """torch.nn.utils.weight_norm replaces the Parameter by a computed tensor before each call;
    the module must pick it up (and give its parameters gradients) as nn.RNN does."""
    ours, reference = ours_and_reference(3, 4, 2, seed=5)
    ours = torch.nn.utils.weight_norm(ours, name="weight_hh_l0")
    reference = torch.nn.utils.weight_norm(reference, name="weight_hh_l0")
    x = torch.randn(5, 2, 3)
    results = []
    for module in (ours, reference):
        output, h_n = module(x)
        (output.sum() + h_n.sum()).backward()
        results.append((output, module.weight_hh_l0_g.grad, module.weight_hh_l0_v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_cpu(dtype):
    """Half types run in float32 inside the CPU kernel and come back in their own type."""
    ours, reference = ours_and_reference(3, 8, 2, seed=6)
    ours = ours.to(dtype)
    x = torch.randn(6, 2, 3)
    output, h_n = ours(x.to(dtype))
    assert output.dtype == h_n.dtype == dtype
    truth_module = reference.to(dtype).double()  # the same rounded weights, in float64
    expected, expected_h = truth_module(x.to(dtype).double())
    torch.testing.assert_close(output.double(), expected, rtol=0, atol=2e-2)
    torch.testing.assert_close(h_n.double(), expected_h, rtol=0, atol=2e-2)


class _RecordingDispatchMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class _RecordingFunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode_kind", ["dispatch", "function"])
@pytest.mark.parametrize("grad", [False, True])
def test_modes_see_what_torch_ops_shows_them(mode_kind, grad):
    """The common eager call reaches rnn_ext::elman_stack through a typed binding, not torch.ops:
    a dispatch mode must see what it sees when torch.ops.rnn_ext.elman_stack is called (the
    operators below its autograd kernel), and a torch function mode (which only torch.ops
    consults) must send the call the general way, where it sees the operator. Same results as
    nn.RNN either way."""
    ours, reference = ours_and_reference(3, 4, 2, seed=3, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64)
    mode_class = _RecordingDispatchMode if mode_kind == "dispatch" else _RecordingFunctionMode
    with torch.set_grad_enabled(grad), mode_class() as through_module:
        got = ours(x, h0)
    with torch.set_grad_enabled(grad), mode_class() as through_torch_ops:
        torch.ops.rnn_ext.elman_stack.default(x, h0, ours._flat_weights, None, [], 2, False, False, False)
    if mode_kind == "dispatch":
        assert through_module.seen == through_torch_ops.seen
    else:  # the general path also runs tensor methods the mode sees
        assert through_torch_ops.seen == [torch.ops.rnn_ext.elman_stack.default]
        assert torch.ops.rnn_ext.elman_stack.default in through_module.seen
    assert any(getattr(func, "namespace", None) == "rnn_ext" for func in through_module.seen)
    expected = reference(x, h0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if grad:
        ours_grads = torch.autograd.grad(sum(t.sum() for t in got), list(ours.parameters()))
        reference_grads = torch.autograd.grad(sum(t.sum() for t in expected), list(reference.parameters()))
        torch.testing.assert_close(ours_grads, reference_grads, rtol=1e-10, atol=1e-12)
