"""exo_lab's C code, compiled for this machine the first time it is needed.

``small_gemm.c`` is the decode-sized fp32 matmul put in front of OpenBLAS (see that file and
:mod:`exo_lab._blas`). It is built with the system C compiler (``$CC`` or ``cc``) and
``-march=native`` into ``exo_lab/native/build/`` (or, when the package is not writable, the user's
cache), named by a hash of the source, the compiler flags and the CPU's features, so a changed
source or another CPU builds again. No compiler, no library: callers carry on without it.

Imports nothing that imports MLX (it runs before MLX is loaded).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-ldl",)
_built: dict[str, Path | None] = {}


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def _build_dirs() -> list[Path]:
    from exo_lab import paths  # imports no MLX

    return [HERE / "build", paths.cache_dir() / "native"]


def library_name(name: str) -> str:
    """The file name of ``name``'s library built for this source, these flags and this CPU."""
    digest = hashlib.sha256()
    for part in ((HERE / f"{name}.c").read_bytes(), " ".join(FLAGS).encode(), platform.machine().encode()):
        digest.update(part)
    digest.update(_cpu_features().encode())
    return f"lib{name}-{digest.hexdigest()[:16]}.so"


def library(name: str) -> Path | None:
    """``name``'s shared library (built now when missing), or None (not Linux x86-64, or no compiler)."""
    if name in _built:
        return _built[name]
    _built[name] = found = _find_or_build(name)
    return found


def _find_or_build(name: str) -> Path | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    file = library_name(name)
    dirs = _build_dirs()
    for d in dirs:
        if (d / file).exists():
            return d / file
    cc = _compiler()
    if cc is None:
        log.info("no C compiler: %s is not built (decode matmuls go to the BLAS alone)", name)
        return None
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{file}.", dir=d)
            os.close(fd)
        except OSError:
            continue
        cmd = [cc, *FLAGS, "-o", tmp, str(HERE / f"{name}.c"), *LIBS]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            log.warning("building %s failed (%s): %s", name, " ".join(cmd), done.stderr.strip()[-2000:])
            return None
        os.replace(tmp, d / file)  # atomic: processes building at once each leave a whole library
        return d / file
    return None
