"""Determinism: the same inputs give bitwise-identical outputs and gradients, call after call, on
every device the build has. Dropout is the one source of randomness, and it draws from torch's
generator: the same seed gives the same masks, hence again identical results."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext

REPEATS = 4

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str):
    """Every bit, so that -0.0 against 0.0 or two different NaN payloads also count as different."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    bits = _BITS[got.dtype]
    assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits)), (
        f"{what} differs between runs"
    )


CONFIGS = {
    # Rows past the CPU kernels' parallel grain, so the input projection and the input gradient
    # are split across threads; H past several column blocks.
    "padded": dict(input_size=64, hidden_size=72, num_layers=2, steps=40, batch=20),
    "bidirectional-relu": dict(
        input_size=16,
        hidden_size=33,
        num_layers=3,
        bidirectional=True,
        nonlinearity="relu",
        steps=25,
        batch=9,
    ),
    "packed-unsorted": dict(
        input_size=24,
        hidden_size=40,
        num_layers=2,
        bidirectional=True,
        steps=30,
        batch=11,
        lengths=[30, 3, 17, 30, 1, 9, 22, 5, 30, 12, 2],
    ),
    "batch-first-no-bias": dict(
        input_size=8, hidden_size=130, num_layers=1, batch_first=True, bias=False, steps=12, batch=70
    ),
}


def _run_once(module, config, dtype, device, seed=None):
    generator = torch.Generator().manual_seed(1000)
    steps, batch = config["steps"], config["batch"]
    shape = (batch, steps, module.input_size) if module.batch_first else (steps, batch, module.input_size)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    directions = 2 if module.bidirectional else 1
    hx = torch.randn(module.num_layers * directions, batch, module.hidden_size, generator=generator)
    hx = hx.to(device=device, dtype=dtype).requires_grad_()
    inp = x
    if "lengths" in config:
        inp = pack_padded_sequence(
            x, torch.tensor(config["lengths"]), batch_first=module.batch_first, enforce_sorted=False
        )
    if seed is not None:
        torch.manual_seed(seed)
    output, h_n = module(inp, hx)
    data = output.data if "lengths" in config else output
    grad_output = torch.randn(data.shape, generator=generator).to(device=device, dtype=dtype)
    grad_h_n = torch.randn(h_n.shape, generator=generator).to(device=device, dtype=dtype)
    params = list(module.parameters())
    grads = torch.autograd.grad([data, h_n], [x, hx, *params], [grad_output, grad_h_n])
    names = ["output", "h_n", "grad_input", "grad_hx"] + [f"grad_{n}" for n, _ in module.named_parameters()]
    return dict(zip(names, [data.detach(), h_n.detach(), *grads]))


def _module(config, dtype, device, dropout=0.0):
    kwargs = {k: v for k, v in config.items() if k not in ("steps", "batch", "lengths")}
    torch.manual_seed(5)
    return rnn_ext.RNN(**kwargs, dropout=dropout, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_repeated_calls_are_bitwise_identical(name, dtype, device):
    config = CONFIGS[name]
    module = _module(config, dtype, device)
    first = _run_once(module, config, dtype, device)
    assert any(t.abs().sum() > 0 for t in first.values()), "a trivial all-zero run proves nothing"
    for _ in range(REPEATS - 1):
        again = _run_once(module, config, dtype, device)
        assert again.keys() == first.keys()
        for key in first:
            assert_bitwise_equal(again[key], first[key], key)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fresh_module_copies_are_bitwise_identical(name, device):
    """A second module built the same way (same seed, same parameters) gives the same bits too:
    nothing depends on a module's history or on where its buffers happen to live."""
    config = CONFIGS[name]
    first = _run_once(_module(config, torch.float32, device), config, torch.float32, device)
    second = _run_once(_module(config, torch.float32, device), config, torch.float32, device)
    for key in first:
        assert_bitwise_equal(second[key], first[key], key)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cpu_bits_do_not_depend_on_the_thread_count(name):
    """The CPU kernels split rows and columns over torch's intra-op threads, never a reduction, so
    1, 2 or 4 threads give the same bits (the configs are large enough to be split)."""
    config = CONFIGS[name]
    threads_before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64):
                results[threads, dtype] = _run_once(_module(config, dtype, "cpu"), config, dtype, "cpu")
    finally:
        torch.set_num_threads(threads_before)
    for (threads, dtype), result in results.items():
        for key in result:
            assert_bitwise_equal(result[key], results[1, dtype][key], f"{key} ({threads} threads, {dtype})")


def test_dropout_is_identical_under_the_same_seed_only(device):
    config = dict(CONFIGS["padded"], num_layers=3)
    module = _module(config, torch.float32, device, dropout=0.5).train()
    first = _run_once(module, config, torch.float32, device, seed=77)
    again = _run_once(module, config, torch.float32, device, seed=77)
    for key in first:
        assert_bitwise_equal(again[key], first[key], key)
    other = _run_once(module, config, torch.float32, device, seed=78)
    assert not torch.equal(other["output"], first["output"]), "dropout ignored the generator's seed"
