"""How rnn_ext.RNN's layers reach ONNX: the TorchScript-based exporter gets torch's own RNN
function, whose export it knows (one ONNX RNN node per layer); the dynamo exporter gets ONNX RNN
nodes emitted directly, so the sequence length stays dynamic."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def reject_packed_export() -> None:
    raise RuntimeError(
        "rnn_ext.RNN: ONNX export of a PackedSequence input is not supported; export the model "
        "with a padded [batch, seq, feature] (or [seq, batch, feature]) tensor input instead"
    )


def _reject_packed(batch_sizes: Optional[Tensor]) -> None:
    if batch_sizes is not None:
        reject_packed_export()


def legacy_layers(
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
    """The layer stack as torch's rnn_tanh/rnn_relu on time-major input: what nn.RNN calls, so
    the TorchScript-based exporter writes what it writes for nn.RNN."""
    _reject_packed(batch_sizes)
    has_biases = len(flat_weights) // (num_layers * (2 if bidirectional else 1)) == 4
    function = torch._VF.rnn_relu if relu else torch._VF.rnn_tanh
    output, h_n = function(
        input, hx, flat_weights, has_biases, num_layers, dropout, training, bidirectional, False
    )
    return output, h_n


def _onnx_rnn_layer(input: Tensor, hx: Tensor, weights: List[Tensor], relu: bool) -> Tuple[Tensor, Tensor]:
    """One layer as one ONNX RNN node. ONNX stacks the directions: W [D, H, I], R [D, H, H],
    B [D, 2H] = b_ih || b_hh; Y comes back [T, D, B, H]."""
    directions = hx.shape[0]
    hidden = hx.shape[2]
    per_direction = len(weights) // directions
    groups = [weights[d * per_direction : (d + 1) * per_direction] for d in range(directions)]
    w = torch.stack([group[0] for group in groups])
    r = torch.stack([group[1] for group in groups])
    b = torch.stack([torch.cat([group[2], group[3]]) for group in groups]) if per_direction == 4 else None
    steps, batch = input.shape[0], input.shape[1]
    y, y_h = torch.onnx.ops.symbolic_multi_out(
        "RNN",
        [input, w, r, b, None, hx],
        {
            "activations": ["Relu" if relu else "Tanh"] * directions,
            "direction": "bidirectional" if directions == 2 else "forward",
            "hidden_size": int(hidden),
        },
        dtypes=[input.dtype, input.dtype],
        shapes=[[steps, directions, batch, hidden], [directions, batch, hidden]],
    )
    output = y.permute(0, 2, 1, 3).reshape(steps, batch, directions * hidden)
    return output, y_h


def onnx_node_layers(
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
    """The layer stack as ONNX RNN nodes, for the dynamo exporter (inference: no dropout)."""
    _reject_packed(batch_sizes)
    directions = 2 if bidirectional else 1
    per_layer = len(flat_weights) // num_layers
    layer_input = input
    final_states: List[Tensor] = []
    for layer in range(num_layers):
        weights = flat_weights[layer * per_layer : (layer + 1) * per_layer]
        layer_input, layer_h_n = _onnx_rnn_layer(
            layer_input, hx[layer * directions : (layer + 1) * directions], weights, relu
        )
        final_states.append(layer_h_n)
    return layer_input, torch.cat(final_states, 0)


def export_layers(
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
    """run_stack while an ONNX exporter is running: the TorchScript-based one traces."""
    layers = legacy_layers if torch.jit.is_tracing() else onnx_node_layers
    return layers(input, hx, flat_weights, num_layers, bidirectional, relu, dropout, training, batch_sizes)
