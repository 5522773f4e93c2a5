"""exo_lab: a Jupyter-native workbench for distributed LLM inference on MLX."""

__version__ = "0.1.0"

from exo_lab import _blas

_blas.preload()  # before anything imports mlx: OpenBLAS for MLX's CPU matmuls

from exo_lab.api.server import Server, serve  # noqa: E402
from exo_lab.cluster.client import Cluster, ClusterError, connect, discover, local_cluster  # noqa: E402
from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology  # noqa: E402
from exo_lab.engine.generator import Engine  # noqa: E402
from exo_lab.models import ModelCard, resolve  # noqa: E402

__all__ = [
    "Cluster",
    "ClusterError",
    "Engine",
    "LinkProfile",
    "ModelCard",
    "NodeInfo",
    "Server",
    "Topology",
    "__version__",
    "connect",
    "discover",
    "local_cluster",
    "resolve",
    "serve",
]
