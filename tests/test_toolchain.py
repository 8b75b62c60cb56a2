"""rnn_ext.RNN in the PyTorch toolchain: torch.compile (fullgraph; aot_eager and inductor),
torch.export, autocast, DDP and FSDP2, CUDA graphs; each checked against eager or nn.RNN."""

import copy
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from helpers import (
    assert_all_close,
    assert_within_scale,
    ours_and_reference,
    requires_cuda,
    skip_if_expecttest_missing,
)

INPUT_SIZE, HIDDEN_SIZE, CLASSES = 5, 6, 3


class Tagger(nn.Module):
    """A recurrent layer and a linear head: the smallest model that shows the RNN inside a graph."""

    def __init__(
        self,
        rnn_class,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        nonlinearity="tanh",
        hidden_size=HIDDEN_SIZE,
    ):
        super().__init__()
        self.rnn = rnn_class(
            INPUT_SIZE,
            hidden_size,
            num_layers,
            nonlinearity,
            batch_first=batch_first,
            bidirectional=bidirectional,
        )
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), CLASSES)

    def forward(self, x, hx=None):
        output, h_n = self.rnn(x, hx)
        if isinstance(output, PackedSequence):
            output = output.data
        return self.head(output), h_n


def make_tagger(rnn_class, device, dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    return Tagger(rnn_class, **config).to(device=device, dtype=dtype)


def random_inputs(
    seed,
    batch,
    steps,
    num_layers,
    bidirectional,
    batch_first,
    device,
    dtype=torch.float64,
    with_hx=True,
    unbatched=False,
    hidden_size=HIDDEN_SIZE,
):
    generator = torch.Generator().manual_seed(seed)
    if unbatched:
        x_shape, hx_shape = (steps, INPUT_SIZE), (num_layers * (1 + bidirectional), hidden_size)
    else:
        x_shape = (batch, steps, INPUT_SIZE) if batch_first else (steps, batch, INPUT_SIZE)
        hx_shape = (num_layers * (1 + bidirectional), batch, hidden_size)
    x = torch.randn(x_shape, generator=generator, dtype=torch.float64)
    hx = 0.5 * torch.randn(hx_shape, generator=generator, dtype=torch.float64)
    return x.to(device, dtype), (hx.to(device, dtype) if with_hx else None)


def outputs_and_gradients(model, x, hx=None):
    """The model's outputs, and the gradients with respect to x, hx and every parameter of a loss
    whose gradient differs from element to element (a plain sum would give them all the same)."""
    x = x.detach().requires_grad_()
    leaves = [x]
    if hx is not None:
        hx = hx.detach().requires_grad_()
        leaves.append(hx)
    logits, h_n = model(x) if hx is None else model(x, hx)
    loss = logits.sin().sum() + (h_n * h_n).sum()
    gradients = torch.autograd.grad(loss, leaves + list(model.parameters()))
    return [logits.detach(), h_n.detach(), *gradients]


def compile_counter(backend):
    """A backend that counts Dynamo's calls and keeps their graphs. Imported here, not at the top,
    because the DDP test's spawned workers import this file and need only torch."""
    with skip_if_expecttest_missing():
        from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def elman_calls(graph):
    """Layers the graph runs in the fused operators: one per elman_forward node, num_layers per
    elman_stack node."""
    layers = 0
    for node in graph.nodes:
        if node.target is torch.ops.rnn_ext.elman_forward.default:
            layers += 1
        elif node.target is torch.ops.rnn_ext.elman_stack.default:
            layers += node.args[5]
    return layers


@pytest.fixture
def fresh_dynamo():
    # Every Tagger shares one forward code object: without a reset, later compile tests would
    # run into Dynamo's per-code recompile limit (and find earlier tests' graphs in its cache).
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_CONFIGS = {
    "2layers-bidirectional-batch_first-hx": dict(
        num_layers=2, bidirectional=True, batch_first=True, with_hx=True
    ),
    "2layers-bidirectional-batch_first-no_hx": dict(
        num_layers=2, bidirectional=True, batch_first=True, with_hx=False
    ),
    "3layers-relu-time_major-hx": dict(
        num_layers=3, bidirectional=False, batch_first=False, with_hx=True, nonlinearity="relu"
    ),
    "2layers-bidirectional-unbatched-hx": dict(
        num_layers=2, bidirectional=True, batch_first=True, with_hx=True, unbatched=True
    ),
}


def split_config(config):
    model_config = {k: v for k, v in config.items() if k not in ("with_hx", "unbatched")}
    input_config = {
        k: v
        for k, v in config.items()
        if k in ("num_layers", "bidirectional", "batch_first", "with_hx", "unbatched")
    }
    return model_config, input_config


# --- 1. torch.compile -------------------------------------------------------------------------


def test_nn_rnn_itself_cannot_compile_fullgraph():
    # Why rnn_ext exists: by default Dynamo refuses any nn.RNN instance (torch 2.13 has an opt-in,
    # experimental torch._dynamo.config.allow_rnn). If a release lifts the default refusal, this
    # test fails and the README's claim must be revised.
    model = make_tagger(nn.RNN, "cpu")
    x, hx = random_inputs(0, 3, 7, 2, True, True, "cpu")
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Attempted to wrap RNN"):
        torch.compile(model, backend="eager", fullgraph=True)(x, hx)
    torch._dynamo.reset()


@pytest.mark.parametrize("config", COMPILE_CONFIGS.values(), ids=COMPILE_CONFIGS.keys())
def test_compile_fullgraph_aot_eager_matches_eager(device, config, fresh_dynamo):
    model_config, input_config = split_config(config)
    model = make_tagger(rnn_ext.RNN, device, **model_config)
    counter = compile_counter("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    # The second call has a new batch size and sequence length: it must recompile (or reuse a
    # dynamic graph), never crash or return stale shapes.
    for seed, (batch, steps) in enumerate([(3, 7), (2, 11)]):
        x, hx = random_inputs(seed, batch, steps, device=device, **input_config)
        expected = outputs_and_gradients(model, x, hx)
        actual = outputs_and_gradients(compiled, x, hx)
        assert_all_close(actual, expected, 1e-10)
    assert counter.frame_count >= 1
    assert all(elman_calls(graph.graph) == model_config["num_layers"] for graph in counter.graphs)


@pytest.mark.slow
def test_compile_fullgraph_inductor_dynamic_shapes_match_eager(device, fresh_dynamo):
    config = dict(num_layers=2, bidirectional=True, batch_first=True)
    model = make_tagger(rnn_ext.RNN, device, **config)
    counter = compile_counter("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    x, hx = random_inputs(0, 3, 7, device=device, **config)
    assert_all_close(outputs_and_gradients(compiled, x, hx), outputs_and_gradients(model, x, hx), 1e-10)
    # dynamic=True: the one graph (and its backward) serves a new batch and length.
    x, hx = random_inputs(1, 2, 11, device=device, **config)
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = outputs_and_gradients(compiled, x, hx)
    assert_all_close(actual, outputs_and_gradients(model, x, hx), 1e-10)
    # Not frame_count == 1: on a cold cache Dynamo restarts the analysis once (to specialise the
    # module's float dropout) and calls the backend again for the same frame.
    assert counter.frame_count >= 1
    assert elman_calls(counter.graphs[-1].graph) == 2


def packed_inputs(seed, lengths, device, dtype=torch.float64, with_hx=False):
    generator = torch.Generator().manual_seed(seed)
    padded = torch.randn(len(lengths), max(lengths), INPUT_SIZE, generator=generator, dtype=torch.float64).to(
        device, dtype
    )
    # Unsorted lengths: exercises sorted_indices/unsorted_indices too.
    packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    hx = None
    if with_hx:
        hx = 0.5 * torch.randn(4, len(lengths), HIDDEN_SIZE, generator=generator, dtype=torch.float64).to(
            device, dtype
        )
    return packed, hx


def outputs_and_gradients_packed(model, packed, hx=None):
    data = packed.data.detach().requires_grad_()
    packed = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    leaves = [data]
    if hx is not None:
        hx = hx.detach().requires_grad_()
        leaves.append(hx)
    logits, h_n = model(packed, hx)
    loss = logits.sin().sum() + (h_n * h_n).sum()
    return [logits.detach(), h_n.detach(), *torch.autograd.grad(loss, leaves + list(model.parameters()))]


# One inductor case: its compiles are slow, and hx takes the same path through it.
@pytest.mark.parametrize(
    "backend,with_hx",
    [("aot_eager", False), ("aot_eager", True), ("inductor", False)],
    ids=["aot_eager-no_hx", "aot_eager-hx", "inductor-no_hx"],
)
def test_compile_fullgraph_packed_sequence_matches_eager(device, backend, with_hx, fresh_dynamo):
    model = make_tagger(rnn_ext.RNN, device)
    counter = compile_counter(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    # The packed batch size is batch_sizes[0], a value inside a tensor: Dynamo traces it only
    # as an unbacked symbol, which it does with capture_scalar_outputs.
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        # Same shapes with other lengths (batch_sizes' values must not be baked into the graph),
        # then a new batch and length, which recompiles: aot_eager only, to spare an inductor
        # compile (inductor's dynamic shapes are covered above).
        all_lengths = [[7, 3, 5], [7, 1, 7], [9, 4, 2, 4]]
        if backend == "inductor":
            all_lengths = all_lengths[:2]
        for seed, lengths in enumerate(all_lengths):
            packed, hx = packed_inputs(seed, lengths, device, with_hx=with_hx)
            assert_all_close(
                outputs_and_gradients_packed(compiled, packed, hx),
                outputs_and_gradients_packed(model, packed, hx),
                1e-10,
            )
    assert counter.frame_count >= 1
    assert all(elman_calls(graph.graph) == 2 for graph in counter.graphs)


def test_explain_reports_no_graph_break(device, fresh_dynamo):
    config = dict(num_layers=2, bidirectional=True, batch_first=True)
    model = make_tagger(rnn_ext.RNN, device, **config)
    x, hx = random_inputs(0, 3, 7, device=device, **config)
    for args in [(x,), (x, hx)]:
        explanation = torch._dynamo.explain(model)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
    packed, _ = packed_inputs(0, [7, 3, 5], device)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        explanation = torch._dynamo.explain(model)(packed)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --- 2. torch.export --------------------------------------------------------------------------

# torch's own RNNBase._update_flat_weights re-points _flat_weights at export's parameter
# stand-ins, and export warns about that assignment; nn.RNN's export warns the same.
ignore_flat_weights_warning = pytest.mark.filterwarnings("ignore:The tensor attributes self.*_flat_weights")


@ignore_flat_weights_warning
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
def test_export_with_dynamic_batch_and_length_matches_eager(device, with_hx):
    config = dict(num_layers=2, bidirectional=True, batch_first=True)
    model = make_tagger(rnn_ext.RNN, device, **config)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    x, hx = random_inputs(0, 3, 7, device=device, with_hx=with_hx, **config)
    if with_hx:
        program = torch.export.export(
            model, (x, hx), dynamic_shapes={"x": {0: batch, 1: steps}, "hx": {1: batch}}
        )
    else:
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch, 1: steps}})
    assert elman_calls(program.graph) == 2
    exported = program.module()
    for seed, (new_batch, new_steps) in enumerate([(3, 7), (5, 12)]):
        x, hx = random_inputs(seed, new_batch, new_steps, device=device, with_hx=with_hx, **config)
        args = (x,) if hx is None else (x, hx)
        with torch.no_grad():
            assert_all_close(list(exported(*args)), list(model(*args)), 1e-10)


@ignore_flat_weights_warning
def test_export_packed_sequence_matches_eager(device):
    model = make_tagger(rnn_ext.RNN, device)
    packed, hx = packed_inputs(0, [7, 3, 5], device, with_hx=True)
    # Static shapes: torch's PackedSequence cannot be rebuilt from a dynamic_shapes spec (its
    # constructor reads .device from every leaf), so only batch_sizes' values may change.
    program = torch.export.export(model, (packed, hx))
    assert elman_calls(program.graph) == 2
    exported = program.module()
    for seed, lengths in enumerate([[7, 3, 5], [7, 7, 1]]):
        packed, hx = packed_inputs(seed, lengths, device, with_hx=True)
        with torch.no_grad():
            assert_all_close(list(exported(packed, hx)), list(model(packed, hx)), 1e-10)


# --- 3. autocast ------------------------------------------------------------------------------


def autocast_pair(model_dtype, device, num_layers=2, bidirectional=True):
    """(rnn_ext.RNN, nn.RNN) with the same weights, in model_dtype on device."""
    pair = ours_and_reference(
        INPUT_SIZE, HIDDEN_SIZE, num_layers, batch_first=True, bidirectional=bidirectional
    )
    return tuple(module.to(device, model_dtype) for module in pair)


def run_under_autocast(model, device_type, autocast_dtype, x):
    x = x.detach().requires_grad_()
    with torch.autocast(device_type, dtype=autocast_dtype):
        output, h_n = model(x)
    # Backward outside the autocast region, as autocast's documentation prescribes.
    (output.float().sin().sum() + h_n.float().square().sum()).backward()
    return output, h_n, x.grad, [p.grad for p in model.parameters()]


def assert_close_to_scale(actual, expected, rtol, name):
    assert_within_scale(actual, expected, rtol, name, min_scale=0.0)


def assert_autocast_matches_nn_rnn(device, autocast_dtype, model_dtype, input_dtype):
    ours, reference = autocast_pair(model_dtype, device)
    x = torch.randn(3, 7, INPUT_SIZE, dtype=torch.float64).to(device, input_dtype)
    our_out, our_h, our_dx, our_grads = run_under_autocast(ours, device, autocast_dtype, x)
    reference_out, reference_h, reference_dx, reference_grads = run_under_autocast(
        reference, device, autocast_dtype, x
    )
    assert (our_out.dtype, our_h.dtype) == (reference_out.dtype, reference_h.dtype)
    # Both sides round to the half type at different points, so they agree to its precision
    # (measured: at most 1.2e-2 of the scale for bfloat16, 6e-3 for float16).
    low_precision = reference_out.dtype in (torch.float16, torch.bfloat16)
    rtol = 3e-2 if low_precision else 1e-10
    assert_close_to_scale(our_out, reference_out, rtol, "output")
    assert_close_to_scale(our_h, reference_h, rtol, "h_n")
    assert our_dx.dtype == reference_dx.dtype == input_dtype
    assert_close_to_scale(our_dx, reference_dx, rtol, "input gradient")
    names = [name for name, _ in ours.named_parameters()]
    for name, our_grad, reference_grad in zip(names, our_grads, reference_grads):
        # Gradients land in the parameters' own dtype, whatever autocast ran in.
        assert our_grad.dtype == reference_grad.dtype == model_dtype, name
        assert_close_to_scale(our_grad, reference_grad, rtol, name)


AUTOCAST_CASES = {
    # (model dtype, input dtype): float32 is the usual case; a bfloat16 model fed float32 runs
    # only because autocast casts the input; float64 is never cast by autocast.
    "float32_model": (torch.float32, torch.float32),
    "bfloat16_model-float32_input": (torch.bfloat16, torch.float32),
    "float64_model": (torch.float64, torch.float64),
}


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", AUTOCAST_CASES.values(), ids=AUTOCAST_CASES.keys())
def test_cpu_autocast_follows_nn_rnn(autocast_dtype, case):
    # nn.RNN on the CPU under autocast runs in the autocast dtype (its output is bfloat16 or
    # float16); rnn_ext must run, and return, the same.
    assert_autocast_matches_nn_rnn("cpu", autocast_dtype, *case)


@requires_cuda
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", AUTOCAST_CASES.values(), ids=AUTOCAST_CASES.keys())
def test_cuda_autocast_follows_nn_rnn(autocast_dtype, case):
    assert_autocast_matches_nn_rnn("cuda", autocast_dtype, *case)


# --- 4. DistributedDataParallel and FSDP2 ----------------------------------------------------

SGD_STEPS, BATCH, SEQUENCE_LENGTH, LEARNING_RATE = 3, 6, 5, 0.1


def distributed_data():
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, SEQUENCE_LENGTH, INPUT_SIZE, generator=generator, dtype=torch.float64)
    target = torch.randn(BATCH, SEQUENCE_LENGTH, CLASSES, generator=generator, dtype=torch.float64)
    return x, target


def train(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(SGD_STEPS):
        optimizer.zero_grad()
        logits, _ = model(x)
        nn.functional.mse_loss(logits, target).backward()
        optimizer.step()


def train_ddp(model, x, target):
    model = DistributedDataParallel(model)
    train(model, x, target)
    return model.module.state_dict()


def train_fsdp2(model, x, target):
    from torch.distributed.fsdp import fully_shard

    # The RNN as its own shard group, the way a model's blocks are usually wrapped.
    fully_shard(model.rnn)
    fully_shard(model)
    train(model, x, target)
    # Collective: every rank gathers the full parameters; rank 0 writes them.
    return {name: value.full_tensor() for name, value in model.state_dict().items()}


# Generous limits, so that a loaded machine cannot fail the test: a spawned worker imports torch and
# rnn_ext before it reaches the rendezvous, which took 2-3 s on a quiet 2-core machine and can take
# many times that when other processes compete for the cores. The whole run takes about 5-10 s.
RENDEZVOUS_SECONDS = 300
WORKERS_DEADLINE_SECONDS = 600


def distributed_worker(rank, world_size, init_file, initial_file, result_dir):
    # Top level so that the spawned processes can import it.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=RENDEZVOUS_SECONDS),
    )
    try:
        x, target = distributed_data()
        # Equal halves: the mean of the two half-batch gradients is the whole batch's gradient.
        half = BATCH // world_size
        rows = slice(rank * half, (rank + 1) * half)
        for name, train_wrapped in (("ddp", train_ddp), ("fsdp2", train_fsdp2)):
            model = make_tagger(rnn_ext.RNN, "cpu")
            model.load_state_dict(torch.load(initial_file))
            state = train_wrapped(model, x[rows], target[rows])
            if rank == 0:
                torch.save(state, result_dir / f"{name}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
def test_ddp_and_fsdp2_two_processes_match_single_process_nn_rnn(tmp_path, monkeypatch):
    # Gloo on the loopback interface only, whatever the machine's hostname resolves to.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    reference = make_tagger(nn.RNN, "cpu")
    initial = copy.deepcopy(reference.state_dict())
    initial_file = tmp_path / "initial.pt"
    torch.save(initial, initial_file)
    # spawn, not fork: this process may hold OpenMP and inductor worker threads.
    context = mp.start_processes(
        distributed_worker,
        args=(2, tmp_path / "store", initial_file, tmp_path),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + WORKERS_DEADLINE_SECONDS
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the distributed workers did not finish in time"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

    train(reference, *distributed_data())
    expected = reference.state_dict()
    for name in ("ddp", "fsdp2"):
        trained = torch.load(tmp_path / f"{name}.pt")
        assert trained.keys() == expected.keys(), name
        for key, value in expected.items():
            assert not torch.equal(value, initial[key]), f"{key} did not train"
            torch.testing.assert_close(trained[key], value, rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")


# --- 5. CUDA graphs ---------------------------------------------------------------------------


def warm_up(function, iterations=3):
    # Capture needs the allocator and lazy initialisations (cuBLAS handles, autograd's) done,
    # on a side stream as torch.cuda.graph's documentation prescribes.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(iterations):
            function()
    torch.cuda.current_stream().wait_stream(stream)


# Under the cuda_regime fixture's cap of 16 units per cooperative block: four blocks per direction,
# which exchange their states through the grid inside the captured kernels.
GRAPH_HIDDEN_SIZE = 64


@requires_cuda
def test_cuda_graph_forward_replays_new_inputs(cuda_regime):
    model = make_tagger(rnn_ext.RNN, "cuda", dtype=torch.float32, hidden_size=GRAPH_HIDDEN_SIZE)
    static_x, static_hx = random_inputs(
        0, 3, 7, 2, True, True, "cuda", torch.float32, hidden_size=GRAPH_HIDDEN_SIZE
    )
    with torch.no_grad():
        warm_up(lambda: model(static_x, static_hx))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits, static_h_n = model(static_x, static_hx)
        for seed in (1, 2):
            x, hx = random_inputs(
                seed, 3, 7, 2, True, True, "cuda", torch.float32, hidden_size=GRAPH_HIDDEN_SIZE
            )
            static_x.copy_(x)
            static_hx.copy_(hx)
            graph.replay()
            expected_logits, expected_h_n = model(x, hx)
            torch.testing.assert_close(static_logits, expected_logits)
            torch.testing.assert_close(static_h_n, expected_h_n)


@requires_cuda
def test_cuda_graph_forward_backward_replays_new_inputs(cuda_regime):
    model = make_tagger(rnn_ext.RNN, "cuda", dtype=torch.float32, hidden_size=GRAPH_HIDDEN_SIZE)
    eager_model = copy.deepcopy(model)
    static_x, static_hx = random_inputs(
        0, 3, 7, 2, True, True, "cuda", torch.float32, hidden_size=GRAPH_HIDDEN_SIZE
    )
    static_x.requires_grad_()

    def step():
        logits, h_n = model(static_x, static_hx)
        loss = logits.sin().sum() + (h_n * h_n).sum()
        loss.backward()
        return logits, h_n

    warm_up(step)
    # Gradients set to None so that the captured backward writes (not accumulates) them.
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits, static_h_n = step()
    for seed in (1, 2):
        x, hx = random_inputs(seed, 3, 7, 2, True, True, "cuda", torch.float32, hidden_size=GRAPH_HIDDEN_SIZE)
        with torch.no_grad():
            static_x.copy_(x)
            static_hx.copy_(hx)
        graph.replay()
        eager_model.zero_grad(set_to_none=True)
        x.requires_grad_()
        logits, h_n = eager_model(x, hx)
        (logits.sin().sum() + (h_n * h_n).sum()).backward()
        torch.testing.assert_close(static_logits, logits.detach())
        torch.testing.assert_close(static_h_n, h_n.detach())
        torch.testing.assert_close(static_x.grad, x.grad)
        for (name, p), eager_p in zip(model.named_parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.grad, eager_p.grad, msg=name)
