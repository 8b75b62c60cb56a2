"""bfloat16 on the CPU: rnn_ext's bf16 outputs and gradients against a float64 reference computed
on the same (rounded) inputs, next to nn.RNN's own bf16 on those inputs; rnn_ext must be no less
accurate. Both kernel paths run: the AVX-512 BF16 kernels (where the CPU has avx512_bf16) and the
float32 path that RNN_EXT_NO_BF16 forces. The slow tier trains in bf16 under autocast and compares
the final loss with float32 training."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from rnn_ext import machine

HAS_BF16_KERNELS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= machine.cpu_flags()

PATHS = [
    pytest.param(
        "bf16-kernels",
        marks=pytest.mark.skipif(not HAS_BF16_KERNELS, reason="the CPU has no avx512_bf16"),
    ),
    "float32-path",
]


@pytest.fixture(params=PATHS)
def kernel_path(request, monkeypatch):
    if request.param == "float32-path":
        monkeypatch.setenv("RNN_EXT_NO_BF16", "1")
    else:
        monkeypatch.delenv("RNN_EXT_NO_BF16", raising=False)
    return request.param


def test_cpu_kernel_reports_the_bf16_path(monkeypatch):
    monkeypatch.delenv("RNN_EXT_NO_BF16", raising=False)
    kernel = rnn_ext._C.cpu_kernel()
    assert kernel.endswith("+BF16") == (HAS_BF16_KERNELS and "RNN_EXT_NO_AVX512" not in os.environ)
    monkeypatch.setenv("RNN_EXT_NO_BF16", "1")
    assert not rnn_ext._C.cpu_kernel().endswith("+BF16")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64: a norm, not a maximum, so that a relu unit whose
    derivative flips under rounding (in any implementation) does not decide the comparison."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


# (T, B, I, H, layers, bidirectional, nonlinearity, lengths or None)
CONFIGS = {
    "short": (20, 8, 16, 64, 1, False, "tanh", None),
    "odd-sizes-bidir": (15, 5, 7, 33, 2, True, "tanh", None),
    "relu-3-layers": (25, 9, 16, 48, 3, False, "relu", None),
    "packed-bidir": (30, 6, 12, 40, 2, True, "tanh", [30, 3, 17, 30, 1, 9]),
    "wide-split-steps": (12, 48, 64, 256, 1, False, "tanh", None),
    # H = 2050: the step's depth takes two slices of the kernel (1024 pairs, then 1), the fused
    # activation and rounding run on the second.
    "deep-state": (4, 3, 16, 2050, 1, False, "tanh", None),
    "long-1000": (1000, 4, 8, 32, 1, False, "tanh", None),
    "long-1000-relu-bidir": (1000, 2, 8, 24, 2, True, "relu", None),
}


def _compare(config, kernel_path):
    steps, batch, input_size, hidden, layers, bidirectional, nonlinearity, lengths = config
    torch.manual_seed(0)
    kwargs = dict(
        input_size=input_size,
        hidden_size=hidden,
        num_layers=layers,
        bidirectional=bidirectional,
        nonlinearity=nonlinearity,
    )
    reference = nn.RNN(**kwargs).double()
    if nonlinearity == "relu":
        # A contracting recurrence: relu states neither vanish nor explode over 1000 steps.
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if "weight_hh" in name:
                    p.mul_(0.7)
    with torch.no_grad():  # the bf16 values are the inputs of every side
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    ext = rnn_ext.RNN(**kwargs).to(torch.bfloat16)
    ext.load_state_dict(reference.state_dict())
    theirs = nn.RNN(**kwargs).to(torch.bfloat16)
    theirs.load_state_dict(reference.state_dict())

    directions = 2 if bidirectional else 1
    x = torch.randn(steps, batch, input_size).to(torch.bfloat16)
    h0 = (0.5 * torch.randn(layers * directions, batch, hidden)).to(torch.bfloat16)

    def run(module, dtype):
        xi = x.to(dtype).requires_grad_()
        hi = h0.to(dtype).requires_grad_()
        inp = pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=False) if lengths else xi
        out, h_n = module(inp, hi)
        data = out.data if lengths else out
        return xi, hi, data, h_n

    results = {}
    grad_out = grad_h_n = None
    for name, module, dtype in (
        ("reference", reference, torch.float64),
        ("rnn_ext", ext, torch.bfloat16),
        ("nn.RNN", theirs, torch.bfloat16),
    ):
        xi, hi, data, h_n = run(module, dtype)
        if grad_out is None:
            generator = torch.Generator().manual_seed(1)
            grad_out = torch.randn(data.shape, generator=generator).to(torch.bfloat16)
            grad_h_n = torch.randn(h_n.shape, generator=generator).to(torch.bfloat16)
        params = list(module.parameters())
        grads = torch.autograd.grad([data, h_n], [xi, hi, *params], [grad_out.to(dtype), grad_h_n.to(dtype)])
        names = ["output", "h_n", "grad_input", "grad_hx"]
        names += [f"grad_{n}" for n, _ in module.named_parameters()]
        results[name] = dict(zip(names, [data.detach(), h_n.detach(), *grads]))

    failures = []
    for key, want in results["reference"].items():
        ours = _relative_error(results["rnn_ext"][key], want)
        theirs_error = _relative_error(results["nn.RNN"][key], want)
        print(f"{kernel_path:>13} {key:<22} rnn_ext {ours:.3e}  nn.RNN {theirs_error:.3e}")
        assert results["rnn_ext"][key].dtype == torch.bfloat16
        # No less accurate than nn.RNN's bf16, up to a quarter of its error (both are a handful of
        # bf16 roundings; which of two equally good sums lands closer varies from tensor to tensor),
        # plus an absolute floor of one bf16 unit for tensors both compute almost exactly.
        if not ours <= 1.25 * theirs_error + 2.0**-8:
            failures.append(f"{key}: rnn_ext {ours:.3e} vs nn.RNN {theirs_error:.3e}")
    assert not failures, failures
    return results


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("long")])
def test_bf16_no_less_accurate_than_nn_rnn(name, kernel_path):
    _compare(CONFIGS[name], kernel_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("long")])
def test_bf16_long_sequences_no_less_accurate_than_nn_rnn(name, kernel_path):
    _compare(CONFIGS[name], kernel_path)


def test_bf16_kernels_match_the_float32_path_closely(monkeypatch):
    """The two paths compute the same function: their outputs agree to a few bf16 units."""
    if not HAS_BF16_KERNELS:
        pytest.skip("the CPU has no avx512_bf16")
    torch.manual_seed(3)
    module = rnn_ext.RNN(24, 70, num_layers=2, bidirectional=True).to(torch.bfloat16)
    x = torch.randn(17, 5, 24).to(torch.bfloat16)
    monkeypatch.delenv("RNN_EXT_NO_BF16", raising=False)
    fast, _ = module(x)
    monkeypatch.setenv("RNN_EXT_NO_BF16", "1")
    slow, _ = module(x)
    assert (fast.float() - slow.float()).abs().max().item() < 0.05
    assert _relative_error(fast, slow) < 1e-2


# ---- bf16 training under autocast ends near float32 training (slow tier) ----


def _sine_to_cosine_losses(seed: int, autocast: bool, rnn_class=rnn_ext.RNN, steps: int = 200):
    """The examples/sine_to_cosine.py model and schedule (hidden state carried from window to
    window); the loss of every step."""
    torch.manual_seed(seed)
    rnn = rnn_class(1, 32, batch_first=True)
    out = nn.Linear(32, 1)
    params = list(rnn.parameters()) + list(out.parameters())
    optimizer = torch.optim.Adam(params, lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    window = torch.linspace(0, math.pi, 10)
    losses, h = [], None
    for step in range(steps):
        t = step * math.pi + window
        x, y = torch.sin(t)[None, :, None], torch.cos(t)[None, :, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            r, h = rnn(x, h)
            prediction = out(r)
        h = h.detach().float()
        loss = nn.functional.mse_loss(prediction.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def _mean(values):
    return sum(values) / len(values)


def _char_lm_loss(seed: int, autocast: bool, steps: int = 150) -> float:
    """A small character model (embedding, 2-layer rnn_ext.RNN, linear read-out) on a repetitive
    text; the mean loss of the last 10 steps."""
    text = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 8
    vocabulary = sorted(set(text))
    codes = torch.tensor([vocabulary.index(c) for c in text])
    torch.manual_seed(seed)
    embed = nn.Embedding(len(vocabulary), 32)
    rnn = rnn_ext.RNN(32, 128, num_layers=2)
    head = nn.Linear(128, len(vocabulary))
    params = list(embed.parameters()) + list(rnn.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    steps_per_sequence, batch = 40, 16
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(codes) - steps_per_sequence - 1, (batch,), generator=generator)
        window = torch.stack([codes[s : s + steps_per_sequence + 1] for s in starts.tolist()], 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden, _ = rnn(embed(window[:-1]))
            logits = head(hidden)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), window[1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_char_lm_training_ends_within_3_percent_of_float32(seed, kernel_path):
    float32 = _char_lm_loss(seed, autocast=False)
    bf16 = _char_lm_loss(seed, autocast=True)
    print(f"char-LM seed {seed} {kernel_path}: float32 {float32:.4e}  bf16 {bf16:.4e}")
    assert abs(bf16 - float32) <= 0.03 * float32


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_sine_to_cosine_training_converges(seed, kernel_path):
    """The sine -> cosine model carries its hidden state across windows, and in bf16 its final loss
    lands anywhere within a few times the float32 one, for nn.RNN's own bf16 as for rnn_ext's
    (seeds 0-2: 0.3x to 6x), so the final losses are printed, not held to 3%. What is held: bf16
    training under autocast learns (its loss falls to under a quarter of its first steps', as the
    float32 run's does) and ends within a factor of 10 of the float32 run."""
    float32 = _sine_to_cosine_losses(seed, autocast=False)
    bf16 = _sine_to_cosine_losses(seed, autocast=True)
    theirs = _sine_to_cosine_losses(seed, autocast=True, rnn_class=nn.RNN)
    print(
        f"sine->cosine seed {seed} {kernel_path}: last-20 mean loss float32 {_mean(float32[-20:]):.4e}"
        f"  rnn_ext bf16 {_mean(bf16[-20:]):.4e}  nn.RNN bf16 {_mean(theirs[-20:]):.4e}"
    )
    assert all(math.isfinite(loss) for loss in bf16)
    assert _mean(bf16[-20:]) < 0.25 * _mean(bf16[:20])
    assert _mean(bf16[-20:]) < 10 * _mean(float32[-20:])


@pytest.mark.parametrize(
    "config",
    [
        (12, 48, 64, 256, 1, False, "tanh"),  # steps split by columns over the team
        (9, 20, 40, 70, 2, True, "relu"),  # directions side by side, a partial panel
        (30, 64, 96, 130, 1, False, "tanh"),  # parallel projection, 64-row blocks, odd panels
        (3, 24, 32, 2050, 1, False, "relu"),  # a step's depth in two slices, split steps
    ],
)
def test_bf16_kernel_bits_do_not_depend_on_the_thread_count(config, monkeypatch):
    """The bf16 kernels (forward step with its fused activation and rounding, the backward step,
    the kernel's products) give the same bits on 1, 2 and 3 threads. The products after the
    backward loop are held to the kernel (RNN_EXT_BF16_GEMM=kernel): above 1M multiply-adds they
    otherwise go to oneDNN, whose own bits are oneDNN's business."""
    if not HAS_BF16_KERNELS or "RNN_EXT_NO_AVX512" in os.environ:
        pytest.skip("the bf16 kernels are not in use (no avx512_bf16, or RNN_EXT_NO_AVX512 set)")
    monkeypatch.delenv("RNN_EXT_NO_BF16", raising=False)
    monkeypatch.setenv("RNN_EXT_BF16_GEMM", "kernel")
    steps, batch, input_size, hidden, layers, bidirectional, nonlinearity = config
    torch.manual_seed(5)
    module = rnn_ext.RNN(
        input_size, hidden, layers, bidirectional=bidirectional, nonlinearity=nonlinearity
    ).to(torch.bfloat16)
    directions = 2 if bidirectional else 1
    x = torch.randn(steps, batch, input_size).to(torch.bfloat16)
    h0 = (0.5 * torch.randn(layers * directions, batch, hidden)).to(torch.bfloat16)
    grad_out = torch.randn(steps, batch, directions * hidden).to(torch.bfloat16)
    grad_h_n = torch.randn(layers * directions, batch, hidden).to(torch.bfloat16)

    def run():
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = module(xi, hi)
        grads = torch.autograd.grad([out, h_n], [xi, hi, *module.parameters()], [grad_out, grad_h_n])
        return [out.detach(), h_n.detach(), *grads]

    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = run()
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for want, got in zip(results[1], results[threads]):
            assert torch.equal(want, got), threads
