"""The rnn_ext operators as Python sees them: fake (meta) kernels for tracing, autograd through the
backward op, and `elman_rnn`, the multi-layer driver the module calls."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.rnn_ext)

elman_forward = torch.ops.rnn_ext.elman_forward.default
elman_backward = torch.ops.rnn_ext.elman_backward.default


@torch.library.register_fake("rnn_ext::elman_forward")
def _elman_forward_fake(input, hx, weights, batch_sizes, relu):
    width = hx.shape[0] * hx.shape[2]
    output = input.new_empty((*input.shape[:-1], width))
    return output, hx.new_empty(hx.shape)


@torch.library.register_fake("rnn_ext::elman_backward")
def _elman_backward_fake(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask):
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    grad_hx = hx.new_empty(hx.shape) if output_mask[1] else hx.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


def _setup_context(ctx, inputs, output):
    input, hx, weights, batch_sizes, relu = inputs
    ctx.relu = relu
    ctx.packed = batch_sizes is not None
    saved = [input, hx, output[0], *weights]
    if ctx.packed:
        saved.append(batch_sizes)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_output, grad_h_n):
    saved = list(ctx.saved_tensors)
    batch_sizes = saved.pop() if ctx.packed else None
    input, hx, output, *weights = saved
    needs_input, needs_hx, needs_weights = ctx.needs_input_grad[:3]
    mask = [bool(needs_input), bool(needs_hx), any(needs_weights)]
    if grad_output is None:
        grad_output = torch.zeros_like(output)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    grad_input, grad_hx, grad_weights = elman_backward(
        grad_output, grad_h_n, input, hx, weights, output, batch_sizes, ctx.relu, mask
    )
    return (
        grad_input if mask[0] else None,
        grad_hx if mask[1] else None,
        list(grad_weights) if mask[2] else None,
        None,
        None,
    )


torch.library.register_autograd("rnn_ext::elman_forward", _backward, setup_context=_setup_context)


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
