"""RoPE, RMSNorm, attention's softmax and swiglu as one operation each (exo_lab.models.fused): bit-identical to
MLX's CPU fallbacks, on every layout, offset and mask a shard gives them, and a shard's step with far fewer
operations."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import exo_lab  # noqa: F401  (OpenBLAS before MLX)

# isort: split

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.models import activations, base
from mlx_lm.models import llama as mlx_lm_llama
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.rope_utils import Llama3RoPE

from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="exo_lab's cpu_fallbacks extension is not built")

LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def rotations(traditional: bool) -> list[nn.Module]:
    return [
        nn.RoPE(64, traditional=traditional, base=500000.0),
        nn.RoPE(32, traditional=traditional, base=10000.0, scale=0.5),  # part of each head rotated
        Llama3RoPE(64, 131072, traditional, 500000.0, LLAMA3),
    ]


def same(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b, equal_nan=False).item()


@pytest.mark.parametrize("traditional", [False, True])
def test_rotation_is_mlx_rope_bit_for_bit(traditional):
    """Contiguous and transposed heads, offsets that grow the table past its first rows, per-row offsets
    (a left-padded row's negative positions too): each the result ``mx.fast.rope`` gives."""
    mx.random.seed(3)
    heads = mx.random.normal((3, 70, 8, 64)).transpose(0, 2, 1, 3)  # as the attention makes them
    plain = mx.random.normal((3, 8, 70, 64))
    for rope in rotations(traditional):
        offsets = (0, 7, fused.MIN_POSITIONS - 30, 3 * fused.MIN_POSITIONS + 5)
        rows = mx.array([-3, 17, 5000], mx.int32)
        want = {(o, i): rope(x, o) for o in offsets for i, x in enumerate((heads, plain))}
        want_rows = rope(heads, rows)
        tables = fused.use_fused(Holder(rope))
        assert type(rope).__name__.startswith("Table") and len(tables) == 1
        for (o, i), w in want.items():
            assert same(rope((heads, plain)[i], o), w), (type(rope).__name__, o, i)
        assert tables[0].rows == 4 * fused.MIN_POSITIONS  # doubled to cover the largest offset
        tables[0].bound = 5000
        assert same(rope(heads, rows), want_rows)


def test_array_offsets_without_a_bound_rotate_with_mlx():
    rope = nn.RoPE(64, base=10000.0)
    x = mx.random.normal((2, 4, 1, 64))
    rows = mx.array([3, 9], mx.int32)
    want = rope(x, rows)
    (table,) = fused.use_fused(Holder(rope))
    assert table.rotate(x, rows) is None  # no bound: the table cannot know where the rows are
    assert same(rope(x, rows), want)
    assert table.rotate(x.astype(mx.bfloat16), 3) is None  # 16-bit activations: MLX's arithmetic
    table.bound = 9
    assert table.rotate(x, rows) is not None


def test_positions_past_the_table_are_nan_not_another_position():
    table = fused.RopeTable(8, False, 10000.0, 1.0, None, fused.module())
    table.ensure(10)
    x = mx.ones((2, 1, 1, 8))
    out = fused.module().table_rope(x, table.cos, table.sin, mx.array([5, table.rows], mx.int32), 8, False)
    assert not mx.isnan(out[0]).any().item() and mx.isnan(out[1]).all().item()


def test_norm_is_mlx_rms_norm_bit_for_bit():
    mx.random.seed(4)
    for shape in ((3, 7, 2048), (5, 1536), (2, 4, 3, 896)):
        w = mx.random.normal((shape[-1],))
        x = mx.random.normal(shape) * 3
        strided = mx.random.normal(shape[::-1]).T if len(shape) == 2 else x[:, ::2]
        for a in (x, strided, x + 1):
            for eps in (1e-5, 1e-6):
                assert same(fused.module().rms_norm(a, w, eps), mx.fast.rms_norm(a, w, eps))
    norm = nn.RMSNorm(64, eps=1e-5)
    norm.weight = mx.random.normal((64,))
    h = mx.random.normal((2, 5, 64))
    want, want16 = norm(h), norm(h.astype(mx.bfloat16))
    fused.use_fused(Holder(norm))
    assert type(norm) is fused.FusedRMSNorm
    assert same(norm(h), want) and same(norm(h.astype(mx.bfloat16)), want16)


def test_softmax_is_mlx_softmax_bit_for_bit():
    """MLX's CPU softmax (its exp one element at a time) against exo_lab's vectorized one: every scale of scores,
    rows shorter and longer than a vector, strided rows, -inf, NaN and values past exp's range."""
    rng = np.random.default_rng(0)
    ext = fused.module()
    for shape in ((7,), (3, 513), (1, 8, 4, 1, 512), (2, 32, 17, 300), (4, 2049)):
        for scale in (0.01, 1.0, 10.0, 60.0, 300.0):
            x = mx.array((rng.standard_normal(shape) * scale).astype(np.float32))
            assert same(ext.softmax(x), mx.softmax(x, axis=-1, precise=True)), (shape, scale)
    x = mx.array(rng.standard_normal((64, 96)).astype(np.float32) * 40)
    assert same(ext.softmax(x.T), mx.softmax(x.T, axis=-1, precise=True))  # rows through their strides
    # scores over exp's whole range, past -88 (zeros) included
    halves = mx.array([[(k + 0.5) / 1.442695 for k in range(-130, 130)]], mx.float32)
    assert same(ext.softmax(halves), mx.softmax(halves, axis=-1, precise=True))
    special = mx.array(
        [
            [0.0, -mx.inf, 1.0, 2.0],
            [mx.nan, 1, 2, 3],
            [-mx.inf, -mx.inf, 0, 0],
            [100, -100, 0.5, -0.5],
            [-1e30, 0, 3, 3],
        ],
        mx.float32,
    )
    assert mx.array_equal(ext.softmax(special), mx.softmax(special, axis=-1, precise=True), equal_nan=True).item()


def test_swiglu_is_mlx_lm_swiglu_bit_for_bit():
    """mlx_lm's compiled swiglu (MLX's sigmoid, its exp one element at a time) against exo_lab's vectorized one:
    every scale of gate, rows shorter and longer than a vector, strided inputs, signed zeros, infinities, NaN,
    subnormals and values past exp's range; other dtypes and shapes go to mlx_lm's."""
    rng = np.random.default_rng(1)
    ext = fused.module()
    for shape in ((7,), (1, 1, 8192), (3, 513), (2, 5, 300)):
        for scale in (0.01, 1.0, 10.0, 60.0, 300.0):
            gate = mx.array((rng.standard_normal(shape) * scale).astype(np.float32))
            x = mx.array(rng.standard_normal(shape).astype(np.float32))
            assert same(ext.swiglu(gate, x), activations.swiglu(gate, x)), (shape, scale)
    g = mx.array(rng.standard_normal((64, 96)).astype(np.float32) * 20)
    x = mx.array(rng.standard_normal((96, 64)).astype(np.float32))
    assert same(ext.swiglu(g.T, x), activations.swiglu(g.T, x))  # through their strides
    edges = [0.0, -0.0, mx.inf, -mx.inf, mx.nan, 88.0, -88.0, 88.1, -88.1, 1e-40, -1e-40, 1e-30, -1e30, 3.4e38]
    halves = [(k + 0.5) / 1.442695 for k in range(-130, 130)]  # exp's rounding boundaries
    gate = mx.array(edges + halves, mx.float32)
    x = mx.ones_like(gate) * 1.5
    assert mx.array_equal(ext.swiglu(gate, x), activations.swiglu(gate, x), equal_nan=True).item()
    half = gate.astype(mx.bfloat16)
    got = fused.swiglu(half, half)  # not fp32: mlx_lm's own
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, activations.swiglu(half, half), equal_nan=True).item()
    with pytest.raises(ValueError, match="one shape"):
        ext.swiglu(gate, gate[:3])


@pytest.mark.parametrize(
    ("heads", "kv_heads", "queries", "keys", "dim"),
    [(32, 8, 1, 160, 64), (8, 8, 5, 37, 16), (4, 1, 7, 7, 8), (6, 2, 1, 513, 32)],
)
def test_attention_is_mlx_attention_bit_for_bit(heads, kv_heads, queries, keys, dim):
    """fused.attention against mx.fast.scaled_dot_product_attention on a CPU: grouped heads, a cache's keys sliced
    from a longer buffer, no mask, causal, boolean and additive masks, per-head ones."""
    rng = np.random.default_rng(heads * keys)

    def normal(*shape: int, scale: float = 1.0) -> mx.array:
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    q = normal(2, heads, queries, dim, scale=3.0)
    k = normal(2, kv_heads, keys + 20, dim, scale=3.0)[:, :, :keys]  # as a cache's buffer, sliced
    v = normal(2, kv_heads, keys + 20, dim)[:, :, :keys]
    masks = [
        None,
        "causal",
        mx.array(rng.random((2, 1, queries, keys)) > 0.3),
        normal(queries, keys, scale=5.0),
        mx.array(rng.random((2, heads, queries, keys)) > 0.5),
    ]
    for mask in masks:
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        assert same(fused.attention(q, k, v, None, 0.125, mask), want), mask if isinstance(mask, str) else type(mask)
    sinks = normal(heads)  # anything it does not spell out goes to mlx_lm's
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None, sinks=sinks)
    assert same(fused.attention(q, k, v, None, 0.125, None, sinks=sinks), want)


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "keys", "dim"),
    [(1, 32, 8, 1, 64), (3, 8, 8, 70, 128), (2, 6, 2, 33, 72), (1, 24, 3, 2100, 64), (2, 4, 4, 9, 5)],
)
def test_decode_attention_is_mlx_attention_bit_for_bit(rows, heads, kv_heads, keys, dim):
    """One query position (a decode step) as one ExoDecodeAttention: MLX's fast attention's bits for grouped heads
    sharing their keys (4 at a time and the rest), heads with a tail past 8 lanes, both threads (2100 keys), a
    cache's buffer sliced, keys and values not contiguous along the head, per-row boolean and additive masks."""
    rng = np.random.default_rng(rows * keys + dim)

    def normal(*shape: int, scale: float = 1.0) -> mx.array:
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    q = normal(rows, heads, 1, dim, scale=3.0)
    buffers = [normal(rows, kv_heads, keys + 20, dim, scale=3.0)[:, :, :keys] for _ in range(2)]
    strided = [normal(rows, kv_heads, dim, keys).swapaxes(2, 3) for _ in range(2)]
    masks = [None, "causal", mx.array(rng.random((rows, 1, 1, keys)) > 0.3), normal(rows, heads, 1, keys, scale=5.0)]
    for k, v in (buffers, strided):
        for mask in masks:
            got = fused.attention(q, k, v, None, 0.125, mask)
            want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
            assert same(got, want), mask if isinstance(mask, str) else type(mask)
    ext = fused.module()
    with pytest.raises(ValueError, match="one query|q \\[B, Hq, 1, D\\]"):
        ext.decode_attention(normal(1, 4, 2, 8), normal(1, 4, 3, 8), normal(1, 4, 3, 8), 1.0)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        ext.decode_attention(normal(1, 6, 1, 8), normal(1, 4, 3, 8), normal(1, 4, 3, 8), 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        ext.decode_attention(normal(1, 4, 1, 8), normal(1, 4, 3, 8), normal(1, 4, 3, 8), 1.0, normal(1, 1, 1, 3))


def test_decode_attention_off_keeps_the_composed_fallback(monkeypatch, tmp_path):
    """``fused.DECODE = False``: a decode step's attention is the fallback's operations again, the same bits."""
    rng = np.random.default_rng(5)
    shapes = ((1, 8, 1, 64), (1, 2, 40, 64), (1, 2, 40, 64))
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    one = fused.attention(q, k, v, None, 0.125, None)
    assert step_ops(one, tmp_path / "one.dot") == {"ExoDecodeAttention": 1}
    monkeypatch.setattr(fused, "DECODE", False)
    composed = fused.attention(q, k, v, None, 0.125, None)
    ops = step_ops(composed, tmp_path / "composed.dot")
    assert ops.get("ExoSoftmax") == 1 and ops.get("Matmul") == 2
    assert same(one, composed)


@contextlib.contextmanager
def mlx_attention() -> Iterator[None]:
    """mlx_lm's llama computing attention and swiglu with MLX's own (a shard points the module at fused's)."""
    mine = mlx_lm_llama.scaled_dot_product_attention, mlx_lm_llama.swiglu
    mlx_lm_llama.scaled_dot_product_attention, mlx_lm_llama.swiglu = (
        base.scaled_dot_product_attention,
        activations.swiglu,
    )
    try:
        yield
    finally:
        mlx_lm_llama.scaled_dot_product_attention, mlx_lm_llama.swiglu = mine


def step_ops(out: mx.array, path: Path) -> dict[str, int]:
    mx.export_to_dot(str(path), out)
    names = re.findall(r'label ="([^" ]+)', path.read_text())
    return {n: names.count(n) for n in set(names)}


def test_a_shard_gives_mlx_lm_logits_with_far_fewer_operations(tiny_model, tmp_path):
    """The tiny model's shard (fused) against ``mlx_lm`` (MLX's fallbacks): the same logits bit for bit over a
    chunked prompt and batched decode steps, with one operation per rotation, norm and activation."""
    layers = 4
    shard, _ = load_shard(tiny_model, ShardSpec(0, layers, layers, None))
    model = load(str(tiny_model))[0]
    assert shard.rope_tables and type(shard.layers[0].input_layernorm) is fused.FusedRMSNorm
    prompt = mx.array([[5, 17, 2, 99, 3, 41, 7, 8, 12, 60, 11]])
    cache, ref_cache = shard.make_cache(), make_prompt_cache(model)
    assert mlx_lm_llama.scaled_dot_product_attention is fused.attention
    for chunk in (prompt[:, :6], prompt[:, 6:]):  # int offsets
        got = shard(chunk, cache)
        with mlx_attention():
            want = model(chunk, cache=ref_cache)
        assert same(got, want)
    cache = [c.merge([c]) for c in cache]  # batch caches: per-row offsets, the shard gives the bound
    ref_cache = [c.merge([c]) for c in ref_cache]
    token = mx.array([[9]])
    for _ in range(3):
        got = shard(token, cache)
        with mlx_attention():
            want = model(token, cache=ref_cache)
        assert same(got, want)
        token = mx.argmax(want[:, -1:], axis=-1)
    ops = step_ops(shard(token, cache), tmp_path / "fused.dot")
    with mlx_attention():
        ref = step_ops(model(token, cache=ref_cache), tmp_path / "mlx.dot")
    assert ops.get("ExoTableRope") == 2 * layers and ops.get("ExoRmsNorm") == 2 * layers + 1
    # a decode step's attention is one operation: scale, scores, mask, softmax and values
    assert ops.get("ExoDecodeAttention") == layers and "ExoSoftmax" not in ops
    assert ops.get("ExoSwiglu") == layers and "ExoSwiglu" not in ref  # the MLP's activation: exo_lab's
    assert "Softmax" not in ops and ref.get("Softmax") == layers
    assert "Cos" not in ops and "Rsqrt" not in ops and "Cos" in ref and "Rsqrt" in ref
    assert sum(ops.values()) < 0.7 * sum(ref.values())
