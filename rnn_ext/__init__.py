"""rnn_ext: a drop-in torch.nn.RNN whose forward and backward run in fused C++/CUDA kernels."""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

# isort: off
from ._extension import info  # noqa: E402  (first: it checks the build against the running torch)
from . import ops  # noqa: E402

# isort: on
from .convert import convert  # noqa: E402
from .module import RNN  # noqa: E402

__all__ = ["RNN", "convert", "info", "ops", "__version__"]
