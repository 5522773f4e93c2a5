"""Facts about this machine that need no MLX: memory (cgroup-aware), cores, the CPU's name,
and the :class:`DeviceProfile` record a node reports (measured by :mod:`exo_lab.cluster.profile`).

Node agents, coordinators and the planner read these often; keeping them apart from the MLX
microbenchmarks means none of them loads MLX to do so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil


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
    # the running kernel's boot id (Linux): nodes reporting the same one run on one physical machine and share
    # its memory bus (simulated hosts, containers), whatever their hostnames and cores
    boot_id: str = ""
    mlx_version: str = ""
    mlx_devices: list[str] = field(default_factory=list)
    benchmark_device: str = ""  # the MLX device the numbers below were measured on
    blas: str = ""
    kernels: str = ""  # hash of exo_lab's C/C++ kernel sources the numbers were measured with
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # "<dtype>_m<M>"
    matmul_weight_read_gb_per_s: dict[str, float] = field(default_factory=dict)  # M=1 keys only
    matmul_shapes: dict[str, list[int]] = field(default_factory=dict)  # key -> [M, K, N] measured
    # per weight format: rows of a decode batch that one pass over the weights computes (exo_lab's q8/q4 kernel
    # multiplying in integers: 4); a format not named computes a batch's rows in one pass as far as one knows
    decode_rows_per_pass: dict[str, int] = field(default_factory=dict)
    memory_read_gb_per_s_reduce: float = 0.0
    memory_read_gb_per_s_gemv: float = 0.0
    memory_bandwidth_gb_per_s: float = 0.0  # the best of every bandwidth run kept for this hardware
    memory_read_gb_per_s_parallel: float = 0.0  # mx.sum split over one CPU stream per core
    memory_bandwidth_measured_at: float = 0.0  # unix time of the run that gave memory_bandwidth_gb_per_s
    memory_bandwidth_checked_at: float = 0.0  # unix time of the last bandwidth run (re-measures included)
    memory_bandwidth_runs: int = 0  # bandwidth runs the best is taken over
    # seconds one message between ranks costs beyond the link (MLX's ring backend, measured on loopback:
    # :mod:`exo_lab.cluster.collective`); 0 when not measured
    message_overhead_s: float = 0.0
    # seconds one decoder layer costs per decoded token beyond its weights' reads (MLX's per-operation cost:
    # :mod:`exo_lab.cluster.layer_overhead`); 0 when not measured
    layer_overhead_s: float = 0.0
    # seconds a decode step costs beyond its layers (embedding, norm, head, sampling, reading the tokens back:
    # :func:`exo_lab.cluster.layer_overhead.measure_step_overhead`); 0 when not measured
    step_overhead_s: float = 0.0
    measured_at: float = 0.0  # unix time of the last microbenchmark run (the best of the runs is kept)
    matmul_runs: int = 0  # microbenchmark runs the matmul rates are the best of
    measure_seconds: float = 0.0
    cache_key: str = ""
    # the cost model's constants fitted by ``exo-lab bench --calibrate`` (see :mod:`exo_lab.bench`):
    # ``decode_efficiency``, ``prefill_efficiency``, ``row_efficiency`` (factors on the rates above), ``hop_overhead_s``
    # (seconds per message between ranks), ``step_overhead_s`` (seconds per decode step, serving included),
    # ``request_overhead_s`` (seconds per request before its first token) and how they were fitted.
    # A new measurement (``--refresh-profile``) drops them: they are relative to the microbenchmarks.
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceProfile:
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
            rel = rel[len(root) :]
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


def boot_id() -> str:
    """This kernel's boot id (the same in every network namespace and container of one machine), or ``""``."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def cpu_count() -> int:
    """Cores this process may run on (honours cpuset cgroups and taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Bytes of the largest data cache of this machine's first CPU (Linux sysfs), 0 where it does not say.

    A read of memory must cover more than this to time the memory and not the cache: a 64 MB buffer on a
    cloud host whose L3 is 480 MiB read at ~52 GB/s where 256 MB and more read at ~31."""
    sizes = []
    for index in cache_dir.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


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
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()
