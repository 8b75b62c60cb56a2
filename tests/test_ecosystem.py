"""rnn_ext.RNN among the tools users put around nn.RNN: whole-model checkpoints loaded with
weights_only=True (and crafted ones refused), per-sample gradients through ExpandedWeights and
Opacus, and the platforms the build accepts."""

import copyreg
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils._per_sample_grad import call_for_per_sample_grads
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from helpers import ours_and_reference
from rnn_ext.module import RNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- Whole-model checkpoints --------------------------------------------------------------------

USER_MODEL = """
import torch
from torch import nn
import rnn_ext


class Tagger(nn.Module):
    def __init__(self, rnn_class):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = rnn_class(6, 7, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
        self.out = nn.Linear(14, 3)

    def forward(self, tokens):
        return self.out(self.rnn(self.embed(tokens))[0])
"""

LOAD = """
import sys
import torch
from torch import nn
import usermodel

path = sys.argv[1]
tokens = torch.load(sys.argv[2])
nn_rnn_users_list = [usermodel.Tagger, torch.nn.modules.rnn.RNN, nn.Embedding, nn.Linear]
for name, allowed in (("without_tagger", nn_rnn_users_list[1:]), ("with_tagger", nn_rnn_users_list)):
    try:
        with torch.serialization.safe_globals(allowed):
            model = torch.load(path, weights_only=True)
    except Exception as error:
        print(name, "FAILED", type(error).__name__)
        continue
    model.eval()
    with torch.no_grad():
        torch.save(model(tokens), path + ".out")
    print(name, "LOADED", type(model.rnn).__module__ + "." + type(model.rnn).__name__)
"""


def test_whole_model_checkpoint_loads_in_fresh_process(tmp_path):
    """A checkpoint of a model holding rnn_ext.RNN loads with weights_only=True in a new process,
    under the allow-list an nn.RNN user writes, exactly where the same model with nn.RNN loads; and
    both fail alike when the user's own class is not allowed."""
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    (tmp_path / "load.py").write_text(LOAD)
    sys.path.insert(0, str(tmp_path))
    try:
        import usermodel
    finally:
        sys.path.remove(str(tmp_path))
    tokens = torch.randint(0, 20, (4, 9))
    torch.save(tokens, tmp_path / "tokens.pt")
    results = {}
    for name, rnn_class in (("torch", nn.RNN), ("rnn_ext", rnn_ext.RNN)):
        torch.manual_seed(0)
        model = usermodel.Tagger(rnn_class).eval()
        path = tmp_path / f"{name}.pt"
        torch.save(model, path)
        with torch.no_grad():
            expected = model(tokens)
        run = subprocess.run(
            [sys.executable, "load.py", str(path), "tokens.pt"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        results[name] = run.stdout.splitlines()
        torch.testing.assert_close(torch.load(str(path) + ".out"), expected, rtol=0, atol=0)
    assert b"rnn_ext.module" in (tmp_path / "rnn_ext.pt").read_bytes()  # the class path it keeps
    assert results["torch"] == [
        "without_tagger FAILED UnpicklingError",
        "with_tagger LOADED torch.nn.modules.rnn.RNN",
    ]
    assert results["rnn_ext"] == [
        "without_tagger FAILED UnpicklingError",
        "with_tagger LOADED rnn_ext.module.RNN",
    ]


class Crafted:
    """Pickles as an rnn_ext.RNN with the given state, as a hand-made checkpoint would."""

    __class__ = property(lambda self: RNN)  # what pickle's __newobj__ check reads

    def __init__(self, state):
        self.state = state

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (RNN,), self.state)


def real_state(**kwargs):
    torch.manual_seed(0)
    module = rnn_ext.RNN(3, 4, **kwargs)
    return module.__getstate__()


def with_changes(state=None, **changes):
    state = dict(real_state() if state is None else state)
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    return state


def expanded_weights_state(hidden):
    """Sizes that agree with weight shapes, but the weights are one stored element each."""
    state = real_state()
    one = torch.zeros(1)
    weights = {
        "weight_ih_l0": nn.Parameter(one.expand(hidden, 3)),
        "weight_hh_l0": nn.Parameter(one.expand(hidden, hidden)),
        "bias_ih_l0": nn.Parameter(one.expand(hidden)),
        "bias_hh_l0": nn.Parameter(one.expand(hidden)),
    }
    parameters = type(state["_parameters"])(weights)
    return with_changes(
        state, hidden_size=hidden, _parameters=parameters, _flat_weights=list(weights.values())
    )


CRAFTED = {
    "not_a_dict": (lambda: [1, 2, 3], TypeError),
    "hidden_size_str": (lambda: with_changes(hidden_size="4"), TypeError),
    "hidden_size_huge": (lambda: with_changes(hidden_size=10**12), ValueError),
    "num_layers_huge": (lambda: with_changes(num_layers=10**15), ValueError),
    "num_layers_zero": (lambda: with_changes(num_layers=0), ValueError),
    "bias_int": (lambda: with_changes(bias=1), TypeError),
    "mode_lstm": (lambda: with_changes(mode="LSTM"), ValueError),
    "nonlinearity_mismatch": (lambda: with_changes(nonlinearity="relu"), ValueError),
    "dropout_huge": (lambda: with_changes(dropout=5.0), ValueError),
    "missing_mode": (lambda: with_changes(mode=KeyError), ValueError),
    "missing_parameters": (lambda: with_changes(_parameters=KeyError), ValueError),
    "parameters_list": (lambda: with_changes(_parameters=[]), TypeError),
    "weight_names_wrong": (lambda: with_changes(_flat_weights_names=["a", "b", "c", "d"]), ValueError),
    "weight_not_tensor": (lambda: with_changes(_flat_weights=[1, 2, 3, 4]), TypeError),
    "weight_int": (
        lambda: with_changes(_flat_weights=[torch.zeros(4, 3, dtype=torch.long)] + [None] * 3),
        TypeError,
    ),
    "zero_stride_weights": (lambda: expanded_weights_state(30000), ValueError),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_checkpoint_is_refused(tmp_path, case):
    make, error = CRAFTED[case]
    path = tmp_path / "crafted.pt"
    torch.save(Crafted(make()), path)
    with pytest.raises(error, match="rnn_ext.RNN: invalid module state"):
        torch.load(path, weights_only=True)


def test_untouched_state_still_loads(tmp_path):
    """The control for the crafted cases: the same construction with a real state loads."""
    path = tmp_path / "real.pt"
    torch.save(Crafted(real_state(num_layers=1)), path)
    module = torch.load(path, weights_only=True)
    assert type(module) is RNN
    reference = nn.RNN(3, 4)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(module(x), reference(x))


# --- Per-sample gradients: ExpandedWeights ------------------------------------------------------


def per_sample_grads(module, x, hx, batch, batch_first, seed):
    torch.manual_seed(seed)
    # The batch size given: hx has its batch second, whatever batch_first says.
    output, h_n = call_for_per_sample_grads(module, batch_size=batch, batch_first=batch_first)(x, hx)
    data = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    (data.square().sum() + h_n.sum()).backward()
    grads = {name: p.grad_sample for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad_sample = None
    return data, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", ["one_layer", "stacked_bidirectional_relu", "packed"])
def test_expanded_weights_match_nn_rnn(dtype, batch_first, training, shape):
    kwargs = dict(batch_first=batch_first, dtype=dtype)
    if shape == "stacked_bidirectional_relu":
        kwargs.update(num_layers=2, bidirectional=True, nonlinearity="relu", dropout=0.3)
    ours, reference = ours_and_reference(3, 5, seed=4, **kwargs)
    ours.train(training)
    reference.train(training)
    batch, steps = 4, 6
    x = torch.randn(batch, steps, 3, dtype=dtype)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    hx = torch.randn(ours.num_layers * (2 if ours.bidirectional else 1), batch, 5, dtype=dtype)
    if shape == "packed":
        x = pack_padded_sequence(x, torch.tensor([6, 2, 5, 1]), batch_first=batch_first, enforce_sorted=False)
    expected_output, expected = per_sample_grads(reference, x, hx, batch, batch_first, seed=9)
    output, grads = per_sample_grads(ours, x, hx, batch, batch_first, seed=9)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    assert grads.keys() == expected.keys()
    for name in grads:
        assert grads[name].shape[0] == batch
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=0, msg=name)
    # Outside per-sample mode the module runs its own kernels again.
    torch.testing.assert_close(ours.eval()(x)[1], reference.eval()(x)[1])


class LoggingTensor(torch.Tensor):
    """A tensor subclass with a __torch_function__ of its own, which records what it is given."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


class PlainSubclass(torch.Tensor):
    pass


@pytest.mark.parametrize("case", ["device_mode", "plain_subclass", "overriding_subclass"])
def test_which_path_tensor_subclasses_and_modes_take(monkeypatch, case):
    """Only a subclass that overrides __torch_function__ sends the module to torch's RNN function;
    a TorchFunctionMode (`with torch.device`) or a subclass without an override keeps the fused
    operator. The results equal nn.RNN's either way."""
    calls = []
    for name in ("rnn_tanh", "rnn_relu"):
        original = getattr(torch._VF, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch._VF, name, recorded, raising=False)
    ours, reference = ours_and_reference(3, 4, 2, seed=1, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = reference(x)
    calls.clear()
    if case == "device_mode":
        with torch.device("cpu"):
            got = ours(x)
    else:
        subclass = PlainSubclass if case == "plain_subclass" else LoggingTensor
        ours.weight_hh_l1 = nn.Parameter(ours.weight_hh_l1.detach().as_subclass(subclass))
        LoggingTensor.seen.clear()
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if case == "overriding_subclass":
        assert calls == ["rnn_tanh"] and "rnn_tanh" in LoggingTensor.seen
    else:
        assert calls == []


# --- Opacus -------------------------------------------------------------------------------------


class SmallTagger(nn.Module):
    def __init__(self, rnn_class, batch_first):
        super().__init__()
        self.rnn = rnn_class(3, 6, num_layers=2, batch_first=batch_first, dtype=torch.float64)
        self.head = nn.Linear(6, 2, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def opacus_grad_samples(rnn_class, mode, batch_first):
    opacus = pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModuleExpandedWeights

    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    torch.manual_seed(2)
    model = SmallTagger(rnn_class, batch_first)
    if mode == "ew":
        wrapped = GradSampleModuleExpandedWeights(model, batch_first=batch_first)
    else:
        wrapped = opacus.GradSampleModule(model, batch_first=batch_first, force_functorch=mode == "functorch")
    wrapped(x).square().sum().backward()
    return {key: p.grad_sample for key, p in model.named_parameters()}


def test_opacus_expanded_weights_mode():
    """Opacus' "ew" mode (torch's ExpandedWeights underneath): the same per-sample gradients."""
    ours = opacus_grad_samples(rnn_ext.RNN, "ew", batch_first=True)
    reference = opacus_grad_samples(nn.RNN, "ew", batch_first=True)
    assert ours.keys() == reference.keys()
    for key in reference:
        assert reference[key].shape[0] == 5
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "mode, batch_first", [("hooks", True), ("hooks", False), ("functorch", True), ("ew", False)]
)
def test_opacus_modes_that_reject_nn_rnn_reject_ours(mode, batch_first):
    """Opacus has no per-sample rule for an RNN module (it offers its own DPRNN instead): in the
    "hooks" and "functorch" modes its functorch fallback cannot take the module's (output, h_n)
    tuple, and "ew" supports batch_first=True only. Both modules fail there alike, never silently
    with wrong gradients."""
    with pytest.raises((RuntimeError, TypeError, NotImplementedError)):
        opacus_grad_samples(nn.RNN, mode, batch_first)
    with pytest.raises((RuntimeError, TypeError, NotImplementedError)):
        opacus_grad_samples(rnn_ext.RNN, mode, batch_first)


# --- Platforms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "platform_name, machine",
    [
        ("linux", "aarch64"),
        ("linux", "ppc64le"),
        ("darwin", "arm64"),
        ("darwin", "x86_64"),
        ("win32", "AMD64"),
    ],
)
def test_setup_stops_on_unsupported_platforms(platform_name, machine):
    """setup.py, run as pip runs it, on another platform (simulated): a clear message and exit
    status 1, before torch is imported or any compiler runs."""
    script = textwrap.dedent(f"""
        import platform, runpy, sys
        sys.platform = {platform_name!r}
        platform.machine = lambda: {machine!r}
        sys.argv = ["setup.py", "build_ext"]
        runpy.run_path("setup.py", run_name="__main__")
        """)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    assert f"rnn_ext builds on Linux x86-64 only, and this is {platform_name} {machine}" in run.stderr
    assert "torch.nn.RNN" in run.stderr
    assert "Traceback" not in run.stderr


def test_setup_accepts_linux_x86_64():
    script = textwrap.dedent("""
        import platform, runpy, sys
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
        """)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "rnn_ext"
