"""mlx_lm's own models for the tiny family configs, and what their tensors and caches hold.

The card tests compare :func:`exo_lab.models.card.card_from_config` with these numbers.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import cache as cache_lib

import exo_lab  # noqa: F401  (preloads OpenBLAS before MLX)

MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def build(config: dict[str, Any], dtype: str = "float32") -> nn.Module:
    """mlx_lm's model for ``config`` (random weights in ``dtype``), with a tied head dropped as mlx_lm's loader does."""
    mod = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = mod.Model(mod.ModelArgs.from_dict(config))
    if config.get("tie_word_embeddings", config["model_type"] == "gemma3_text") and "lm_head" in model:
        model.sanitize({})  # gemma3_text: no lm_head.weight in the files -> tied
    model.set_dtype(MLX_DTYPES[dtype])
    mx.eval(model.parameters())
    return model


def parameter_bytes(model: nn.Module, num_layers: int) -> tuple[list[int], dict[str, int]]:
    """Bytes per layer and per outside module (``model.embed_tokens``, ``model.norm``, ``lm_head``)."""
    layers = [0] * num_layers
    outside: dict[str, int] = {}
    for name, a in tree_flatten(model.parameters()):
        assert isinstance(a, mx.array)
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            layers[int(parts[2])] += a.nbytes
        else:
            key = ".".join(parts[:-1]) if parts[-1] in ("weight", "scales", "biases", "bias") else name
            outside[key] = outside.get(key, 0) + a.nbytes
    return layers, outside


def layer_parameters(model: nn.Module, i: int) -> dict[str, mx.array]:
    """Layer ``i``'s arrays by their path inside the layer."""
    layer = model["model"].layers[i]
    return {k: a for k, a in tree_flatten(layer.parameters()) if isinstance(a, mx.array)}


def logical_cache_bytes(c: Any) -> int:
    """Bytes a layer's cache holds for the tokens it keeps (not the preallocated tail of its buffer)."""
    if isinstance(c, (cache_lib.RotatingKVCache, cache_lib.KVCache)):
        n = min(c.offset, c.max_size) if isinstance(c, cache_lib.RotatingKVCache) else c.offset
        keys, values = c.keys, c.values
        assert keys is not None and values is not None
        return keys[..., :n, :].nbytes + values[..., :n, :].nbytes
    if isinstance(c, cache_lib.ArraysCache):
        return sum(a.nbytes for a in c.cache if a is not None)
    raise TypeError(f"unknown cache {type(c).__name__}")


def buffer_cache_bytes(c: Any) -> int:
    """Bytes of a layer's cache arrays as allocated (KVCache grows in steps of 256 tokens)."""
    return sum(a.nbytes for _, a in tree_flatten(c.state) if isinstance(a, mx.array))


def run_tokens(model: nn.Module, prompt: int, decode: int) -> list[Any]:
    """The model's real cache after a ``prompt``-token prefill and ``decode`` single-token steps."""
    c = cache_lib.make_prompt_cache(model)
    tokens = mx.arange(prompt)[None] % 200 + 3
    logits = model(tokens, cache=c)
    for _ in range(decode):
        nxt = mx.argmax(logits[:, -1:], axis=-1)
        logits = model(nxt, cache=c)
        mx.eval(logits)
    return c
