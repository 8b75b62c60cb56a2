"""The rnn_ext operators as Python sees them: fake (meta) kernels for tracing, and `elman_rnn`, the
multi-layer driver the module calls. Autograd is registered in C++ (csrc/autograd.cpp) so that a
call costs no Python; its backward is the rnn_ext::elman_backward op."""
from __future__ import annotations

import torch

from ._extension import _C  # noqa: F401  (loading the extension registers torch.ops.rnn_ext)

elman_forward = torch.ops.rnn_ext.elman_forward.default
elman_backward = torch.ops.rnn_ext.elman_backward.default


def _check_devices(input, hx, weights, batch_sizes=None, others=()):
    # The C++ kernels make the same checks; a mix with meta tensors dispatches here instead.
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(f"rnn_ext: batch_sizes must be a CPU tensor, got one on {batch_sizes.device}")
    for name, tensor in others:
        if tensor.device != input.device:
            raise RuntimeError(f"rnn_ext: {name} is on {tensor.device} but input is on {input.device}")
    if hx.device != input.device:
        raise RuntimeError(
            "Input and hidden tensors are not at the same device, found input tensor at "
            f"{input.device} and hidden tensor at {hx.device}"
        )
    for weight in weights:
        if weight.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {weight.device}"
            )


@torch.library.register_fake("rnn_ext::elman_forward")
def _elman_forward_fake(input, hx, weights, batch_sizes, relu):
    _check_devices(input, hx, weights, batch_sizes)
    width = hx.shape[0] * hx.shape[2]
    output = input.new_empty((*input.shape[:-1], width))
    return output, hx.new_empty(hx.shape)


@torch.library.register_fake("rnn_ext::elman_backward")
def _elman_backward_fake(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask):
    _check_devices(input, hx, weights, batch_sizes,
                   [("grad_output", grad_output), ("grad_h_n", grad_h_n), ("output", output)])
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    grad_hx = hx.new_empty(hx.shape) if output_mask[1] else hx.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


def elman_rnn(input, hx, flat_weights, num_layers, bidirectional, relu, dropout=0.0, training=False,
              batch_sizes=None):
    """A stack of Elman layers over time-major `input` ([T, B, I], or packed [N, I] with
    `batch_sizes`), like torch's `_VF.rnn_tanh`/`rnn_relu`. Dropout follows every layer but the last
    when training. Returns (output, h_n)."""
    directions = 2 if bidirectional else 1
    per_layer = len(flat_weights) // num_layers
    layer_input = input
    final_states = []
    for layer in range(num_layers):
        weights = flat_weights[layer * per_layer:(layer + 1) * per_layer]
        layer_hx = hx if num_layers == 1 else hx[layer * directions:(layer + 1) * directions]
        layer_output, layer_h_n = elman_forward(layer_input, layer_hx, weights, batch_sizes, relu)
        final_states.append(layer_h_n)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = torch.nn.functional.dropout(layer_output, p=dropout, training=True)
        layer_input = layer_output
    h_n = final_states[0] if num_layers == 1 else torch.cat(final_states, 0)
    return layer_input, h_n
