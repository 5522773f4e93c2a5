"""16-bit weights with fp32 activations on the CPU: what the ``bf16w`` and ``fp16w`` weight formats compute with.

MLX's CPU matmul wants both operands in one dtype, so bf16 weights either compute with bf16 activations in
MLX's own kernels (on this project's AVX2 CPU ~0.07 of what memory bandwidth allows) or are cast to fp32,
which reads and writes 4 bytes per weight on every call. ``weight_matmul`` (:mod:`exo_lab.native`'s MLX
primitive) keeps the weights at 2 bytes and widens them in registers: fp32 products and sums of the same
bf16/fp16 weights, so a bf16 checkpoint computes exactly what its fp32 upcast computes (up to the order of
the sums) from half the memory, and decodes faster than fp32 because it reads half the bytes.

:func:`use_half` swaps a model's linears and embeddings (plain, tensor-sharded, vocabulary-split) for
classes computing with :func:`matmul` and holding their weights in 16 bits; everything else (norms, biases,
MoE experts) stays fp32. :func:`available` says whether the primitive was built and works with this MLX.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers import distributed as mlx_distributed

from exo_lab.models import kernels

HALF = (mx.bfloat16, mx.float16)


def available() -> bool:
    """Whether :func:`matmul` can run here (built, works with this MLX, and MLX computes on the CPU)."""
    return mx.default_device() == mx.cpu and kernels.module() is not None


def matmul(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` for fp32 ``x`` [..., K] and bf16/fp16 ``w`` [N, K], in fp32 (RuntimeError when unavailable)."""
    ext = kernels.module()
    if ext is None:
        raise RuntimeError(
            "16-bit weights with fp32 activations need exo_lab's weight_matmul (python -m exo_lab.native)"
        )
    return ext.weight_matmul(x.astype(mx.float32), w)


class HalfLinear(nn.Linear):
    """``nn.Linear`` with 16-bit weights: fp32 in, fp32 out."""

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class HalfAllToShardedLinear(mlx_distributed.AllToShardedLinear):
    """A tensor-sharded column slice (no communication forward) with 16-bit weights."""

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class HalfShardedToAllLinear(mlx_distributed.ShardedToAllLinear):
    """A tensor-sharded row slice with 16-bit weights, its partial sums all-reduced over the group."""

    def __call__(self, x: mx.array) -> mx.array:
        # through the module MLX's own sharded linears use, so a trace's all-reduce hook sees it too
        y = mlx_distributed.mx.distributed.all_sum(matmul(x, self["weight"]), group=self.group)
        return y + self["bias"] if "bias" in self else y


class HalfEmbedding(nn.Embedding):
    """``nn.Embedding`` with 16-bit rows: looked-up rows come out fp32; a tied head computes with :func:`matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        return self["weight"][x].astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return matmul(x, self["weight"])


#: the classes :func:`use_half` swaps in, by the class they replace
SWAPS: dict[type, type] = {
    nn.Linear: HalfLinear,
    mlx_distributed.AllToShardedLinear: HalfAllToShardedLinear,
    mlx_distributed.ShardedToAllLinear: HalfShardedToAllLinear,
    nn.Embedding: HalfEmbedding,
}


def use_half(model: nn.Module, dtype: mx.Dtype, swaps: dict[type, type] | None = None) -> int:
    """Hold every plain or tensor-sharded linear and embedding of ``model`` (and each class in ``swaps``, which
    must compute ``x @ weight.T`` with :func:`matmul`) in ``dtype`` (bf16 or fp16), computing in fp32; in
    place; how many modules changed."""
    table = {**SWAPS, **(swaps or {})}
    changed = 0
    for _, module in model.named_modules():
        half = table.get(type(module))
        weight = module.get("weight") if isinstance(module, nn.Module) else None
        if half is None or weight is None or not mx.issubdtype(weight.dtype, mx.floating):
            continue
        module.__class__ = half
        module["weight"] = weight.astype(dtype)
        changed += 1
    return changed
