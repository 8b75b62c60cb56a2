"""The CUDA backend: agreement with the CPU op, every recurrence regime forced, half types against a
float64 truth, a non-default stream, CUDA-graph capture and replay, packed input, and indices past
2^31. Skipped as a whole without a GPU and a CUDA build of rnn_ext."""

import ctypes
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext
from helpers import (
    CUDA_REGIMES,
    assert_results_close,
    forced_regime_must_run,
    op_results,
    ours_and_reference,
    random_layer,
    relu_layer_away_from_zero,
    requires_cuda,
    rounded_to,
    stable_seed,
)

pytestmark = requires_cuda
elman_forward = torch.ops.rnn_ext.elman_forward
elman_backward = torch.ops.rnn_ext.elman_backward


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 is compared with a float64 truth at 1e-5: TF32 GEMMs would not meet it."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


LAYER_GRID = list(
    itertools.product(
        [1, 2],  # directions
        [False, True],  # packed
        [(True, False), (False, True)],  # (bias, relu)
        [5, 40],  # hidden: not a multiple of 4; several cooperative slices
    )
)


@pytest.mark.parametrize("directions,packed,bias_relu,hidden", LAYER_GRID)
def test_float64_matches_cpu(cuda_regime, directions, packed, bias_relu, hidden):
    bias, relu = bias_relu
    seed = stable_seed("float64", cuda_regime, directions, packed, bias_relu, hidden)
    layer = random_layer(
        seed, steps=7, batch=5, input_size=6, hidden=hidden, directions=directions, bias=bias, packed=packed
    )
    expected = op_results("cpu", torch.float64, layer, relu, seed)
    actual = op_results("cuda", torch.float64, layer, relu, seed)
    assert_results_close(actual, expected, 1e-10)


@pytest.mark.parametrize("directions,packed", [(1, False), (2, True)])
@pytest.mark.parametrize("hidden", [24, 130])
def test_float32_against_float64_truth(cuda_regime, directions, packed, hidden):
    seed = stable_seed("float32", cuda_regime, directions, packed, hidden)
    layer = random_layer(
        seed, steps=9, batch=6, input_size=7, hidden=hidden, directions=directions, bias=True, packed=packed
    )
    truth = op_results("cpu", torch.float64, rounded_to(layer, torch.float32), False, seed, torch.float32)
    actual = op_results("cuda", torch.float32, layer, False, seed)
    assert_results_close(actual, truth, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_half_types_against_float64_truth(cuda_regime, dtype, relu):
    seed = stable_seed("half", cuda_regime, str(dtype), relu)
    if relu:
        # Rounding moves the kernels' pre-activations (persistent regimes round them, step_gemm rounds
        # the state at every step) a few eps away from the truth's; near zero that would flip relu's
        # derivative, an O(1) gradient error of a correct kernel. These inputs keep them away from zero.
        layer = relu_layer_away_from_zero(seed, steps=8, batch=4, hidden=40, dtype=dtype)
    else:
        layer = random_layer(
            seed, steps=8, batch=4, input_size=5, hidden=40, directions=2, bias=True, packed=False
        )
    truth = op_results("cpu", torch.float64, rounded_to(layer, dtype), relu, seed, dtype)
    actual = op_results("cuda", dtype, layer, relu, seed)
    # Outputs and gradients are stored in the half type (2^-11 or 2^-8 relative) and the recurrence
    # carries the rounding on, so ~1e-2 relative; bfloat16's 8-bit mantissa needs a little more.
    assert_results_close(actual, truth, 1e-2 if dtype == torch.float16 else 3e-2)


@pytest.mark.parametrize("batch", [1, 3, 300])
def test_batch_tiles_and_groups(cuda_regime, batch):
    """Batch sizes around the register tiles (1, 2, 4, 8 rows) and far past one block's rows."""
    seed = stable_seed("batch", cuda_regime, batch)
    layer = random_layer(
        seed, steps=4, batch=batch, input_size=3, hidden=20, directions=2, bias=True, packed=True
    )
    expected = op_results("cpu", torch.float64, layer, False, seed)
    actual = op_results("cuda", torch.float64, layer, False, seed)
    assert_results_close(actual, expected, 1e-10)


def _driver_attribute(attribute):
    """An attribute of the current device from the CUDA driver: the limits the planner reads, which
    torch's device properties do not carry in every release."""
    driver = ctypes.CDLL("libcuda.so.1")
    device, value = ctypes.c_int(), ctypes.c_int()
    assert driver.cuDeviceGet(ctypes.byref(device), torch.cuda.current_device()) == 0
    assert driver.cuDeviceGetAttribute(ctypes.byref(value), attribute, device) == 0
    return value.value


CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH = 95
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97


@pytest.mark.parametrize("hidden", [256, 600, 1100])
@pytest.mark.parametrize("requested", CUDA_REGIMES)
def test_large_hidden(monkeypatch, hidden, requested):
    """Sizes where W_hh leaves one block (and at 1100 float32, possibly the chip): auto must pick a
    regime that runs; a forced regime refuses, with a clear error, exactly where the planner's
    arithmetic on this device's limits says it must (helpers.forced_regime_must_run, which the
    emulated tests hold against the planner), and otherwise runs correctly."""
    monkeypatch.setenv("RNN_EXT_CUDA_REGIME", requested)
    seed = stable_seed("large", hidden, requested)
    layer = random_layer(
        seed, steps=4, batch=3, input_size=8, hidden=hidden, directions=1, bias=True, packed=False
    )
    truth = op_results("cpu", torch.float64, rounded_to(layer, torch.float32), False, seed, torch.float32)
    must_run = forced_regime_must_run(
        requested,
        hidden,
        torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count,
        _driver_attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        _driver_attribute(CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH) != 0,
        torch.float32,
    )
    if not must_run:
        with pytest.raises(RuntimeError, match=f"RNN_EXT_CUDA_REGIME={requested} cannot run"):
            op_results("cuda", torch.float32, layer, False, seed)
        return
    actual = op_results("cuda", torch.float32, layer, False, seed)
    assert_results_close(actual, truth, 2e-5)


def test_matches_nn_rnn_on_cuda_packed_module():
    """rnn_ext.RNN on CUDA against nn.RNN on the CPU (float64), multi-layer, bidirectional, packed
    with unsorted lengths."""
    ours, reference = ours_and_reference(
        5, 12, num_layers=2, bidirectional=True, dtype=torch.float64, seed=stable_seed("module")
    )
    ours = ours.cuda()
    padded = torch.randn(9, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([3, 9, 1, 6])
    results = []
    for module, device in ((reference, "cpu"), (ours, "cuda")):
        x = padded.detach().to(device).clone().requires_grad_(True)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        output, h_n = module(packed)
        output, _ = pad_packed_sequence(output)
        (output.square().sum() + h_n.sum()).backward()
        results.append(
            [output.detach().cpu(), h_n.detach().cpu(), x.grad.cpu()]
            + [p.grad.cpu() for p in module.parameters()]
        )
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True])
def test_cpu_and_cuda_module_agree_float32(packed):
    torch.manual_seed(stable_seed("module32", packed))
    cpu = rnn_ext.RNN(4, 33, num_layers=2, nonlinearity="relu", batch_first=True)
    gpu = rnn_ext.RNN(4, 33, num_layers=2, nonlinearity="relu", batch_first=True).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(3, 6, 4)
    outputs = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        inputs = x.to(device)
        if packed:
            inputs = pack_padded_sequence(
                inputs, torch.tensor([6, 2, 4]), batch_first=True, enforce_sorted=False
            )
        output, h_n = module(inputs)
        if packed:
            output = pad_packed_sequence(output, batch_first=True)[0]
        outputs.append((output.detach().cpu(), h_n.detach().cpu()))
    for a, b in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_non_default_stream(cuda_regime):
    """The op runs on the caller's current stream: inputs made on a side stream are read after they
    are written there, and the results match the default stream's."""
    seed = stable_seed("stream", cuda_regime)
    layer = random_layer(
        seed, steps=6, batch=4, input_size=3, hidden=24, directions=2, bias=True, packed=False
    )
    expected = op_results("cuda", torch.float32, layer, True, seed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        actual = op_results("cuda", torch.float32, layer, True, seed)
    side.synchronize()
    assert_results_close(actual, expected, 1e-6)


def _graph_case(seed):
    layer = random_layer(
        seed, steps=6, batch=4, input_size=3, hidden=24, directions=2, bias=True, packed=False
    )
    input, hx, weights, _ = layer
    return (
        input.float().cuda(),
        hx.float().cuda(),
        [w.float().cuda().requires_grad_(True) for w in weights],
    )


def test_cuda_graph_forward(cuda_regime):
    input, hx, weights = _graph_case(stable_seed("graph-forward", cuda_regime))
    static_input, static_hx = input.clone(), hx.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up outside the capture (cuBLAS handles, kernel attributes)
            elman_forward(static_input, static_hx, weights, None, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_output, static_h_n = elman_forward(static_input, static_hx, weights, None, False)
    for trial in range(3):
        new_input = torch.randn_like(input)
        new_hx = torch.randn_like(hx)
        static_input.copy_(new_input)
        static_hx.copy_(new_hx)
        graph.replay()
        with torch.no_grad():
            output, h_n = elman_forward(new_input, new_hx, weights, None, False)
        torch.testing.assert_close(static_output, output, rtol=0, atol=1e-6, msg=f"replay {trial}")
        torch.testing.assert_close(static_h_n, h_n, rtol=0, atol=1e-6, msg=f"replay {trial}")


def test_cuda_graph_forward_backward(cuda_regime):
    input, hx, weights = _graph_case(stable_seed("graph-backward", cuda_regime))
    static_input = input.clone().requires_grad_(True)
    static_hx = hx.clone().requires_grad_(True)
    static_grad_output = torch.randn(6, 4, 48, device="cuda")
    static_grad_h_n = torch.randn_like(hx)
    leaves = [static_input, static_hx, *weights]

    def step():
        output, h_n = elman_forward(static_input, static_hx, weights, None, False)
        grads = torch.autograd.grad((output, h_n), leaves, (static_grad_output, static_grad_h_n))
        return (output.detach(), h_n.detach(), *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for trial in range(3):
        with torch.no_grad():
            static_input.copy_(torch.randn_like(input))
            static_hx.copy_(torch.randn_like(hx))
            static_grad_output.copy_(torch.randn_like(static_grad_output))
            static_grad_h_n.copy_(torch.randn_like(static_grad_h_n))
        graph.replay()
        eager = step()
        for index, (a, b) in enumerate(zip(captured, eager)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"replay {trial}, result {index}")


def test_empty_shapes():
    weights = [torch.randn(4, 3, device="cuda"), torch.randn(4, 4, device="cuda")]
    input = torch.randn(5, 0, 3, device="cuda", requires_grad=True)
    hx = torch.zeros(1, 0, 4, device="cuda", requires_grad=True)
    output, h_n = elman_forward(input, hx, weights, None, False)
    assert output.shape == (5, 0, 4) and h_n.shape == (1, 0, 4)
    grad_input, grad_hx, grad_weights = elman_backward(
        torch.zeros_like(output),
        torch.zeros_like(h_n),
        input,
        hx,
        weights,
        output,
        None,
        False,
        [True, True, True],
    )
    assert grad_input.shape == input.shape and grad_hx.shape == hx.shape
    assert all(g.shape == w.shape and not g.any() for g, w in zip(grad_weights, weights))


def test_indices_past_2_pow_31():
    """A float16 output of more than 2^31 elements: the last steps of the long run must equal a short
    run started from the state the long one had just before them (32-bit row offsets would wrap)."""
    steps, batch, hidden = 2**14 + 3, 512, 256
    needed = steps * batch * hidden * 2 * 3  # output, its input projection, and slack
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory")
    assert steps * batch * hidden > 2**31
    generator = torch.Generator(device="cuda").manual_seed(7)
    weights = [
        (torch.rand(hidden, 1, device="cuda", generator=generator) - 0.5).half(),
        ((torch.rand(hidden, hidden, device="cuda", generator=generator) - 0.5) * 2 * hidden**-0.5).half(),
    ]
    input = torch.randn(steps, batch, 1, device="cuda", generator=generator).half()
    hx = torch.zeros(1, batch, hidden, device="cuda").half()
    with torch.no_grad():
        output, h_n = elman_forward(input, hx, weights, None, False)
        tail = 3
        start = output[steps - tail - 1].unsqueeze(0).contiguous()
        tail_output, tail_h_n = elman_forward(input[steps - tail :].contiguous(), start, weights, None, False)
    # The long run carries its state in float32 while the short one restarts from the float16 output,
    # so they agree to float16 rounding, not bit for bit.
    torch.testing.assert_close(output[steps - tail :], tail_output, rtol=0, atol=5e-3)
    torch.testing.assert_close(h_n, tail_h_n, rtol=0, atol=5e-3)
