"""rnn_ext.convert: swap every torch.nn.RNN inside a model for an rnn_ext.RNN with the same
settings and the same parameters."""

from __future__ import annotations

import copy

from torch import nn

from .module import RNN


def _replacement(rnn: nn.RNN) -> RNN:
    first = rnn._flat_weights[0]
    new = RNN(
        rnn.input_size,
        rnn.hidden_size,
        rnn.num_layers,
        rnn.nonlinearity,
        bias=rnn.bias,
        batch_first=rnn.batch_first,
        dropout=rnn.dropout,
        bidirectional=rnn.bidirectional,
        device="meta",
        dtype=first.dtype,
    )
    # Share the very Parameter objects, as weight tying and optimisers expect.
    for name in rnn._flat_weights_names:
        setattr(new, name, getattr(rnn, name))
    new._init_flat_weights()
    new.train(rnn.training)
    return new


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns `model` with every torch.nn.RNN in it (the model itself included) replaced by an
    rnn_ext.RNN holding the same parameters. With inplace=False the model is deep-copied first."""
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) is nn.RNN:
        return _replacement(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.RNN:
            setattr(model, name, _replacement(child))
        else:
            convert(child, inplace=True)
    return model
