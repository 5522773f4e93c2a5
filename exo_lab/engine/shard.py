"""One rank's part of a model: a range of layers, optionally split over a tensor group.

A shard is built from the model's own mlx_lm classes (Llama, Qwen2/3, Qwen3-MoE,
DeepSeek-V3, GLM-4 MoE, gpt-oss, Gemma 3, Qwen3-Next and others with
``model.embed_tokens / layers / norm``) and loads only the tensors it needs: its
layers (experts stacked per layer, as mlx_lm stores them), plus the embedding on the
first stage and the final norm and head on the last. The forward pass runs the same
operations as the whole model, with the model's own per-layer caches and the mask each
layer kind gets (:mod:`exo_lab.engine.families`), so splitting layers changes no bits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from exo_lab.engine.families import architecture, family, pair_split_problem, tensor_split_problem, tied_embeddings
from exo_lab.models import formats, fused, halfmatmul, qmatmul, shared_rows
from exo_lab.models.tensors import read_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model a rank holds."""

    start: int
    end: int
    num_layers: int
    dtype: str | None = None  # compute dtype; None keeps the stored one

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers


def _model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def needs_tensor(name: str, spec: ShardSpec, tied: bool) -> bool:
    """Whether a shard needs the stored tensor ``name``."""
    if name.startswith("model.layers."):
        return spec.start <= int(name.split(".")[2]) < spec.end
    if "embed_tokens" in name:
        return spec.first or (spec.last and tied)
    if name.startswith("lm_head") or name.startswith("model.norm"):
        return spec.last
    return False


def tensor_names(model_dir: Path, spec: ShardSpec, tied: bool) -> list[str]:
    """Names of the stored tensors a shard needs (a checkpoint without a head is tied, whatever ``tied`` says)."""
    from exo_lab.models.card import read_tensor_index

    index = read_tensor_index(model_dir)
    tied = tied or not any(t.name.startswith("lm_head.") for t in index)
    return [t.name for t in index if needs_tensor(t.name, spec, tied)]


def _stage_caches(model: Any, start: int, end: int) -> list:
    """Fresh caches for layers ``[start, end)``: the model's own ``make_cache()`` (or a KVCache per layer), sliced."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)[start:end]


class Shard(nn.Module):
    """Layers ``[start, end)`` of a model, with embedding/head where the stage needs them."""

    rope_tables: list[fused.RopeTable]  #: the layers' rotation tables (set outside the module tree)

    def __init__(self, model: Any, spec: ShardSpec) -> None:
        """``model`` is an mlx_lm model (an ``nn.Module`` used through its dynamic attributes)."""
        super().__init__()
        self.spec = spec
        inner = model.model
        self.family = family(model)
        self.kinds = self.family.kinds(model)[spec.start : spec.end]
        self.window: int | None = getattr(model.args, "sliding_window", None)
        self.layers = inner.layers[spec.start : spec.end]
        # tied: the model says so (args, or Gemma's attribute that sanitize sets), or it has no head
        self.tied = bool(
            getattr(model.args, "tie_word_embeddings", False)
            or getattr(model, "tie_word_embeddings", False)
            or "lm_head" not in model
        )
        self.embed_tokens = inner.embed_tokens if (spec.first or (spec.last and self.tied)) else None
        self.norm = inner.norm if spec.last else None
        self.lm_head = model["lm_head"] if (spec.last and not self.tied) else None
        self._embed_scale = partial(self.family.embed_scale, model) if self.family.embed_scale else None
        self._make_cache = partial(_stage_caches, model, spec.start, spec.end)
        #: hidden states from a previous stage are cast to this (its weight format's activations; None: as they come)
        self.input_dtype: mx.Dtype | None = None
        object.__setattr__(self, "rope_tables", [])  # sized before the layers run (exo_lab.models.fused)

    def hidden(self, x: mx.array, cache: list) -> mx.array:
        """This stage's layers over tokens (first stage) or hidden states: the hidden states after them."""
        if self.spec.first:
            assert self.embed_tokens is not None  # a first stage always holds the embedding
            h = self.embed_tokens(x)
            if self._embed_scale is not None:
                h = self._embed_scale(h)
        else:
            h = x if self.input_dtype is None or x.dtype == self.input_dtype else x.astype(self.input_dtype)
        fused.prepare(self.rope_tables, cache)
        masks: dict[str, Any] = {}
        for layer, c, kind in zip(self.layers, cache, self.kinds):
            if kind not in masks:  # from the stage's first layer of this kind, before it runs
                masks[kind] = self.family.mask(kind, h, c, self.window)
            h = layer(h, masks[kind], cache=c)
        return h

    def __call__(self, x: mx.array, cache: list) -> mx.array:
        """Tokens (first stage) or hidden states in; hidden states or logits (last stage) out."""
        h = self.hidden(x, cache)
        if not self.spec.last:
            return h
        # a last stage always holds the norm, and the embedding (tied) or the head (untied)
        assert self.norm is not None
        h = self.norm(h)
        if self.tied:
            assert self.embed_tokens is not None
            return self.embed_tokens.as_linear(h)
        assert self.lm_head is not None
        return self.lm_head(h)

    def make_cache(self) -> list:
        """Fresh per-layer caches of this stage's layers, of the types the model's own ``make_cache()`` gives."""
        return self._make_cache()


def _quantize(model: nn.Module, quant: dict, weights: dict[str, mx.array]) -> None:
    """Turn the modules the checkpoint stores quantized into quantized ones, as ``mlx_lm.load`` does.

    Per-layer entries of ``quantization`` (mixed recipes, gpt-oss's 8-bit routers) win; other
    modules with stored scales get the parameters their tensors show.
    """
    from mlx_lm.utils import infer_quant_config

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quant:
            return quant[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def convert(shard: nn.Module, fmt: str) -> None:
    """Hold ``shard``'s (unquantized) weights in the weight format ``fmt`` (:mod:`exo_lab.models.formats`).

    Float formats cast every floating parameter. ``q8``/``q4`` cast to fp32 first, then quantize
    every linear and embedding whose rows hold whole groups, a tensor rank's slices too (``mx.quantize``,
    group 64: fp32 scales and biases, so activations stay fp32), computing on every core
    (:mod:`exo_lab.models.qmatmul`); norms stay fp32. ``bf16w``/``fp16w`` cast to fp32 first, then hold
    every linear and embedding in 16 bits, computing with :mod:`exo_lab.models.halfmatmul`.
    """
    f = formats.get(fmt)
    if f.widened and not halfmatmul.available():
        raise ValueError(
            f"weight format {fmt} needs exo_lab's weight_matmul kernel, not built here (python -m exo_lab.native)"
        )
    target = getattr(mx, f.activations if f.quantized or f.widened else f.name)
    if isinstance(shard, Shard):
        shard.input_dtype = getattr(mx, f.activations)
    shard.update(tree_map(lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a, shard.parameters()))
    if f.widened:
        from exo_lab.engine.vocab import HALF_SWAPS

        halfmatmul.use_half(shard, getattr(mx, f.held), HALF_SWAPS)
        return
    if f.bits is None:
        return

    def predicate(_path: str, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % formats.GROUP_SIZE == 0

    nn.quantize(shard, group_size=formats.GROUP_SIZE, bits=f.bits, class_predicate=predicate)
    from exo_lab.engine.vocab import QUANT_SWAPS

    qmatmul.quantize_sharded(shard, formats.GROUP_SIZE, f.bits, QUANT_SWAPS)  # a tensor rank's slices
    qmatmul.use_cores(shard)


def load_shard(
    model_dir: str | Path,
    spec: ShardSpec,
    tensor_group: mx.distributed.Group | None = None,
    progress=None,
    pair=None,
    checksums: Mapping[str, str] | None = None,
) -> tuple[Shard, dict]:
    """Build a shard reading only its tensors; split it over ``tensor_group`` when given.

    ``progress(layers_loaded, layers_total)`` is called as layers arrive. ``pair`` is
    ``(index, exchange)`` for a tensor pair inside a pipeline stage (see :mod:`exo_lab.engine.pairs`).
    ``checksums`` (a partial copy's manifest): read only tensors it lists, each verified.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model_cls, args_cls = _model_classes(config)
    model = model_cls(args_cls.from_dict(config))  # lazy: parameters are not materialised
    names = tensor_names(model_dir, spec, tied_embeddings(config))
    total = spec.end - spec.start
    weights: dict[str, mx.array] = {}
    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(int(n.split(".")[2]) if n.startswith("model.layers.") else -1, []).append(n)
    for layer in sorted(by_layer):
        weights.update(read_tensors(model_dir, by_layer[layer], checksums))
        if progress is not None and layer >= 0:
            progress(min(total, layer - spec.start + 1), total)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quant = config.get("quantization")
    if quant:
        _quantize(model, quant, weights)
    model.load_weights(list(weights.items()), strict=False)
    if tensor_group is not None and tensor_group.size() > 1:
        problem = tensor_split_problem(model, tensor_group.size())
        if problem:
            raise ValueError(problem)
        inner_layers = model.model.layers
        model.model.layers = inner_layers[spec.start : spec.end]
        try:
            model.shard(tensor_group)
        except ValueError as e:  # a split through a quantization group, or uneven heads or experts
            raise ValueError(
                f"{architecture(model)} cannot be split over {tensor_group.size()} tensor ranks"
                + (f" at group size {quant['group_size']}: every slice must hold whole groups" if quant else "")
                + f" ({e})"
            ) from e
        model.model.layers = inner_layers[: spec.start] + model.model.layers + inner_layers[spec.end :]
    if pair is not None:
        from exo_lab.engine.pairs import shard_pair

        if problem := pair_split_problem(model):
            raise ValueError(problem)
        shard_pair(model.model.layers[spec.start : spec.end], pair[0], pair[1])
    shard = Shard(model, spec)
    if tensor_group is not None and tensor_group.size() > 1:
        from exo_lab.engine.vocab import split_vocab

        if split_vocab(shard, tensor_group):  # the model object keeps only the slices too (frees the rest)
            model.model.embed_tokens = shard.embed_tokens
            if shard.lm_head is not None:
                model.lm_head = shard.lm_head
    if spec.dtype and not quant:
        convert(shard, spec.dtype)
    object.__setattr__(shard, "rope_tables", fused.use_fused(shard))
    from exo_lab.engine.vocab import LANE_CLASSES

    qmatmul.use_lanes(shard, LANE_CLASSES)  # q4 rows laid out for exo_lab's AVX2 kernel, where it has one
    shared_rows.share_rows(shard)  # q|k|v and gate|up as one product each where exo_lab's kernel computes them
    mx.eval(shard.parameters())
    log.info(
        "shard [%d, %d) of %d layers: %.1f MB",
        spec.start,
        spec.end,
        spec.num_layers,
        sum(v.nbytes for _, v in cast("list[tuple[str, mx.array]]", tree_flatten(shard.parameters()))) / 1e6,
    )
    return shard, config
