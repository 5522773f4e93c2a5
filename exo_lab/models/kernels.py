"""exo_lab's own MLX primitives for compact weights (:mod:`exo_lab.native`'s ``weight_matmul`` extension), loaded
and checked against the installed MLX once.

``weight_matmul(x, w)``: fp32 ``x`` times bf16/fp16 ``w`` transposed (:mod:`exo_lab.models.halfmatmul`);
``quant_matmul(x, w, scales, biases, group_size, bits)``: fp32 ``x`` times MLX's 8/4-bit affine-quantized ``w``
transposed (:mod:`exo_lab.models.qmatmul`). :func:`module` is None where the extension was not built (no C++
compiler, MLX headers or nanobind) or does not work with this MLX (another nanobind ABI): callers use MLX's
own kernels then.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from exo_lab import native

log = logging.getLogger(__name__)


def _check(ext: Any) -> None:
    x = mx.array([[1.0, -2.0, 3.0, 0.5, 1.0, 2.0, -1.0, 4.0]] * 2)
    for dt in (mx.bfloat16, mx.float16):
        got = ext.weight_matmul(x[:, :3], mx.array([[0.5, 0.25, 2.0]], dtype=dt))
        assert got.dtype == mx.float32 and got.tolist() == [[6.0], [6.0]], got
    w = mx.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0] * 4])
    for bits in (8, 4):
        q, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        x32 = mx.concatenate([x] * 4, axis=1)
        want = mx.quantized_matmul(x32, q, scales, biases, transpose=True, group_size=32, bits=bits)
        got = ext.quant_matmul(x32, q, scales, biases, 32, bits)
        assert mx.allclose(got, want, rtol=1e-5).item(), (bits, got, want)  # another order of the same sums
        # groups of 64 (16-bit x where the CPU has VNNI or AVX2): integers up to 32767 round to themselves
        wide = mx.concatenate([w, w], axis=1)
        q, scales, biases = mx.quantize(wide, group_size=64, bits=bits)
        x64 = mx.array([[32767.0] + [float((i * 9973) % 65535 - 32767) for i in range(1, 64)]] * 2)
        want = mx.quantized_matmul(x64, q, scales, biases, transpose=True, group_size=64, bits=bits)
        got = ext.quant_matmul(x64, q, scales, biases, 64, bits)
        assert mx.allclose(got, want, rtol=1e-5).item(), (bits, got, want)


def module() -> Any:
    """The checked extension module, or None (see the module docstring)."""
    return native.checked_extension("weight_matmul", _check, "MLX's own kernels")


#: rows of x that ``quant_matmul`` computes per pass over the weights where it multiplies in integers (one
#: decode pass reads and unpacks each weight row once for up to 4 rows; more rows take more passes)
INTEGER_ROWS_PER_PASS = 4


def decode_rows_per_pass() -> dict[str, int]:
    """Per weight format computed with ``quant_matmul``: the rows of a decode batch one pass over the weights
    computes (the cost model's :func:`~exo_lab.placement.cost.rows_extra_s`); empty where that is not known."""
    ext = module()
    if ext is None or not ext.integer_activations():
        return {}
    return {"q8": INTEGER_ROWS_PER_PASS, "q4": INTEGER_ROWS_PER_PASS}
