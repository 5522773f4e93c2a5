"""benchmarks/shared_bus.py's products: the model's layers from memory, or one projection kept in cache."""

from __future__ import annotations

import pytest

from tests.helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def shared_bus():
    return load_benchmark("shared_bus")


@pytest.mark.parametrize("fmt", ["q4", "float32"])
def test_the_cached_projection_holds_about_the_bytes_asked_and_runs_them_each_step(shared_bus, fmt: str) -> None:
    run, nbytes = shared_bus.decode_products(fmt, 0, rows=1, cached_kb=64)
    run()
    once = nbytes / shared_bus.CACHED_CALLS
    assert 48 * 1024 <= once <= 64 * 1024  # rows of 2048 weights, a multiple of 8 rows, within what was asked
    assert nbytes == once * shared_bus.CACHED_CALLS


def test_the_layers_read_every_projection_of_each_layer(shared_bus) -> None:
    _, nbytes = shared_bus.decode_products("float32", 1)
    assert nbytes == 4 * sum(n * k for n, k in shared_bus.LAYER)
