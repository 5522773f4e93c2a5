"""exo_lab's decode kernels (q8/q4 and 16-bit weights) split a product's weight rows over the cores as chunks
claimed as they come (``RowPool`` in exo_lab/native/weight_matmul.cpp): the bits must not depend on who computed
which chunk."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import exo_lab  # noqa: F401  (OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import numpy as np

from exo_lab import defaults
from exo_lab.models import kernels, qmatmul

needs_kernels = pytest.mark.skipif(kernels.module() is None, reason="exo_lab's weight_matmul extension is not built")

#: (weight rows, columns, rows of x, bits): past PARALLEL_WEIGHTS, row counts that leave a short last chunk
SHAPES = [(4099, 2048, 1, 4), (2053, 8192, 1, 4), (3001, 2048, 2, 4), (2049, 2048, 4, 8), (5003, 1024, 3, 8)]
#: (weight rows, columns, rows of x, dtype) of 16-bit weights' decode products (bf16w, fp16w)
HALF = [(4099, 2048, 1, "bfloat16"), (2053, 4096, 5, "float16"), (3001, 2048, 16, "bfloat16")]

DIGEST = """
import exo_lab, hashlib, mlx.core as mx
from exo_lab.models import kernels
h = hashlib.sha256()
for n, k, m, bits in {shapes!r}:
    q = mx.quantize(mx.random.normal((n, k), key=mx.random.key(n)) * 0.05, group_size=64, bits=bits)
    x = mx.random.normal((m, k), key=mx.random.key(m + k))
    h.update(bytes(memoryview(kernels.module().quant_matmul(x, *q, 64, bits))))
for n, k, m, dtype in {half!r}:
    w = (mx.random.normal((n, k), key=mx.random.key(n)) * 0.05).astype(getattr(mx, dtype))
    x = mx.random.normal((m, k), key=mx.random.key(m + k))
    h.update(bytes(memoryview(kernels.module().weight_matmul(x, w))))
print(h.hexdigest())
"""


def _digest(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", DIGEST.format(shapes=SHAPES, half=HALF)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip()


@needs_kernels
def test_the_pool_gives_the_bits_of_one_thread_and_of_openmps_halves():
    pooled = _digest({"OMP_NUM_THREADS": "2"})
    assert pooled == _digest({"OMP_NUM_THREADS": "1"})  # no helper: the caller computes every chunk
    assert pooled == _digest({"OMP_NUM_THREADS": "2", defaults.ROW_POOL: "0"})  # OpenMP's fixed halves
    for chunks in ("0", "1", "7"):  # chunks of 128 KB whatever the product; one, seven to a thread's share
        assert pooled == _digest({"OMP_NUM_THREADS": "2", defaults.POOL_CHUNKS: chunks}), chunks


@needs_kernels
def test_products_from_two_streams_at_once_and_after_the_helpers_slept_are_right():
    """Two CPU streams call the kernel at once (one of them computes alone while the other holds the pool), and
    products far apart wake helpers that went to sleep: each result is that product's bits."""
    n, k, bits = 4099, 2048, 4
    q = mx.quantize(mx.random.normal((n, k), key=mx.random.key(5)) * 0.05, group_size=64, bits=bits)
    xs = [mx.random.normal((1, k), key=mx.random.key(i)) for i in range(8)]
    alone = [np.array(kernels.module().quant_matmul(x, *q, 64, bits)) for x in xs]
    streams = qmatmul.cpu_streams(2)
    for _ in range(3):
        outs = []
        for i, x in enumerate(xs):
            with mx.stream(streams[i % 2]):
                outs.append(kernels.module().quant_matmul(x, *q, 64, bits))
        mx.eval(outs)
        for got, want in zip(outs, alone):
            assert np.array_equal(np.array(got), want)
    for x, want in zip(xs, alone):
        time.sleep(0.002)  # past the helpers' spin: each product wakes them again
        assert np.array_equal(np.array(kernels.module().quant_matmul(x, *q, 64, bits)), want)
