"""The rnn_ext operators as Python sees them: fake (meta) kernels for tracing and batching rules for
torch.vmap. Autograd is registered in C++ (csrc/autograd.cpp) so that a call costs no Python; its
backward is the rnn_ext::elman_backward op."""

from __future__ import annotations

import math

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
    _check_devices(
        input,
        hx,
        weights,
        batch_sizes,
        [("grad_output", grad_output), ("grad_h_n", grad_h_n), ("output", output)],
    )
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    grad_hx = hx.new_empty(hx.shape) if output_mask[1] else hx.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


elman_stack = torch.ops.rnn_ext.elman_stack.default
# elman_stack (hx given) as differentiable ATen ops; a CompositeImplicitAutograd kernel, so every
# transform and tracer sees those ops and it needs no fake kernel or batching rule of its own.
elman_stack_composite = torch.ops.rnn_ext._elman_stack_composite.default


def _stack_fake(input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, batch_first):
    """elman_stack's output, h_n and time-major layer outputs, as empty tensors with the kernels'
    shapes and strides (a batch_first output is a transposed view of a time-major one)."""
    _check_devices(
        input, input if hx is None else hx, weights, batch_sizes, [("dropout mask", m) for m in dropout_masks]
    )
    directions = 2 if bidirectional else 1
    hidden = weights[1].shape[0]
    width = directions * hidden
    if batch_sizes is not None:
        rows = (input.shape[0], width)
        batch = hx.shape[1] if hx is not None else torch.library.get_ctx().new_dynamic_size()
    elif batch_first:
        rows = (input.shape[1], input.shape[0], width)
        batch = input.shape[0]
    else:
        rows = (input.shape[0], input.shape[1], width)
        batch = input.shape[1]
    output = input.new_empty(rows)
    if batch_first and batch_sizes is None:
        output = output.transpose(0, 1)
    h_n = input.new_empty((num_layers * directions, batch, hidden))
    return output, h_n, [input.new_empty(rows) for _ in range(num_layers - 1)]


@torch.library.register_fake("rnn_ext::elman_stack")
def _elman_stack_fake(
    input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, relu, batch_first
):
    output, h_n, _ = _stack_fake(
        input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, batch_first
    )
    return output, h_n


@torch.library.register_fake("rnn_ext::_elman_stack_forward")
def _elman_stack_forward_fake(
    input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, relu, batch_first
):
    return _stack_fake(input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, batch_first)


@torch.library.register_fake("rnn_ext::elman_stack_backward")
def _elman_stack_backward_fake(
    grad_output,
    grad_h_n,
    input,
    hx,
    weights,
    batch_sizes,
    dropout_masks,
    layer_outputs,
    output,
    num_layers,
    bidirectional,
    relu,
    batch_first,
    output_mask,
):
    _check_devices(
        input,
        hx,
        weights,
        batch_sizes,
        [("grad_output", grad_output), ("grad_h_n", grad_h_n), ("output", output)],
    )
    if not output_mask[0]:
        grad_input = input.new_empty((0,))
    elif batch_first and batch_sizes is None:
        grad_input = input.new_empty((input.shape[1], input.shape[0], input.shape[2])).transpose(0, 1)
    else:
        grad_input = input.new_empty(input.shape)
    grad_hx = hx.new_empty(hx.shape) if output_mask[1] else hx.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


def _take(tensor, dim, index):
    return tensor if dim is None else tensor.select(dim, index)


def _stack_per_sample(info, in_dims, op, args):
    """The batching rule of last resort: one call of `op` per sample, results stacked on dim 0.
    Exact for any mix of batched arguments; `args` follow the op's schema (lists are Tensor[])."""
    results = []
    for index in range(info.batch_size):
        sample_args = []
        for arg, dim in zip(args, in_dims):
            if isinstance(arg, (list, tuple)):
                sample_args.append([_take(t, d, index) for t, d in zip(arg, dim)])
            elif isinstance(arg, torch.Tensor):
                sample_args.append(_take(arg, dim, index))
            else:
                sample_args.append(arg)
        results.append(op(*sample_args))
    stacked = []
    for parts in zip(*results):
        if isinstance(parts[0], (list, tuple)):
            stacked.append([torch.stack(group) for group in zip(*parts)])
        else:
            stacked.append(torch.stack(parts))
    dims = tuple([0] * len(value) if isinstance(value, list) else 0 for value in stacked)
    return tuple(stacked), dims


@torch.library.register_vmap("rnn_ext::elman_forward")
def _elman_forward_vmap(info, in_dims, input, hx, weights, batch_sizes, relu):
    input_dim, hx_dim, weight_dims, sizes_dim, _ = in_dims
    if sizes_dim is not None or any(dim is not None for dim in weight_dims):
        return _stack_per_sample(info, in_dims, elman_forward, (input, hx, weights, batch_sizes, relu))
    # Only input and hx carry the vmapped dimension V: fold it into the RNN's batch, as the row
    # order (b, v), which keeps each step's active rows of a packed batch contiguous. One fused
    # call does all samples.
    samples = info.batch_size
    if input_dim is None:
        input = input.unsqueeze(-2).expand(*input.shape[:-1], samples, input.shape[-1])
    else:
        input = input.movedim(input_dim, input.dim() - 2)
    if hx_dim is None:
        hx = hx.unsqueeze(2).expand(hx.shape[0], hx.shape[1], samples, hx.shape[2])
    else:
        hx = hx.movedim(hx_dim, 2)
    directions, batch, hidden = hx.shape[0], hx.shape[1], hx.shape[3]
    folded_hx = hx.reshape(directions, batch * samples, hidden)
    if batch_sizes is None:
        steps = input.shape[0]
        output, h_n = elman_forward(
            input.reshape(steps, batch * samples, input.shape[-1]), folded_hx, weights, None, relu
        )
        output = output.view(steps, batch, samples, output.shape[-1])
        output_dim = 2
    else:
        rows = input.shape[0]
        output, h_n = elman_forward(
            input.reshape(rows * samples, input.shape[-1]), folded_hx, weights, batch_sizes * samples, relu
        )
        output = output.view(rows, samples, output.shape[-1])
        output_dim = 1
    return (output, h_n.view(directions, batch, samples, hidden)), (output_dim, 2)


@torch.library.register_vmap("rnn_ext::elman_backward")
def _elman_backward_vmap(
    info, in_dims, grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask
):
    # Weight gradients are sums over the RNN batch, so samples cannot share one call: loop.
    (grad_input, grad_hx, grad_weights), _ = _stack_per_sample(
        info,
        in_dims,
        elman_backward,
        (grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask),
    )
    # Gradients the mask leaves out come back empty and unbatched, as from the op itself.
    grad_input, input_dim = (grad_input, 0) if output_mask[0] else (grad_input[0], None)
    grad_hx, hx_dim = (grad_hx, 0) if output_mask[1] else (grad_hx[0], None)
    weight_dims = [0] * len(grad_weights)
    return (grad_input, grad_hx, grad_weights), (input_dim, hx_dim, weight_dims)


# torch.autograd.grad(is_grads_batched=True) (jacobian(vectorize=True)) and gradcheck's batched-grad
# checks batch with torch's older vmap (the Batched dispatch key), whose generic per-sample loop
# cannot take elman_backward's Tensor[] argument or result. elman_backward on such tensors goes
# through a private twin with one flat tensor in place of each list, which that loop can batch.
_library = torch.library.Library("rnn_ext", "FRAGMENT")
_library.define(
    "_elman_backward_flat(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx,"
    " Tensor flat_weights, Tensor output, Tensor? batch_sizes, bool relu, bool has_bias,"
    " bool[3] output_mask) -> Tensor"
)


def _weight_shapes(input, hx, has_bias):
    directions, hidden, input_size = hx.shape[0], hx.shape[2], input.shape[-1]
    group = [(hidden, input_size), (hidden, hidden)] + ([(hidden,), (hidden,)] if has_bias else [])
    return group * directions


def _elman_backward_flat(
    grad_output, grad_h_n, input, hx, flat_weights, output, batch_sizes, relu, has_bias, output_mask
):
    weights, offset = [], 0
    for shape in _weight_shapes(input, hx, has_bias):
        size = math.prod(shape)
        weights.append(flat_weights.narrow(0, offset, size).view(shape))
        offset += size
    grad_input, grad_hx, grad_weights = elman_backward(
        grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask
    )
    return torch.cat([grad_input.reshape(-1), grad_hx.reshape(-1)] + [g.reshape(-1) for g in grad_weights])


def _elman_backward_flat_fake(
    grad_output, grad_h_n, input, hx, flat_weights, output, batch_sizes, relu, has_bias, output_mask
):
    size = (input.numel() if output_mask[0] else 0) + (hx.numel() if output_mask[1] else 0)
    size += flat_weights.numel() if output_mask[2] else 0
    return flat_weights.new_empty((size,))


def _elman_backward_legacy_batched(
    grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask
):
    has_bias = len(weights) == 4 * hx.shape[0]
    flat_weights = torch.cat([w.reshape(-1) for w in weights])
    flat = torch.ops.rnn_ext._elman_backward_flat(
        grad_output, grad_h_n, input, hx, flat_weights, output, batch_sizes, relu, has_bias, output_mask
    )
    parts, offset = [], 0
    for wanted, like in ((output_mask[0], input), (output_mask[1], hx)):
        if wanted:
            parts.append(flat.narrow(0, offset, like.numel()).view(like.shape))
            offset += like.numel()
        else:
            parts.append(torch.empty((0,), dtype=like.dtype, device=like.device))
    grad_weights = []
    if output_mask[2]:
        for weight in weights:
            grad_weights.append(flat.narrow(0, offset, weight.numel()).view(weight.shape))
            offset += weight.numel()
    return parts[0], parts[1], grad_weights


_library.impl("_elman_backward_flat", _elman_backward_flat, "CompositeExplicitAutograd")
torch.library.register_fake("rnn_ext::_elman_backward_flat", _elman_backward_flat_fake, lib=_library)
_library.impl("elman_backward", _elman_backward_legacy_batched, "Batched")
