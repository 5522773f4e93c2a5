"""The decode-sized fp32 matmul in front of OpenBLAS (exo_lab/native/small_gemm.c): same products, batch-invariant."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from exo_lab import _blas, defaults, native
from exo_lab.models import kernels

pytestmark = pytest.mark.skipif(
    _blas.find_openblas() is None or native.library("small_gemm") is None,
    reason="needs OpenBLAS and a C compiler (Linux x86-64)",
)

# Runs in a child started as exo_lab starts its workers (LD_PRELOAD from child_env): MLX products of every
# decode size against float64 numpy, and each row of a batch against the same row alone.
CHILD = r"""
import json, sys
import exo_lab, exo_lab._blas as blas
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
out = {"name": blas.name(), "err": [], "invariant": True, "plain_err": 0.0}
for m, n, k in [(1, 64, 64), (1, 37, 300), (2, 129, 77), (3, 256, 2048), (8, 130, 1001), (16, 64, 64), (17, 96, 40)]:
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    got = np.array(mx.array(x) @ mx.array(w).T)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    out["err"].append(float(np.abs(got - want).max() / np.abs(want).max()))
    for i in range(m if m <= 16 else 0):  # up to 16 rows (the kernel's), each row alone gives exactly its row
        alone = np.array(mx.array(x[i : i + 1]) @ mx.array(w).T)
        out["invariant"] &= bool(np.array_equal(alone[0], got[i]))
for m, n, k in [(1, 70, 300), (1, 64, 512), (3, 130, 33), (16, 7, 5)]:  # x @ W, W not transposed (attention's p @ v)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    got = np.array(mx.array(x) @ mx.array(w))
    out["plain_err"] = max(out["plain_err"], float(np.abs(got - want).max() / np.abs(want).max()))
    for i in range(m):
        out["invariant"] &= bool(np.array_equal(np.array(mx.array(x[i : i + 1]) @ mx.array(w))[0], got[i]))
print(json.dumps(out))
"""


def _child(env_extra: dict[str, str]) -> dict:
    env = _blas.child_env({**__import__("os").environ, **env_extra})
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_get_the_kernel_and_it_computes_the_same_products() -> None:
    got = _child({})
    assert got["name"] == "openblas+small_gemm"
    assert max(got["err"]) < 1e-5, got["err"]
    assert got["plain_err"] < 1e-5
    assert got["invariant"], "a row of a decode batch must not depend on the other rows"


def test_its_threads_spin_briefly_when_idle_unless_told_otherwise() -> None:
    """Ranks sharing a machine's cores must not spin against each other (libgomp's default spins ~15 ms), nor
    sleep between one product of a decode step and the next: a spin of ~45 us, unless the user chose."""
    assert _blas.child_env({})["GOMP_SPINCOUNT"] == "1000"
    assert "OMP_WAIT_POLICY" not in _blas.child_env({})
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = _blas.child_env(chosen)
        assert {k: env.get(k) for k in _blas.OMP_VARIABLES} == {k: chosen.get(k) for k in _blas.OMP_VARIABLES}
    assert "GOMP_SPINCOUNT" not in _blas.child_env({"EXO_LAB_SMALL_GEMM": "0"})


IDLE_OMP_CHILD = r"""
import json, resource, time
import exo_lab
import mlx.core as mx
from exo_lab.models import kernels
w, s, b = mx.quantize(mx.random.normal((4096, 2048)), group_size=64, bits=4)
x = mx.random.normal((1, 2048)); mx.eval(w, s, b, x)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(100):  # a product on every core, then 5 ms of nothing, as a rank between steps
    mx.eval(kernels.module().quant_matmul(x, w, s, b, 64, 4))
    time.sleep(0.005)
r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
print(json.dumps({"cores": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall}))
"""


@pytest.mark.skipif(kernels.module() is None or kernels.module().threads() < 2, reason="no kernel, or one thread")
def test_the_kernels_threads_sleep_soon_after_a_product() -> None:
    """Between steps (5 ms here) the helper thread sleeps, a decode product's ``RowPool`` helper as OpenMP's
    threads (``EXO_LAB_ROW_POOL=0``, and every prompt) with exo_lab's spin; with libgomp's own default it spins
    ~15 ms."""
    cores = {}
    omp = {defaults.ROW_POOL: "0"}
    for name, env in (("pool", {}), ("openmp", omp), ("libgomp", omp | {"GOMP_SPINCOUNT": "300000"})):
        inherited = {k: v for k, v in os.environ.items() if k not in (*_blas.OMP_VARIABLES, defaults.ROW_POOL)}
        full = _blas.child_env(inherited | env)
        done = subprocess.run(
            [sys.executable, "-c", IDLE_OMP_CHILD], env=full, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        cores[name] = json.loads(done.stdout.strip().splitlines()[-1])["cores"]
    # libgomp's spinning helper takes what the core gives it: 0.58 of a core once in CI, with a test beside it
    ours = max(cores["pool"], cores["openmp"])
    assert ours < 0.6 and cores["libgomp"] > 2 * ours + 0.2, cores


IDLE_CHILD = r"""
import json, resource, time
import exo_lab
import mlx.core as mx
a = mx.random.normal((256, 256)); mx.eval(a)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(100):  # a product (OpenBLAS's threads), then 5 ms of nothing, as a rank between small steps
    mx.eval(a @ a)
    time.sleep(0.005)
r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
print(json.dumps({"cores": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall}))
"""


def test_openblas_threads_sleep_between_calls_unless_told_otherwise() -> None:
    """OpenBLAS's threads spin ~0.1 s after each call by default: a rank that computes in short bursts kept a
    second core busy for nothing. exo_lab's processes have them sleep after 2**16 cycles (a user's value wins)."""
    assert _blas.child_env({})["OPENBLAS_THREAD_TIMEOUT"] == "16"
    assert _blas.child_env({"OPENBLAS_THREAD_TIMEOUT": "28"})["OPENBLAS_THREAD_TIMEOUT"] == "28"
    cores = {}
    for timeout in ("16", "28"):  # exo_lab's, and OpenBLAS's own default
        env = _blas.child_env({**__import__("os").environ, "OPENBLAS_THREAD_TIMEOUT": timeout})
        done = subprocess.run([sys.executable, "-c", IDLE_CHILD], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        cores[timeout] = json.loads(done.stdout.strip().splitlines()[-1])["cores"]
    if cores["28"] < 0.5:  # OpenBLAS runs one thread here (one core): nothing spins either way
        pytest.skip(f"OpenBLAS does not spin here ({cores})")
    assert cores["16"] < 0.5 < cores["28"], cores


def test_it_can_be_turned_off() -> None:
    got = _child({"EXO_LAB_SMALL_GEMM": "0"})
    assert got["name"] == "openblas"
    assert max(got["err"]) < 1e-5


def test_alpha_beta_and_strides_follow_cblas() -> None:
    lib = ctypes.CDLL(str(native.library("small_gemm")))
    f = ctypes.POINTER(ctypes.c_float)
    rng = np.random.default_rng(1)
    m, n, k, lda, ldb, ldc = 3, 10, 19, 24, 21, 13
    a = rng.standard_normal((m, lda)).astype(np.float32)
    b = rng.standard_normal((n, ldb)).astype(np.float32)
    c = rng.standard_normal((m, ldc)).astype(np.float32)
    want = c.astype(np.float64).copy()
    want[:, :n] = 0.5 * (a[:, :k].astype(np.float64) @ b[:, :k].T) + 2.0 * want[:, :n]
    ptr = lambda v: v.ctypes.data_as(f)  # noqa: E731
    lib.exo_small_gemm_nt(m, n, k, ctypes.c_float(0.5), ptr(a), lda, ptr(b), ldb, ctypes.c_float(2.0), ptr(c), ldc)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)  # columns past n untouched


def test_x_at_w_is_one_fma_chain_per_element() -> None:
    """x @ W with W not transposed: every element the fma chain over k in order, whichever columns block it."""
    lib = ctypes.CDLL(str(native.library("small_gemm")))
    f = ctypes.POINTER(ctypes.c_float)
    rng = np.random.default_rng(2)
    m, n, k, lda, ldb, ldc = 2, 75, 33, 40, 80, 77  # a block of 64 columns, one of 8, 3 more
    a = rng.standard_normal((m, lda)).astype(np.float32)
    b = rng.standard_normal((k, ldb)).astype(np.float32)
    c = rng.standard_normal((m, ldc)).astype(np.float32)
    want = c.copy()
    for i in range(m):
        for j in range(n):
            s = np.float32(0.0)
            for t in range(k):  # fma: the product exact, one rounding (float64 holds it exactly)
                s = np.float32(np.float64(a[i, t]) * np.float64(b[t, j]) + np.float64(s))
            want[i, j] = np.float32(np.float32(0.5) * s) + np.float32(np.float32(2.0) * c[i, j])
    ptr = lambda v: v.ctypes.data_as(f)  # noqa: E731
    lib.exo_small_gemm_nn(m, n, k, ctypes.c_float(0.5), ptr(a), lda, ptr(b), ldb, ctypes.c_float(2.0), ptr(c), ldc)
    assert np.array_equal(c, want)  # columns past n untouched


def test_the_library_is_named_by_its_source_and_cpu() -> None:
    name = native.library_name("small_gemm")
    assert name.startswith("libsmall_gemm-") and name.endswith(".so")
    assert native.library("small_gemm").name == name
