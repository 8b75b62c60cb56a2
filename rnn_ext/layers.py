"""The one place that decides how rnn_ext.RNN's layer stack runs (run_stack): the fused operator
rnn_ext::elman_stack, the same math as differentiable ATen ops (rnn_ext::_elman_stack_composite)
for torch.func / forward-mode AD, or what an ONNX exporter understands. The stack's arguments
travel as one StackConfig."""

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from .onnx import export_layers
from .ops import elman_stack, elman_stack_composite


class StackConfig(NamedTuple):
    """What a layer stack is, beside its tensors: the module's settings for one call."""

    num_layers: int
    bidirectional: bool
    relu: bool
    batch_first: bool  # ignored for packed input
    dropout: float
    training: bool


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
    input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor], config: StackConfig
) -> Tuple[Tensor, Tensor]:
    """The layer stack as torch's rnn_tanh/rnn_relu, which nn.RNN calls (its own dropout draws
    included): a tensor subclass that overrides it (ExpandedWeights decomposes it into cells) then
    sees what it sees with nn.RNN."""
    directions = 2 if config.bidirectional else 1
    has_biases = len(weights) // (config.num_layers * directions) == 4
    function = torch._VF.rnn_relu if config.relu else torch._VF.rnn_tanh
    if batch_sizes is None:
        return function(
            input,
            hx,
            weights,
            has_biases,
            config.num_layers,
            config.dropout,
            config.training,
            config.bidirectional,
            config.batch_first,
        )
    return function(
        input,
        batch_sizes,
        hx,
        weights,
        has_biases,
        config.num_layers,
        config.dropout,
        config.training,
        config.bidirectional,
    )


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


def dropout_masks(rows: List[int], hidden: int, like: Tensor, config: StackConfig) -> List[Tensor]:
    """The inter-layer dropout masks nn.RNN's kernel draws, drawn here before the stack runs: one
    per layer but the last, on the time-major shape of a layer's output (`rows` + [D*H]), in the
    layers' order, scaled as at::dropout scales them, with `like`'s dtype and device. The same seed
    gives nn.RNN's masks on the CPU. Empty when no dropout applies."""
    p = config.dropout
    if p == 0.0 or not config.training or config.num_layers == 1:
        return []
    shape = rows + [(2 if config.bidirectional else 1) * hidden]
    masks: List[Tensor] = []
    for _ in range(config.num_layers - 1):
        mask = torch.empty(shape, dtype=like.dtype, device=like.device)
        if mask.numel() == 0:
            pass  # at::dropout draws nothing for an empty tensor
        elif p == 1.0:
            mask.zero_()  # at::dropout multiplies by zero and draws nothing
        else:
            mask.bernoulli_(1.0 - p).div_(1.0 - p)
        masks.append(mask)
    return masks


def run_stack(
    input: Tensor,
    hx: Tensor,
    weights: List[Tensor],
    batch_sizes: Optional[Tensor],
    config: StackConfig,
) -> Tuple[Tensor, Tensor]:
    """A stack of Elman layers, like torch's `_VF.rnn_tanh`/`rnn_relu`, with the arguments nn.RNN's
    forward has checked: input [T, B, I] ([B, T, I] when batch_first) or packed [N, I] with
    `batch_sizes`; hx [L*D, B, H]; nn.RNN's flat weights. Returns (output, h_n). The one place
    that chooses the path:

    - an ONNX exporter running: torch's RNN function (TorchScript-based exporter) or ONNX RNN
      nodes (dynamo exporter);
    - a torch.func transform other than vmap, or a forward-mode AD tangent: the composite operator
      rnn_ext::_elman_stack_composite, whose kernel is a chain of differentiable ATen ops;
    - otherwise (eager, vmap, torch.compile/export, TorchScript): rnn_ext::elman_stack.
    """
    swap = config.batch_first and batch_sizes is None
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export():
            output, h_n = export_layers(
                input.transpose(0, 1) if swap else input,
                hx,
                weights,
                config.num_layers,
                config.bidirectional,
                config.relu,
                config.dropout,
                config.training,
                batch_sizes,
            )
            return (output.transpose(0, 1) if swap else output), h_n
    if batch_sizes is not None:
        rows = [input.shape[0]]
    elif swap:
        rows = [input.shape[1], input.shape[0]]
    else:
        rows = [input.shape[0], input.shape[1]]
    if not torch.jit.is_scripting():
        if not torch.compiler.is_compiling() and overrides_torch_function([input, hx] + list(weights)):
            return torch_function_layers(input, hx, weights, batch_sizes, config)
    masks = dropout_masks(rows, hx.shape[-1], input, config)
    if not torch.jit.is_scripting():
        composite = not torch.compiler.is_compiling() and needs_composite(input, hx, weights)
        return (elman_stack_composite if composite else elman_stack)(
            input,
            hx,
            weights,
            batch_sizes,
            masks,
            config.num_layers,
            config.bidirectional,
            config.relu,
            config.batch_first,
        )
    return torch.ops.rnn_ext.elman_stack(
        input,
        hx,
        weights,
        batch_sizes,
        masks,
        config.num_layers,
        config.bidirectional,
        config.relu,
        config.batch_first,
    )
