"""The definition of the math, in plain PyTorch: one Elman layer, one direction, step by step.

    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)

Slow and obvious on purpose; tests use it (in float64) as the truth next to torch.nn.RNN.
"""

import torch


def elman_layer(
    input,
    h0,
    weight_ih,
    weight_hh,
    bias_ih=None,
    bias_hh=None,
    nonlinearity="tanh",
    reverse=False,
    lengths=None,
):
    """input [T, B, I], h0 [B, H]. `lengths` (list of B ints, default all T) limits each sequence:
    steps at or past a row's length leave its state alone and output zeros, as packing does.
    Returns output [T, B, H] and the final state [B, H] (of each row's own last step)."""
    steps, batch = input.shape[0], input.shape[1]
    lengths = [steps] * batch if lengths is None else list(lengths)
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0
    outputs = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        pre = input[t] @ weight_ih.T + h @ weight_hh.T
        if bias_ih is not None:
            pre = pre + bias_ih + bias_hh
        active = torch.tensor([t < n for n in lengths], device=input.device).unsqueeze(1)
        h = torch.where(active, act(pre), h)
        outputs[t] = torch.where(active, h, torch.zeros_like(h))
    return torch.stack(outputs), h


def elman_rnn(input, h0, layers, nonlinearity="tanh", bidirectional=False, lengths=None):
    """A stack of layers without dropout. input [T, B, I]; h0 [layers * directions, B, H];
    layers: per layer a list of per-direction tuples (w_ih, w_hh, b_ih, b_hh) (biases may be None).
    Returns output [T, B, directions * H] and h_n [layers * directions, B, H]."""
    final_states = []
    x = input
    for layer, directions in enumerate(layers):
        outs = []
        for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(directions):
            index = layer * len(directions) + d
            out, h = elman_layer(
                x, h0[index], w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse=d == 1, lengths=lengths
            )
            outs.append(out)
            final_states.append(h)
        x = torch.cat(outs, dim=-1)
    return x, torch.stack(final_states)
