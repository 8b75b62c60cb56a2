"""rnn_ext.RNN: torch.nn.RNN's contract on rnn_ext's fused Elman ops.

Subclasses nn.RNNBase (not nn.RNN, which Dynamo refuses to trace) so that parameters, init,
state_dict, repr, flat-weight bookkeeping and argument checks are the installed torch's own.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .ops import elman_rnn

_NONLINEARITY_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


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
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(mode, *args, **kwargs)

    def forward(self, input, hx=None):
        self._update_flat_weights()
        directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        sorted_indices = unsorted_indices = batch_sizes = None
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            # One read of the packed batch size, as a Python int: under torch.compile (with
            # capture_scalar_outputs) and torch.export every read of a tensor's value is a new
            # unknown symbol, and hx's batch must provably be this same one.
            max_batch_size = batch_sizes[0].item()
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
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
            max_batch_size = input.size(batch_dim)
        if hx is None:
            hx = torch.zeros(
                self.num_layers * directions,
                max_batch_size,
                self.hidden_size,
                dtype=input.dtype,
                device=input.device,
            )
        else:
            hx = self.permute_hidden(hx, sorted_indices)
            if packed and hx.dim() == 3 and torch.compiler.is_compiling():
                # A user's hx has a known batch, the packed one is an unknown: tell the compiler
                # they are equal (checked at run time) so the size check below can be traced.
                torch._check(hx.size(1) == max_batch_size)

        # nn.RNNBase.check_forward_args, with the batch read above instead of a second read of
        # batch_sizes[0]: the same checks, in the same order, with the same messages.
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hx, (self.num_layers * directions, max_batch_size, self.hidden_size))
        if not packed and input.size(1 - batch_dim) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        input, hx, weights = self._autocast(input, hx)
        if not packed and self.batch_first:
            input = input.transpose(0, 1)
        output, hidden = elman_rnn(
            input,
            hx,
            weights,
            self.num_layers,
            self.bidirectional,
            self.mode == "RNN_RELU",
            self.dropout,
            self.training,
            batch_sizes,
        )
        if not packed and self.batch_first:
            output = output.transpose(0, 1)
        if output.requires_grad:
            # The op saved its output for backward (act' is computed from it). Hand the caller a
            # copy with the same strides, so that in-place use of it (`out += residual`,
            # Dropout(inplace=True)) works as with nn.RNN, and so that it is not a view.
            output = output.clone()
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, hidden

    def _weights_have_changed(self):
        # nn.RNNBase's version calls hasattr/getattr per weight (Module.__getattr__ is slow); the
        # registered Parameter is read straight from _parameters, and anything else (weight_norm,
        # parametrizations, plain tensors assigned by the user) through getattr as before.
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            weight = parameters.get(name)
            if weight is None:
                weight = getattr(self, name, None)
            if weight is not None and ref is not None and ref() is not weight:
                return True
        return False

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
