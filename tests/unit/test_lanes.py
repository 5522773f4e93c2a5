"""q4 weights in lane order (exo_lab.models.qmatmul.use_lanes): the layout, exo_lab's lane kernel against MLX's
order (real MLX, the native extension), batch invariance, lookups, and a q4 shard laid out at load."""

from __future__ import annotations

from dataclasses import replace

import pytest

import exo_lab  # noqa: F401  (OpenBLAS before MLX)

# isort: split

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import kernels, qmatmul, synthetic

needs_lanes = pytest.mark.skipif(qmatmul.lane_groups() == 0, reason="no lane kernel on this CPU (AVX2 only)")


def test_lane_order_moves_word_i_of_group_j_to_8i_plus_j_and_back():
    w = mx.arange(3 * 128, dtype=mx.uint32).reshape(3, 128)  # 3 rows of 1024 4-bit codes: 2 blocks of 8 groups
    lanes = qmatmul.to_lanes(w)
    got = np.array(lanes)
    for block in range(2):
        for group in range(8):
            for word in range(8):
                assert got[1, block * 64 + 8 * word + group] == 128 + block * 64 + 8 * group + word
    assert mx.array_equal(qmatmul.to_lanes(lanes), w).item()


@needs_lanes
@pytest.mark.parametrize(("n", "k"), [(259, 512), (2053, 2048), (96, 8192)])
def test_lane_kernel_is_mlx_order_product_and_batch_invariant(n, k):
    """Rows past PARALLEL_WEIGHTS (2053 x 2048) split over the threads; 4 rows of x at a time; a prompt's tiles."""
    q, scales, biases = mx.quantize(mx.random.normal((n, k), key=mx.random.key(n)) * 0.05, group_size=64, bits=4)
    x = mx.random.normal((21, k), key=mx.random.key(k))
    lanes = qmatmul.to_lanes(q)
    ext = kernels.module()
    got = np.array(ext.quant_matmul(x, lanes, scales, biases, 64, 4, lanes=True))
    mlx_order = np.array(ext.quant_matmul(x, q, scales, biases, 64, 4))
    # the same integer sums, scaled 8 groups at a time instead of one: fp32 chains apart
    assert np.abs(got - mlx_order).max() < 1e-4 * max(1.0, np.abs(mlx_order).max())
    for rows in (slice(0, 1), slice(1, 3), slice(3, 6), slice(6, 10), slice(12, 21)):
        part = ext.quant_matmul(x[rows], lanes, scales, biases, 64, 4, lanes=True)
        assert np.array_equal(np.array(part), got[rows])


@needs_lanes
def test_lane_kernel_refuses_what_it_cannot_compute():
    ext = kernels.module()
    x = mx.zeros((1, 960))  # 15 groups of 64: not whole blocks of 8
    q, scales, biases = mx.quantize(mx.ones((4, 960)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="lane order"):
        ext.quant_matmul(x, q, scales, biases, 64, 4, lanes=True)
    q8 = mx.quantize(mx.ones((4, 512)), group_size=64, bits=8)
    with pytest.raises(ValueError, match="lane order"):
        ext.quant_matmul(mx.zeros((1, 512)), *q8, 64, 8, lanes=True)


@needs_lanes
def test_matmul_in_lane_order_falls_back_to_mlx_order_off_the_kernel():
    q, scales, biases = mx.quantize(mx.random.normal((64, 512), key=mx.random.key(3)), group_size=64, bits=4)
    x = mx.random.normal((2, 512), key=mx.random.key(4)).astype(mx.bfloat16)  # not fp32: MLX's kernel
    want = qmatmul.matmul(x, q, scales, biases, 64, 4)
    got = qmatmul.matmul(x, qmatmul.to_lanes(q), scales, biases, 64, 4, lanes=True)
    assert mx.array_equal(got, want).item()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 512)
        self.proj = nn.Linear(512, 96, bias=True)
        self.narrow = nn.Linear(448, 8)  # 7 groups a row: stays in MLX's order


@needs_lanes
def test_use_lanes_lays_out_what_fits_and_keeps_lookups_and_products(monkeypatch):
    def build() -> _Tiny:
        mx.random.seed(5)
        model = _Tiny()
        nn.quantize(model, group_size=64, bits=4)
        for _, m in model.named_modules():
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
        qmatmul.use_cores(model)
        return model

    plain, laid = build(), build()
    assert qmatmul.use_lanes(laid) == 2  # embed and proj; narrow's rows are not whole blocks
    assert getattr(laid.embed, "lanes", False) and getattr(laid.proj, "lanes", False)
    assert not getattr(laid.narrow, "lanes", False)
    assert qmatmul.use_lanes(laid) == 0  # once only
    ids = mx.array([[0, 7, 39, 7]])
    assert mx.array_equal(laid.embed(ids), plain.embed(ids)).item()  # lookups in MLX's order again
    x = mx.random.normal((1, 3, 512), key=mx.random.key(6))
    assert mx.allclose(laid.proj(x), plain.proj(x), rtol=1e-5, atol=1e-5).item()
    assert mx.allclose(laid.embed.as_linear(x), plain.embed.as_linear(x), rtol=1e-5, atol=1e-5).item()
    monkeypatch.setenv("EXO_LAB_LANES", "0")
    assert qmatmul.lane_groups() == 0 and qmatmul.use_lanes(build()) == 0


@needs_lanes
def test_q4_shard_in_lane_order_gives_the_greedy_tokens_of_mlx_order(tmp_path, monkeypatch):
    """A qwen3 of hidden size 512 (8 groups a row; a tied head, so the embedding is laid out too) loaded in q4
    with and without the lane order."""
    base = synthetic.PRESETS["qwen3-tiny"]
    config = {**base.config, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2}
    monkeypatch.setitem(synthetic.PRESETS, "lanes-tiny", replace(base, config=config))
    path = synthetic.create(tmp_path / "m", "lanes-tiny", seed=3)

    def tokens() -> tuple[int, list[int]]:
        shard, _ = load_shard(path, ShardSpec(0, 2, 2, "q4"))
        laid = sum(1 for _, m in shard.named_modules() if getattr(m, "lanes", False))
        cache = shard.make_cache()
        y = mx.argmax(shard(mx.array([[1, 5, 9, 3, 7, 2, 8, 4]]), cache)[:, -1], axis=-1)
        out = []
        for _ in range(12):
            out.append(int(y.item()))
            y = mx.argmax(shard(y[None], cache)[:, -1], axis=-1)
        return laid, out

    laid, with_lanes = tokens()
    monkeypatch.setenv("EXO_LAB_LANES", "0")
    none, without = tokens()
    assert laid == 1 + 2 * 6 and none == 0  # the embedding, each layer's products but o (128 codes a row)
    assert with_lanes == without


@needs_lanes
def test_a_tensor_pairs_row_slice_computes_in_its_weights_order():
    """A pair's row slice (``PairReduced``, a pipeline stage's tensor pair) multiplies through qmatmul, so a laid
    out slice gives what the same slice in MLX's order gives."""
    from exo_lab.engine.pairs import PairReduced

    def reduced() -> PairReduced:
        mx.random.seed(9)
        inner = nn.QuantizedLinear.from_linear(nn.Linear(512, 64, bias=False), group_size=64, bits=4)
        inner.scales, inner.biases = inner.scales.astype(mx.float32), inner.biases.astype(mx.float32)
        inner.__class__ = qmatmul.CoreQuantizedShardedToAllLinear  # what quantize_sharded makes of a rank's slice
        return PairReduced(inner, lambda y: y)  # type: ignore[arg-type]  (the exchange: this rank alone)

    plain, laid = reduced(), reduced()
    assert qmatmul.use_lanes(laid) == 1
    x = mx.random.normal((2, 512), key=mx.random.key(10))
    assert mx.allclose(laid(x), plain(x), rtol=1e-5, atol=1e-5).item()
