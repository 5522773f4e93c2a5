"""exo_lab's C and C++ code, compiled for this machine the first time it is needed.

- ``small_gemm.c`` is the decode-sized fp32 matmul put in front of OpenBLAS (see that file and
  :mod:`exo_lab._blas`), built with the system C compiler (``$CC`` or ``cc``): :func:`library`.
- ``weight_matmul.cpp`` holds MLX primitives, ``x @ W.T`` with bf16/fp16 or 8/4-bit quantized weights and
  fp32 activations, in a Python extension module (nanobind, against the installed MLX's headers and ``libmlx``), built with
  ``$CXX`` or ``c++``: :func:`extension` (the module, after checking it works with this MLX).
- ``cpu_fallbacks.cpp``: MLX primitives for RoPE, RMSNorm and a decode step's attention, which MLX's CPU runs
  as fallbacks of plain operations, and softmax, which it runs one element at a time
  (:mod:`exo_lab.models.fused`), an extension module built the same way.
- ``peer_sum.cpp``: a tensor pair's all-reduce over one TCP socket, as an MLX primitive
  (:mod:`exo_lab.engine.peer_link`), an extension module built the same way.

Both are built with ``-march=native`` into ``exo_lab/native/build/`` (or, when the package is not
writable, the user's cache), named by a hash of the source, the flags, the CPU's features (and for the
extension the MLX, nanobind and Python versions), so a changed source, another CPU or another MLX
builds again. No compiler, no library: callers carry on without it.

Imports nothing that imports MLX (it runs before MLX is loaded); :func:`extension` imports MLX.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-ldl",)
CXX_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fopenmp",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-DNDEBUG",
    "-DNB_DOMAIN=mlx",  # MLX's nanobind domain: its array type is this module's
)
_built: dict[str, Path | None] = {}
_modules: dict[str, ModuleType | None] = {}


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


def sources_digest() -> str:
    """A short hash of the C and C++ sources here: what the kernels compute (part of the profile's cache key)."""
    digest = hashlib.sha256()
    for path in sorted(HERE.glob("*.c*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


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
    if not _supported():
        return None
    cc = _compiler()
    return _build(name, library_name(name), lambda out: [cc, *FLAGS, "-o", out, str(HERE / f"{name}.c"), *LIBS], cc)


def _supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _build(name: str, file: str, command: Any, compiler: str | None) -> Path | None:
    """``file`` in the first build directory that has it, else built there with ``command(output_path)``."""
    dirs = _build_dirs()
    for d in dirs:
        if (d / file).exists():
            return d / file
    if compiler is None:
        log.info("no compiler: %s is not built (its callers carry on without it)", name)
        return None
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{file}.", dir=d)
            os.close(fd)
        except OSError:
            continue
        cmd = command(tmp)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            log.warning("building %s failed (%s): %s", name, " ".join(cmd), done.stderr.strip()[-2000:])
            return None
        os.replace(tmp, d / file)  # atomic: processes building at once each leave a whole library
        return d / file
    return None


def _package_dir(package: str) -> Path | None:
    """Where ``package`` keeps its C++ headers (``include/``): found without importing it (mlx is a namespace
    package, so a stray ``mlx`` folder on the path may come first)."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / "include").is_dir():
            return Path(location)
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _extension_command(name: str, mlx_dir: Path, nb_dir: Path) -> Any:
    cxx = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")
    include = sysconfig.get_paths()["include"]

    def command(out: str) -> list[str]:
        return [
            str(cxx),
            *CXX_FLAGS,
            f"-I{mlx_dir / 'include'}",
            f"-I{nb_dir / 'include'}",
            f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
            f"-I{include}",
            "-o",
            out,
            str(nb_dir / "src" / "nb_combined.cpp"),
            str(HERE / f"{name}.cpp"),
            f"-L{mlx_dir / 'lib'}",
            "-lmlx",
            f"-Wl,-rpath,{mlx_dir / 'lib'}",
        ]

    return command, cxx


def extension_path(name: str) -> Path | None:
    """The built extension module ``_<name>`` (built now when missing), or None (no MLX headers, no nanobind,
    no C++ compiler, not Linux x86-64)."""
    if name in _built:
        return _built[name]
    _built[name] = None
    mlx_dir, nb_dir = _package_dir("mlx"), _package_dir("nanobind")
    if not _supported() or mlx_dir is None or nb_dir is None:
        log.info("%s: no MLX headers or no nanobind, not built", name)
        return None
    digest = hashlib.sha256((HERE / f"{name}.cpp").read_bytes())
    for part in (
        *CXX_FLAGS,
        _cpu_features(),
        _version("mlx"),
        _version("nanobind"),
        sysconfig.get_config_var("EXT_SUFFIX"),
    ):
        digest.update(str(part).encode())
    command, cxx = _extension_command(name, mlx_dir, nb_dir)
    _built[name] = found = _build(name, f"_{name}-{digest.hexdigest()[:16]}.so", command, cxx)
    return found


_checked: dict[str, ModuleType | None] = {}


def checked_extension(name: str, check: Callable[[ModuleType], None], instead: str) -> ModuleType | None:
    """The extension module ``_<name>`` once ``check(module)`` passed (its functions take this MLX's arrays
    and give the results they should), or None, with a warning saying ``instead`` (what runs in its place).
    Checked once per process."""
    if name not in _checked:
        _checked[name] = None
        ext = extension(name)
        if ext is not None:
            try:
                check(ext)
                _checked[name] = ext
            except (TypeError, AssertionError, RuntimeError, ValueError, AttributeError, OSError) as err:
                log.warning("exo_lab's %s does not work with this MLX (%s): %s instead", name, err, instead)
    return _checked[name]


def extension(name: str) -> ModuleType | None:
    """The extension module ``_<name>`` loaded (imports MLX first: it registers the array type the module
    takes), or None when it cannot be built or loaded. Whether its functions take this MLX's arrays (the
    same nanobind ABI) is for the caller to check."""
    if name in _modules:
        return _modules[name]
    _modules[name] = None
    path = extension_path(name)
    if path is None:
        return None
    import mlx.core  # noqa: F401  (the array type the module's functions take)

    module_name = f"_{name}"
    try:
        loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
        spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError, AssertionError) as err:
        log.warning("%s (%s) does not load: %s", name, path, err)
        return None
    _modules[name] = module
    return module
