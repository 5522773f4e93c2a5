"""exo_lab: a Jupyter-native workbench for distributed LLM inference on MLX."""

__version__ = "0.1.0"

from exo_lab import _blas

_blas.preload()  # before anything imports mlx: OpenBLAS for MLX's CPU matmuls

from exo_lab.api.server import Server, serve  # noqa: E402
from exo_lab.engine.generator import Engine  # noqa: E402
from exo_lab.models import ModelCard, resolve  # noqa: E402

__all__ = ["Engine", "ModelCard", "Server", "__version__", "resolve", "serve"]
