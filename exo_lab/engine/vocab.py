"""The vocabulary split over a tensor group: each rank holds ``1 / k`` of the embedding (and head) rows.

Without it every tensor rank reads the whole head for every token: for Llama-3.2-1B (a tied 128256 x 2048
embedding) that is a fifth of what one token reads, so tensor-2 could never decode more than ~1.66x as fast
as one process. Here rank ``r`` of ``k`` keeps rows ``[r V / k, (r + 1) V / k)``:

- the head (``as_linear``, or an untied ``lm_head``) computes its slice of the logits and one ``all_gather``
  puts the slices together on every rank;
- the embedding lookup takes the rows this rank holds (zeros for the others) and one ``all_sum`` adds the
  ranks' parts: exactly the looked-up row (a value plus zeros).

Each logit is the same dot product as with the whole head. Plain (unquantized) embeddings and heads only,
and only when ``k`` divides the vocabulary; otherwise the shard keeps the whole head on every rank.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from exo_lab.models import halfmatmul


def _gather_vocab(local: mx.array, group: mx.distributed.Group) -> mx.array:
    """Every rank's slice of the last axis, concatenated in rank order."""
    k = group.size()
    parts = mx.distributed.all_gather(local, group=group)  # [k * batch, ..., V / k]
    parts = parts.reshape(k, *local.shape)
    return mx.moveaxis(parts, 0, -2).reshape(*local.shape[:-1], k * local.shape[-1])


class VocabSlice(nn.Module):
    """Rows ``[start, start + n)`` of an embedding (and, tied, the head), split over ``group``."""

    def __init__(self, weight: mx.array, start: int, group: mx.distributed.Group) -> None:
        super().__init__()
        self.weight = weight
        self._start = start
        self._group = group

    def __call__(self, tokens: mx.array) -> mx.array:
        n = self.weight.shape[0]
        local = tokens - self._start
        mine = (local >= 0) & (local < n)
        rows = self.weight[mx.where(mine, local, 0)]
        part = mx.where(mine[..., None], rows, mx.zeros_like(rows))
        return mx.distributed.all_sum(part, group=self._group)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(x @ self.weight.T, self._group)


class HeadSlice(nn.Module):
    """Rows ``[start, start + n)`` of an untied head (no bias), split over ``group``."""

    def __init__(self, weight: mx.array, group: mx.distributed.Group) -> None:
        super().__init__()
        self.weight = weight
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(x @ self.weight.T, self._group)


class HalfVocabSlice(VocabSlice):
    """A :class:`VocabSlice` with 16-bit rows (the ``bf16w``/``fp16w`` formats): rows come out fp32, the tied head
    computes with :func:`exo_lab.models.halfmatmul.matmul`."""

    def __call__(self, tokens: mx.array) -> mx.array:
        return super().__call__(tokens).astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(halfmatmul.matmul(x, self.weight), self._group)


class HalfHeadSlice(HeadSlice):
    """A :class:`HeadSlice` with 16-bit rows, computing with :func:`exo_lab.models.halfmatmul.matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(halfmatmul.matmul(x, self.weight), self._group)


#: what :func:`exo_lab.models.halfmatmul.use_half` swaps in for this module's classes
HALF_SWAPS: dict[type, type] = {VocabSlice: HalfVocabSlice, HeadSlice: HalfHeadSlice}


def split_vocab(shard: Any, group: mx.distributed.Group) -> bool:
    """Split ``shard``'s embedding and head rows over ``group`` (see the module docstring); False when they stay
    whole (quantized, a bias, a vocabulary ``k`` does not divide, or nothing to split)."""
    k, r = group.size(), group.rank()
    parts = [m for m in (shard.embed_tokens, shard.lm_head) if m is not None]
    if k <= 1 or not parts:
        return False
    if any(type(m) not in (nn.Embedding, nn.Linear) or "bias" in m or m.weight.shape[0] % k for m in parts):
        return False
    if shard.embed_tokens is not None:
        w = shard.embed_tokens.weight
        n = w.shape[0] // k
        shard.embed_tokens = VocabSlice(mx.contiguous(w[r * n : (r + 1) * n]), r * n, group)
    if shard.lm_head is not None:
        w = shard.lm_head.weight
        n = w.shape[0] // k
        shard.lm_head = HeadSlice(mx.contiguous(w[r * n : (r + 1) * n]), group)
    return True
