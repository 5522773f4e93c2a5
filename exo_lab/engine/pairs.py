"""Tensor pairs inside a pipeline: two ranks of one stage share each layer.

MLX's ring backend cannot split the world group, so a stage's tensor pair
cannot use the sharded layers' ``all_sum``. Here the pair's partial sums are
exchanged with point-to-point ``send``/``recv`` between the two ranks (ring
neighbours) in a fixed order (the lower rank sends first), and each side adds
the two partials; addition commutes exactly, so both ranks hold identical
bits afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
    shard_linear,
)

from exo_lab.engine.peer_link import SUMMABLE, PeerLink
from exo_lab.models import halfmatmul, qmatmul


@dataclass(frozen=True)
class PairGroup:
    """Stands in for a 2-rank group when slicing weights (``size``/``rank`` only)."""

    index: int  # 0 or 1 within the pair

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return self.index


@dataclass(frozen=True)
class Exchange:
    """Sum a partial result with the peer rank's."""

    world: mx.distributed.Group
    peer: int
    lower: bool
    link: PeerLink | None = None  # the pair's own socket (:mod:`exo_lab.engine.peer_link`), else MLX's ring

    def __call__(self, x: mx.array) -> mx.array:
        if self.link is not None and x.dtype in SUMMABLE:
            return self.link.sum(x)
        if self.lower:
            sent = mx.distributed.send(x, self.peer, group=self.world)
            (x_after,) = mx.depends([x], [sent])
            other = mx.distributed.recv_like(x_after, self.peer, group=self.world)
            return x_after + other
        other = mx.distributed.recv_like(x, self.peer, group=self.world)
        (x_after,) = mx.depends([x], [other])
        sent = mx.distributed.send(x_after, self.peer, group=self.world)
        (total,) = mx.depends([other + x_after], [sent])
        return total


class PairReduced(nn.Module):
    """A sharded-to-all linear whose all-reduce is an :class:`Exchange`."""

    def __init__(self, inner: nn.Module, exchange: Exchange) -> None:
        super().__init__()
        self.inner = inner
        self._exchange = exchange

    def __call__(self, x: mx.array) -> mx.array:
        m = self.inner
        if isinstance(m, QuantizedShardedToAllLinear) and getattr(m, "mode", "affine") == "affine":
            y = qmatmul.module_matmul(m, x)  # exo_lab's kernel where it computes, in the weight's order (lanes)
        elif isinstance(m, QuantizedShardedToAllLinear):  # another quantization mode (mxfp4): MLX's kernel
            y = mx.quantized_matmul(
                x,
                m["weight"],
                scales=m["scales"],
                biases=m.get("biases"),
                transpose=True,
                group_size=m.group_size,
                bits=m.bits,
                mode=m.mode,
            )
        elif m["weight"].dtype in halfmatmul.HALF:
            y = halfmatmul.matmul(x, m["weight"])
        else:
            y = x @ m["weight"].T
        y = self._exchange(y)
        if "bias" in m:
            y = y + m["bias"]
        return y


def shard_pair(layers: list, index: int, exchange: Exchange) -> None:
    """Split every layer's attention heads and MLP between the two ranks of a pair (in place)."""
    # shard_linear wants an mx.distributed.Group but only calls its size() and rank(), which PairGroup has
    group = cast(mx.distributed.Group, PairGroup(index))
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.o_proj = PairReduced(shard_linear(attn.o_proj, "sharded-to-all", group=group), exchange)
        attn.n_heads //= 2
        attn.n_kv_heads //= 2
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = PairReduced(shard_linear(mlp.down_proj, "sharded-to-all", group=group), exchange)
    assert ShardedToAllLinear  # imported for isinstance checks by readers of this module
