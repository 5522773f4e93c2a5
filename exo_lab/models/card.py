"""ModelCard: what the planner needs to know about a model, read from its files.

Built from ``config.json`` and the safetensors headers only (no weights are
loaded), so it is cheap even for models far larger than the machine.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_TORCH_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: its file, dtype, shape and size."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the file's data section
    data_start: int  # where the data section starts in the file

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """The tensors listed in one safetensors file's header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return [
        TensorInfo(name, path.name, meta["dtype"], tuple(meta["shape"]), tuple(meta["data_offsets"]), 8 + length)
        for name, meta in sorted(header.items())
    ]


def read_tensor_index(model_dir: Path) -> list[TensorInfo]:
    """Every tensor of a model directory, over all its safetensors files."""
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {model_dir}")
    return [t for f in files for t in read_safetensors_header(f)]


@dataclass(frozen=True)
class ModelCard:
    """Shape, sizes and split-ability of a model, exactly as its files hold it."""

    name: str
    path: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    quantization: dict[str, int] | None
    tie_word_embeddings: bool
    layer_bytes: list[int]
    embedding_bytes: int
    head_bytes: int
    norm_bytes: int
    max_position_embeddings: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """All weight bytes: layers plus embedding, head and final norm."""
        return sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes + self.norm_bytes

    @property
    def activation_bytes(self) -> int:
        """Bytes per element of activations (and of the KV cache)."""
        return _TORCH_DTYPE_BYTES.get(self.dtype, 2)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of context, over all layers."""
        return 2 * self.num_layers * self.num_key_value_heads * self.head_dim * self.activation_bytes

    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * self.activation_bytes

    def tensor_split_problem(self, n: int) -> str | None:
        """Why the model cannot be split over ``n`` tensor ranks, or None if it can."""
        if n < 1:
            return "n must be at least 1"
        if self.num_attention_heads % n:
            return f"{self.num_attention_heads} attention heads do not divide by {n}"
        if self.num_key_value_heads % n:
            return f"{self.num_key_value_heads} KV heads do not divide by {n}"
        if self.intermediate_size % n:
            return f"intermediate size {self.intermediate_size} does not divide by {n}"
        if self.quantization:
            group = self.quantization.get("group_size", 64)
            for what, dim in (
                ("hidden", self.num_attention_heads * self.head_dim),
                ("intermediate", self.intermediate_size),
            ):
                if (dim // n) % group:
                    return f"{what} size {dim}/{n} is not a multiple of the quantization group {group}"
        return None

    def can_split_tensor(self, n: int) -> bool:
        """Whether attention heads, KV heads and the MLP split evenly over ``n`` ranks."""
        return self.tensor_split_problem(n) is None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_bytes"] = self.weight_bytes
        d["kv_bytes_per_token"] = self.kv_bytes_per_token
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> ModelCard:
        """Read a card from a Hugging Face-layout model directory."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        text_config = config.get("text_config", config)
        tensors = read_tensor_index(path)
        layers = int(text_config["num_hidden_layers"])
        layer_bytes = [0] * layers
        embedding = head = norm = 0
        for t in tensors:
            m = _LAYER.match(t.name)
            if m:
                layer_bytes[int(m.group(1))] += t.nbytes
            elif "embed_tokens" in t.name:
                embedding += t.nbytes
            elif t.name.startswith("lm_head"):
                head += t.nbytes
            else:
                norm += t.nbytes
        heads = int(text_config["num_attention_heads"])
        hidden = int(text_config["hidden_size"])
        quant = config.get("quantization") or None
        if quant:
            quant = {k: int(v) for k, v in quant.items() if k in ("group_size", "bits")}
        dtype = config.get("torch_dtype") or config.get("dtype") or _dtype_from_tensors(tensors)
        return cls(
            name=name or path.name,
            path=str(path),
            architecture=config.get("model_type", "unknown"),
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(text_config.get("num_key_value_heads") or heads),
            head_dim=int(text_config.get("head_dim") or hidden // heads),
            intermediate_size=int(text_config.get("intermediate_size", 4 * hidden)),
            vocab_size=int(text_config["vocab_size"]),
            dtype=str(dtype),
            quantization=quant,
            tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
            layer_bytes=layer_bytes,
            embedding_bytes=embedding,
            head_bytes=head,
            norm_bytes=norm,
            max_position_embeddings=text_config.get("max_position_embeddings"),
        )


def _bytes_per_weight(dtype: str, quantization: dict[str, int] | None) -> float:
    if quantization:
        bits, group = quantization.get("bits", 4), quantization.get("group_size", 64)
        return bits / 8 + 2 * _TORCH_DTYPE_BYTES.get(dtype, 2) / group  # packed weights + scale and bias per group
    return _TORCH_DTYPE_BYTES.get(dtype, 2)


def card_from_config(
    config: dict[str, Any], name: str, dtype: str | None = None, quantization: dict[str, int] | None = None
) -> ModelCard:
    """A card computed from a Hugging Face ``config.json`` alone (no weights needed).

    For studying models you do not have: sizes follow the Llama/Qwen layout
    (q/k/v/o projections, gated MLP, two norms per layer). Quantized sizes
    count packed weights plus one scale and bias per group (mlx's format).
    """
    c = config.get("text_config", config)
    weights_dtype: str = dtype or c.get("torch_dtype") or "bfloat16"
    quantization = quantization if quantization is not None else c.get("quantization")
    hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = int(c["intermediate_size"])
    vocab = int(c["vocab_size"])
    tied = bool(c.get("tie_word_embeddings", False))
    bpw = _bytes_per_weight(weights_dtype, quantization)
    act = _TORCH_DTYPE_BYTES.get(weights_dtype, 2)
    linear = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    bias = (heads + 2 * kv) * head_dim if c.get("attention_bias") else 0
    qk_norm = 2 * head_dim if c.get("model_type") == "qwen3" else 0
    per_layer = int(linear * bpw) + (2 * hidden + bias + qk_norm) * act
    emb = int(vocab * hidden * bpw)
    return ModelCard(
        name=name,
        path="",
        architecture=c.get("model_type", "llama"),
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        dtype=weights_dtype,
        quantization=quantization,
        tie_word_embeddings=tied,
        layer_bytes=[per_layer] * layers,
        embedding_bytes=emb,
        head_bytes=0 if tied else emb,
        norm_bytes=hidden * act,
        max_position_embeddings=c.get("max_position_embeddings"),
    )


def _dtype_from_tensors(tensors: list[TensorInfo]) -> str:
    for t in tensors:
        if t.dtype in ("BF16", "F16", "F32"):
            return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[t.dtype]
    return "bfloat16"
