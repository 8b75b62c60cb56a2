"""Whole-model checkpoints holding rnn_ext.RNN: the check of a pickled module's state before it is
restored. rnn_ext.module registers its RNN class with torch.serialization.add_safe_globals, so that
`torch.load(..., weights_only=True)` rebuilds it as it rebuilds nn.RNN; a checkpoint is untrusted
data, so every attribute the module's code reads is checked here first, and the sizes are checked
against tensors the file actually holds (nothing is allocated from a number in the file)."""

import numbers
from typing import Any, Dict, List

import torch
from torch import Tensor

_MODES = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}
_FLAGS = ("bias", "batch_first", "bidirectional", "training")
_SIZES = ("input_size", "hidden_size", "num_layers")
_DICTS = ("_parameters", "_buffers", "_modules")


def _fail(kind, message):
    raise kind(f"rnn_ext.RNN: invalid module state (corrupt or crafted checkpoint?): {message}")


def _weight_names(num_layers: int, bidirectional: bool, bias: bool) -> List[List[str]]:
    """nn.RNNBase's parameter names per layer and direction, in its order."""
    names = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse") if bidirectional else ("",):
            group = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
            if bias:
                group += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
            names.append(group)
    return names


def _weight_shape(name: str, input_size: int, hidden_size: int, directions: int) -> tuple:
    if name.startswith("bias"):
        return (hidden_size,)
    if name.startswith("weight_hh"):
        return (hidden_size, hidden_size)
    layer_input = input_size if name.startswith("weight_ih_l0") else hidden_size * directions
    return (hidden_size, layer_input)


def _check_backed(name: str, tensor: Tensor) -> None:
    """The tensor's elements are its storage's own: a checkpoint can describe a huge tensor over a
    one-element storage with zero strides, which would pass a shape check yet hold no data."""
    if type(tensor) not in (Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
        return
    if tensor.is_meta or tensor.numel() == 0:
        return
    needed = tensor.numel() * tensor.element_size()
    if tensor.untyped_storage().nbytes() < needed or 0 in tensor.stride():
        _fail(ValueError, f"{name} has {tensor.numel()} elements but its storage does not hold them")


def check_state(state: Any) -> None:
    """Raises TypeError/ValueError unless `state` (what RNNBase.__getstate__ returns) is one that a
    real rnn_ext.RNN has: the right attribute types, consistent sizes, and weights of the shapes
    those sizes give. Costs O(number of weights); builds nothing from the sizes alone."""
    if not isinstance(state, dict):
        _fail(TypeError, f"expected a dict, got {type(state).__name__}")
    required = ("mode", "nonlinearity", "dropout", "_flat_weights_names", "_flat_weights")
    missing = [key for key in required + _FLAGS + _SIZES + _DICTS if key not in state]
    if missing:
        _fail(ValueError, f"missing attributes {missing}")
    mode = state["mode"]
    if not isinstance(mode, str) or mode not in _MODES:
        _fail(ValueError, f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if state["nonlinearity"] != _MODES[mode]:
        _fail(ValueError, f"nonlinearity {state['nonlinearity']!r} does not match mode {mode!r}")
    for key in _FLAGS:
        if not isinstance(state[key], bool):
            _fail(TypeError, f"{key} must be a bool, got {type(state[key]).__name__}")
    for key in _SIZES:
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(TypeError, f"{key} must be an int, got {type(value).__name__}")
        if value < (0 if key == "input_size" else 1):
            _fail(ValueError, f"{key} must be {'>= 0' if key == 'input_size' else '> 0'}, got {value}")
    if state.get("proj_size", 0) != 0:
        _fail(ValueError, f"proj_size must be 0 for an RNN, got {state.get('proj_size')!r}")
    dropout = state["dropout"]
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        _fail(ValueError, f"dropout must be a number in [0, 1], got {dropout!r}")
    for key in _DICTS:
        if not isinstance(state[key], dict):
            _fail(TypeError, f"{key} must be a dict, got {type(state[key]).__name__}")

    names = state["_flat_weights_names"]
    flat = state["_flat_weights"]
    if not isinstance(names, list) or not isinstance(flat, list):
        _fail(TypeError, "_flat_weights_names and _flat_weights must be lists")
    directions = 2 if state["bidirectional"] else 1
    per_direction = 4 if state["bias"] else 2
    # Compared before any list is built from num_layers: the list in the file bounds the work.
    if len(names) != state["num_layers"] * directions * per_direction or len(flat) != len(names):
        _fail(ValueError, f"{len(names)} weight names and {len(flat)} weights for the sizes given")
    groups = _weight_names(state["num_layers"], state["bidirectional"], state["bias"])
    expected = [name for group in groups for name in group]
    if names != expected:
        _fail(ValueError, f"weight names {names[:4]}... differ from nn.RNN's {expected[:4]}...")
    if "_all_weights" in state and state["_all_weights"] != groups:
        _fail(ValueError, "_all_weights differs from the weight names the sizes give")

    parameters: Dict[str, Any] = state["_parameters"]
    for index, name in enumerate(names):
        for where, value in (("_parameters", parameters.get(name)), ("_flat_weights", flat[index])):
            if value is None:
                continue
            if not isinstance(value, Tensor):
                _fail(TypeError, f"{where}[{name!r}] must be a Tensor, got {type(value).__name__}")
            shape = _weight_shape(name, state["input_size"], state["hidden_size"], directions)
            if tuple(value.shape) != shape:
                _fail(ValueError, f"{name} has shape {tuple(value.shape)}, the sizes give {shape}")
            if not value.is_floating_point():
                _fail(TypeError, f"{name} must be a floating-point tensor, got {value.dtype}")
            _check_backed(name, value)
