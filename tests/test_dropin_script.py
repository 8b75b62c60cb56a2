"""rnn_ext.RNN under TorchScript: torch.jit.script (tensor and PackedSequence input, hx or not),
save/load (also in a fresh process), and torch.jit.trace with its default checks; values against
eager rnn_ext and nn.RNN."""

import io
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from helpers import DEVICES, assert_all_close, float64_pair

# CUDA cases are listed (and skipped) everywhere, so that a run without a GPU says so.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pair(device="cpu", **kwargs):
    return float64_pair(3, 4, device=device, **kwargs)


class Holder(nn.Module):
    """Scripted nn.RNN (and so rnn_ext.RNN) is called from TorchScript code, whose argument types
    pick its Tensor or PackedSequence forward: a holder module is the smallest such caller."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, hx: Optional[torch.Tensor] = None):
        return self.rnn(x, hx)


class Tagger(nn.Module):
    """A model holding a recurrent layer, as users write them."""

    def __init__(self, rnn_type):
        super().__init__()
        self.rnn = rnn_type(3, 4, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, hx: Optional[torch.Tensor] = None):
        output, h_n = self.rnn(x, hx)
        return self.head(output), h_n


class PackedTagger(nn.Module):
    def __init__(self, rnn_type):
        super().__init__()
        self.rnn = rnn_type(3, 4, num_layers=2, bidirectional=True)

    def forward(self, x: PackedSequence, hx: Optional[torch.Tensor] = None):
        output, h_n = self.rnn(x, hx)
        return output.data, h_n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_layers=2, bidirectional=True, batch_first=True),
        dict(nonlinearity="relu", num_layers=3, bias=False),
    ],
)
def test_scripted_rnn_matches_eager_and_nn_rnn(device, kwargs):
    ours, theirs = make_pair(device, **kwargs)
    scripted = torch.jit.script(Holder(ours))
    scripted_theirs = torch.jit.script(Holder(theirs))
    directions = 2 if kwargs.get("bidirectional") else 1
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    hx = torch.randn(
        kwargs.get("num_layers", 1) * directions,
        2 if kwargs.get("batch_first") else 5,
        4,
        dtype=torch.float64,
        device=device,
    )
    for args in [(x,), (x, hx), (x[0],), (x[0], hx[:, 0])]:
        expected = theirs(*args)
        assert_all_close(scripted(*args), expected)
        assert_all_close(ours(*args), expected)
        assert_all_close(scripted_theirs(*args), expected)
    # gradients through the scripted module are the fused backward's
    x.requires_grad_(True)
    scripted(x)[0].sin().sum().backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    dx = x.grad.clone()
    x.grad = None
    theirs(x)[0].sin().sum().backward()
    assert_all_close(grads, [p.grad for p in theirs.parameters()])
    torch.testing.assert_close(dx, x.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_hx", [False, True])
def test_scripted_packed_model_matches_nn_rnn(device, with_hx):
    torch.manual_seed(0)
    ours = PackedTagger(rnn_ext.RNN).to(device=device, dtype=torch.float64)
    theirs = PackedTagger(nn.RNN).to(device=device, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    scripted = torch.jit.script(ours)
    padded = torch.randn(5, 3, 3, dtype=torch.float64, device=device)
    sequence = pack_padded_sequence(padded, torch.tensor([5, 2, 4]), enforce_sorted=False)
    hx = torch.randn(4, 3, 4, dtype=torch.float64, device=device) if with_hx else None
    assert_all_close(scripted(sequence, hx), theirs(sequence, hx))


def test_scripted_model_save_load_round_trip_and_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = Tagger(rnn_ext.RNN).double()
    reference = Tagger(nn.RNN).double()
    reference.load_state_dict(model.state_dict())
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    hx = torch.randn(4, 2, 4, dtype=torch.float64)
    assert_all_close(loaded(x), reference(x))
    assert_all_close(loaded(x, hx), reference(x, hx))

    path = tmp_path / "tagger.pt"
    torch.jit.save(scripted, str(path))
    torch.save({"x": x, "expected": reference(x)}, tmp_path / "io.pt")
    program = textwrap.dedent(f"""
        import torch, rnn_ext  # rnn_ext registers the operators the saved graph calls
        model = torch.jit.load({str(path)!r})
        data = torch.load({str(tmp_path / "io.pt")!r})
        out, h_n = model(data["x"])
        torch.testing.assert_close(out, data["expected"][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h_n, data["expected"][1], rtol=1e-10, atol=1e-10)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # Without the operators registered the graph cannot run: C++ must load the extension library too.
    without = textwrap.dedent(f"""
        import torch
        torch.jit.load({str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, cwd="/")
    assert result.returncode != 0 and "rnn_ext::elman_stack" in result.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_trace_passes_default_checks_and_generalises(device):
    torch.manual_seed(0)
    model = Tagger(rnn_ext.RNN).to(device=device, dtype=torch.float64)
    reference = Tagger(nn.RNN).to(device=device, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 6, 3, dtype=torch.float64, device=device)
    traced = torch.jit.trace(model, (x,))  # check_trace=True by default
    assert any(node.kind() == "rnn_ext::elman_stack" for node in traced.rnn.graph.nodes())
    other = torch.randn(3, 4, 3, dtype=torch.float64, device=device)  # another batch and length
    assert_all_close(traced(x), reference(x))
    assert_all_close(traced(other), reference(other))
    assert_all_close(torch.jit.trace(reference, (x,))(other), reference(other))
    with torch.no_grad():
        assert_all_close(traced(other), reference(other))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    assert_all_close(torch.jit.load(buffer)(other), reference(other))


def test_scripted_output_is_safe_to_modify_in_place():
    ours, theirs = make_pair()
    scripted = torch.jit.script(Holder(ours))
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    output, _ = scripted(x)
    output += 1.0  # the op saved its output for backward; the caller holds a copy
    output.sin().sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    output, _ = theirs(x)
    output += 1.0
    output.sin().sum().backward()
    torch.testing.assert_close(expected_grad, x.grad, rtol=1e-10, atol=1e-10)


def test_scripted_bad_input_raises_nn_rnn_error():
    ours, theirs = make_pair()
    scripted, scripted_theirs = torch.jit.script(Holder(ours)), torch.jit.script(Holder(theirs))
    x = torch.randn(5, 2, 7, dtype=torch.float64)
    errors = []
    for module in (scripted, scripted_theirs):
        with pytest.raises(Exception) as info:
            module(x)
        errors.append(info)
    assert errors[0].type is errors[1].type
    assert "input.size(-1) must be equal to input_size. Expected 3, got 7" in str(errors[0].value)
    assert "input.size(-1) must be equal to input_size. Expected 3, got 7" in str(errors[1].value)
