"""rnn_ext: a drop-in torch.nn.RNN whose forward and backward run in fused C++/CUDA kernels."""
from . import ops
from .convert import convert
from .module import RNN

__version__ = "0.1.0"

__all__ = ["RNN", "convert", "ops", "__version__"]
