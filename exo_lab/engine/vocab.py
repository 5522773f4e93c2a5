"""The vocabulary split over a tensor group: each rank holds ``1 / k`` of the embedding (and head) rows.

Without it every tensor rank reads the whole head for every token: for Llama-3.2-1B (a tied 128256 x 2048
embedding) that is a fifth of what one token reads, so tensor-2 could never decode more than ~1.66x as fast
as one process. Here rank ``r`` of ``k`` keeps rows ``[r V / k, (r + 1) V / k)``:

- the head (``as_linear``, or an untied ``lm_head``) computes its slice of the logits and one ``all_gather``
  puts the slices together on every rank;
- the embedding lookup takes the rows this rank holds (zeros for the others) and one ``all_sum`` adds the
  ranks' parts: exactly the looked-up row (a value plus zeros).

Each logit is the same dot product as with the whole head. Plain embeddings and heads, and quantized ones
(``mx.quantize``'s affine rows, from a quantized checkpoint); only when ``k`` divides the vocabulary, otherwise
the shard keeps the whole head on every rank. A slice held in another weight format computes with that format's
matmul: :data:`HALF_SWAPS` (``bf16w``/``fp16w``), :data:`QUANT_SWAPS` (``q8``/``q4`` of an unquantized checkpoint,
quantized after the split: each row's groups are the whole head's).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.nn.layers.distributed as mlx_distributed

from exo_lab.models import halfmatmul, qmatmul


def _gather_vocab(local: mx.array, group: mx.distributed.Group) -> mx.array:
    """Every rank's slice of the last axis, concatenated in rank order."""
    k = group.size()
    # over a pair's or a larger group's own sockets where they are routed, as the sums (engine/peer_link.py)
    parts = mlx_distributed.mx.distributed.all_gather(local, group=group)  # [k * batch, ..., V / k]
    parts = parts.reshape(k, *local.shape)
    return mx.moveaxis(parts, 0, -2).reshape(*local.shape[:-1], k * local.shape[-1])


class VocabSlice(nn.Module):
    """Rows ``[start, start + n)`` of an embedding (and, tied, the head), split over ``group``."""

    def __init__(self, weight: mx.array, start: int, group: mx.distributed.Group) -> None:
        super().__init__()
        self.weight = weight
        self._start = start
        self._group = group

    def _rows(self, index: mx.array) -> mx.array:
        return self.weight[index]

    def _logits(self, x: mx.array) -> mx.array:
        return x @ self.weight.T

    def __call__(self, tokens: mx.array) -> mx.array:
        n = self.weight.shape[0]
        local = tokens - self._start
        mine = (local >= 0) & (local < n)
        rows = self._rows(mx.where(mine, local, 0))
        part = mx.where(mine[..., None], rows, mx.zeros_like(rows))
        # as the sharded linears sum: over a tensor pair's own socket where one is routed (engine/peer_link.py)
        return mlx_distributed.mx.distributed.all_sum(part, group=self._group)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(self._logits(x), self._group)


class HeadSlice(nn.Module):
    """Rows ``[start, start + n)`` of an untied head (no bias), split over ``group``."""

    def __init__(self, weight: mx.array, group: mx.distributed.Group) -> None:
        super().__init__()
        self.weight = weight
        self._group = group

    def _logits(self, x: mx.array) -> mx.array:
        return x @ self.weight.T

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(self._logits(x), self._group)


class HalfVocabSlice(VocabSlice):
    """A :class:`VocabSlice` with 16-bit rows (the ``bf16w``/``fp16w`` formats): rows come out fp32, the tied head
    computes with :func:`exo_lab.models.halfmatmul.matmul`."""

    def _rows(self, index: mx.array) -> mx.array:
        return self.weight[index].astype(mx.float32)

    def _logits(self, x: mx.array) -> mx.array:
        return halfmatmul.matmul(x, self.weight)


class HalfHeadSlice(HeadSlice):
    """A :class:`HeadSlice` with 16-bit rows, computing with :func:`exo_lab.models.halfmatmul.matmul`."""

    def _logits(self, x: mx.array) -> mx.array:
        return halfmatmul.matmul(x, self.weight)


class QuantVocabSlice(VocabSlice):
    """A :class:`VocabSlice` of quantized rows (``weight``, ``scales``, ``biases``; ``group_size``, ``bits``):
    looked-up rows dequantized as ``nn.QuantizedEmbedding`` does, the tied head computing with
    :func:`exo_lab.models.qmatmul.matmul`."""

    group_size: int
    bits: int

    def _rows(self, index: mx.array) -> mx.array:
        return mx.dequantize(
            qmatmul.rows_in_order(self, self["weight"][index]),
            self["scales"][index],
            self["biases"][index],
            group_size=self.group_size,
            bits=self.bits,
        )

    def _logits(self, x: mx.array) -> mx.array:
        return qmatmul.module_matmul(self, x)


class QuantHeadSlice(HeadSlice):
    """A :class:`HeadSlice` of quantized rows, computing with :func:`exo_lab.models.qmatmul.matmul`."""

    group_size: int
    bits: int

    def _logits(self, x: mx.array) -> mx.array:
        return qmatmul.module_matmul(self, x)


#: what :func:`exo_lab.models.halfmatmul.use_half` swaps in for this module's classes
HALF_SWAPS: dict[type, type] = {VocabSlice: HalfVocabSlice, HeadSlice: HalfHeadSlice}
#: what :func:`exo_lab.models.qmatmul.quantize_sharded` swaps in for this module's classes
QUANT_SWAPS: dict[type, type] = {VocabSlice: QuantVocabSlice, HeadSlice: QuantHeadSlice}
#: the quantized slices whose weights :func:`exo_lab.models.qmatmul.use_lanes` may lay out
LANE_CLASSES: tuple[type, ...] = (QuantVocabSlice, QuantHeadSlice)


def _splittable(module: nn.Module, k: int) -> bool:
    plain = type(module) in (nn.Embedding, nn.Linear)
    quantized = type(module) in (
        nn.QuantizedEmbedding,
        nn.QuantizedLinear,
        qmatmul.CoreQuantizedEmbedding,
        qmatmul.CoreQuantizedLinear,
    )
    if quantized and (getattr(module, "mode", "affine") != "affine" or module.get("biases") is None):
        return False
    return (plain or quantized) and "bias" not in module and module["weight"].shape[0] % k == 0


def _rows_of(module: nn.Module, r: int, k: int) -> tuple[dict[str, mx.array], int]:
    """Rank ``r`` of ``k``'s rows of ``module``'s weight (and quantized scales and biases), and where they start."""
    n = module["weight"].shape[0] // k
    names = ("weight", "scales", "biases") if "scales" in module else ("weight",)
    return {name: mx.contiguous(module[name][r * n : (r + 1) * n]) for name in names}, r * n


def _quantized(part: nn.Module, rows: dict[str, mx.array], whole: nn.Module, swaps: dict[type, type]) -> nn.Module:
    if "scales" in rows:
        part.__class__ = swaps[type(part)]
        part.scales, part.biases = rows["scales"], rows["biases"]
        part.group_size, part.bits = whole.group_size, whole.bits
    return part


def split_vocab(shard: Any, group: mx.distributed.Group) -> bool:
    """Split ``shard``'s embedding and head rows over ``group`` (see the module docstring); False when they stay
    whole (a bias, a quantization other than affine, a vocabulary ``k`` does not divide, or nothing to split)."""
    k, r = group.size(), group.rank()
    parts = [m for m in (shard.embed_tokens, shard.lm_head) if m is not None]
    if k <= 1 or not parts or not all(_splittable(m, k) for m in parts):
        return False
    if shard.embed_tokens is not None:
        rows, start = _rows_of(shard.embed_tokens, r, k)
        part = VocabSlice(rows["weight"], start, group)
        shard.embed_tokens = _quantized(part, rows, shard.embed_tokens, QUANT_SWAPS)
    if shard.lm_head is not None:
        rows, _ = _rows_of(shard.lm_head, r, k)
        shard.lm_head = _quantized(HeadSlice(rows["weight"], group), rows, shard.lm_head, QUANT_SWAPS)
    return True
