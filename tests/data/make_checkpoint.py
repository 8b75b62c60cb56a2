"""Writes, beside this file, what a user of rnn_ext 0.1.0 saves: whole-model checkpoints (torch.save
of the modules themselves) in rnn_ext_0_1_0_models.pt, and a TorchScript program (which names the
layer operator rnn_ext::elman_forward) in rnn_ext_0_1_0_scripted.pt. Run it with rnn_ext 0.1.0
installed; test_stack.py loads both with the current code."""

import pathlib
from typing import Optional, Tuple

import torch

import rnn_ext

here = pathlib.Path(__file__).parent
torch.manual_seed(0)
models = {
    "seed": rnn_ext.RNN(1, 32, batch_first=True),
    "stack": rnn_ext.RNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True, dropout=0.25),
}
models["stack"].eval()
torch.save(models, here / "rnn_ext_0_1_0_models.pt")


class Model(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(
        self, x: torch.Tensor, hx: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.rnn(x, hx)


torch.jit.script(Model(models["stack"])).save(str(here / "rnn_ext_0_1_0_scripted.pt"))
