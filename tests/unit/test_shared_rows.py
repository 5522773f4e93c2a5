"""Sibling quantized products as one (:mod:`exo_lab.models.shared_rows`): the same bits as each alone."""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import pytest

from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import kernels, qmatmul, shared_rows, synthetic

pytestmark = pytest.mark.skipif(kernels.module() is None, reason="exo_lab's weight_matmul kernel is not built here")


def _attention(bits: int, bias: bool = False) -> nn.Module:
    """A module holding q/k/v projections (128 -> 128, 64, 64) as exo_lab's quantized linears."""
    parent = nn.Module()
    for name, rows in (("q_proj", 128), ("k_proj", 64), ("v_proj", 64)):
        linear = nn.Linear(128, rows, bias=bias)
        q = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
        q.__class__ = qmatmul.CoreQuantizedLinear
        setattr(parent, name, q)
    mx.eval(parent.parameters())
    return parent


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_a_group_computes_each_member_s_bits(bits, rows):
    parent = _attention(bits, bias=bits == 8)
    x = mx.random.normal((1, rows, 128), key=mx.random.key(rows))
    want = [parent[n](x) for n in ("q_proj", "k_proj", "v_proj")]
    mx.eval(want)
    assert shared_rows.share_rows(parent) == 1
    assert type(parent["q_proj"]) is shared_rows.SharedRowsLinear
    group = parent["k_proj"]._group
    assert [m["weight"].shape[0] for m in (parent["q_proj"], parent["k_proj"], parent["v_proj"])] == [128, 64, 64]
    got = [parent[n](x) for n in ("q_proj", "k_proj", "v_proj")]
    assert all(mx.array_equal(g, w).item() for g, w in zip(got, want))
    assert group._input is None  # every member took its columns
    # out of order, and a member called again or with another input computes its own rows
    alone = [parent["v_proj"](x), parent["v_proj"](x), parent["q_proj"](x * 1)]
    assert all(mx.array_equal(g, w).item() for g, w in zip(alone, [want[2], want[2], want[0]]))


def test_members_that_the_kernel_does_not_compute_stay_apart():
    parent = _attention(4)
    parent.v_proj = nn.QuantizedLinear.from_linear(nn.Linear(128, 64), group_size=64, bits=4)  # MLX's own
    assert shared_rows.share_rows(parent) == 0
    assert type(parent["q_proj"]) is qmatmul.CoreQuantizedLinear


def test_a_bf16_input_computes_alone_with_the_same_result():
    parent = _attention(4)
    x = mx.random.normal((1, 2, 128)).astype(mx.bfloat16)
    want = parent["k_proj"](x)
    shared_rows.share_rows(parent)
    assert mx.array_equal(parent["k_proj"](x), want).item()


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny", "qwen3-tiny", "gemma3-tiny", "gpt-oss-tiny"])
def test_a_q4_shard_gives_the_logits_of_separate_products(tmp_path, monkeypatch, preset):
    path = synthetic.create(tmp_path / preset, preset)
    grouped, _ = load_shard(path, ShardSpec(0, 4, 4, "q4"))
    monkeypatch.setattr(shared_rows, "share_rows", lambda model: 0)
    apart, _ = load_shard(path, ShardSpec(0, 4, 4, "q4"))
    assert any(isinstance(m, shared_rows.SharedRowsLinear) for _, m in grouped.named_modules())
    assert not any(isinstance(m, shared_rows.SharedRowsLinear) for _, m in apart.named_modules())
    outs = []
    for shard in (grouped, apart):
        cache = shard.make_cache()
        prompt = shard(mx.array([[3, 1, 4, 1, 5, 9, 2, 6]]), cache)
        step = shard(mx.array([[7]]), cache)
        outs.append((prompt, step))
    assert all(mx.array_equal(a, b).item() for a, b in zip(*outs))
