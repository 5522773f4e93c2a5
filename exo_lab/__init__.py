"""exo_lab: a Jupyter-native workbench for distributed LLM inference on MLX.

The root is lazy (PEP 562): ``import exo_lab`` loads no MLX, tornado app or widget;
``exo_lab.Engine`` and the other public names import their module on first use. Importing the
package does load OpenBLAS (:mod:`exo_lab._blas`), so that MLX, whenever it is imported
later, uses it for its CPU matmuls.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from exo_lab import _blas
from exo_lab._version import __version__

_blas.preload()  # before anything imports mlx: OpenBLAS for MLX's CPU matmuls (imports no mlx itself)

#: public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "Cluster": "exo_lab.workbench",
    "ClusterError": "exo_lab.cluster.client",
    "Engine": "exo_lab.engine.generator",
    "LinkProfile": "exo_lab.cluster.topology",
    "ModelCard": "exo_lab.models.card",
    "NodeInfo": "exo_lab.cluster.topology",
    "Server": "exo_lab.api.server",
    "Topology": "exo_lab.cluster.topology",
    "connect": "exo_lab.workbench",
    "discover": "exo_lab.workbench",
    "local_cluster": "exo_lab.workbench",
    "resolve": "exo_lab.models.store",
    "serve": "exo_lab.api.server",
}

__all__ = [  # the keys of _EXPORTS and __version__ (a literal, for linters and type checkers)
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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from exo_lab.api.server import Server, serve
    from exo_lab.cluster.client import ClusterError
    from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
    from exo_lab.engine.generator import Engine
    from exo_lab.models.card import ModelCard
    from exo_lab.models.store import resolve
    from exo_lab.workbench import Cluster, connect, discover, local_cluster


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exo_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _register_display_hooks() -> None:
    """In an IPython kernel, have :mod:`exo_lab.ui` register the notebook displays of topologies,
    plans and instances (the data classes know nothing of widgets)."""
    if "IPython" in sys.modules:
        try:
            from IPython import get_ipython
        except ImportError:  # a broken IPython is no reason to fail importing exo_lab
            return
        if get_ipython() is not None:
            importlib.import_module("exo_lab.ui")


_register_display_hooks()
