"""The CPU engine's threading and kernel builds: every phase of a large layer runs on more than one
thread when torch has them (and on one when it has one), results match nn.RNN across the sizes
where the work splits change, and the AVX-512 and AVX2 kernel builds agree with the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from rnn_ext import _C

PHASES = (
    "input_projection",
    "forward_recurrence",
    "backward_recurrence",
    "input_gradient",
    "weight_gradient",
)


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _phase_masks(module, x):
    _C._cpu_phase_stats(reset=True)
    output, h_n = module(x)
    (output.sum() + h_n.sum()).backward()
    stats = _C._cpu_phase_stats(reset=True)
    for phase in PHASES:
        assert stats[phase]["calls"] >= 1, f"{phase} never ran"
        assert stats[phase]["seconds"] > 0
    return {phase: stats[phase]["thread_mask"] for phase in PHASES}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_every_phase_uses_two_threads(threads, bidirectional):
    """OpenMP teams must really start: built without -fopenmp, ATen's parallel_for and our teams
    run everything on the calling thread and the second thread's bit never appears."""
    threads(2)
    torch.manual_seed(0)
    module = rnn_ext.RNN(96, 256, bidirectional=bidirectional)
    x = torch.randn(20, 32, 96, requires_grad=True)
    masks = _phase_masks(module, x)
    assert masks == {phase: 0b11 for phase in PHASES}, masks


def test_one_thread_stays_on_the_caller(threads):
    threads(1)
    module = rnn_ext.RNN(96, 256)
    masks = _phase_masks(module, torch.randn(20, 32, 96, requires_grad=True))
    assert masks == {phase: 0b1 for phase in PHASES}, masks


def test_small_steps_are_not_split(threads):
    """A seed-sized layer's steps stay on one thread: a barrier per step would cost more than the
    step (the recurrence of a batch of one is latency, not arithmetic)."""
    threads(2)
    module = rnn_ext.RNN(1, 32)
    masks = _phase_masks(module, torch.randn(50, 1, 1, requires_grad=True))
    assert masks["forward_recurrence"] == 0b1
    assert masks["backward_recurrence"] == 0b1


def test_phase_stats_reset():
    rnn_ext.RNN(4, 8)(torch.randn(3, 2, 4))
    assert _C._cpu_phase_stats(reset=True)["input_projection"]["calls"] >= 1
    stats = _C._cpu_phase_stats()
    assert all(entry == {"calls": 0, "seconds": 0.0, "thread_mask": 0} for entry in stats.values())


# Sizes on both sides of the engine's thresholds: tiny products on the packed kernel, large ones
# in BLAS parts, steps split by column units or not, widths that end inside a column panel.
SHAPES = [
    dict(steps=9, batch=1, input_size=1, hidden_size=32, num_layers=1),
    dict(steps=7, batch=7, input_size=33, hidden_size=48, num_layers=2, bidirectional=True),
    dict(steps=11, batch=64, input_size=70, hidden_size=130, num_layers=1),
    dict(steps=5, batch=20, input_size=64, hidden_size=300, num_layers=2, bidirectional=True),
    dict(steps=6, batch=33, input_size=40, hidden_size=96, num_layers=1, nonlinearity="relu"),
    dict(
        steps=12,
        batch=9,
        input_size=16,
        hidden_size=200,
        num_layers=1,
        bidirectional=True,
        lengths=[12, 3, 7, 12, 1, 9, 5, 2, 11],
    ),
]


@pytest.mark.parametrize("thread_count", [1, 2, 3])
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_matches_nn_rnn_in_float64(threads, index, thread_count):
    threads(thread_count)
    shape = dict(SHAPES[index])
    steps, batch, lengths = shape.pop("steps"), shape.pop("batch"), shape.pop("lengths", None)
    torch.manual_seed(index)
    reference = nn.RNN(**shape, dtype=torch.float64)
    candidate = rnn_ext.RNN(**shape, dtype=torch.float64)
    candidate.load_state_dict(reference.state_dict())
    directions = 2 if shape.get("bidirectional") else 1
    x = torch.randn(steps, batch, shape["input_size"], dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(
        shape["num_layers"] * directions, batch, shape["hidden_size"], dtype=torch.float64, requires_grad=True
    )
    results = []
    for module in (reference, candidate):
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        output, h_n = module(inp, h0)
        data = output if lengths is None else output.data
        torch.manual_seed(99)
        grads = torch.autograd.grad(
            (data, h_n), (x, h0, *module.parameters()), (torch.randn_like(data), torch.randn_like(h_n))
        )
        results.append((data.detach(), h_n.detach(), *grads))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


_KERNEL_PROBE = """
import torch, rnn_ext
torch.manual_seed(3)
reference = torch.nn.RNN(48, 300, dtype=torch.float64)
candidate = rnn_ext.RNN(48, 300)
candidate.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
x = torch.randn(40, 13, 48, dtype=torch.float64)
want, _ = reference(x)
got, _ = candidate(x.float())
errors = [((got.double() - want).abs().max() / want.abs().max()).item()]
# The weight gradients read dP through the kernel's transposed view of A.
upstream = torch.randn_like(want)
for a, b in zip(torch.autograd.grad(want, list(reference.parameters()), upstream),
                torch.autograd.grad(got, list(candidate.parameters()), upstream.float())):
    errors.append(((b.double() - a).abs().max() / a.abs().max()).item())
print(max(errors))
"""


@pytest.mark.parametrize("disable_avx512", [False, True])
def test_kernel_builds_match_the_float64_reference(disable_avx512):
    """The AVX-512 build (where the CPU has it) and the AVX2 build (RNN_EXT_NO_AVX512=1) both stay
    at float32 accuracy on a width that ends inside a column panel, forward and weight gradients."""
    env = dict(os.environ)
    env.pop("RNN_EXT_NO_AVX512", None)
    if disable_avx512:
        env["RNN_EXT_NO_AVX512"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _KERNEL_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert float(result.stdout.strip()) < 2e-5


_SMALL_TEAM_PROBE = """
import torch, rnn_ext
torch.manual_seed(0)
torch.set_num_threads(2)
for bidirectional in (False, True):
    ours = rnn_ext.RNN(16, 32, 2, bidirectional=bidirectional, dtype=torch.float64)
    theirs = torch.nn.RNN(16, 32, 2, bidirectional=bidirectional, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(20, 4, 16, dtype=torch.float64, requires_grad=True)
    out, h_n = ours(x)
    ref_out, ref_h_n = theirs(x)
    grad_ours = torch.autograd.grad((out.sum() + h_n.sum()), [x, *ours.parameters()])
    grad_theirs = torch.autograd.grad((ref_out.sum() + ref_h_n.sum()), [x, *theirs.parameters()])
    worst = max((a - b).abs().max().item()
                for a, b in zip((out, h_n, *grad_ours), (ref_out, ref_h_n, *grad_theirs)))
    assert worst < 1e-10, (bidirectional, worst)
print("ok")
"""


def test_a_smaller_team_than_asked_for_still_computes_every_direction():
    """OpenMP may grant fewer threads than torch asks for (OMP_THREAD_LIMIT, OMP_DYNAMIC): every
    direction and gradient must still be computed."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    result = subprocess.run(
        [sys.executable, "-c", _SMALL_TEAM_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch", [64, 20, 13, 3])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(threads, batch, nonlinearity):
    """The recurrence kernel cuts a step's rows into register blocks by the batch size (and gives one
    to three rows wider column strips): each sample of a batch must get the same float32 bits as the
    sample run alone, whatever block its row falls in, on one thread and on two (where the larger
    batches' steps are split by columns). The width ends inside a column panel."""
    torch.manual_seed(batch)
    module = rnn_ext.RNN(1, 200, nonlinearity=nonlinearity)
    # Few enough multiply-adds that the input projection also runs on the packed kernel.
    x = torch.randn(4, batch, 1)
    h0 = torch.randn(1, batch, 200)
    for thread_count in (1, 2):
        threads(thread_count)
        with torch.no_grad():
            output, h_n = module(x, h0)
            for b in range(batch):
                alone, alone_h_n = module(x[:, b : b + 1], h0[:, b : b + 1])
                assert torch.equal(output[:, b : b + 1], alone), (thread_count, b)
                assert torch.equal(h_n[:, b : b + 1], alone_h_n), (thread_count, b)


@pytest.mark.parametrize("batch", [1, 8, 16, 20, 32, 64])
def test_common_batch_sizes_match_the_float64_reference(threads, batch):
    """float32 on the kernels at the batch sizes people use, forward and backward, against nn.RNN in
    float64, with the same bits on one thread and on two."""
    torch.manual_seed(batch)
    reference = nn.RNN(24, 272, 2, dtype=torch.float64)
    candidate = rnn_ext.RNN(24, 272, 2)
    candidate.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    x = torch.randn(6, batch, 24, dtype=torch.float64)
    h0 = torch.randn(2, batch, 272, dtype=torch.float64)
    want, want_h_n = reference(x, h0)
    want_grads = torch.autograd.grad(want.square().sum() + want_h_n.sum(), list(reference.parameters()))
    runs = []
    for thread_count in (1, 2):
        threads(thread_count)
        got, got_h_n = candidate(x.float(), h0.float())
        grads = torch.autograd.grad(got.square().sum() + got_h_n.sum(), list(candidate.parameters()))
        runs.append((got, got_h_n, *grads))
    for one, two in zip(*runs):
        assert torch.equal(one, two)
    for got, wanted in zip(runs[0], (want, want_h_n, *want_grads)):
        scale = wanted.abs().max().item()
        assert (got.double() - wanted).abs().max().item() <= 2e-5 * max(scale, 1.0)
