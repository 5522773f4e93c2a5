"""exo_lab's MLX primitive for 16-bit weights with fp32 activations (real kernel, real MLX)."""

from __future__ import annotations

import exo_lab  # noqa: F401  (OpenBLAS and the small-GEMM kernel before MLX)

# isort: split

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.nn.layers import distributed as mlx_distributed

from exo_lab.models import halfmatmul

pytestmark = pytest.mark.skipif(not halfmatmul.available(), reason="weight_matmul not built (no C++ compiler)")


def _reference(x: mx.array, w: mx.array) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ np.asarray(w.astype(mx.float32), dtype=np.float64).T


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 70])  # decode kernel up to 16 rows, widen + BLAS above
@pytest.mark.parametrize("k", [2048, 200, 13])  # whole 16-wide chunks, a tail, only a tail
def test_every_shape_equals_float64_of_the_widened_weights(dtype, rows, k):
    w = (mx.random.normal((37, k), key=mx.random.key(k)) * 0.1).astype(dtype)
    x = mx.random.normal((rows, k), key=mx.random.key(rows))
    got = halfmatmul.matmul(x, w)
    assert got.dtype == mx.float32 and got.shape == (rows, 37)
    assert np.allclose(np.asarray(got), _reference(x, w), atol=2e-5 * np.sqrt(k), rtol=1e-5)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(dtype):
    """Batch-invariant: a sequence decodes the same tokens whatever else shares its step (and in any split)."""
    w = (mx.random.normal((4099, 2048), key=mx.random.key(1)) * 0.05).astype(dtype)  # threads split the columns
    x = mx.random.normal((16, 2048), key=mx.random.key(2))
    batch = halfmatmul.matmul(x, w)
    for m in (1, 2, 5, 9):
        part = halfmatmul.matmul(x[:m], w)
        assert mx.array_equal(part, batch[:m]).item(), m
    assert mx.array_equal(halfmatmul.matmul(x[7:8], w)[0], batch[7]).item()


def test_leading_axes_and_non_contiguous_inputs():
    w = (mx.random.normal((64, 48), key=mx.random.key(3))).astype(mx.bfloat16)
    x = mx.random.normal((2, 3, 96), key=mx.random.key(4))[..., ::2]  # strided view
    got = halfmatmul.matmul(x, w)
    assert got.shape == (2, 3, 64)
    assert np.allclose(np.asarray(got).reshape(6, 64), _reference(x.reshape(6, 48), w), atol=1e-4)


def test_bad_operands_raise_clear_errors():
    w = mx.zeros((4, 8), dtype=mx.bfloat16)
    with pytest.raises(ValueError, match="w must be bfloat16 or float16"):
        halfmatmul.matmul(mx.zeros((1, 8)), mx.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"x \[..., K\] and w \[N, K\]"):
        halfmatmul.matmul(mx.zeros((1, 7)), w)


def test_use_half_swaps_linears_embeddings_and_sharded_linears():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.up = nn.Linear(32, 64, bias=True)
            self.down = nn.Linear(64, 32, bias=False)
            self.norm = nn.RMSNorm(32)

        def __call__(self, ids: mx.array) -> mx.array:
            h = self.embed(ids)
            return self.embed.as_linear(self.norm(h + self.down(nn.silu(self.up(h)))))

    model = Block()
    ids = mx.array([[3, 7, 11]])
    want = model(ids)
    assert halfmatmul.use_half(model, mx.bfloat16) == 3
    assert type(model.up) is halfmatmul.HalfLinear and model.up.weight.dtype == mx.bfloat16
    assert model.up.bias.dtype == mx.float32 and model.norm.weight.dtype == mx.float32
    got = model(ids)
    assert got.dtype == mx.float32
    assert mx.allclose(got, want, atol=0.05).item()  # weights rounded to bf16, computed in fp32
    group = mx.distributed.init()  # a group of one: the all-reduce is the identity
    sharded = mlx_distributed.shard_linear(nn.Linear(32, 16), "sharded-to-all", group=group)
    column = mlx_distributed.shard_linear(nn.Linear(32, 16), "all-to-sharded", group=group)
    x = mx.random.normal((2, 32))
    plain = [sharded(x), column(x)]
    holder = nn.Module()
    holder.a, holder.b = sharded, column
    assert halfmatmul.use_half(holder, mx.float16) == 2
    assert type(sharded) is halfmatmul.HalfShardedToAllLinear and type(column) is halfmatmul.HalfAllToShardedLinear
    for before, after in zip(plain, [sharded(x), column(x)]):
        assert mx.allclose(before, after, atol=1e-2).item()
