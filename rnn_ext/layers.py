"""The multi-layer Elman driver behind rnn_ext.RNN, and the one-layer paths it chooses between: the
fused operator, and the same math as differentiable torch ops for torch.func / forward-mode AD."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from .onnx import export_layers
from .ops import elman_forward

_disabled_torch_function = torch._C._disabled_torch_function_impl
_tensor_torch_function = Tensor.__torch_function__.__func__


@torch.jit.unused
def overrides_torch_function(tensors: List[Tensor]) -> bool:
    """True when a tensor among `tensors` is a subclass with a `__torch_function__` of its own
    (ExpandedWeights of per-sample gradients, for one). Such a subclass handles torch's functions,
    not rnn_ext's operator, so the layers must run as torch's own RNN function. A
    TorchFunctionMode alone (`with torch.device(...)`) does not count, unlike
    `torch.overrides.has_torch_function`."""
    for tensor in tensors:
        cls = type(tensor)
        if cls is Tensor or cls is torch.nn.Parameter:
            continue
        function = getattr(cls, "__torch_function__", None)
        if (
            function is _disabled_torch_function
            or getattr(function, "__func__", None) is _tensor_torch_function
        ):
            continue
        return True
    return False


@torch.jit.unused
def torch_function_layers(
    input: Tensor,
    hx: Tensor,
    flat_weights: List[Tensor],
    num_layers: int,
    bidirectional: bool,
    relu: bool,
    dropout: float,
    training: bool,
    batch_sizes: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The layer stack as torch's rnn_tanh/rnn_relu, which nn.RNN calls: a tensor subclass that
    overrides it (ExpandedWeights decomposes it into cells) then sees what it sees with nn.RNN."""
    has_biases = len(flat_weights) // (num_layers * (2 if bidirectional else 1)) == 4
    function = torch._VF.rnn_relu if relu else torch._VF.rnn_tanh
    if batch_sizes is None:
        return function(
            input, hx, flat_weights, has_biases, num_layers, dropout, training, bidirectional, False
        )
    return function(
        input, batch_sizes, hx, flat_weights, has_biases, num_layers, dropout, training, bidirectional
    )


@torch.jit.unused
def composite_layer(
    input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor], relu: bool
) -> Tuple[Tensor, Tensor]:
    """One layer of rnn_ext::elman_forward (same arguments, same results) as a chain of torch ops,
    step by step. Slow; every torch transform (grad, jvp, vmap, forward AD, hessian) composes
    with it, which the fused operator's C++ autograd cannot. Eager only: TorchScript has no
    torch.func."""
    directions = hx.shape[0]
    per_direction = len(weights) // directions
    if batch_sizes is None:
        steps = input.shape[0]
        batch = input.shape[1]
        sizes = [batch] * steps
        offsets = [t * batch for t in range(steps)]
        rows = input.reshape(steps * batch, input.shape[-1])
    else:
        sizes = [int(size) for size in batch_sizes.tolist()]
        steps = len(sizes)
        batch = sizes[0]
        offsets = [0] * steps
        for t in range(1, steps):
            offsets[t] = offsets[t - 1] + sizes[t - 1]
        rows = input
    direction_outputs: List[Tensor] = []
    final_states: List[Tensor] = []
    for d in range(directions):
        w_ih = weights[d * per_direction]
        w_hh = weights[d * per_direction + 1]
        projected = torch.matmul(rows, w_ih.t())
        if per_direction == 4:
            projected = projected + weights[d * per_direction + 2] + weights[d * per_direction + 3]
        reverse = d == 1
        h0 = hx[d]
        state = h0  # rows past a step's batch size hold their final states
        step_outputs: List[Tensor] = [h0] * steps
        for position in range(steps):
            t = steps - 1 - position if reverse else position
            active = sizes[t]
            previous = state.narrow(0, 0, active)
            if reverse and t + 1 < steps and sizes[t + 1] < active:
                # Rows whose sequence ends at step t start here, in reverse, from h0.
                carried = sizes[t + 1]
                previous = torch.cat([state.narrow(0, 0, carried), h0.narrow(0, carried, active - carried)])
            pre = projected.narrow(0, offsets[t], active) + torch.matmul(previous, w_hh.t())
            h = torch.relu(pre) if relu else torch.tanh(pre)
            step_outputs[t] = h
            state = h if active == batch else torch.cat([h, state.narrow(0, active, batch - active)])
        direction_outputs.append(torch.cat(step_outputs, 0))
        final_states.append(state)
    output = torch.cat(direction_outputs, -1)
    if batch_sizes is None:
        output = output.reshape(steps, batch, output.shape[-1])
    return output, torch.stack(final_states, 0)


@torch.jit.unused
def needs_composite(input: Tensor, hx: Tensor, weights: List[Tensor]) -> bool:
    """True where the fused operator cannot serve the caller: inside a torch.func transform other
    than vmap (grad, vjp, jacrev, jacfwd, jvp, hessian), or when a forward-mode AD tangent rides on
    an argument. Under vmap alone the operators' batching rules keep the fused kernels. Eager
    calls outside all of these pay two cheap checks."""
    if torch._C._are_functorch_transforms_active():
        for interpreter in retrieve_all_functorch_interpreters():
            if interpreter.key() != TransformType.Vmap:
                return True
    if forward_ad._current_level < 0:
        return False
    for tensor in [input, hx] + list(weights):
        if forward_ad.unpack_dual(tensor).tangent is not None:
            return True
    return False


def run_layers(
    input: Tensor,
    hx: Tensor,
    flat_weights: List[Tensor],
    num_layers: int,
    bidirectional: bool,
    relu: bool,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A stack of Elman layers over time-major `input` ([T, B, I], or packed [N, I] with
    `batch_sizes`), like torch's `_VF.rnn_tanh`/`rnn_relu`. Dropout follows every layer but the last
    when training. Returns (output, h_n)."""
    composite = False
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export():
            return export_layers(
                input, hx, flat_weights, num_layers, bidirectional, relu, dropout, training, batch_sizes
            )
        if not torch.compiler.is_compiling():
            if overrides_torch_function([input, hx] + list(flat_weights)):
                return torch_function_layers(
                    input, hx, flat_weights, num_layers, bidirectional, relu, dropout, training, batch_sizes
                )
            composite = needs_composite(input, hx, flat_weights)
    return stack_layers(
        input, hx, flat_weights, num_layers, bidirectional, relu, dropout, training, batch_sizes, composite
    )


def stack_layers(
    input: Tensor,
    hx: Tensor,
    flat_weights: List[Tensor],
    num_layers: int,
    bidirectional: bool,
    relu: bool,
    dropout: float,
    training: bool,
    batch_sizes: Optional[Tensor],
    composite: bool,
) -> Tuple[Tensor, Tensor]:
    """run_layers once the path is chosen: each layer by composite_layer or by the fused op."""
    directions = 2 if bidirectional else 1
    per_layer = len(flat_weights) // num_layers
    layer_input = input
    final_states: List[Tensor] = []
    for layer in range(num_layers):
        weights = flat_weights[layer * per_layer : (layer + 1) * per_layer]
        layer_hx = hx if num_layers == 1 else hx[layer * directions : (layer + 1) * directions]
        if composite:
            layer_output, layer_h_n = composite_layer(layer_input, layer_hx, weights, batch_sizes, relu)
        elif torch.jit.is_scripting():
            layer_output, layer_h_n = torch.ops.rnn_ext.elman_forward(
                layer_input, layer_hx, weights, batch_sizes, relu
            )
        else:
            layer_output, layer_h_n = elman_forward(layer_input, layer_hx, weights, batch_sizes, relu)
        final_states.append(layer_h_n)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = torch.nn.functional.dropout(layer_output, p=dropout, training=True)
        layer_input = layer_output
    h_n = final_states[0] if num_layers == 1 else torch.cat(final_states, 0)
    return layer_input, h_n
