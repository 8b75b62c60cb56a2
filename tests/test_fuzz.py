"""Differential fuzzing: random configurations of rnn_ext.RNN against torch.nn.RNN in float64, with
the same weights, comparing outputs, h_n and every gradient (input, hx, each parameter).

Profiles (hypothesis settings): "fast" (default, derandomized so CI reruns the same cases) runs in
`make test`; RNN_EXT_FUZZ_PROFILE=long (`make fuzz`) draws thousands of fresh cases. Add
`--hypothesis-show-statistics` to see how many cases ran per input form and what they covered.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from helpers import ours_and_reference

# The device fixture is a plain string parameter, safe to share across hypothesis examples.
_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORMS = ("padded", "unbatched", "packed_sorted", "packed_unsorted")
# Cases per input form (the test runs once per form, so each form gets its share whatever
# hypothesis's generator favours): 400 in all for the fast profile, 10,000 for the long one.
EXAMPLES = {"fast": 100, "long": 2500}
settings.register_profile("fast", max_examples=EXAMPLES["fast"], derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=EXAMPLES["long"], derandomize=False, **_COMMON)
PROFILE = os.environ.get("RNN_EXT_FUZZ_PROFILE", "fast")
settings.load_profile(PROFILE)
# Largest sizes drawn: the long profile reaches further (batches past the kernels' 64-row chunks,
# wider H and I) at more cost per case.
LARGE = {"fast": 24, "long": 48}[PROFILE]
LARGE_BATCH = {"fast": 24, "long": 72}[PROFILE]

# float64 on both sides; the error allowed is relative to each tensor's own magnitude (relu stacks
# can grow), so a wrong element anywhere still fails.
TOLERANCE = 1e-10

# How the input (and hx) tensor handed to the module is laid out in memory.
LAYOUTS = ("contiguous", "permuted", "strided", "expanded")


@dataclasses.dataclass(frozen=True)
class Case:
    input_size: int
    hidden_size: int
    steps: int
    batch: int
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    nonlinearity: str
    form: str
    lengths: tuple  # per sequence, packed forms only
    input_layout: str
    with_hx: bool
    hx_layout: str
    grad_input: bool
    grad_hx: bool
    grad_params: bool
    weight_scale: float
    seed: int


@st.composite
def cases(draw, form):
    steps = draw(st.one_of(st.integers(1, 8), st.integers(9, LARGE)))
    if form == "unbatched":
        batch = 1
    elif form == "padded":
        batch = draw(st.one_of(st.just(0), st.integers(1, 9), st.integers(10, LARGE_BATCH)))
    else:
        batch = draw(st.one_of(st.integers(1, 9), st.integers(10, LARGE_BATCH)))
    lengths = ()
    if form.startswith("packed"):
        lengths = tuple(draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)))
        if form == "packed_sorted":
            lengths = tuple(sorted(lengths, reverse=True))
    return Case(
        input_size=draw(st.one_of(st.integers(1, 9), st.integers(10, LARGE))),
        hidden_size=draw(st.one_of(st.integers(1, 9), st.integers(10, LARGE))),
        steps=steps,
        batch=batch,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        nonlinearity=draw(st.sampled_from(("tanh", "relu"))),
        form=form,
        lengths=lengths,
        input_layout=draw(st.sampled_from(LAYOUTS)),
        with_hx=draw(st.booleans()),
        hx_layout=draw(st.sampled_from(LAYOUTS)),
        grad_input=draw(st.booleans()),
        grad_hx=draw(st.booleans()),
        grad_params=draw(st.booleans()),
        weight_scale=draw(st.sampled_from((0.5, 1.0, 1.5))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _base_case(**changes):
    """A small default case; explicit examples change what they pin."""
    fields = dict(
        input_size=3,
        hidden_size=5,
        steps=4,
        batch=3,
        num_layers=1,
        bidirectional=False,
        batch_first=False,
        bias=True,
        nonlinearity="tanh",
        form="padded",
        lengths=(),
        input_layout="contiguous",
        with_hx=True,
        hx_layout="contiguous",
        grad_input=True,
        grad_hx=True,
        grad_params=True,
        weight_scale=1.0,
        seed=1234,
    )
    fields.update(changes)
    return Case(**fields)


# Corners every profile covers whatever the random draw: T=1, B=0, unbatched, packed with unsorted
# lengths, every non-contiguous layout, both nonlinearities, stacked bidirectional, B past 64 rows.
EXPLICIT_CASES = [
    _base_case(steps=1),
    _base_case(steps=1, batch=1, bidirectional=True, num_layers=2),
    _base_case(batch=0),
    _base_case(batch=0, batch_first=True, bidirectional=True, num_layers=3, with_hx=False),
    _base_case(batch=0, input_layout="expanded", hx_layout="expanded"),
    _base_case(form="unbatched", batch=1, num_layers=2, bidirectional=True),
    _base_case(form="unbatched", batch=1, with_hx=False, batch_first=True, input_layout="permuted"),
    _base_case(form="packed_unsorted", batch=4, lengths=(2, 4, 1, 3), bidirectional=True, num_layers=2),
    _base_case(form="packed_unsorted", batch=3, lengths=(1, 1, 1), steps=1, batch_first=True),
    _base_case(form="packed_sorted", batch=3, lengths=(4, 4, 2), nonlinearity="relu"),
    _base_case(
        form="packed_unsorted",
        batch=5,
        lengths=(3, 1, 3, 2, 1),
        steps=4,
        with_hx=True,
        hx_layout="permuted",
        input_layout="strided",
        bidirectional=True,
    ),
    _base_case(input_layout="permuted", hx_layout="strided", batch_first=True),
    _base_case(input_layout="strided", hx_layout="permuted", bidirectional=True),
    _base_case(input_layout="expanded", hx_layout="expanded", num_layers=2, bidirectional=True),
    _base_case(nonlinearity="relu", num_layers=3, bidirectional=True, bias=False),
    _base_case(grad_input=False, grad_hx=False, grad_params=True),
    _base_case(grad_input=True, grad_hx=False, grad_params=False),
    _base_case(grad_input=False, grad_hx=False, grad_params=False),
    _base_case(hidden_size=17, input_size=33, batch=70, steps=2, bidirectional=True),
]


def _leaf(logical: torch.Tensor, layout: str, repeat_dim: int) -> torch.Tensor:
    """A fresh tensor holding the storage that `_view` reads `logical`'s values from."""
    if layout == "contiguous":
        return logical.clone()
    if layout == "permuted":
        return logical.permute(list(range(logical.dim()))[::-1]).contiguous()
    if layout == "strided":
        # Every other element of every dimension, starting one element in.
        big = torch.zeros([2 * n + 1 for n in logical.shape], dtype=logical.dtype, device=logical.device)
        big[tuple(slice(1, 1 + 2 * n, 2) for n in logical.shape)] = logical
        return big
    if layout == "expanded":
        # One slice repeated along repeat_dim (stride 0 there); the other slices' values are unused.
        shape = list(logical.shape)
        shape[repeat_dim] = 1
        if logical.shape[repeat_dim] == 0:
            return torch.zeros(shape, dtype=logical.dtype, device=logical.device)
        return logical.narrow(repeat_dim, 0, 1).clone()
    raise AssertionError(layout)


def _view(leaf: torch.Tensor, shape, layout: str) -> torch.Tensor:
    """The tensor the module sees: `leaf` viewed with the logical `shape` in `layout`."""
    if layout == "contiguous":
        return leaf
    if layout == "permuted":
        return leaf.permute(list(range(leaf.dim()))[::-1])
    if layout == "strided":
        return leaf[tuple(slice(1, 1 + 2 * n, 2) for n in shape)]
    if layout == "expanded":
        return leaf.expand(shape)
    raise AssertionError(layout)


def _random(generator: torch.Generator, shape, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def _ours_and_reference(case: Case, device):
    """(rnn_ext.RNN, nn.RNN, the case's generator): the case's module in float64 on `device`, both
    with weights uniform in +-weight_scale / sqrt(hidden_size) drawn from the case's generator."""
    ours, reference = ours_and_reference(
        case.input_size,
        case.hidden_size,
        case.num_layers,
        case.nonlinearity,
        bias=case.bias,
        batch_first=case.batch_first,
        bidirectional=case.bidirectional,
        dtype=torch.float64,
        device=device,
    )
    generator = torch.Generator().manual_seed(case.seed)
    bound = case.weight_scale / math.sqrt(case.hidden_size)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(
                torch.rand(parameter.shape, generator=generator, dtype=torch.float64) * 2 * bound - bound
            )
    ours.load_state_dict(reference.state_dict())
    for module in (ours, reference):
        module.requires_grad_(case.grad_params)
    return ours, reference, generator


def _inputs(case: Case, generator: torch.Generator, device):
    """The logical input and hx values (hx is None when the case passes none)."""
    directions = 2 if case.bidirectional else 1
    if case.form == "unbatched":
        x = _random(generator, (case.steps, case.input_size), device)
        hx = _random(generator, (case.num_layers * directions, case.hidden_size), device)
    else:
        shape = (
            (case.batch, case.steps, case.input_size)
            if case.batch_first
            else (case.steps, case.batch, case.input_size)
        )
        x = _random(generator, shape, device)
        hx = _random(generator, (case.num_layers * directions, case.batch, case.hidden_size), device)
    return x, (hx if case.with_hx else None)


def _run(module, case: Case, x_logical, hx_logical, cotangent_seed: int):
    """Forward + backward of one module on its own copies of the inputs. Returns a dict of every
    tensor to compare."""
    batched = case.form != "unbatched"
    x_leaf = _leaf(x_logical, case.input_layout, (0 if case.batch_first else 1) if batched else 0)
    x_leaf.requires_grad_(case.grad_input)
    x = _view(x_leaf, x_logical.shape, case.input_layout)
    hx_leaf = hx = None
    if hx_logical is not None:
        hx_leaf = _leaf(hx_logical, case.hx_layout, 1 if batched else 0)
        hx_leaf.requires_grad_(case.grad_hx)
        hx = _view(hx_leaf, hx_logical.shape, case.hx_layout)
    if case.form.startswith("packed"):
        x = pack_padded_sequence(
            x,
            torch.tensor(case.lengths),
            batch_first=case.batch_first,
            enforce_sorted=case.form == "packed_sorted",
        )
    output, h_n = module(x, hx)
    result = {"h_n": h_n}
    if isinstance(output, PackedSequence):
        result.update(
            output=output.data,
            batch_sizes=output.batch_sizes,
            sorted_indices=output.sorted_indices,
            unsorted_indices=output.unsorted_indices,
        )
        output = output.data
    else:
        result["output"] = output
    result["requires_grad"] = (output.requires_grad, h_n.requires_grad)
    leaves = [("grad_input", x_leaf)] if case.grad_input else []
    if hx_leaf is not None and case.grad_hx:
        leaves.append(("grad_hx", hx_leaf))
    if case.grad_params:
        leaves += [(f"grad_{name}", p) for name, p in module.named_parameters()]
    if leaves:
        generator = torch.Generator().manual_seed(cotangent_seed)
        grad_output = _random(generator, output.shape, output.device)
        grad_h_n = _random(generator, h_n.shape, h_n.device)
        loss = (output * grad_output).sum() + (h_n * grad_h_n).sum()
        grads = torch.autograd.grad(loss, [t for _, t in leaves], allow_unused=True)
        for (name, _), grad in zip(leaves, grads):
            result[name] = grad
    return result


def _assert_same(actual: dict, expected: dict, case: Case):
    assert actual.keys() == expected.keys(), case
    for name, want in expected.items():
        got = actual[name]
        if not isinstance(want, torch.Tensor) or want.dtype == torch.int64:
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want), (name, case)
            else:
                assert got == want, (name, case)
            continue
        assert got is not None, (name, case)
        assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device, (
            name,
            got.shape,
            want.shape,
            case,
        )
        if name in ("output", "h_n"):
            # Same memory layout as nn.RNN, so .view() on it works (or fails) the same way.
            strides = [s for s, n in zip(got.stride(), got.shape) if n > 1]
            want_strides = [s for s, n in zip(want.stride(), want.shape) if n > 1]
            assert strides == want_strides, (name, got.stride(), want.stride(), case)
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        torch.testing.assert_close(
            got,
            want,
            rtol=TOLERANCE,
            atol=TOLERANCE * scale,
            equal_nan=False,
            msg=lambda m: f"{name}: {m}\n{case}",  # noqa: B023 (used before the next iteration)
        )


def check_case(case: Case, device: str):
    ours, reference, generator = _ours_and_reference(case, device)
    x, hx = _inputs(case, generator, device)
    cotangent_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    expected = _run(reference, case, x, hx, cotangent_seed)
    actual = _run(ours, case, x, hx, cotangent_seed)
    _assert_same(actual, expected, case)


@pytest.mark.parametrize("form", FORMS)
@given(data=st.data())
def test_matches_nn_rnn(form, data, device):
    case = data.draw(cases(form), label="case")
    event(f"input_layout={case.input_layout}")
    event(f"layers={case.num_layers} bidirectional={case.bidirectional}")
    if case.batch == 0:
        event("batch=0")
    if case.steps == 1:
        event("steps=1")
    check_case(case, device)


@pytest.mark.parametrize(
    "case", EXPLICIT_CASES, ids=lambda c: f"{c.form}-T{c.steps}-B{c.batch}-{c.input_layout}"
)
def test_explicit_case(case, device):
    check_case(case, device)


def test_profile_is_known():
    """A typo in RNN_EXT_FUZZ_PROFILE must not silently fall back to some other profile."""
    assert PROFILE in ("fast", "long")
    assert settings.default.max_examples == EXAMPLES[PROFILE]
