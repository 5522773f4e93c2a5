"""The profile's memory bandwidth: measured again when it looks far off, the best run kept, with its time.

Real measurements on small sizes (a few MB, a fraction of a second), no stand-ins for MLX."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest

import exo_lab  # noqa: F401  (OpenBLAS before MLX)

# isort: split

from exo_lab.cluster import profile as prof
from exo_lab.cluster.display import measured_when
from exo_lab.cluster.machine import DeviceProfile

ROWS = 1024  # 8 MB of fp32


def profile(bw: float, reads: float = 1.0, at: float = 1000.0, **kw) -> DeviceProfile:
    return DeviceProfile(
        memory_bandwidth_gb_per_s=bw,
        memory_bandwidth_measured_at=at,
        memory_bandwidth_checked_at=at,
        memory_bandwidth_runs=1,
        matmul_weight_read_gb_per_s={"float32_m1": reads, "q4_m1": reads / 2},
        measured_at=at,
        **kw,
    )


def test_looks_off_when_reads_or_a_decode_beat_the_bandwidth():
    assert not prof.looks_off(profile(bw=10.0, reads=9.0))
    assert prof.looks_off(profile(bw=6.5, reads=9.0))  # a format read faster than "the bandwidth"
    assert prof.looks_off(profile(bw=6.5, reads=1.0), implied_gb_s=9.0)  # so did a measured decode
    assert not prof.looks_off(profile(bw=6.5, reads=1.0), implied_gb_s=7.0)  # within OFF_FACTOR
    assert prof.looks_off(profile(bw=0.0))
    # a decode of 1.4 tok/s over 4.94 GB of fp32 weights read 6.9 GB/s
    assert math.isclose(prof.implied_bandwidth(4.94e9, 1.4), 6.916)


def test_remeasured_keeps_the_best_run_and_its_time():
    p = profile(bw=6.5, at=1000.0)
    lower = prof.remeasured(p, 5.0, now=2000.0)
    assert lower.memory_bandwidth_gb_per_s == 6.5 and lower.memory_bandwidth_measured_at == 1000.0
    assert lower.memory_bandwidth_checked_at == 2000.0 and lower.memory_bandwidth_runs == 2
    higher = prof.remeasured(lower, 14.0, now=3000.0)
    assert higher.memory_bandwidth_gb_per_s == 14.0 and higher.memory_bandwidth_measured_at == 3000.0
    assert higher.memory_bandwidth_checked_at == 3000.0 and higher.memory_bandwidth_runs == 3
    assert measured_when(higher.to_json()) == "1970-01-01 00:50 UTC"
    assert measured_when({}) == "-"


def test_measure_bandwidth_is_real_and_quick():
    start = time.monotonic()
    gb_s = prof.measure_bandwidth(0.2, rows=ROWS)
    assert 0.05 < gb_s < 10_000 and math.isfinite(gb_s)
    assert time.monotonic() - start < 10


def test_check_bandwidth_measures_a_far_off_profile_again():
    now = time.time()
    low = profile(bw=1e-3, reads=1e-3, at=1000.0)  # as if measured under heavy load
    fixed = prof.check_bandwidth(low, implied_gb_s=0.01, budget_s=0.1)
    assert fixed.memory_bandwidth_gb_per_s > 1e-3  # a real run beats it
    assert fixed.memory_bandwidth_measured_at >= now and fixed.memory_bandwidth_checked_at >= now
    assert fixed.memory_bandwidth_runs == 1 + 3  # off: three runs, the best kept
    high = profile(bw=1e6, reads=1.0, at=1000.0)  # no run here beats it: kept, with its time
    kept = prof.check_bandwidth(high, budget_s=0.1)
    assert kept.memory_bandwidth_gb_per_s == 1e6 and kept.memory_bandwidth_measured_at == 1000.0
    assert kept.memory_bandwidth_checked_at >= now and kept.memory_bandwidth_runs == 2


def test_cached_profile_far_off_is_measured_again_and_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(prof, "RECHECK_S", 0.1)
    monkeypatch.setattr(prof, "measure_bandwidth", lambda budget_s=0.1: _real(budget_s))
    path = tmp_path / f"{prof.cache_key()}.json"
    now = time.time()
    # cached and checked just now, but a format reads 1000x faster than its bandwidth: far off
    path.write_text(json.dumps(profile(bw=1e-3, reads=1.0, at=now, cache_key=prof.cache_key()).to_json()))
    loaded = prof.load_or_measure(cache_dir=tmp_path)
    assert loaded.memory_bandwidth_gb_per_s > 1e-3 and loaded.memory_bandwidth_measured_at >= now
    stored = json.loads(path.read_text())
    assert stored["memory_bandwidth_gb_per_s"] == loaded.memory_bandwidth_gb_per_s
    assert stored["memory_bandwidth_measured_at"] == loaded.memory_bandwidth_measured_at
    assert stored["matmul_weight_read_gb_per_s"]["float32_m1"] == 1.0  # the rest of the profile untouched
    # sane and checked recently: loaded as cached, nothing measured
    sane = profile(bw=1e6, reads=1.0, at=now, cache_key=prof.cache_key())
    path.write_text(json.dumps(sane.to_json()))
    again = prof.load_or_measure(cache_dir=tmp_path)
    assert again.memory_bandwidth_checked_at == now and again.memory_bandwidth_runs == 1
    # checked over RECHECK_AFTER_S ago: measured again, the better cached number kept
    path.write_text(json.dumps(profile(bw=1e6, reads=1.0, at=now - 2 * prof.RECHECK_AFTER_S).to_json()))
    old = prof.load_or_measure(cache_dir=tmp_path)
    assert old.memory_bandwidth_gb_per_s == 1e6 and old.memory_bandwidth_checked_at >= now
    assert json.loads(path.read_text())["memory_bandwidth_runs"] == 2


def _real(budget_s: float) -> float:
    """The real measurement, on a small array (the default reads 64 MB)."""
    return _MEASURE(budget_s, rows=ROWS)


_MEASURE = prof.measure_bandwidth


# --- the matmuls: measured again when taken under load, the best of each kept ----------------------


def test_matmuls_look_low_when_the_bandwidth_outran_every_read_of_their_run():
    quiet = DeviceProfile(memory_bandwidth_gb_per_s=19.7, memory_read_gb_per_s_gemv=19.7)
    assert not prof.matmuls_look_low(quiet)
    # the 1-core sim host's cache: matmuls and reads taken under load, the bandwidth re-checked since
    loaded = DeviceProfile(memory_bandwidth_gb_per_s=21.6, memory_read_gb_per_s_gemv=12.6)
    assert prof.matmuls_look_low(loaded)
    assert not prof.matmuls_look_low(DeviceProfile(memory_bandwidth_gb_per_s=21.6))  # no reads recorded


def test_best_of_two_runs_keeps_each_figures_best_and_drops_a_stale_calibration():
    old = DeviceProfile(
        matmul_gflops={"bf16w_m1": 7.7, "float32_m512": 60.0},
        matmul_weight_read_gb_per_s={"bf16w_m1": 7.7},
        matmul_shapes={"bf16w_m1": [1, 2048, 32768], "float32_m512": [512, 2048, 1024]},
        memory_read_gb_per_s_gemv=12.6,
        memory_bandwidth_gb_per_s=21.6,
        memory_bandwidth_measured_at=500.0,
        memory_bandwidth_runs=3,
        message_overhead_s=9e-5,
        layer_overhead_s=6e-4,
        measured_at=100.0,
        matmul_runs=1,
        calibration={"decode_efficiency": 2.1},
    )
    new = DeviceProfile(
        matmul_gflops={"bf16w_m1": 19.1, "float32_m512": 55.0},
        matmul_weight_read_gb_per_s={"bf16w_m1": 19.1},
        matmul_shapes={"bf16w_m1": [1, 2048, 16384], "float32_m512": [512, 2048, 512]},
        memory_read_gb_per_s_gemv=19.7,
        memory_bandwidth_gb_per_s=19.7,
        message_overhead_s=1e-4,
        layer_overhead_s=4e-4,
        measured_at=9000.0,
    )
    best = prof.best_of(old, new)
    assert best.matmul_gflops == {"bf16w_m1": 19.1, "float32_m512": 60.0}
    assert best.matmul_weight_read_gb_per_s == {"bf16w_m1": 19.1}
    assert best.matmul_shapes == {"bf16w_m1": [1, 2048, 16384], "float32_m512": [512, 2048, 1024]}
    assert best.memory_read_gb_per_s_gemv == 19.7 and not prof.matmuls_look_low(best)
    assert best.memory_bandwidth_gb_per_s == 21.6 and best.memory_bandwidth_measured_at == 500.0
    assert best.memory_bandwidth_runs == 4 and best.memory_bandwidth_checked_at == 9000.0
    assert best.message_overhead_s == 9e-5 and best.layer_overhead_s == 4e-4
    assert best.measured_at == 9000.0 and best.matmul_runs == 2
    assert best.calibration == {}  # fitted against rates that changed
    same = prof.best_of(best, replace(new, calibration={}))
    assert prof.best_of(replace(same, calibration={"decode_efficiency": 1.1}), new).calibration == {
        "decode_efficiency": 1.1
    }  # nothing beaten: the calibration still holds


@pytest.mark.slow
def test_cached_matmuls_taken_under_load_are_measured_again_and_the_best_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(prof, "measure_bandwidth", lambda budget_s=0.1: _real(budget_s))
    monkeypatch.setattr(prof, "measure_profile", lambda: _MEASURE_PROFILE(budget_s=2.0))
    path = tmp_path / f"{prof.cache_key()}.json"
    now = time.time()
    stale = profile(bw=1e6, reads=1e-3, at=now - 2 * prof.RECHECK_AFTER_S, cache_key=prof.cache_key())
    stale = replace(stale, memory_read_gb_per_s_gemv=1e-3, matmul_gflops={"float32_m1": 1e-3}, matmul_runs=1)
    path.write_text(json.dumps(stale.to_json()))
    loaded = prof.load_or_measure(cache_dir=tmp_path)
    assert loaded.matmul_runs == 2 and loaded.measured_at >= now
    assert loaded.matmul_gflops["float32_m1"] > 1e-3 and "q4_m512" in loaded.matmul_gflops  # a real run's
    assert loaded.memory_bandwidth_gb_per_s == 1e6  # the better cached bandwidth kept
    assert json.loads(path.read_text())["matmul_gflops"] == loaded.matmul_gflops
    # measured within the hour: loaded as cached even when it still looks low
    path.write_text(json.dumps(replace(stale, measured_at=now).to_json()))
    assert prof.load_or_measure(cache_dir=tmp_path).matmul_runs == 1


_MEASURE_PROFILE = prof.measure_profile
