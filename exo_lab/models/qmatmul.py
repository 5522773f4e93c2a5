"""Quantized matmuls that keep up with memory: what the q8/q4 weight formats compute with on a CPU.

MLX's CPU ``quantized_matmul`` runs on one thread and is compute-bound (measured on a 2-core
AVX2 machine: about 1e9 weights/s at M=1, 0.06 of what memory bandwidth allows; at M=128 it is 13x
slower than dequantizing the weights and multiplying with OpenBLAS). So, with fp32 activations
on the CPU:

- with fp32 scales and biases (the ``q8``/``q4`` formats): exo_lab's ``quant_matmul`` primitive
  (:mod:`exo_lab.models.kernels`), on every core. On a CPU with AVX-512 VNNI or AVX2 (``integer_activations()``)
  it rounds x to 16-bit integers per group of 64 and multiplies them with the codes in integers (``vpdpwssd``,
  or ``vpmaddwd`` and an add; llama.cpp rounds x to 8 bits), for any number of rows: each output element the
  same operations whatever the batch (batch-invariant, prompt rows included). Elsewhere (or groups not a
  multiple of 64), up to ``SMALL_M`` rows (decode) it widens the codes to fp32 in registers, each output element
  the same dot product whatever the batch; more rows (prefill): blocks of weights dequantized to fp32, then
  the BLAS.
- where it is not built, or the scales are 16-bit (a stored quantized checkpoint), MLX's kernels: up to
  ``SMALL_M`` rows ``quantized_matmul`` split by output rows over one MLX CPU stream per core (each stream
  has its own thread), bit-identical to ``mx.quantized_matmul``; more rows ``mx.dequantize`` (split over
  the streams the same way), then ``x @ W.T`` on the BLAS, which uses every core.

Where that kernel is AVX2's, :func:`use_lanes` lays q4 rows out at load in lane order (:func:`to_lanes`: each
block of 8 groups holds a group a 32-bit lane), so a block's 8 exact integer sums are scaled in one conversion
and one fma: llama-1b q4 decode 1.09x (served, 2 streams: 1.22x), its prompts 1.24x on this project's 2-core host
(``benchmarks/lanes.py``).

:class:`CoreQuantizedLinear` and :class:`CoreQuantizedEmbedding` are ``nn.QuantizedLinear`` and
``nn.QuantizedEmbedding`` that compute this way, the ``CoreQuantized*Sharded*`` classes MLX's tensor-sharded
quantized linears (:func:`use_cores` swaps them in); :func:`quantize_sharded` quantizes tensor-sharded
fp32 linears in place. The device profile measures the q8/q4 formats with the same functions
(:mod:`exo_lab.cluster.profile`).
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers import distributed as mlx_distributed

from exo_lab import defaults
from exo_lab.models import kernels

SMALL_M = 16  #: up to this many rows: dot products (decode); more: dequantized weights and the BLAS (prefill)
_streams: list[mx.Stream] = []


def cpu_streams(n: int | None = None) -> list[mx.Stream]:
    """``n`` (default: one per core) CPU streams of this process, made once and shared."""
    n = n or os.cpu_count() or 1
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:n]


def _parts(rows: int, n: int) -> list[tuple[int, int]]:
    step = -(-rows // n)
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    group_size: int,
    bits: int,
    streams: int = 0,
    native: bool = True,
    lanes: bool = False,
) -> mx.array:
    """``x @ dequantize(w).T`` (what ``mx.quantized_matmul(..., transpose=True)`` gives) on every core.

    ``streams``: how many CPU streams to split MLX's kernels over (0: one per core; 1: plain MLX);
    ``native``: False keeps MLX's kernels where exo_lab's ``quant_matmul`` would run; ``lanes``: ``w`` is in
    lane order (:func:`to_lanes`)."""
    fast = x.dtype == mx.float32 and mx.default_device() == mx.cpu  # only the fp32 CPU path is sped up
    if lanes:
        if fast and native and _native(scales, biases, group_size, bits):
            return kernels.module().quant_matmul(x, w, scales, biases, group_size, bits, lanes=True)
        w = to_lanes(w)  # MLX's order again (a copy) for any other kernel
    if not fast:
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    if native and _native(scales, biases, group_size, bits):  # first: a decode step makes ~7 calls a layer
        return kernels.module().quant_matmul(x, w, scales, biases, group_size, bits)
    parts = _parts(w.shape[0], max(1, streams or os.cpu_count() or 1))
    m = x.size // x.shape[-1] if x.ndim else 1
    if m > SMALL_M:
        if len(parts) == 1:
            full = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
        else:
            full = mx.concatenate(
                [
                    mx.dequantize(
                        w[a:b],
                        scales[a:b],
                        None if biases is None else biases[a:b],
                        group_size=group_size,
                        bits=bits,
                        stream=s,
                    )
                    for (a, b), s in zip(parts, cpu_streams(len(parts)))
                ]
            )
        return x @ full.T
    if len(parts) == 1:
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    outs = [
        mx.quantized_matmul(
            x,
            w[a:b],
            scales[a:b],
            None if biases is None else biases[a:b],
            transpose=True,
            group_size=group_size,
            bits=bits,
            stream=s,
        )
        for (a, b), s in zip(parts, cpu_streams(len(parts)))
    ]
    return mx.concatenate(outs, axis=-1)


def _native(scales: mx.array, biases: mx.array | None, group_size: int, bits: int) -> bool:
    return (
        bits in (4, 8)
        and group_size % 8 == 0
        and scales.dtype == mx.float32
        and biases is not None
        and biases.dtype == mx.float32
        and kernels.module() is not None
    )


# ---- lane order: q4 rows laid out for exo_lab's AVX2 kernel -------------------------------------------------
#: uint32 words of codes a group of 64 4-bit codes holds
_GROUP_WORDS = 8


def lane_groups() -> int:
    """Groups a block of the lane order holds (0: no lane kernel here, or ``EXO_LAB_LANES=0``)."""
    ext = kernels.module()
    return int(ext.lane_groups()) if ext is not None and hasattr(ext, "lane_groups") and defaults.lanes() else 0


def to_lanes(w: mx.array) -> mx.array:
    """4-bit codes in groups of 64 (uint32 ``[..., K / 8]``, K a multiple of 512) from MLX's order to lane order,
    or back (the same 8 x 8 transpose): in each block of 8 groups, word ``i`` of group ``j`` moves to ``8 i + j``,
    so each 32 bytes the kernel loads hold word ``i`` of all 8 groups, a group a 32-bit lane
    (``int16_block_lanes`` in exo_lab/native/weight_matmul.cpp)."""
    words = w.shape[-1]
    blocks = words // (_GROUP_WORDS * _GROUP_WORDS)
    lead = tuple(w.shape[:-1])
    return w.reshape(*lead, blocks, _GROUP_WORDS, _GROUP_WORDS).swapaxes(-1, -2).reshape(*lead, words)


def lanes_for(k: int, group_size: int, bits: int) -> bool:
    """Whether exo_lab's kernel here computes rows of ``k`` codes of ``bits`` bits in groups of ``group_size``
    in lane order: 4 bits, groups of 64, a multiple of :func:`lane_groups` groups."""
    groups = lane_groups()
    return groups > 0 and bits == 4 and group_size == 64 and k % (64 * groups) == 0


def lanes_fit(module: Any) -> bool:
    """Whether ``module`` (a quantized linear, embedding, or vocab slice computing with :func:`matmul`) can hold
    its weight in lane order here (:func:`lanes_for`, fp32 scales and biases on exo_lab's kernel)."""
    weight = module.get("weight") if isinstance(module, dict) else None
    group_size, bits = getattr(module, "group_size", 0), getattr(module, "bits", 0)
    return (
        weight is not None
        and weight.dtype == mx.uint32
        and getattr(module, "mode", "affine") == "affine"
        and bits in (4, 8)
        and lanes_for(weight.shape[-1] * 32 // bits, group_size, bits)
        and "biases" in module
        and _native(module["scales"], module["biases"], group_size, bits)
    )


def use_lanes(model: nn.Module, classes: tuple[type, ...] = ()) -> int:
    """Lay out the weights of ``model``'s q4 modules that compute with :func:`matmul` (the ``Core*`` classes,
    and ``classes``) in lane order (:func:`to_lanes`), in place, where :func:`lanes_fit`; how many changed.

    Their products then scale each block of 8 groups' exact integer sums in one conversion and one fma (one
    of each a group in MLX's order); lookups of rows (an embedding) put them back in MLX's order."""
    kinds = (*LANE_CLASSES, *classes)
    changed = 0
    for _, module in model.named_modules():
        if not isinstance(module, kinds) or getattr(module, "lanes", False) or not lanes_fit(module):
            continue
        module.weight = to_lanes(module["weight"])
        module.lanes = True
        changed += 1
    return changed


def module_matmul(module: Any, x: mx.array) -> mx.array:
    """``x`` times ``module``'s quantized weight transposed (:func:`matmul`, in the weight's order)."""
    return matmul(
        x,
        module["weight"],
        module["scales"],
        module.get("biases"),
        module.group_size,
        module.bits,
        lanes=getattr(module, "lanes", False),
    )


def rows_in_order(module: Any, rows: mx.array) -> mx.array:
    """Rows of ``module``'s weight (looked up, e.g. an embedding's) in MLX's order."""
    return to_lanes(rows) if getattr(module, "lanes", False) else rows


class CoreQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` computing with :func:`matmul` (same weights)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = module_matmul(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class CoreQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (a tied head) computes with :func:`matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        biases = self.get("biases")
        return mx.dequantize(
            rows_in_order(self, self["weight"][x]),
            scales=self["scales"][x],
            biases=None if biases is None else biases[x],
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        return module_matmul(self, x)


class CoreQuantizedAllToShardedLinear(mlx_distributed.QuantizedAllToShardedLinear):
    """A tensor-sharded quantized column slice (no communication forward) computing with :func:`matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = module_matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class CoreQuantizedShardedToAllLinear(mlx_distributed.QuantizedShardedToAllLinear):
    """A tensor-sharded quantized row slice computing with :func:`matmul`, its partial sums all-reduced."""

    def __call__(self, x: mx.array) -> mx.array:
        # through the module MLX's own sharded linears use, so a trace's all-reduce hook sees it too
        part = module_matmul(self, x)
        y = mlx_distributed.mx.distributed.all_sum(part, group=self.group)
        return y + self["bias"] if "bias" in self else y


#: the classes :func:`use_cores` swaps in, by the class they replace
CORE_SWAPS: dict[type, type] = {
    nn.QuantizedLinear: CoreQuantizedLinear,
    nn.QuantizedEmbedding: CoreQuantizedEmbedding,
    mlx_distributed.QuantizedAllToShardedLinear: CoreQuantizedAllToShardedLinear,
    mlx_distributed.QuantizedShardedToAllLinear: CoreQuantizedShardedToAllLinear,
}
#: the classes whose weights :func:`use_lanes` lays out
LANE_CLASSES: tuple[type, ...] = (
    CoreQuantizedLinear,
    CoreQuantizedEmbedding,
    CoreQuantizedAllToShardedLinear,
    CoreQuantizedShardedToAllLinear,
)
#: the classes :func:`quantize_sharded` swaps in, by the (fp32) tensor-sharded class they replace
SHARDED_SWAPS: dict[type, type] = {
    mlx_distributed.AllToShardedLinear: CoreQuantizedAllToShardedLinear,
    mlx_distributed.ShardedToAllLinear: CoreQuantizedShardedToAllLinear,
}


def use_cores(model: nn.Module) -> int:
    """Make every affine quantized linear, embedding and tensor-sharded linear of ``model`` compute on every
    core (in place, the arrays shared); how many modules changed."""
    changed = 0
    for _, module in model.named_modules():
        core = CORE_SWAPS.get(type(module))
        if core is None or getattr(module, "mode", "affine") != "affine":
            continue
        module.__class__ = core
        changed += 1
    return changed


def quantize_sharded(model: nn.Module, group_size: int, bits: int, swaps: dict[type, type] | None = None) -> int:
    """Quantize ``model``'s tensor-sharded linears (and each class in ``swaps``, which must then compute with
    ``weight``, ``scales``, ``biases``, ``group_size`` and ``bits``) whose rows hold whole groups, in place
    (affine, fp32 scales and biases, computing with :func:`matmul`); how many modules changed.

    ``nn.quantize`` leaves them alone: MLX's sharded linears cannot quantize themselves. A slice's groups are
    the unsplit weight's wherever the split falls on a group boundary, so the ranks hold what one process
    quantizing the whole weight holds."""
    table = {**SHARDED_SWAPS, **(swaps or {})}
    changed = 0
    for _, module in model.named_modules():
        swap = table.get(type(module))
        weight = module.get("weight") if isinstance(module, nn.Module) else None
        if swap is None or weight is None or weight.shape[-1] % group_size:
            continue
        q, scales, biases = mx.quantize(weight.astype(mx.float32), group_size=group_size, bits=bits)
        module.__class__ = swap
        module.weight, module.scales, module.biases = q, scales, biases
        module.group_size, module.bits, module.mode = group_size, bits, "affine"
        changed += 1
    return changed
