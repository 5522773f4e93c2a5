"""ModelCard: what the planner needs to know about a model, read from its files.

Built from ``config.json`` and the safetensors headers only (no weights are
loaded), so it is cheap even for models far larger than the machine.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from exo_lab.models.layout import QUANTIZABLE, LayerCache, Module, layout

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


#: architectures whose layers a tensor pair inside a pipeline stage splits (``engine/pairs.py``)
PAIR_SPLIT_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3"})


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
    """Shape, sizes and split-ability of a model, exactly as its files (or its config) hold it.

    Per layer (they differ: DeepSeek-V3's first layers are dense, Qwen3-Next mixes linear and full
    attention): ``layer_bytes`` held, ``layer_active_bytes`` read per decoded token (routed experts
    count ``experts_per_token / num_experts``), ``layer_flops`` per token, and ``layer_caches`` (see
    :class:`~exo_lab.models.layout.LayerCache`). The per-layer lists are optional for cards written
    before them: a dense Llama-style layer is assumed then.
    """

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
    quantization: dict[str, Any] | None
    tie_word_embeddings: bool
    layer_bytes: list[int]
    embedding_bytes: int
    head_bytes: int
    norm_bytes: int
    max_position_embeddings: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layer_active_bytes: list[int] | None = None
    layer_flops: list[int] | None = None
    layer_caches: list[dict[str, Any]] | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    attention_width: int = 0
    tensor_dims: dict[str, int] | None = None
    tensor_group_dims: dict[str, int] | None = None
    tensor_unsupported: str | None = None
    kv_splits_with_tensor: bool = True

    @property
    def weight_bytes(self) -> int:
        """All weight bytes: layers plus embedding, head and final norm."""
        return sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes + self.norm_bytes

    @property
    def outside_bytes(self) -> int:
        """Weight bytes outside the layers: embedding, head and final norm."""
        return self.embedding_bytes + self.head_bytes + self.norm_bytes

    @property
    def activation_bytes(self) -> int:
        """Bytes per element of activations (and of the KV cache)."""
        return _TORCH_DTYPE_BYTES.get(self.dtype, 2)

    def _span(self, start: int, stop: int | None) -> range:
        return range(start, self.num_layers if stop is None else stop)

    def weight_bytes_of(self, start: int = 0, stop: int | None = None) -> int:
        """Weight bytes of layers ``[start, stop)``."""
        return sum(self.layer_bytes[start:stop])

    def active_bytes(self, start: int = 0, stop: int | None = None) -> int:
        """Weight bytes of layers ``[start, stop)`` read per decoded token (active experts only)."""
        return sum((self.layer_active_bytes or self.layer_bytes)[start:stop])

    @property
    def active_bytes_per_token(self) -> int:
        """Weight bytes read per decoded token: every layer's active bytes plus the head (and final norm)."""
        head = self.embedding_bytes if self.tie_word_embeddings else self.head_bytes
        return self.active_bytes() + head + self.norm_bytes

    def flops_per_token(self, start: int = 0, stop: int | None = None) -> int:
        """Matmul FLOPs per token (2 per active weight) of layers ``[start, stop)``, attention over the context aside."""
        if self.layer_flops is not None:
            return sum(self.layer_flops[start:stop])
        h, hd = self.hidden_size, self.head_dim
        dense = h * self.num_attention_heads * hd * 2 + h * self.num_key_value_heads * hd * 2
        dense += 3 * h * self.intermediate_size
        return 2 * dense * len(self._span(start, stop))

    @property
    def head_flops_per_token(self) -> int:
        return 2 * self.vocab_size * self.hidden_size

    @property
    def attention_dim(self) -> int:
        """Per layer and context token, half the multiply-adds of attention (q.k plus p.v)."""
        return self.attention_width or self.num_attention_heads * self.head_dim

    def attention_flops(self, prompt: int, start: int = 0, stop: int | None = None) -> float:
        """FLOPs of attention over a ``prompt``-token prefill in layers ``[start, stop)``: 4 per
        (query, key) pair and unit of :attr:`attention_dim`, causal; a sliding layer sees at most its
        window, a linear-attention layer (a constant state) no context."""
        total = 0.0
        for c in self.caches()[start:stop]:
            if c.per_token == 0:
                continue
            w = prompt if c.window is None else min(prompt, c.window)
            total += w * (w + 1) / 2 + (prompt - w) * w
        return 4 * self.attention_dim * total

    def caches(self) -> list[LayerCache]:
        """What each layer caches (a dense KV cache per layer for cards without ``layer_caches``)."""
        return list(self._caches)

    @functools.cached_property
    def _caches(self) -> tuple[LayerCache, ...]:
        # read once: the planner asks for them hundreds of times a plan it weighs (five nodes: 1176 plans, 2.63 -> 0.93 s)
        if self.layer_caches is not None:
            return tuple(LayerCache.from_json(c) for c in self.layer_caches)
        return (LayerCache(2 * self.num_key_value_heads * self.head_dim * self.activation_bytes),) * self.num_layers

    def kv_bytes_per_layer(self, context: int) -> list[int]:
        """Cache bytes of each layer at ``context`` tokens (sliding layers stop at their window,
        linear-attention layers hold a constant state)."""
        return [c.nbytes(context) for c in self.caches()]

    def kv_bytes(self, context: int, start: int = 0, stop: int | None = None) -> int:
        """Cache bytes of layers ``[start, stop)`` at ``context`` tokens of one sequence."""
        return sum(self.kv_bytes_per_layer(context)[start:stop])

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes each token of context adds, over all layers (below every sliding window)."""
        return sum(c.per_token for c in self.caches())

    def kv_bytes_per_token_per_layer(self) -> int:
        """The mean of :attr:`kv_bytes_per_token` over the layers."""
        return self.kv_bytes_per_token // max(self.num_layers, 1)

    def tensor_split_problem(self, n: int) -> str | None:
        """Why the model cannot be split over ``n`` tensor ranks (as mlx_lm's ``shard()`` splits
        it), or None if it can."""
        if n < 1:
            return "n must be at least 1"
        if n == 1:
            return None
        if self.tensor_unsupported:
            return self.tensor_unsupported
        dims = self.tensor_dims
        if dims is None:
            dims = {
                "attention heads": self.num_attention_heads,
                "KV heads": self.num_key_value_heads,
                "intermediate size": self.intermediate_size,
            }
        for what, dim in dims.items():
            if dim % n:
                return f"{what} {dim} does not divide by {n}"
        if self.quantization:
            group = int(self.quantization.get("group_size", 64))
            group_dims = self.tensor_group_dims
            if group_dims is None:
                group_dims = {
                    "hidden": self.num_attention_heads * self.head_dim,
                    "intermediate": self.intermediate_size,
                }
            for what, dim in group_dims.items():
                if (dim // n) % group:
                    return f"{what} {dim}/{n} is not a multiple of the quantization group {group}"
        return None

    def pair_split_problem(self) -> str | None:
        """Why a tensor pair inside a pipeline stage cannot split this model's layers, or None.

        Inside a pipeline, ranks of one stage exchange partial sums themselves (``engine/pairs.py``: MLX's
        ring cannot split a group), which covers the dense layers of Llama-like models only.
        """
        if self.architecture in PAIR_SPLIT_ARCHITECTURES:
            return None
        return (
            f"tensor pairs inside a pipeline split dense Llama-like layers only, not {self.architecture}'s "
            "(a pipeline, or one tensor group over all ranks, can run it)"
        )

    def can_split_tensor(self, n: int) -> bool:
        """Whether mlx_lm's tensor split of this model works over ``n`` ranks."""
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
        """Read a card from a Hugging Face-layout model directory: bytes as the files hold them,
        the rest (active bytes, FLOPs, caches, splits) from ``config.json``."""
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
        dtype = config.get("torch_dtype") or config.get("dtype") or _dtype_from_tensors(tensors)
        planned = card_from_config(config, name or path.name, dtype=str(dtype))
        planned_active = planned.layer_active_bytes or planned.layer_bytes
        active = [
            int(held * a / p) if p else held for held, a, p in zip(layer_bytes, planned_active, planned.layer_bytes)
        ]
        return replace(
            planned,
            path=str(path),
            layer_bytes=layer_bytes,
            layer_active_bytes=active,
            embedding_bytes=embedding,
            head_bytes=head,
            norm_bytes=norm,
        )


def quant_params(quantization: dict[str, Any] | None, path: str) -> dict[str, Any] | None:
    """How mlx_lm quantizes the module at ``path`` under a config's ``quantization``: its own entry
    (mixed per-layer form: a dict, or False), else the defaults; None: not quantized."""
    if not quantization:
        return None
    own = quantization.get(path)
    if own is False:
        return None
    base = {"group_size": 64, "bits": 4, "mode": "affine"}
    base.update({k: v for k, v in quantization.items() if k in ("group_size", "bits", "mode")})
    if isinstance(own, dict):
        base.update(own)
    return base


def module_bytes(module: Module, path: str, act: int, quantization: dict[str, Any] | None) -> int:
    """Bytes of one module as mlx_lm holds it: a quantized weight is packed ``bits`` per element
    plus, per group, a scale and (affine mode) a bias in the activation dtype (fp formats: one
    byte of scale); biases, norms and loose parameters stay in the activation dtype."""
    n = module.weight_elements
    q = quant_params(quantization, path) if module.kind in QUANTIZABLE else None
    explicit = bool(quantization) and isinstance(quantization.get(path), dict)
    if q is not None and (explicit or module.shape[-1] % int(q["group_size"]) == 0):
        groups = n // int(q["group_size"])
        mode = q.get("mode", "affine")
        weight = n * int(q["bits"]) // 8 + (2 * groups * act if mode == "affine" else groups)
    else:
        weight = n * act
    return weight + module.bias_elements * act


def _layout_card_fields(config: dict[str, Any], act: int, quantization: dict[str, Any] | None) -> dict[str, Any]:
    lay = layout(config, act)
    share = lay.experts_per_token / lay.experts if lay.experts else 1.0
    held, active, flops = [], [], []
    for i, mods in enumerate(lay.layers):
        total = read = 0.0
        mults = 0.0
        for m in mods:
            b = module_bytes(m, f"model.layers.{i}.{m.path}", act, quantization)
            total += b
            read += b * share if m.routed else b
            if m.kind in ("linear", "experts", "per_head"):
                mults += m.weight_elements * (share if m.routed else 1.0)
        held.append(int(total))
        active.append(int(read))
        flops.append(int(2 * mults))
    outside = {m.path: module_bytes(m, m.path, act, quantization) for m in lay.outside}
    return dict(
        layer_bytes=held,
        layer_active_bytes=active,
        layer_flops=flops,
        layer_caches=[c.to_json() for c in lay.caches],
        embedding_bytes=outside.get("model.embed_tokens", 0),
        head_bytes=outside.get("lm_head", 0),
        norm_bytes=outside.get("model.norm", 0),
        num_experts=lay.experts,
        experts_per_token=lay.experts_per_token,
        attention_width=lay.attention_width,
        tensor_dims=dict(lay.tensor_dims),
        tensor_group_dims=dict(lay.tensor_group_dims),
        tensor_unsupported=lay.tensor_unsupported,
        kv_splits_with_tensor=lay.kv_splits_with_tensor,
    )


def card_from_config(
    config: dict[str, Any], name: str, dtype: str | None = None, quantization: dict[str, Any] | None = None
) -> ModelCard:
    """A card computed from a Hugging Face ``config.json`` alone (no weights needed).

    Module by module as mlx_lm builds the model (:mod:`exo_lab.models.layout`: dense Llama/Qwen2/
    Qwen3, Qwen3-MoE, DeepSeek-V3/Kimi K2, GLM-4 MoE, gpt-oss, Gemma 3, Qwen3-Next; other types
    are read as Llama). Quantized sizes (``quantization`` here, else the config's, including
    mlx_lm's mixed per-module entries) count packed weights plus scales and biases as mlx stores them.
    """
    c = config.get("text_config", config)
    weights_dtype: str = dtype or c.get("torch_dtype") or config.get("torch_dtype") or c.get("dtype") or "bfloat16"
    if quantization is None:
        quantization = config.get("quantization") or c.get("quantization") or None
    act = _TORCH_DTYPE_BYTES.get(weights_dtype, 2)
    hidden = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    moe_inter = c.get("moe_intermediate_size")
    return ModelCard(
        name=name,
        path="",
        architecture=c.get("model_type", "llama"),
        num_layers=int(c["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c.get("v_head_dim") or hidden // heads),
        intermediate_size=int(c.get("intermediate_size") or moe_inter or 4 * hidden),
        vocab_size=int(c["vocab_size"]),
        dtype=weights_dtype,
        quantization=quantization,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", c.get("model_type") in ("gemma3_text", "gemma3"))),
        max_position_embeddings=c.get("max_position_embeddings"),
        **_layout_card_fields(config, act, quantization),
    )


def _dtype_from_tensors(tensors: list[TensorInfo]) -> str:
    for t in tensors:
        if t.dtype in ("BF16", "F16", "F32"):
            return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[t.dtype]
    return "bfloat16"
