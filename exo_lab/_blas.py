"""Use OpenBLAS for MLX's CPU matmuls when the machine has it.

MLX's Linux wheel links the netlib reference BLAS (fp32 GEMM at a few
GFLOP/s). Loading OpenBLAS into the global symbol scope *before* ``mlx.core``
is imported makes MLX's ``cblas_*`` calls resolve to OpenBLAS (about 20x
faster here). ``exo_lab/__init__`` calls :func:`preload` first thing, and every
process exo_lab starts gets ``LD_PRELOAD`` through :func:`child_env`.

Set ``EXO_LAB_BLAS=reference`` to keep MLX's bundled BLAS (for comparisons).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

from exo_lab import defaults

log = logging.getLogger(__name__)

_CANDIDATES = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
)

_loaded_by_us = False


def find_openblas() -> str | None:
    """Path of a system OpenBLAS library, or None."""
    if sys.platform != "linux":
        return None
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def wanted() -> bool:
    """Whether the user allows OpenBLAS (``EXO_LAB_BLAS`` is not ``reference``)."""
    return defaults.blas() != "reference"


def preload() -> bool:
    """Load OpenBLAS globally if allowed, present, and MLX is not imported yet.

    Returns True when OpenBLAS is (now) in the process.
    """
    global _loaded_by_us
    if in_use():
        return True
    if not wanted():
        return False
    path = find_openblas()
    if path is None:
        return False
    if "mlx.core" in sys.modules:
        log.warning(
            "mlx was imported before exo_lab, so MLX keeps its slow bundled BLAS; "
            "import exo_lab first (or start Python with LD_PRELOAD=%s)",
            path,
        )
        return False
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _loaded_by_us = True
    return True


def in_use() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    if _loaded_by_us:
        return True
    try:
        with open("/proc/self/maps") as maps:
            return any("libopenblas" in line and "scipy" not in line for line in maps)
    except OSError:
        return False


def name() -> str:
    """Which BLAS MLX's CPU backend uses in this process."""
    if sys.platform == "darwin":
        return "accelerate"
    return "openblas" if in_use() else "reference"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process that preloads OpenBLAS when allowed."""
    env = dict(os.environ if env is None else env)
    path = find_openblas() if wanted() and defaults.blas(env) != "reference" else None
    if path:
        current = env.get("LD_PRELOAD", "")
        if path not in current.split():
            env["LD_PRELOAD"] = f"{path} {current}".strip()
    return env
