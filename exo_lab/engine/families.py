"""How each mlx_lm architecture runs its decoder layers, for a stage that holds only some of them.

A pipeline stage cannot call the model's own inner ``__call__`` (it runs every layer and picks
masks by whole-model indices), so it repeats what that ``__call__`` does, per layer, with the
same mlx_lm functions. What differs between architectures is small and lives in one table,
:data:`FAMILIES`, keyed by ``model_type``:

- the kind of each layer: ``full`` attention (the causal mask, as an array where the model asks
  for one: DeepSeek-V3), ``sliding`` attention (a window mask, as gpt-oss and Gemma 3 build for
  their sliding layers) or ``linear`` attention (an SSM mask: Qwen3-Next's gated delta layers);
- an embedding scale (Gemma 3 multiplies by ``sqrt(hidden_size)``, rounded to bf16 as it does).

Masks depend only on the layer's cache and the input length, so one mask per kind (from the
stage's first layer of that kind, before it runs) is bit-for-bit the mask the whole model uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from exo_lab.models.card import PAIR_SPLIT_ARCHITECTURES

FULL, SLIDING, LINEAR = "full", "sliding", "linear"


def _all_full(model: Any) -> list[str]:
    return [FULL] * len(model.model.layers)


def _gpt_oss_kinds(model: Any) -> list[str]:
    return [FULL if t == "full_attention" else SLIDING for t in model.model.layer_types]


def _gemma3_kinds(model: Any) -> list[str]:
    pattern = model.args.sliding_window_pattern
    return [FULL if i % pattern == pattern - 1 else SLIDING for i in range(len(model.model.layers))]


def _linear_kinds(model: Any) -> list[str]:
    return [LINEAR if layer.is_linear else FULL for layer in model.model.layers]


def _gemma3_scale(model: Any, h: mx.array) -> mx.array:
    return h * mx.array(model.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)


@dataclass(frozen=True)
class Family:
    """What a stage must know of an architecture's inner ``__call__`` (see the module docstring)."""

    kinds: Callable[[Any], list[str]] = _all_full  # model -> kind of every layer of the whole model
    full_mask_array: bool = False  # the causal mask as an array (create_attention_mask(return_array=True))
    embed_scale: Callable[[Any, mx.array], mx.array] | None = None  # applied to the embedding output

    def mask(self, kind: str, h: mx.array, cache: Any, window: int | None) -> Any:
        """The mask the whole model gives a layer of ``kind`` whose cache is ``cache``."""
        from mlx_lm.models.base import create_attention_mask, create_ssm_mask

        if kind == LINEAR:
            return create_ssm_mask(h, cache)
        if kind == SLIDING:
            return create_attention_mask(h, cache, window_size=window)
        return create_attention_mask(h, cache, return_array=self.full_mask_array)


DEFAULT = Family()
FAMILIES: dict[str, Family] = {
    "deepseek_v3": Family(full_mask_array=True),
    "gpt_oss": Family(kinds=_gpt_oss_kinds),
    "gemma3_text": Family(kinds=_gemma3_kinds, embed_scale=_gemma3_scale),
    "qwen3_next": Family(kinds=_linear_kinds),
}  #: by mlx_lm module (Kimi K2 runs deepseek_v3's); the others are Llama-like (full attention, causal mask)

TIED_BY_DEFAULT = frozenset({"gemma3_text", "gemma3"})  #: tie the head when config.json does not say


def architecture(model: Any) -> str:
    """The mlx_lm module that defines ``model`` (``deepseek_v3`` for Kimi K2 too)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def family(model: Any) -> Family:
    """The adapter for an mlx_lm model (Llama's plain one for architectures not in :data:`FAMILIES`)."""
    return FAMILIES.get(architecture(model), DEFAULT)


def tied_embeddings(config: dict) -> bool:
    """Whether the model's head is its embedding, from ``config.json``."""
    return bool(config.get("tie_word_embeddings", config.get("model_type") in TIED_BY_DEFAULT))


PAIR_SPLITS = PAIR_SPLIT_ARCHITECTURES  #: dense layers :func:`exo_lab.engine.pairs.shard_pair` splits


def pair_split_problem(model: Any) -> str | None:
    """Why a tensor pair inside a pipeline stage cannot split ``model``'s layers, or None."""
    if architecture(model) not in PAIR_SPLITS:
        return (
            f"tensor pairs inside a pipeline split dense Llama-like layers only, not {architecture(model)}'s"
            " (use a pipeline, or one tensor group over all ranks)"
        )
    return None


def tensor_split_problem(model: Any, size: int) -> str | None:
    """Why ``model`` (an mlx_lm model) cannot be split over ``size`` tensor ranks, or None."""
    if size > 1 and not hasattr(model, "shard"):
        return f"mlx_lm's {architecture(model)} model has no shard(): it cannot be split over tensor ranks"
    return None
