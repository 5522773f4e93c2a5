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
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil

from exo_lab import _blas, paths

log = logging.getLogger(__name__)

_SCHEMA = 1  # bump when the microbenchmarks change, so old caches are not reused
_K = 2048
_N_PROMPT_MAX = 2048
_N_DECODE_MAX = 32768  # 32768 x 2048 fp32 = 256 MB
_N_PROBE = 128
_MAX_ITERS = 10
_Q_BITS, _Q_GROUP = 4, 64


@dataclass(frozen=True)
class DeviceProfile:
    """One machine as a node sees it. Every field has a default, so a partial
    (what-if) profile loads too."""

    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    cpu_model: str = ""
    cpu_count: int = 0
    system: str = ""
    machine: str = ""
    hostname: str = ""
    mlx_version: str = ""
    mlx_devices: list[str] = field(default_factory=list)
    benchmark_device: str = ""  # the MLX device the numbers below were measured on
    blas: str = ""
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # "<dtype>_m<M>"
    matmul_weight_read_gb_per_s: dict[str, float] = field(default_factory=dict)  # M=1 keys only
    matmul_shapes: dict[str, list[int]] = field(default_factory=dict)  # key -> [M, K, N] measured
    memory_read_gb_per_s_reduce: float = 0.0
    memory_read_gb_per_s_gemv: float = 0.0
    memory_bandwidth_gb_per_s: float = 0.0
    measured_at: float = 0.0  # unix time
    measure_seconds: float = 0.0
    cache_key: str = ""
    # the cost model's constants fitted by ``exo-lab bench --calibrate`` (see :mod:`exo_lab.bench`):
    # ``decode_efficiency``, ``prefill_efficiency`` (factors on the rates above), ``hop_overhead_s``
    # (seconds per message between ranks) and how they were fitted.
    # A new measurement (``--refresh-profile``) drops them: they are relative to the microbenchmarks.
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DeviceProfile":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


# --- memory (cgroup-aware) ---------------------------------------------------


def memory_now() -> tuple[int, int]:
    """(total, available) bytes: the tightest cgroup limit below the host's
    memory, else psutil's host values."""
    vm = psutil.virtual_memory()
    limited = _cgroup_memory(Path("/proc/self"), vm.total)
    if limited is None:
        return int(vm.total), int(vm.available)
    total, headroom = limited
    return total, min(headroom, int(vm.available))


def _cgroup_memory(proc: Path, host_total: int) -> tuple[int, int] | None:
    """(limit, limit - usage) of the tightest memory cgroup above this process.

    Walks from the process's cgroup up to the hierarchy's root (a parent's limit
    binds its children too). Usage leaves out inactive page cache, which the
    kernel reclaims before it hits the limit (as ``docker stats`` does).
    """
    limits, headrooms = [], []
    for version, chain in _cgroup_dirs("memory", proc):
        if version == 1:
            limit_file, usage_file, inactive = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            limit_file, usage_file, inactive = "memory.max", "memory.current", "inactive_file"
        for level in chain:
            limit, usage = _read_int(level / limit_file), _read_int(level / usage_file)
            if limit is None or usage is None or limit >= host_total:
                continue
            usage = max(0, usage - _memory_stat(level / "memory.stat").get(inactive, 0))
            limits.append(limit)
            headrooms.append(max(0, limit - usage))
    return (min(limits), min(headrooms)) if limits else None


def _cgroup_dirs(controller: str, proc: Path) -> list[tuple[int, list[Path]]]:
    """For v1 (``controller``) and v2: (version, [own cgroup dir, parent, ..., mount root])."""
    try:
        own = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    paths_by_version: dict[int, str] = {}
    for line in own:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths_by_version[2] = parts[2]
        elif controller in parts[1].split(","):
            paths_by_version[1] = parts[2]
    found = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mount_point, fstype, options = fields[3], Path(fields[4]), tail[0], tail[2].split(",")
        version = 2 if fstype == "cgroup2" else 1 if fstype == "cgroup" and controller in options else 0
        if version not in paths_by_version:
            continue
        rel = paths_by_version[version]
        if root != "/" and (rel == root or rel.startswith(root + "/")):
            rel = rel[len(root):]
        directory = mount_point / rel.lstrip("/")
        if not directory.is_dir():  # a cgroup namespace we cannot map: use the mount's root
            directory = mount_point
        chain = [directory, *[p for p in directory.parents if p.is_relative_to(mount_point)]]
        found.append((version, chain))
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _memory_stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    stat = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


# --- static facts ------------------------------------------------------------


def cpu_count() -> int:
    """Cores this process may run on (honours cpuset cgroups and taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name, as well as the OS tells it."""
    if sys.platform == "linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


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
    memory = next((info[k] for k in ("max_recommended_working_set_size", "memory_size", "total_memory") if info.get(k)), None)
    return (str(name) if name else None), (int(memory) if memory else None)


def _static_facts() -> dict[str, Any]:
    gpu_name, gpu_memory = gpu_info()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "system": platform.system(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "mlx_version": mx.__version__,
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


def _sized_matmul(make: Callable[[int], tuple[Callable[[], mx.array], int]], n_max: int, slice_s: float) -> tuple[int, float, int]:
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
    weights = mx.random.uniform(-1.0, 1.0, (n_decode_max, _K), key=mx.random.key(0))  # <= 256 MB fp32
    x1 = mx.random.uniform(-1.0, 1.0, (1, _K), key=mx.random.key(1))
    x512 = mx.random.uniform(-1.0, 1.0, (512, _K), key=mx.random.key(2))
    mx.eval(weights, x1, x512)
    log.debug("setup %.2f s", time.perf_counter() - start)

    def plain(dtype: mx.Dtype, x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            w = weights[:n] if dtype == weights.dtype else weights[:n].astype(dtype)
            xs = x.astype(dtype)
            mx.eval(w, xs)
            return (lambda: xs @ w.T), w.nbytes

        return make

    def q4(x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            wq, scales, biases = mx.quantize(weights[:n], group_size=_Q_GROUP, bits=_Q_BITS)
            mx.eval(wq, scales, biases)
            fn = lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=_Q_GROUP, bits=_Q_BITS)  # noqa: E731
            return fn, wq.nbytes + scales.nbytes + biases.nbytes

        return make

    variants = [
        ("float32_m1", plain(mx.float32, x1), n_decode_max),
        ("float32_m512", plain(mx.float32, x512), _N_PROMPT_MAX),
        ("bfloat16_m1", plain(mx.bfloat16, x1), n_decode_max),
        ("bfloat16_m512", plain(mx.bfloat16, x512), _N_PROMPT_MAX),
        ("q4_m1", q4(x1), n_decode_max),
        ("q4_m512", q4(x512), _N_PROMPT_MAX),
    ]
    bar = _progress_bar(len(variants) + 1) if progress else None
    steps_left = len(variants) + 1

    def slice_s() -> float:
        return max(0.0, deadline - time.perf_counter()) / steps_left

    reduce_s = _best_seconds(lambda: mx.sum(weights), slice_s())
    reduce_gb_s = weights.nbytes / reduce_s / 1e9
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
    del weights, x1, x512
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
    log.info("measured %s in %.1f s: %s GFLOP/s, %.1f GB/s", profile.cpu_model, elapsed,
             {k: round(v, 1) for k, v in gflops.items()}, profile.memory_bandwidth_gb_per_s)
    return profile


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="profiling", unit="step")


# --- cache -------------------------------------------------------------------


def save_calibration(calibration: dict[str, Any], key: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """Store ``calibration`` in the cached profile ``key`` (default: this machine's); returns its path.

    None when there is no cached profile to store it with (the caller keeps it in memory only).
    Takes the profiles lock the node agents take, so a profile being measured is never overwritten.
    """
    from filelock import FileLock

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
