"""ONNX export of rnn_ext.RNN with both torch exporters, run in onnxruntime on shapes other than the
exported ones, against nn.RNN (float32, 1e-5)."""

import io
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

LEGACY_GRID = list(
    itertools.product(["tanh", "relu"], [1, 2, 3], [False, True], [False, True], [False, True])
)
# The dynamo exporter is slow: a covering subset (every value of every axis, each pair of
# layers x bidirectional).
DYNAMO_GRID = [
    ("tanh", 1, False, False, False),
    ("relu", 1, True, True, True),
    ("tanh", 2, True, False, True),
    ("relu", 2, False, True, False),
    ("tanh", 3, False, True, True),
    ("relu", 3, True, False, False),
]


class WithHx(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx):
        return self.rnn(x, hx)


class WithoutHx(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)


def make_case(nonlinearity, layers, bidirectional, batch_first, with_hx, seed=0):
    torch.manual_seed(seed)
    ours = rnn_ext.RNN(
        3,
        5,
        num_layers=layers,
        nonlinearity=nonlinearity,
        bidirectional=bidirectional,
        batch_first=batch_first,
    ).eval()
    theirs = nn.RNN(
        3,
        5,
        num_layers=layers,
        nonlinearity=nonlinearity,
        bidirectional=bidirectional,
        batch_first=batch_first,
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    wrap = WithHx if with_hx else WithoutHx
    return wrap(ours), wrap(theirs)


def sample_inputs(layers, bidirectional, batch_first, with_hx, batch, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, steps, 3) if batch_first else (steps, batch, 3)
    x = torch.randn(shape, generator=generator)
    if not with_hx:
        return (x,)
    return x, torch.randn(layers * (2 if bidirectional else 1), batch, 5, generator=generator)


def run_in_onnxruntime(model_bytes, names, inputs):
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})


def rnn_nodes(model_bytes):
    graph = onnx.load_from_string(model_bytes).graph
    return [node for node in graph.node if node.op_type == "RNN"]


def check_against_nn_rnn(model_bytes, names, theirs, layers, bidirectional, batch_first, with_hx):
    for batch, steps, seed in [(2, 7, 1), (4, 3, 2), (1, 11, 3)]:
        inputs = sample_inputs(layers, bidirectional, batch_first, with_hx, batch, steps, seed)
        got = run_in_onnxruntime(model_bytes, names, inputs)
        with torch.no_grad():
            expected = theirs(*inputs)
        assert len(got) == 2
        for value, want in zip(got, expected):
            torch.testing.assert_close(torch.from_numpy(value), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", LEGACY_GRID)
def test_legacy_exporter_writes_onnx_rnn_nodes_that_match_nn_rnn(case):
    nonlinearity, layers, bidirectional, batch_first, with_hx = case
    ours, theirs = make_case(*case)
    example = sample_inputs(layers, bidirectional, batch_first, with_hx, 2, 5, 0)
    batch_axis, steps_axis = (0, 1) if batch_first else (1, 0)
    names = ["x", "hx"][: len(example)]
    dynamic_axes = {
        "x": {batch_axis: "batch", steps_axis: "steps"},
        "output": {batch_axis: "batch", steps_axis: "steps"},
        "h_n": {1: "batch"},
    }
    if with_hx:
        dynamic_axes["hx"] = {1: "batch"}
    buffer = io.BytesIO()
    torch.onnx.export(
        ours,
        example,
        buffer,
        dynamo=False,
        input_names=names,
        output_names=["output", "h_n"],
        dynamic_axes=dynamic_axes,
    )
    model_bytes = buffer.getvalue()
    nodes = rnn_nodes(model_bytes)
    assert len(nodes) == layers
    for node in nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["activations"] == [nonlinearity.capitalize().encode()] * (2 if bidirectional else 1)
    check_against_nn_rnn(model_bytes, names, theirs, layers, bidirectional, batch_first, with_hx)


@pytest.mark.parametrize("case", DYNAMO_GRID)
def test_dynamo_exporter_writes_onnx_rnn_nodes_with_dynamic_length(case):
    nonlinearity, layers, bidirectional, batch_first, with_hx = case
    ours, theirs = make_case(*case)
    example = sample_inputs(layers, bidirectional, batch_first, with_hx, 2, 5, 0)
    batch_axis, steps_axis = (0, 1) if batch_first else (1, 0)
    batch, steps = torch.export.Dim("batch", min=1), torch.export.Dim("steps", min=1)
    dynamic_shapes = {"x": {batch_axis: batch, steps_axis: steps}}
    if with_hx:
        dynamic_shapes["hx"] = {1: batch}
    program = torch.onnx.export(ours, example, dynamo=True, dynamic_shapes=dynamic_shapes)
    model_bytes = program.model_proto.SerializeToString()
    assert len(rnn_nodes(model_bytes)) == layers
    names = [value.name for value in onnx.load_from_string(model_bytes).graph.input]
    check_against_nn_rnn(model_bytes, names, theirs, layers, bidirectional, batch_first, with_hx)


def test_nn_rnn_exports_the_same_way_with_the_legacy_exporter():
    # nn.RNN's own legacy export is what ours is held to; if torch changes it, this shows.
    _, theirs = make_case("tanh", 2, True, True, True)
    example = sample_inputs(2, True, True, True, 2, 5, 0)
    buffer = io.BytesIO()
    torch.onnx.export(
        theirs,
        example,
        buffer,
        dynamo=False,
        input_names=["x", "hx"],
        output_names=["output", "h_n"],
        dynamic_axes={"x": {0: "batch", 1: "steps"}, "hx": {1: "batch"}},
    )
    assert len(rnn_nodes(buffer.getvalue())) == 2
    check_against_nn_rnn(buffer.getvalue(), ["x", "hx"], theirs, 2, True, True, True)


@pytest.mark.parametrize("dynamo", [False, True])
def test_packed_sequence_export_is_refused_clearly(dynamo):
    ours = rnn_ext.RNN(3, 5).eval()

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = ours

        def forward(self, x, lengths):
            return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    example = (torch.randn(4, 2, 3), torch.tensor([4, 2]))
    with pytest.raises(Exception, match="ONNX export of a PackedSequence input is not supported"):
        torch.onnx.export(Packed(), example, io.BytesIO() if not dynamo else None, dynamo=dynamo)


def test_nn_rnn_exports_an_unrolled_graph_with_the_dynamo_exporter():
    # What ours is measured against: nn.RNN's dynamo export runs, but unrolled over the example's
    # length (no RNN node), so only that length runs.
    _, theirs = make_case("relu", 2, True, False, True)
    example = sample_inputs(2, True, False, True, 2, 5, 0)
    program = torch.onnx.export(theirs, example, dynamo=True)
    model_bytes = program.model_proto.SerializeToString()
    assert rnn_nodes(model_bytes) == []
    names = [value.name for value in onnx.load_from_string(model_bytes).graph.input]
    inputs = sample_inputs(2, True, False, True, 2, 5, 7)
    with torch.no_grad():
        expected = theirs(*inputs)
    for value, want in zip(run_in_onnxruntime(model_bytes, names, inputs), expected):
        torch.testing.assert_close(torch.from_numpy(value), want, rtol=1e-5, atol=1e-5)
