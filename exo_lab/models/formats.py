"""Weight formats a rank can compute in: what each one stores per weight and what it computes with.

A rank's *format* (``RankSpec.dtype``, the worker's ``dtype``) is what its weights are held in
once loaded, whatever the checkpoint stores:

==========  =================================  ===================  ===============
format      weights                            activations          exact?
==========  =================================  ===================  ===============
float32     fp32 (OpenBLAS GEMV/GEMM on CPU)   fp32                 yes (an upcast)
bfloat16    bf16                               bf16                 only if stored
float16     fp16                               fp16                 only if stored
q8          8-bit affine, group 64, fp32       fp32                 no
            scales and biases
q4          4-bit affine, group 64, fp32       fp32                 no
            scales and biases
bf16w       bf16 (linears and embeddings;      fp32                 only if stored
            norms, biases, experts fp32)
fp16w       fp16 (as bf16w)                    fp32                 only if stored
==========  =================================  ===================  ===============

``bf16w`` and ``fp16w`` compute with exo_lab's CPU kernel (:mod:`exo_lab.models.halfmatmul`): the 16-bit
weights are widened in registers and multiplied with fp32 activations, so a bf16 checkpoint computes what
its fp32 upcast (``float32``) computes, from half the memory, reading half the bytes per token. They exist
on a node only where that kernel was built (the device profile measures them only there).

``q8`` and ``q4`` are ``mx.quantize`` of the fp32 weights (``nn.QuantizedLinear`` and
``nn.QuantizedEmbedding``, the head too when it is tied), so their activations and scales stay fp32 (their
matmuls round x to 16-bit integers per group inside the kernel where the CPU has AVX-512 VNNI or AVX2:
:mod:`exo_lab.models.qmatmul`):
MLX's CPU ``quantized_matmul`` with bf16 activations is many times slower (measured: see
``benchmarks/weight_formats.py``). Quantizing changes the tokens a model generates, and so does
casting down (fp32 to bf16, bf16 to fp16): the planner uses these *lossy* formats only when the
user allows them (``lossy=True``); by default a rank computes in the checkpoint's own dtype or in
fp32 (exact weights).

The device profile measures every format's M=1 read rate, M=8 and M=512 GFLOP/s under the keys
``<format>_m1``, ``<format>_m8`` and ``<format>_m512`` (:mod:`exo_lab.cluster.profile`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

GROUP_SIZE = 64
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Format:
    """One weight format: its name, quantization bits (None: plain floats), activation dtype and, for plain
    floats, the dtype the weights are held in (the name's, unless it differs from the activations')."""

    name: str
    bits: int | None
    activations: str
    weights: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def held(self) -> str:
        """The dtype plain-float weights are held in."""
        return self.weights or self.name

    @property
    def widened(self) -> bool:
        """16-bit weights computing with fp32 activations (exo_lab's kernel)."""
        return self.bits is None and self.held != self.activations

    def bytes_per_weight(self) -> float:
        """Bytes one weight takes in memory (quantized: with its share of the fp32 scale and bias)."""
        if self.bits is None:
            return float(FLOAT_BYTES[self.held])
        return self.bits / 8 + 2 * FLOAT_BYTES[self.activations] / GROUP_SIZE


FORMATS: dict[str, Format] = {
    "float32": Format("float32", None, "float32"),
    "bfloat16": Format("bfloat16", None, "bfloat16"),
    "float16": Format("float16", None, "float16"),
    "q8": Format("q8", 8, "float32"),
    "q4": Format("q4", 4, "float32"),
    "bf16w": Format("bf16w", None, "float32", "bfloat16"),
    "fp16w": Format("fp16w", None, "float32", "float16"),
}
WIDENED = tuple(name for name, f in FORMATS.items() if f.widened)
QUANTIZED = tuple(name for name, f in FORMATS.items() if f.quantized)


def get(name: str) -> Format:
    """The format called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; choose one of {', '.join(FORMATS)}") from None


def activation_dtype(name: str) -> str:
    """The dtype a rank computing in format ``name`` sends and receives hidden states in."""
    return get(name).activations


def activation_dtype_of(dtype: str) -> str:
    """:func:`activation_dtype` of a format, or ``dtype`` itself when it names none (a stored dtype)."""
    return FORMATS[dtype].activations if dtype in FORMATS else dtype


def all_quantized(names: Iterable[str | None]) -> bool:
    """Whether every one of these rank formats is q8 or q4 (None or a stored dtype is not): their prompts run in
    finer chunks on a CPU (``exo_lab.defaults.prefill_step``)."""
    names = list(names)
    return bool(names) and all(n in FORMATS and FORMATS[n].quantized for n in names)


def exact_formats(stored: str) -> list[str]:
    """Formats whose weights equal the checkpoint's (dtype ``stored``): the stored dtype, fp32 and the stored
    16-bit weights widened to fp32 in registers."""
    if stored == "float32":
        return [stored]
    return [stored, "float32", *(name for name in WIDENED if FORMATS[name].held == stored)]


def lossy_formats(stored: str) -> list[str]:
    """Every format a checkpoint in ``stored`` can be loaded in, the exact ones first."""
    exact = exact_formats(stored)
    return exact + [f for f in FORMATS if f not in exact]
