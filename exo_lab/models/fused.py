"""RoPE, RMSNorm, attention's softmax and a gated MLP's activation as one operation each on a CPU, bit-identical
to MLX's.

MLX has no CPU kernel for ``mx.fast.rope`` or ``mx.fast.rms_norm``: each call builds its fallback from plain
operations, ~25 for a rotation (positions, angles, ``cos``, ``sin``, slices, products, a concatenation), twice
per attention layer per step, and ~9 for a norm: ~1100 of a llama-1b decode step's ~2150. A rank's Python
thread dispatches each one; on a one-core host the computation waits for it. :func:`use_fused` swaps a
shard's ``nn.RoPE``, ``mlx_lm``'s ``Llama3RoPE`` and ``nn.RMSNorm`` for subclasses computing with exo_lab's
``table_rope`` and ``rms_norm`` primitives (:mod:`exo_lab.native`'s ``cpu_fallbacks.cpp``): one operation per
call, the fallback's result bit for bit, so the tokens stay ``mlx_lm``'s.

A rotation's table (:class:`RopeTable`, one per rotation: dims, traditional, base, scale, frequencies) holds
row ``p`` = the cosines and sines of position ``p``, computed by ``mx.fast.rope`` itself (an identity
rotated: its first half gives the cosines, its second the sines), so they are MLX's to the bit. It grows
(doubling) to the positions a call needs: an ``int`` offset says them; a batch cache's per-row offsets (an
array) do not without waiting for it, so the shard, which holds the caches, sizes the tables before its
layers run (:func:`prepare`), from each cache's write index. Where it cannot (another cache type), the layers
rotate with ``mx.fast.rope``. Activations other than fp32, and the GPU, always use MLX's.

MLX's CPU attention is a fallback too (scores, mask, softmax, values); its softmax's exp runs one element at a
time with a software fma on MLX's Linux wheel, most of the attention's time at long contexts. :func:`attention`
spells the fallback out with exo_lab's ``softmax`` (the same arithmetic, vectorized); :func:`use_fused` points
the ``mlx_lm`` modules of a shard's layers at it (llama-1b q4 decode step, one process on 2 cores: 2000 tokens
of context 62.7 -> 46.7 ms, 512 tokens 44.7 -> 37.2, with the matmul changes of the same session).

A gated MLP's activation, ``mlx_lm``'s ``swiglu`` (``silu(gate) * x``, compiled by MLX), runs its exp the same way:
one element at a time with libm's software fma, ~100 us of each llama-1b layer's decode step (8192 elements) and
~7% of a prompt's prefill. :func:`swiglu` computes it as one operation (``cpu_fallbacks``' ``swiglu``: MLX's
sigmoid and exp, vectorized, the same bits); :func:`use_fused` points the ``mlx_lm`` modules of a shard's layers
at it too (148 -> 51 us an 8192-element call, 47 of them an operation's dispatch).

A decode step's attention (one query position) is one operation, ``decode_attention``: the fallback's ~10 (the
scale, reshapes, broadcasts, two batches of one-row products through ``small_gemm``, the softmax) in one task per
key/value head, whose query heads share each key's loads, every score and output computed in ``small_gemm``'s
order, so the same bits (where ``small_gemm`` is in use). 16 layers' attention at 2000 keys 14.1 -> 6.7 ms on two
cores; a q4 step on one core at 160 tokens of context 54.0 -> 50.9 ms, at 2000 64.8 -> 59.9 ms.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from exo_lab import _blas, native

log = logging.getLogger(__name__)

MIN_POSITIONS = 4096  #: a new table's rows
#: one query position's attention as one operation (``decode_attention``) where it gives the fallback's bits
DECODE = True


def _check(ext: Any) -> None:
    table = RopeTable(8, False, 10000.0, 1.0, None, ext)
    table.ensure(8)
    x = mx.arange(2 * 3 * 5 * 8, dtype=mx.float32).reshape(2, 3, 5, 8) / 7
    want = mx.fast.rope(x, 8, traditional=False, base=10000.0, scale=1.0, offset=2)
    got = ext.table_rope(x, table.cos, table.sin, mx.array(2, mx.int32), 8, False)
    assert mx.array_equal(got, want).item(), "not mx.fast.rope's result"
    w = mx.arange(1, 9, dtype=mx.float32) / 3
    assert mx.array_equal(ext.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5)).item(), "not rms_norm's"
    scores = (x - 3) * 9
    assert mx.array_equal(ext.softmax(scores), mx.softmax(scores, axis=-1, precise=True)).item(), "softmax"
    gate = mx.concatenate([scores.reshape(-1), mx.array([0.0, -0.0, 88.5, -88.5, 1e-30, -1e-30], mx.float32)])
    assert mx.array_equal(ext.swiglu(gate, gate / 5), _mlx_lm_swiglu()(gate, gate / 5)).item(), "not swiglu's"


def module() -> Any:
    """The checked ``cpu_fallbacks`` extension, or None (not built here, or not this MLX's ABI)."""
    return native.checked_extension("cpu_fallbacks", _check, "MLX's own")


def available() -> bool:
    """Whether the fused operations run here: on the CPU, with the extension built and checked."""
    return mx.default_device() == mx.cpu and module() is not None


class RopeTable:
    """Cosines and sines (float32 ``[positions, dims / 2]`` each) of one rotation, as ``mx.fast.rope`` computes
    them, for positions ``0 .. rows - 1``."""

    def __init__(
        self, dims: int, traditional: bool, base: float | None, scale: float, freqs: mx.array | None, ext: Any = None
    ) -> None:
        self.dims, self.traditional, self.base, self.scale, self.freqs = dims, traditional, base, scale, freqs
        self.ext = ext
        self.cos = self.sin = mx.zeros((0, dims // 2), mx.float32)
        #: the positions the next layers' array offsets stay below (:func:`prepare`); None: unknown
        self.bound: int | None = None

    @property
    def rows(self) -> int:
        return int(self.cos.shape[0])

    def ensure(self, positions: int) -> None:
        """Cover positions below ``positions`` (doubling the rows from :data:`MIN_POSITIONS`)."""
        if positions <= self.rows:
            return
        rows = max(MIN_POSITIONS, self.rows)
        while rows < positions:
            rows *= 2
        half = self.dims // 2
        one, zero = mx.ones((1, 1, rows, half), mx.float32), mx.zeros((1, 1, rows, half), mx.float32)
        if self.traditional:  # pairs (1, 0): rotated to (cos, sin)
            identity = mx.stack([one, zero], axis=-1).reshape(1, 1, rows, self.dims)
        else:  # halves 1 and 0: rotated to cos and sin
            identity = mx.concatenate([one, zero], axis=-1)
        out = mx.fast.rope(
            identity,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=0,
            freqs=self.freqs,
        )[0, 0]
        if self.traditional:
            out = out.reshape(rows, half, 2)
            cos, sin = out[..., 0], out[..., 1]
        else:
            cos, sin = out[:, :half], out[:, half:]
        self.cos, self.sin = mx.contiguous(cos), mx.contiguous(sin)
        mx.eval(self.cos, self.sin)

    def rotate(self, x: mx.array, offset: int | mx.array) -> mx.array | None:
        """``x`` rotated from ``offset``, or None where the table cannot (the caller uses ``mx.fast.rope``)."""
        if x.dtype != mx.float32 or x.ndim != 4 or self.ext is None:
            return None
        if isinstance(offset, int):
            self.ensure(offset + x.shape[2])
            off = mx.array(offset, mx.int32)
        else:
            if self.bound is None or offset.dtype != mx.int32:
                return None
            self.ensure(self.bound + x.shape[2])
            off = offset
        return self.ext.table_rope(x, self.cos, self.sin, off, self.dims, self.traditional)


class _TableRotation:
    """What the table subclasses share: rotate with ``_table``, else as the parent class does."""

    _table: RopeTable

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        out = self._table.rotate(x, offset)
        return super().__call__(x, offset) if out is None else out  # type: ignore[misc]


class TableRoPE(_TableRotation, nn.RoPE):
    """``nn.RoPE`` rotating from a :class:`RopeTable`."""


class FusedRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` as one operation for fp32 activations and weight."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if x.dtype != mx.float32 or w.dtype != mx.float32:
            return super().__call__(x)
        return module().rms_norm(x, w, self.eps)


def _llama3_class() -> type | None:
    try:
        from mlx_lm.models.rope_utils import Llama3RoPE
    except ImportError:  # pragma: no cover - mlx_lm is a dependency
        return None
    return Llama3RoPE


def _swaps() -> dict[type, tuple[type, Any]]:
    """Each swappable rotation class: its table subclass and how to read its table's parameters."""
    swaps: dict[type, tuple[type, Any]] = {
        nn.RoPE: (TableRoPE, lambda m: (m.dims, m.traditional, m.base, m.scale, None)),
    }
    llama3 = _llama3_class()
    if llama3 is not None:
        table_llama3 = type("TableLlama3RoPE", (_TableRotation, llama3), {"__doc__": "Llama3RoPE from a table."})
        swaps[llama3] = (table_llama3, lambda m: (m.dims, m.traditional, None, 1.0, m._freqs))
    return swaps


def use_fused(model: nn.Module) -> list[RopeTable]:
    """Make ``model``'s ``nn.RoPE`` and ``Llama3RoPE`` rotations rotate from tables (layers with the same rotation
    share one) and its ``nn.RMSNorm`` norms compute as one operation, in place, and point the ``mlx_lm`` modules
    of its layers at :func:`attention` and :func:`swiglu`; the tables (none where :func:`available` is false:
    nothing changes then)."""
    if not available():
        return []
    ext = module()
    _point(model, "scaled_dot_product_attention", _mlx_lm_attention(), attention)
    _point(model, "swiglu", _mlx_lm_swiglu(), swiglu)
    swaps = _swaps()
    tables: dict[tuple, RopeTable] = {}
    for _, m in model.named_modules():
        if type(m) is nn.RMSNorm:
            m.__class__ = FusedRMSNorm
            continue
        swap = swaps.get(type(m))
        if swap is None:
            continue
        cls, params = swap
        dims, traditional, base, scale, freqs = params(m)
        key = (dims, traditional, base, scale, None if freqs is None else tuple(freqs.tolist()))
        if key not in tables:
            tables[key] = RopeTable(dims, traditional, base, scale, freqs, ext)
        m.__class__ = cls
        m._table = tables[key]
    return list(tables.values())


def _mlx_lm_attention() -> Any:
    from mlx_lm.models import base

    return base.scaled_dot_product_attention


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: mx.array | str | None,
    sinks: mx.array | None = None,
) -> mx.array:
    """``mlx_lm``'s ``scaled_dot_product_attention`` with MLX's CPU fallback spelled out, its softmax exo_lab's
    (``cpu_fallbacks``' ``softmax``: MLX's arithmetic, vectorized; MLX's Linux wheel runs it one element at a
    time with a software fma, ~6 ms of a 512-token llama-1b decode step's attention): the same operations in the
    same order as ``mx.fast.scaled_dot_product_attention`` on a CPU, so the result is its bits. fp32 without
    attention sinks on the CPU; anything else (and quantized caches) goes to ``mlx_lm``'s."""
    if (
        sinks is not None
        or hasattr(cache, "bits")
        or not available()
        or not all(a.dtype == mx.float32 for a in (queries, keys, values))
        or (isinstance(mask, mx.array) and mask.dtype not in (mx.bool_, mx.float32))
        or (isinstance(mask, str) and mask != "causal")
    ):
        return _mlx_lm_attention()(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    n_q, n_kv = queries.shape[1], keys.shape[1]
    if isinstance(mask, mx.array):  # as the fast function prepares an array mask for its fallback
        mask = mx.broadcast_to(mask, (*queries.shape[:-1], keys.shape[-2]))
    if queries.shape[2] == 1 and _decode_in_one():  # "causal" leaves one query every key: no mask
        return module().decode_attention(queries, keys, values, scale, mask if isinstance(mask, mx.array) else None)
    q = mx.multiply(mx.array(scale, mx.float32), queries)
    repeats = n_q // n_kv
    k, v = keys, values
    if repeats > 1:
        q = mx.unflatten(q, 1, (n_kv, repeats))
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = mx.matmul(q, mx.swapaxes(k, -1, -2))
    if mask is not None:
        if isinstance(mask, str):  # causal: query i (of the last qL positions) sees keys up to its own
            kl, ql = k.shape[-2], q.shape[-2]
            q_idx = mx.expand_dims(mx.arange(kl - ql, kl), 1)
            mask = mx.greater_equal(q_idx, mx.expand_dims(mx.arange(0, kl), 0))
        if repeats > 1 and mask.ndim >= 3:
            mask = mx.expand_dims(mask, -3) if mask.shape[-3] == 1 else mx.unflatten(mask, -3, (n_kv, repeats))
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(mx.float32).min, mx.float32))
        else:
            scores = mx.add(scores, mask)
    out = mx.matmul(module().softmax(scores), v)
    return mx.flatten(out, 1, 2) if repeats > 1 else out


_small_gemm: bool | None = None


def _decode_in_one() -> bool:
    """Whether a decode step's attention runs as ``decode_attention``: it computes each score and output as
    ``small_gemm`` does, so only where that kernel sits in front of OpenBLAS (checked once) is it the fallback's
    result bit for bit."""
    global _small_gemm
    if _small_gemm is None:
        _small_gemm = _blas.small_gemm_in_use()
    return DECODE and _small_gemm


@functools.cache
def _mlx_lm_swiglu() -> Any:
    """``mlx_lm``'s own ``swiglu``, kept from before :func:`_point` (whose first call asks for it) could point its
    module at ours: a model with a layer class of ``mlx_lm.models.activations`` has it do that."""
    from mlx_lm.models import activations

    return activations.swiglu


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``mlx_lm``'s ``swiglu`` (``silu(gate) * x``) as one operation (``cpu_fallbacks``' ``swiglu``, MLX's CPU
    result bit for bit) for fp32 ``gate`` and ``x`` of one shape on the CPU; anything else ``mlx_lm``'s."""
    if gate.dtype == mx.float32 and x.dtype == mx.float32 and gate.shape == x.shape and gate.size and available():
        return module().swiglu(gate, x)
    return _mlx_lm_swiglu()(gate, x)


def _point(model: nn.Module, name: str, original: Any, mine: Any) -> None:
    """Point the ``mlx_lm`` modules defining ``model``'s layers at ``mine`` where their module-level ``name`` is
    ``original`` (process-wide: the same bits)."""
    for _, m in model.named_modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and getattr(mod, name, None) is original:
            setattr(mod, name, mine)


def position_bound(caches: list) -> int | None:
    """An upper bound of the per-row offsets of ``caches`` (mlx_lm caches) before this step's tokens: the
    largest write index of a batch cache (a row's offset is it less the row's left padding) or ``int`` offset;
    None when a cache with array offsets has no such index."""
    bound = 0
    for c in caches:
        offset = getattr(c, "offset", 0)
        if isinstance(offset, int):
            bound = max(bound, offset)
        elif type(c).__name__ == "BatchKVCache" and isinstance(getattr(c, "_idx", None), int):
            bound = max(bound, c._idx)
        else:
            return None
    return bound


def prepare(tables: list[RopeTable], caches: list) -> None:
    """Before a shard's layers run over ``caches``: tell each table how far the layers' offsets reach."""
    if tables:
        bound = position_bound(caches)
        for t in tables:
            t.bound = bound
