"""rnn_ext.RNN: torch.nn.RNN's contract on rnn_ext's fused Elman ops.

Subclasses nn.RNNBase (not nn.RNN, which Dynamo refuses to trace) so that parameters, init,
state_dict, repr, flat-weight bookkeeping and argument checks are the installed torch's own.
"""

from itertools import repeat
from operator import is_
from typing import Optional, Tuple, overload

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence

from ._extension import _C
from .checkpoint import check_state
from .layers import StackConfig, dropout_masks, overrides_torch_function, run_stack
from .onnx import reject_packed_export

_NONLINEARITY_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


# Looked up once: the eager fast path's checks run on every call.
_is_compiling = torch.compiler.is_compiling
_is_any_autocast_enabled = torch._C._is_any_autocast_enabled
_are_functorch_transforms_active = torch._C._are_functorch_transforms_active
_get_tracing_state = torch._C._get_tracing_state
_is_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
# rnn_ext::elman_stack through a typed binding: the operator, minus torch.ops' argument parsing.
_elman_stack_eager = _C._elman_stack_eager
_TENSOR = repeat(Tensor)


class RNN(nn.RNNBase):
    r"""Drop-in replacement for :class:`torch.nn.RNN`: same arguments, parameters, outputs and
    errors; forward and backward run in rnn_ext's fused kernels.

    Args:
        input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, batch_first=False,
        dropout=0.0, bidirectional=False, device=None, dtype=None: as for torch.nn.RNN.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        mode = _NONLINEARITY_MODES.get(self.nonlinearity)
        if mode is None:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        pass

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:
        pass

    def forward(self, input, hx=None):
        if not torch.jit.is_scripting():
            # The common call: a batched tensor, outside torch.compile/export, autocast, tracing,
            # torch.func transforms, forward-mode AD and torch function modes. Under Dynamo,
            # is_compiling() ends it before the checks Dynamo cannot trace.
            if (
                type(input) is Tensor
                and input.dim() == 3
                and not _is_compiling()
                and not _is_any_autocast_enabled()
                and not _are_functorch_transforms_active()
                and forward_ad._current_level < 0
                and _get_tracing_state() is None
                and not _is_torch_function_mode_enabled()
            ):
                result = self._forward_eager_batched(input, hx)
                if result is not None:
                    return result
        self._update_flat_weights()
        directions = 2 if self.bidirectional else 1
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        sorted_indices: Optional[Tensor] = None
        unsorted_indices: Optional[Tensor] = None
        batch_sizes: Optional[Tensor] = None
        if isinstance(input, PackedSequence):
            if not torch.jit.is_scripting():
                if torch.onnx.is_in_onnx_export():
                    reject_packed_export()
            packed = True
            batch_sizes = input.batch_sizes
            sorted_indices = input.sorted_indices
            unsorted_indices = input.unsorted_indices
            data = input.data
            if torch.jit.is_scripting():
                max_batch_size = int(input.batch_sizes[0])
            else:
                # One read of the packed batch size, as a Python int: under torch.compile (with
                # capture_scalar_outputs) and torch.export every read of a tensor's value is a
                # new unknown symbol, and hx's batch must provably be this same one.
                max_batch_size = input.batch_sizes[0].item()
        else:
            packed = False
            data = input
            if data.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {data.dim()}D tensor instead")
            is_batched = data.dim() == 3
            if not is_batched:
                data = data.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            max_batch_size = data.size(batch_dim)
        if hx is None:
            hx = torch.zeros(
                self.num_layers * directions,
                max_batch_size,
                self.hidden_size,
                dtype=data.dtype,
                device=data.device,
            )
        else:
            hx = self.permute_hidden(hx, sorted_indices)
            if not torch.jit.is_scripting():
                if packed and hx.dim() == 3 and torch.compiler.is_compiling():
                    # A user's hx has a known batch, the packed one is an unknown: tell the
                    # compiler they are equal (checked at run time) so the size check below can
                    # be traced.
                    torch._check(hx.size(1) == max_batch_size)

        # nn.RNNBase.check_forward_args, with the batch read above instead of a second read of
        # batch_sizes[0]: the same checks, in the same order, with the same messages.
        self.check_input(data, batch_sizes)
        self.check_hidden_size(hx, (self.num_layers * directions, max_batch_size, self.hidden_size))
        if not packed and not torch.jit.is_tracing() and data.size(1 - batch_dim) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if torch.jit.is_scripting():
            weights = self._flat_weights
        else:
            data, hx, weights = self._autocast(data, hx)
        config = StackConfig(
            self.num_layers,
            self.bidirectional,
            self.mode == "RNN_RELU",
            self.batch_first,
            float(self.dropout),
            self.training,
        )
        output, hidden = run_stack(data, hx, weights, batch_sizes, config)
        if isinstance(input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, hidden

    @torch.jit.unused
    def _forward_eager_batched(self, input: Tensor, hx: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
        """forward for the common call (a batched plain tensor, eager, no autocast, trace, transform,
        export or torch function mode active): nn.RNN's checks of such a call and one
        rnn_ext::elman_stack call, with the general path's results. Returns None for anything
        irregular, which the general path then handles or rejects with its messages."""
        weights = self._registered_flat_weights()
        if weights is None:
            return None
        for weight in weights:
            if type(weight) is not nn.Parameter and overrides_torch_function([weight]):
                return None  # ExpandedWeights and other tensor subclasses: run_stack routes them
        shape = input.shape
        batch_first = self.batch_first
        if batch_first:
            batch, steps = shape[0], shape[1]
        else:
            steps, batch = shape[0], shape[1]
        if steps == 0 or shape[2] != self.input_size or input.dtype != weights[0].dtype:
            return None
        bidirectional = self.bidirectional
        num_layers = self.num_layers
        hidden = self.hidden_size
        if hx is None:
            # Without hx the operator reads H from weight_hh_l0: a wrong one gets the general
            # path's message, which names it.
            if weights[1].shape != (hidden, hidden):
                return None
        elif hx.shape != (num_layers * 2 if bidirectional else num_layers, batch, hidden):
            return None
        masks = []
        if num_layers > 1 and self.dropout and self.training:
            config = StackConfig(num_layers, bidirectional, False, batch_first, float(self.dropout), True)
            masks = dropout_masks([steps, batch], hidden, input, config)
        if hx is not None and type(hx) is not Tensor:
            return None  # a tensor subclass: torch.ops consults its __torch_function__
        return _elman_stack_eager(
            input, hx, weights, masks, num_layers, bidirectional, self.mode == "RNN_RELU", batch_first
        )

    def __setstate__(self, state):
        # Unpickling (torch.load of a whole model, deepcopy): the state may come from an untrusted
        # checkpoint, since this class is a safe global for weights_only loads (below).
        check_state(state)
        super().__setstate__(state)

    def _registered_flat_weights(self):
        """self._flat_weights when they are exactly this module's registered parameters, in order
        (else None after nn.RNNBase's own refresh, for the general path). One identity comparison
        replaces nn.RNNBase's per-weight _weights_have_changed walk: anything that swaps a
        parameter (assignment, functional_call, load_state_dict(assign=True), .to()) replaces an
        entry of _parameters."""
        parameters = self._parameters
        weights = self._flat_weights
        if len(weights) != len(parameters) or not all(map(is_, weights, parameters.values())):
            self._update_flat_weights()
            weights = self._flat_weights
            if len(weights) != len(parameters) or not all(map(is_, weights, parameters.values())):
                return None  # parametrized, or a weight that is not a registered parameter
        if not all(map(isinstance, weights, _TENSOR)):
            return None  # a weight set to None: the general path raises nn.RNN's error
        return weights

    def _autocast(self, input, hx):
        """Under autocast nn.RNN runs in a lower precision; do the same, with autocast's rule for
        what it casts (floating tensors except float64 ones). On the CPU that is the autocast
        dtype. On CUDA it is float16 whatever the autocast dtype: nn.RNN there goes through
        torch's cuDNN autocast wrapper (_cudnn_rnn_cast_reflatten), which casts to half."""
        weights = self._flat_weights
        for index, weight in enumerate(weights):
            if weight is None:  # a weight set to None: nn.RNN's kernel binding raises this
                raise TypeError(f"expected Tensor as element {index} in argument 2, but got NoneType")
        device_type = input.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            dtype = torch.float16 if device_type == "cuda" else torch.get_autocast_dtype("cpu")

            def cast(tensor):
                if tensor.is_floating_point() and tensor.dtype != torch.float64:
                    return tensor.to(dtype)
                return tensor

            input, hx = cast(input), cast(hx)
            weights = [cast(w) for w in weights]
        return input, hx, weights


# Whole-model checkpoints: `torch.load(path, weights_only=True)` rebuilds only allow-listed classes.
# A user's allow-list names torch.nn.modules.rnn.RNN, not this class; registered here, a checkpoint
# holding rnn_ext.RNN loads wherever the same checkpoint with nn.RNN does. Process-wide, once
# rnn_ext is imported; what it admits is this one class, whose __setstate__ checks the state.
torch.serialization.add_safe_globals([RNN])
