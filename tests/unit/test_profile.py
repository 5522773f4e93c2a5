"""DeviceProfile: JSON, cache, cgroup-aware memory and cores, the real microbenchmarks."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import pytest

from exo_lab import native
from exo_lab.cluster import profile as prof
from exo_lab.cluster.machine import last_level_cache_bytes
from exo_lab.cluster.profile import DeviceProfile, load_or_measure, measure_profile, memory_now
from exo_lab.models import formats, halfmatmul

GIB = 1 << 30
KEYS = tuple(f"{f}_m{m}" for f in ("float32", "bfloat16", "float16", "q8", "q4") for m in (1, 8, 512))
WIDENED_KEYS = tuple(f"{f}_m{m}" for f in ("bf16w", "fp16w") for m in (1, 8, 512))  # where the kernel is built


def fake_profile(**changes) -> DeviceProfile:
    data = dict(
        memory_total_bytes=8 * GIB,
        memory_available_bytes=6 * GIB,
        cpu_model="Test CPU",
        cpu_count=2,
        system="Linux",
        machine="x86_64",
        hostname="h",
        mlx_version="0.0",
        mlx_devices=["cpu"],
        benchmark_device="cpu",
        blas="openblas",
        matmul_gflops={k: 1.5 for k in KEYS},
        matmul_weight_read_gb_per_s={k: 2.5 for k in KEYS if k.endswith("_m1")},
        matmul_shapes={k: [int(k.rsplit("_m", 1)[1]), 2048, 2048] for k in KEYS},
        memory_read_gb_per_s_reduce=8.0,
        memory_read_gb_per_s_gemv=12.0,
        memory_bandwidth_gb_per_s=12.0,
        memory_bandwidth_checked_at=time.time(),  # checked just now: a cached copy is not measured again
        measured_at=1.0,
        measure_seconds=3.0,
        cache_key=prof.cache_key(),
    )
    return DeviceProfile(**{**data, **changes})


def test_json_round_trip():
    p = fake_profile(gpu_name="Apple M3", gpu_memory_bytes=96 * GIB)
    assert DeviceProfile.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_partial_profile_loads_with_defaults():
    p = DeviceProfile.from_json({"memory_total_bytes": GIB, "matmul_gflops": {"bfloat16_m1": 700.0}, "unknown": 1})
    assert p.memory_total_bytes == GIB and p.matmul_gflops == {"bfloat16_m1": 700.0}
    assert p.cpu_count == 0 and p.mlx_devices == [] and p.gpu_memory_bytes is None


def test_static_facts():
    assert prof.cpu_count() == len(os.sched_getaffinity(0))
    assert prof.cpu_model()
    assert prof.mlx_devices()[0] == "cpu"
    key = prof.cache_key()
    assert key == prof.cache_key() and len(key) == 16 and int(key, 16) >= 0
    facts = prof._static_facts()
    assert facts["kernels"] == native.sources_digest() and len(facts["kernels"]) == 12
    # another kernel source computes at other rates: a cached profile is not reused for it
    assert prof.cache_key({**facts, "kernels": "0" * 12}) != prof.cache_key(facts)


def test_memory_now_is_sane():
    total, available = memory_now()
    assert 0 < available <= total


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_a_parent_binds(tmp_path):
    mount = tmp_path / "cg"
    proc = tmp_path / "proc"
    write(proc / "cgroup", "0::/node/worker\n")
    write(proc / "mountinfo", f"30 25 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    write(mount / "node" / "memory.max", f"{GIB}\n")
    write(mount / "node" / "memory.current", f"{300 << 20}\n")
    write(mount / "node" / "memory.stat", f"anon 1\ninactive_file {100 << 20}\n")
    write(mount / "node" / "worker" / "memory.max", "max\n")
    write(mount / "node" / "worker" / "memory.current", f"{300 << 20}\n")
    assert prof._cgroup_memory(proc, host_total=64 * GIB) == (GIB, GIB - (200 << 20))
    assert prof._cgroup_memory(proc, host_total=GIB // 2) is None  # a limit above the host's memory is no limit


def test_cgroup_v1_tightest_level_wins(tmp_path):
    mount = tmp_path / "memory"
    proc = tmp_path / "proc"
    write(proc / "cgroup", "5:cpuset:/\n4:memory:/sim/node1\n0::/\n")
    write(proc / "mountinfo", f"40 25 0:30 / {mount} rw - cgroup cgroup rw,memory\n")
    write(mount / "sim" / "memory.limit_in_bytes", f"{4 * GIB}\n")
    write(mount / "sim" / "memory.usage_in_bytes", f"{3 * GIB}\n")
    write(mount / "sim" / "node1" / "memory.limit_in_bytes", f"{2 * GIB}\n")
    write(mount / "sim" / "node1" / "memory.usage_in_bytes", f"{GIB // 2}\n")
    assert prof._cgroup_memory(proc, host_total=64 * GIB) == (2 * GIB, GIB)


def test_reads_of_memory_cover_twice_the_last_level_cache_within_an_eighth_of_memory():
    mib = 2**20
    assert prof.uncached_bytes(64 * GIB, cache_bytes=480 * mib) == 960 * mib  # a cloud host's L3
    assert prof.uncached_bytes(64 * GIB, cache_bytes=32 * mib) == 256 * mib  # never under 256 MB
    assert prof.uncached_bytes(GIB, cache_bytes=480 * mib) == 128 * mib  # a small simulated node
    assert prof.uncached_bytes(0, cache_bytes=0) == 16 * mib
    assert prof.uncached_bytes(3 * GIB + 5, cache_bytes=0) % (prof._K * 4) == 0  # whole fp32 rows


def test_last_level_cache_is_the_largest_data_cache(tmp_path):
    for index, (kind, size) in enumerate(
        [("Data", "48K"), ("Instruction", "4096M"), ("Unified", "2048K"), ("Unified", "491520K")]
    ):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "type").write_text(kind + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 480 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 0


def test_decode_like_products_read_views_of_one_stream():
    """Every format's M=1 weights lie over the stream's bytes, one array after the other."""
    stream = mx.full((64, prof._K), 0.5, mx.float32)
    for fmt in formats.FORMATS.values():
        n = prof.stream_capacity(stream, fmt)
        ws = prof.stream_weights(stream, fmt, n)
        assert sum(w.nbytes for w in ws) <= stream.nbytes < sum(w.nbytes for w in ws) + sum(w.nbytes for w in ws) / n
        assert [w.shape[0] for w in ws] == [n] * len(ws)
        assert mx.isfinite(ws[-1].astype(mx.float32)).all().item()  # a constant fill: no NaN in any format


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """measure_profile replaced by a fake that counts its calls; memory_now by a fixed value."""
    calls: list[int] = []

    def fake_measure(budget_s: float = 5.0, progress: bool = False) -> DeviceProfile:
        calls.append(1)
        return fake_profile(measured_at=float(len(calls)))

    monkeypatch.setattr(prof, "measure_profile", fake_measure)
    monkeypatch.setattr(prof, "memory_now", lambda: (3 * GIB, GIB))
    return calls


def test_cache_measures_once_and_refreshes_memory(counted, tmp_path):
    first = load_or_measure(cache_dir=tmp_path)
    assert counted == [1]
    assert (tmp_path / f"{prof.cache_key()}.json").exists()
    second = load_or_measure(cache_dir=tmp_path)
    assert counted == [1]
    assert second.matmul_gflops == first.matmul_gflops and second.measured_at == first.measured_at
    assert (second.memory_total_bytes, second.memory_available_bytes) == (3 * GIB, GIB)  # live, not cached
    third = load_or_measure(refresh=True, cache_dir=tmp_path)
    assert counted == [1, 1] and third.measured_at == 2.0
    assert load_or_measure(cache_dir=tmp_path).measured_at == 2.0


def test_a_cached_profile_says_which_machine_loads_it(counted, tmp_path, monkeypatch):
    """The cache is per kind of hardware: a machine (or simulated host) of the same kind loading it is itself."""
    load_or_measure(cache_dir=tmp_path)
    monkeypatch.setattr(prof.socket, "gethostname", lambda: "another-host")
    assert load_or_measure(cache_dir=tmp_path).hostname == "another-host"
    assert counted == [1]
    # ... and which physical machine it runs on: the kernel's boot id, live (every namespace of it sees one)
    monkeypatch.setattr(prof, "boot_id", lambda: "another-kernel")
    assert load_or_measure(cache_dir=tmp_path).boot_id == "another-kernel"


def test_boot_id_names_the_running_kernel():
    from pathlib import Path

    assert prof.boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip() != ""


def test_cache_defaults_to_the_exo_lab_cache_dir(counted, tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_LAB_CACHE_DIR", str(tmp_path))
    load_or_measure()
    assert (tmp_path / "profiles" / f"{prof.cache_key()}.json").exists()


def test_unreadable_cache_is_measured_again(counted, tmp_path):
    (tmp_path / f"{prof.cache_key()}.json").write_text("{not json")
    assert load_or_measure(cache_dir=tmp_path).matmul_gflops["q4_m1"] == 1.5
    assert counted == [1]


def test_a_cached_profile_without_the_step_overhead_gets_it_measured_once(counted, tmp_path, monkeypatch):
    measured: list[int] = []
    monkeypatch.setattr(prof, "measure_step_overhead", lambda: measured.append(1) or 2e-4)
    load_or_measure(cache_dir=tmp_path)  # measured whole by the fake
    cached = tmp_path / f"{prof.cache_key()}.json"
    old = json.loads(cached.read_text())
    del old["step_overhead_s"]  # as a profile cached before the step overhead was measured
    cached.write_text(json.dumps(old))
    assert load_or_measure(cache_dir=tmp_path).step_overhead_s == 2e-4
    assert load_or_measure(cache_dir=tmp_path).step_overhead_s == 2e-4
    assert counted == [1] and measured == [1]
    assert json.loads((tmp_path / f"{prof.cache_key()}.json").read_text())["step_overhead_s"] == 2e-4


def test_a_measured_step_overhead_of_zero_is_not_measured_on_every_load(counted, tmp_path, monkeypatch):
    """Under load a step can measure no slower than its layers (0): that is a measurement, not a missing one."""
    measured: list[int] = []
    monkeypatch.setattr(prof, "measure_step_overhead", lambda: measured.append(1) or 2e-4)
    first = load_or_measure(cache_dir=tmp_path)  # the fake measured 0
    assert first.step_overhead_s == 0.0
    assert load_or_measure(cache_dir=tmp_path).step_overhead_s == 0.0
    assert measured == []


def test_a_failing_bandwidth_recheck_keeps_the_cached_profile(counted, tmp_path, monkeypatch):
    load_or_measure(cache_dir=tmp_path)

    def fails(*_a: object, **_k: object) -> float:
        raise RuntimeError("[malloc] Unable to allocate")

    monkeypatch.setattr(prof, "measure_bandwidth", fails)
    monkeypatch.setattr(prof, "RECHECK_AFTER_S", -1.0)  # due now
    before = json.loads((tmp_path / f"{prof.cache_key()}.json").read_text())
    again = load_or_measure(cache_dir=tmp_path)
    assert again.memory_bandwidth_gb_per_s == before["memory_bandwidth_gb_per_s"]
    assert json.loads((tmp_path / f"{prof.cache_key()}.json").read_text()) == before
    assert counted == [1]


def test_a_step_costs_more_than_its_layers():
    """A one-layer model whole (embedding, head, argmax, the token read back) against its layer alone. The two
    medians are ~0.1 ms apart: under load (CI's two workers on two cores) a run can invert them (three runs of
    24 steps each did, twice in CI), so it gets five runs of 64 steps."""
    from exo_lab.cluster.layer_overhead import measure_step_overhead

    assert any(measure_step_overhead(steps=64, layers=1) > 0 for _ in range(5))


@pytest.mark.slow
@pytest.mark.parametrize("burst", ["first", "second"])
def test_a_burst_during_one_decode_product_does_not_set_its_format_s_rate(monkeypatch, burst):
    """Each M=1 product is timed again after all the others and keeps its faster run: one of float32's two M=1
    timings (the first product measured, and the last) is made ten times slower, as a burst of other work would
    make it, and the profile holds the other."""
    real, runs = prof._sized_matmul, []
    here = KEYS + (WIDENED_KEYS if halfmatmul.available() else ())
    decode = [k for k in here if k.endswith("_m1")]
    slow = 0 if burst == "first" else len(here) + len(decode) - 1

    def timed(make, n_max, slice_s, probe_rows=prof._N_PROBE, whole_s=0.0):
        n, seconds, nbytes = real(make, n_max, slice_s, probe_rows, whole_s)
        runs.append((n, seconds * (10 if len(runs) == slow else 1), nbytes))
        return runs[-1]

    monkeypatch.setattr(prof, "_sized_matmul", timed)
    p = measure_profile(budget_s=3.0)
    assert len(runs) == len(here) + len(decode)  # every product once, the M=1 ones twice (float32's last)
    n, seconds, nbytes = runs[-1 if burst == "first" else 0]
    assert p.matmul_weight_read_gb_per_s["float32_m1"] == p.memory_read_gb_per_s_gemv == nbytes / seconds / 1e9
    assert p.matmul_shapes["float32_m1"] == [1, prof._K, n]
    n, seconds, nbytes = runs[slow]
    assert p.matmul_weight_read_gb_per_s["float32_m1"] > nbytes / seconds / 1e9


@pytest.mark.slow
def test_measure_profile_is_real_and_bounded():
    start = time.monotonic()
    p = measure_profile()
    elapsed = time.monotonic() - start
    assert elapsed <= 8.5, f"microbenchmarks took {elapsed:.1f} s"
    assert 0 < p.measure_seconds <= elapsed
    here = KEYS + (WIDENED_KEYS if halfmatmul.available() else ())
    assert set(p.matmul_gflops) == set(here) == set(p.matmul_shapes)
    assert set(p.matmul_weight_read_gb_per_s) == {k for k in here if k.endswith("_m1")}
    rates = [
        *p.matmul_gflops.values(),
        *p.matmul_weight_read_gb_per_s.values(),
        p.memory_read_gb_per_s_reduce,
        p.memory_read_gb_per_s_gemv,
    ]
    assert all(isinstance(v, float) and 0 < v < math.inf for v in rates)
    assert 0 < p.message_overhead_s < 0.05  # two real ring ranks on loopback
    assert 1e-6 < p.layer_overhead_s < 0.05  # a real stack of Llama layers: their operations' cost
    assert 0 <= p.step_overhead_s < 0.05  # a whole step of the same model beyond its layers
    assert p.matmul_runs == 1
    assert p.memory_bandwidth_gb_per_s == max(
        p.memory_read_gb_per_s_reduce, p.memory_read_gb_per_s_parallel, p.memory_read_gb_per_s_gemv
    )
    assert p.memory_bandwidth_measured_at == p.memory_bandwidth_checked_at == p.measured_at
    assert p.memory_bandwidth_runs == 1
    assert all(m in (1, 8, 512) and k == 2048 and n >= 128 for m, k, n in p.matmul_shapes.values())
    assert 0 < p.memory_available_bytes <= p.memory_total_bytes
    assert isinstance(p.cpu_model, str) and p.cpu_model and p.cpu_count >= 1
    assert p.system and p.machine and p.hostname and p.mlx_version and "cpu" in p.mlx_devices
    assert p.cache_key == prof.cache_key() and abs(p.measured_at - time.time()) < 60
    assert (p.gpu_memory_bytes is None) == ("gpu" not in p.mlx_devices)
    if p.system == "Linux" and p.benchmark_device == "cpu" and p.blas.startswith("openblas"):
        assert p.matmul_gflops["float32_m512"] > p.matmul_gflops["bfloat16_m512"]
    assert DeviceProfile.from_json(json.loads(json.dumps(p.to_json()))) == p


# --- real cgroups (v1, as root) ------------------------------------------------

_PROBE = """
import json, os, sys
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
from exo_lab.cluster.profile import cpu_count, memory_now
total, available = memory_now()
print(json.dumps({"total": total, "available": available, "cpu_count": cpu_count()}))
"""


@contextmanager
def v1_cgroup(controller: str, settings: dict[str, str]) -> Iterator[Path]:
    """A fresh cgroup v1 under ``/sys/fs/cgroup/<controller>``, removed afterwards."""
    root = Path("/sys/fs/cgroup") / controller
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
        pytest.skip(f"no writable cgroup v1 {controller} hierarchy at {root}")
    path = root / f"exolab-test-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as err:
        pytest.skip(f"cannot create {path}: {err}")
    try:
        for name, value in settings.items():
            (path / name).write_text(value)
        yield path
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except OSError as err:  # EBUSY while the exited child is still being torn down
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def run_probe(cgroup: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(cgroup / "cgroup.procs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_cgroup_limit_is_reported():
    with v1_cgroup("memory", {"memory.limit_in_bytes": str(GIB)}) as cgroup:
        seen = run_probe(cgroup)
    assert seen["total"] == GIB
    assert 0 < seen["available"] <= GIB


def test_cpuset_cgroup_limits_cpu_count():
    cpu = min(os.sched_getaffinity(0))
    mems = Path("/sys/fs/cgroup/cpuset/cpuset.mems")
    mems_value = mems.read_text().strip() if mems.exists() else "0"
    with v1_cgroup("cpuset", {"cpuset.cpus": str(cpu), "cpuset.mems": mems_value}) as cgroup:
        seen = run_probe(cgroup)
    assert seen["cpu_count"] == 1
