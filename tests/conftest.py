"""Shared test helpers: the devices to run on (CPU, plus CUDA where the build and a GPU exist)."""
import pytest
import torch

import rnn_ext


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "rnn_ext::elman_forward", "CUDA"
    ):
        devices.append("cuda")
    return devices


DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Gives target the parameters of source (same names), leaving them independent tensors."""
    target.load_state_dict(source.state_dict())


__all__ = ["DEVICES", "device", "copy_weights", "rnn_ext"]
