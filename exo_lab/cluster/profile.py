"""DeviceProfile: what a node reports about its machine, measured where it matters.

Static facts (CPU, cores, MLX devices, BLAS) are read; memory is read live and
honours cgroups (v1 and v2), so a simulated node reports its own limit; matmul
throughput and memory bandwidth are measured with MLX microbenchmarks on the
default device, within a time budget (~5 s on a 2-core CPU).

How the microbenchmarks stay real and bounded:

- Each matmul is ``x @ W.T`` (as ``nn.Linear`` does) with K=2048 (Llama-1B
  hidden) for float32, bfloat16 and q4 (``mx.quantized_matmul``, 4 bits,
  group 64, fp32 activations and scales). M=512 is prompt-like, M=1 decode-like.
- N (the number of weight rows) is sized per variant: a small probe (N=128)
  gives the rate, then N is the largest power of two whose iteration takes
  about a quarter of the variant's time slice, capped at 2048 for M=512 and at
  32768 for M=1. M=1 uses up to 16 matrices' worth of rows (256 MB fp32, less
  when available memory is under 2 GiB) so the weights do not fit in cache, as
  in decode over many layers. The shapes used are recorded in
  ``matmul_shapes`` ([M, K, N]); GFLOP/s = 2·M·K·N / t.
- Each variant gets an equal share of what is left of 90% of the budget: one
  warm-up, then the timed iterations that fit in its slice (at least 1, at
  most 10); the best iteration counts. On this project's 2-core CPU, bfloat16
  and q4 at M=512 end up at N=256..512 (~6 and ~3 GFLOP/s).
- Weight-read bandwidth (M=1) = weight bytes (with q4 scales and biases) / t.
  ``memory_read_gb_per_s_reduce`` is ``mx.sum`` over the same (<= 256 MB) fp32 array (MLX
  CPU: one core); ``memory_read_gb_per_s_gemv`` is the fp32 M=1 rate (OpenBLAS
  may use every core); ``memory_bandwidth_gb_per_s`` is the larger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from filelock import FileLock
from tqdm.auto import tqdm

from exo_lab import _blas, paths
from exo_lab.cluster.machine import (  # noqa: F401  (re-exported: the profile's facts without MLX)
    DeviceProfile,
    _cgroup_memory,
    cpu_count,
    cpu_model,
    memory_now,
)

log = logging.getLogger(__name__)

_SCHEMA = 1  # bump when the microbenchmarks change, so old caches are not reused
_K = 2048
_N_PROMPT_MAX = 2048
_N_DECODE_MAX = 32768  # 32768 x 2048 fp32 = 256 MB
_N_PROBE = 128
_MAX_ITERS = 10
_Q_BITS, _Q_GROUP = 4, 64


def mlx_devices() -> list[str]:
    """MLX devices usable here: ``["cpu"]`` or ``["cpu", "gpu"]``."""
    gpu = False
    for backend in ("metal", "cuda"):
        module = getattr(mx, backend, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            gpu = True
    return ["cpu", "gpu"] if gpu else ["cpu"]


def gpu_info() -> tuple[str | None, int | None]:
    """(name, usable memory bytes) of the GPU, or (None, None) without one."""
    if "gpu" not in mlx_devices():
        return None, None
    info: dict[str, Any] = {}
    if hasattr(mx, "device_info"):
        info = dict(mx.device_info(mx.gpu))
    elif hasattr(mx, "metal") and hasattr(mx.metal, "device_info"):
        info = dict(mx.metal.device_info())
    name = info.get("device_name") or info.get("architecture")
    memory = next(
        (info[k] for k in ("max_recommended_working_set_size", "memory_size", "total_memory") if info.get(k)), None
    )
    return (str(name) if name else None), (int(memory) if memory else None)


def _static_facts() -> dict[str, Any]:
    gpu_name, gpu_memory = gpu_info()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "system": platform.system(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "mlx_version": mx.__version__,  # pyright: ignore[reportAttributeAccessIssue]  # in mlx.core, not its stub
        "mlx_devices": mlx_devices(),
        "blas": _blas.name(),
        "gpu_name": gpu_name,
        "gpu_memory_bytes": gpu_memory,
    }


def cache_key(facts: dict[str, Any] | None = None) -> str:
    """Hash of what decides the microbenchmark numbers on this machine."""
    facts = facts or _static_facts()
    keys = ("cpu_model", "cpu_count", "machine", "mlx_version", "blas", "mlx_devices", "gpu_name")
    blob = json.dumps([_SCHEMA, *(facts[k] for k in keys)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- microbenchmarks ---------------------------------------------------------


def _seconds(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def _best_seconds(fn: Callable[[], mx.array], slice_s: float, warm: bool = False, best: float = math.inf) -> float:
    """The best of timed iterations of ``fn`` that fit in ``slice_s`` (at least one
    unless ``best`` is given; after a warm-up unless ``warm``)."""
    start = time.perf_counter()
    if not warm:
        _seconds(fn)
    for _ in range(_MAX_ITERS):
        if best < math.inf and time.perf_counter() - start + best > slice_s:
            break  # the next iteration would overrun the slice
        best = min(best, _seconds(fn))
    return best


def _sized_matmul(
    make: Callable[[int], tuple[Callable[[], mx.array], int]], n_max: int, slice_s: float
) -> tuple[int, float, int]:
    """Probe with N=128, pick N for ~slice/4 per iteration, time it: (N, seconds, weight bytes)."""
    start = time.perf_counter()
    n = min(_N_PROBE, n_max)
    fn, nbytes = make(n)
    _seconds(fn)  # warm-up (first-call costs)
    probe = _seconds(fn)
    per_row = probe / n
    target = max(n, min(n_max, 2 ** int(math.log2(max(1.0, slice_s / 4 / max(per_row, 1e-12))))))
    remaining = lambda: max(0.0, slice_s - (time.perf_counter() - start))  # noqa: E731
    if target == n:
        return n, _best_seconds(fn, remaining(), warm=True, best=probe), nbytes
    fn, nbytes = make(target)
    return target, _best_seconds(fn, remaining()), nbytes


def _decode_rows(available_bytes: int) -> int:
    """Rows of the M=1 weights: 32768 (256 MB fp32), halved until they take at
    most 1/8 of the available memory (a small simulated node), at least 2048."""
    rows = _N_DECODE_MAX
    while rows > _N_PROMPT_MAX and rows * _K * 4 > available_bytes // 8:
        rows //= 2
    return rows


def measure_profile(budget_s: float = 5.0, progress: bool = False) -> DeviceProfile:
    """Measure this machine now: static facts, live memory and the MLX microbenchmarks."""
    facts = _static_facts()
    start = time.perf_counter()
    deadline = start + 0.9 * budget_s
    n_decode_max = _decode_rows(memory_now()[1])
    arrays = {
        "weights": mx.random.uniform(-1.0, 1.0, (n_decode_max, _K), key=mx.random.key(0)),  # <= 256 MB fp32
        "x1": mx.random.uniform(-1.0, 1.0, (1, _K), key=mx.random.key(1)),
        "x512": mx.random.uniform(-1.0, 1.0, (512, _K), key=mx.random.key(2)),
    }
    mx.eval(*arrays.values())
    log.debug("setup %.2f s", time.perf_counter() - start)

    def plain(dtype: mx.Dtype, x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            w = arrays["weights"][:n] if dtype == arrays["weights"].dtype else arrays["weights"][:n].astype(dtype)
            xs = x.astype(dtype)
            mx.eval(w, xs)
            return (lambda: xs @ w.T), w.nbytes

        return make

    def q4(x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            wq, scales, biases = mx.quantize(arrays["weights"][:n], group_size=_Q_GROUP, bits=_Q_BITS)
            mx.eval(wq, scales, biases)
            fn = lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=_Q_GROUP, bits=_Q_BITS)  # noqa: E731
            return fn, wq.nbytes + scales.nbytes + biases.nbytes

        return make

    variants = [
        ("float32_m1", plain(mx.float32, arrays["x1"]), n_decode_max),
        ("float32_m512", plain(mx.float32, arrays["x512"]), _N_PROMPT_MAX),
        ("bfloat16_m1", plain(mx.bfloat16, arrays["x1"]), n_decode_max),
        ("bfloat16_m512", plain(mx.bfloat16, arrays["x512"]), _N_PROMPT_MAX),
        ("q4_m1", q4(arrays["x1"]), n_decode_max),
        ("q4_m512", q4(arrays["x512"]), _N_PROMPT_MAX),
    ]
    bar = _progress_bar(len(variants) + 1) if progress else None
    steps_left = len(variants) + 1

    def slice_s() -> float:
        return max(0.0, deadline - time.perf_counter()) / steps_left

    reduce_s = _best_seconds(lambda: mx.sum(arrays["weights"]), slice_s())
    reduce_gb_s = arrays["weights"].nbytes / reduce_s / 1e9
    steps_left -= 1
    if bar:
        bar.update()

    gflops: dict[str, float] = {}
    read: dict[str, float] = {}
    shapes: dict[str, list[int]] = {}
    for name, make, n_max in variants:
        m = 1 if name.endswith("_m1") else 512
        t0 = time.perf_counter()
        n, seconds, nbytes = _sized_matmul(make, n_max, slice_s())
        log.debug("%s: N=%d, %.3f s per iteration, step %.2f s", name, n, seconds, time.perf_counter() - t0)
        gflops[name] = 2 * m * _K * n / seconds / 1e9
        shapes[name] = [m, _K, n]
        if m == 1:
            read[name] = nbytes / seconds / 1e9
        steps_left -= 1
        if bar:
            bar.update()
    if bar:
        bar.close()
    arrays.clear()  # free the test matrices before clearing MLX's cache
    mx.clear_cache()
    elapsed = time.perf_counter() - start

    total, available = memory_now()
    facts = {**facts, "cache_key": cache_key(facts)}
    profile = DeviceProfile(
        memory_total_bytes=total,
        memory_available_bytes=available,
        benchmark_device=mx.default_device().type.name,
        matmul_gflops=gflops,
        matmul_weight_read_gb_per_s=read,
        matmul_shapes=shapes,
        memory_read_gb_per_s_reduce=reduce_gb_s,
        memory_read_gb_per_s_gemv=read["float32_m1"],
        memory_bandwidth_gb_per_s=max(reduce_gb_s, read["float32_m1"]),
        measured_at=time.time(),
        measure_seconds=elapsed,
        **facts,
    )
    log.info(
        "measured %s in %.1f s: %s GFLOP/s, %.1f GB/s",
        profile.cpu_model,
        elapsed,
        {k: round(v, 1) for k, v in gflops.items()},
        profile.memory_bandwidth_gb_per_s,
    )
    return profile


def _progress_bar(total: int) -> Any:
    return tqdm(total=total, desc="profiling", unit="step")


# --- cache -------------------------------------------------------------------


def save_calibration(calibration: dict[str, Any], key: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """Store ``calibration`` in the cached profile ``key`` (default: this machine's); returns its path.

    None when there is no cached profile to store it with (the caller keeps it in memory only).
    Takes the profiles lock the node agents take, so a profile being measured is never overwritten.
    """
    directory = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "profiles"
    path = directory / f"{key or cache_key()}.json"
    if not path.exists():
        return None
    with FileLock(str(directory.parent / "profiles.lock")):
        data = json.loads(path.read_text())
        data["calibration"] = dict(calibration)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    return path


def load_or_measure(refresh: bool = False, cache_dir: Path | None = None) -> DeviceProfile:
    """This machine's profile: microbenchmarks from the per-hardware cache (unless
    ``refresh`` or missing), memory always read live."""
    directory = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "profiles"
    path = directory / f"{cache_key()}.json"
    if not refresh and path.exists():
        try:
            profile = DeviceProfile.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable profile cache %s (%s); measuring again", path, err)
        else:
            total, available = memory_now()
            return replace(profile, memory_total_bytes=total, memory_available_bytes=available)
    profile = measure_profile()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1))
    os.replace(tmp, path)
    return profile
