"""Use OpenBLAS for MLX's CPU matmuls when the machine has it.

MLX's Linux wheel links the netlib reference BLAS (fp32 GEMM at a few
GFLOP/s). Loading OpenBLAS into the global symbol scope *before* ``mlx.core``
is imported makes MLX's ``cblas_*`` calls resolve to OpenBLAS (about 20x
faster here). ``exo_lab/__init__`` calls :func:`preload` first thing, and every
process exo_lab starts gets ``LD_PRELOAD`` through :func:`child_env`.

In front of OpenBLAS goes exo_lab's own ``cblas_sgemm`` for decode-sized products
(:mod:`exo_lab.native`, ``small_gemm.c``): OpenBLAS 0.3.21 packs the whole weight matrix on every
call, so x @ W.T with a few rows of x ran at a quarter of the memory bandwidth; the kernel streams
W once (measured on one core of this project's 2-core AVX2 machine: 4.8 -> 18 GB/s at 1 row,
2.1x at 8 rows). It is built on first use with the system compiler; without one, OpenBLAS alone.

Set ``EXO_LAB_BLAS=reference`` to keep MLX's bundled BLAS (for comparisons), and
``EXO_LAB_SMALL_GEMM=0`` to send every product to OpenBLAS.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from pathlib import Path

from exo_lab import defaults, native

log = logging.getLogger(__name__)

_CANDIDATES = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
)

_loaded_by_us = False
SMALL_GEMM = "small_gemm"
#: the kernels' OpenMP threads spin ~45 us (1000 of libgomp's spins, ~45 ns each here) after a product, then
#: sleep. libgomp's own default spins 300000 times (~15 ms): ranks sharing a machine's cores (a local cluster)
#: spun against each other (a local pipeline-2 decoded 1.43 tok/s spinning, 3.84 sleeping, one process 5.96 and
#: 5.3). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``, the default until now) woke the helper thread for each of
#: a decode step's ~113 products: a q4 llama-1b step on 2 cores took 32-33 ms with it and 30.5-31 ms with the
#: short spin, which bridges the gaps between one product and the next. A value the user set for either
#: variable wins.
OMP_SPIN = ("GOMP_SPINCOUNT", "1000")
OMP_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def _set_omp_wait(env: dict[str, str] | os._Environ[str]) -> None:
    """``GOMP_SPINCOUNT`` into ``env`` unless the user chose how OpenMP's idle threads wait."""
    if not any(v in env for v in OMP_VARIABLES):
        env[OMP_SPIN[0]] = OMP_SPIN[1]


#: OpenBLAS's own threads likewise: after each call they spin for 2**28 cycles (~0.1 s) before they sleep, so a
#: rank decoding a small model kept a second core busy doing nothing (1.0 core while its Python slept 2 ms between
#: tiny matmuls). 2**16 cycles (~25 us) still bridges back-to-back calls. Measured on a local cluster of two
#: nodes with the tiny model, five alternating rounds: pipeline-2 with 4 streams 354 -> 543 tok/s (192-614 ->
#: 484-550), one stream 135 -> 139 (52-193 -> 130-158); one rank 254 -> 279 (1 stream), 759 -> 674 (4 streams,
#: within the noise); llama-1b fp32 decode on both cores unchanged. A value the user set wins.
OPENBLAS_WAIT = ("OPENBLAS_THREAD_TIMEOUT", "16")


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
        if not _loaded_by_us and (path := find_openblas()):  # preloaded by the parent (child_env)
            _connect_small_gemm(path)
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
    small = small_gemm_library()
    if small is not None:  # first: MLX's cblas_sgemm resolves to it, and it hands the rest to OpenBLAS
        _set_omp_wait(os.environ)  # read once, when the kernel's OpenMP runtime loads with it
        ctypes.CDLL(str(small), mode=ctypes.RTLD_GLOBAL)
    os.environ.setdefault(*OPENBLAS_WAIT)  # read once, when OpenBLAS initializes (as it loads)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _loaded_by_us = True
    _connect_small_gemm(path)
    return True


def small_gemm_library() -> Path | None:
    """The decode-sized matmul library (built on first use) when allowed and buildable, else None."""
    return native.library(SMALL_GEMM) if defaults.small_gemm() else None


def _connect_small_gemm(openblas: str) -> None:
    """Tell the small-matmul library, when it is in this process, which OpenBLAS takes what it does not."""
    if not _mapped(f"lib{SMALL_GEMM}-"):
        return
    lib = small_gemm_library()
    if lib is not None and not ctypes.CDLL(str(lib)).exo_small_gemm_use(openblas.encode()):
        log.warning("the small-matmul kernel could not find OpenBLAS's functions in %s", openblas)


def _mapped(fragment: str) -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any(fragment in line for line in maps)
    except OSError:
        return False


def in_use() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    if _loaded_by_us:
        return True
    try:
        with open("/proc/self/maps") as maps:
            return any("libopenblas" in line and "scipy" not in line for line in maps)
    except OSError:
        return False


def small_gemm_in_use() -> bool:
    """True when the small-matmul kernel sits in front of OpenBLAS in this process."""
    return in_use() and _mapped(f"lib{SMALL_GEMM}-")


def name() -> str:
    """Which BLAS MLX's CPU backend uses in this process."""
    if sys.platform == "darwin":
        return "accelerate"
    if not in_use():
        return "reference"
    return "openblas+small_gemm" if small_gemm_in_use() else "openblas"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process that preloads OpenBLAS when allowed."""
    env = dict(os.environ if env is None else env)
    path = find_openblas() if wanted() and defaults.blas(env) != "reference" else None
    if path:
        current = env.get("LD_PRELOAD", "").split()
        small = native.library(SMALL_GEMM) if defaults.small_gemm(env) else None
        first = [p for p in ([str(small)] if small else []) + [path] if p not in current]
        env["LD_PRELOAD"] = " ".join(first + current)
        env.setdefault(*OPENBLAS_WAIT)
        if small:
            _set_omp_wait(env)
    return env
