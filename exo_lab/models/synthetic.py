"""Synthetic models: real mlx_lm architectures with seeded random weights.

No model hub is reachable from CI, so tests, benchmarks and the offline demo
use models made here. They are saved in the Hugging Face layout
(``config.json``, ``model*.safetensors`` + ``model.safetensors.index.json``,
``tokenizer.json``, ``tokenizer_config.json`` with a chat template) and load
through exactly the path a downloaded model takes (``mlx_lm.load``).

Initialisation: plain random weights make greedy decoding repeat one token.
Here the embedding is small next to the blocks' outputs (so the next token is
not simply the current one), attention projections get a gain so context
mixes in (sharp queries and keys), and the head rows of ids the tokenizer never produces (padding and
special tokens) are damped so generations look like text and rarely stop.
Same arguments give byte-identical files.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from exo_lab.models import tokenizer as bpe
from exo_lab.models.presets import DTYPE_NAMES, PRESETS, Preset, card_config

log = logging.getLogger(__name__)

SHARD_BYTES = 2 << 30  # the hub shards above 2 GiB; so do we
DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}
FAMILY = {
    "llama": "llama",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "qwen3_moe": "chatml",
    "deepseek_v3": "chatml",
    "glm4_moe": "chatml",
    "gpt_oss": "chatml",
    "gemma3_text": "chatml",
    "qwen3_next": "chatml",
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}
QUANT_BITS = (2, 3, 4, 6, 8)  #: affine bits ``quantize`` accepts
QUANT_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  #: mlx_lm's mixed per-layer recipes


EMBED_STD = 0.25
QK_GAIN = 4.0  # sharp attention: context, not a uniform average, steers the output
VO_GAIN = 1.0
MLP_GAIN = 2.0
HEAD_GAIN = 3.0
DAMPED_ROW_SCALE = 0.05


def chat_family(preset: Preset) -> str:
    """The tokenizer and chat template family of ``preset``: ``llama``, ``chatml`` or ``think``."""
    return preset.extra.get("chat", FAMILY[preset.model_type])


def _model_class(model_type: str):
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    return module.Model, module.ModelArgs


def _config(preset: Preset, dtype: str, tok) -> dict[str, Any]:
    family = FAMILY[preset.model_type]
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[preset.model_type]],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        **card_config(preset, dtype),
    }
    if family == "llama":
        cfg["bos_token_id"] = tok.token_to_id("<|begin_of_text|>")
        cfg["eos_token_id"] = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    else:
        cfg["bos_token_id"] = tok.token_to_id("<|endoftext|>")
        cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    return dict(sorted(cfg.items()))


def _quantize(model: nn.Module, config: dict[str, Any], quantize: int | str) -> dict[str, Any]:
    """Quantize ``model`` in place as ``mlx_lm.convert`` does; the config it writes (``quantization``).

    Bits give affine quantization with group size 64 (and the model's own ``quant_predicate``, so
    gpt-oss keeps its routers at 8 bits, listed per layer); a recipe name gives mlx_lm's mixed
    per-layer form (some layers at the high bit width, each listed in ``quantization``).
    """
    import contextlib
    import io

    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    predicate: Callable[[str, nn.Module], bool | dict] | None = None
    bits = quantize
    if isinstance(quantize, str):
        # the builder's annotation names a third parameter its predicate does not take
        predicate = cast("Callable[[str, nn.Module], bool | dict]", mixed_quant_predicate_builder(quantize, model, 64))
        bits = int(quantize.split("_")[1])
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
        _, quantized = quantize_model(model, config, 64, int(bits), quant_predicate=predicate)
    return dict(sorted(quantized.items()))


def _norm_value(name: str, norm_init: dict[str, float]) -> float:
    """The initial value of a norm weight: the first ``norm_init`` key found in ``name`` (default 1)."""
    return next((v for k, v in norm_init.items() if k in name), 1.0)


def _initial_weights(
    model: nn.Module, seed: int, damped_ids: list[int], norm_init: dict[str, float] | None = None
) -> dict[str, mx.array]:
    """Seeded fp32 weights for every parameter of ``model``, by name."""
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, mx.array] = {}
    for index, name in enumerate(sorted(params)):
        shape = params[name].shape
        key = mx.random.key(seed * 1_000_003 + index)
        if name.endswith("norm.weight"):
            w = mx.full(shape, _norm_value(name, norm_init or {}))
        elif name.endswith(".bias"):
            w = 0.02 * mx.random.normal(shape, key=key)
        elif name.endswith("embed_tokens.weight"):
            w = EMBED_STD * mx.random.normal(shape, key=key)
        else:
            fan_in = shape[-1]
            if "q_proj" in name or "k_proj" in name:
                gain = QK_GAIN
            elif "self_attn" in name:
                gain = VO_GAIN
            else:
                gain = MLP_GAIN
            if name.startswith("lm_head"):
                gain = HEAD_GAIN
            w = (gain / math.sqrt(fan_in)) * mx.random.normal(shape, key=key)
        out[name] = w
    head = "lm_head.weight" if "lm_head.weight" in out else "model.embed_tokens.weight"
    if damped_ids:
        scale = mx.ones((out[head].shape[0], 1))
        scale[mx.array(damped_ids)] = DAMPED_ROW_SCALE
        out[head] = out[head] * scale
    if head == "model.embed_tokens.weight":
        # Tied head: the embedding doubles as the output layer, so it must be
        # large enough to give confident logits; the blocks still dominate.
        out[head] = out[head] * (HEAD_GAIN / (EMBED_STD * math.sqrt(shape_hidden(out))))
    mx.eval(out)
    return out


def shape_hidden(weights: dict[str, mx.array]) -> int:
    return weights["model.embed_tokens.weight"].shape[1]


def build_model(
    preset: str | Preset = "tiny", seed: int = 0, dtype: str | None = None, quantize: int | str | None = None
):
    """An in-memory synthetic model: ``(model, config, hf_tokenizer)``.

    ``quantize``: affine bits (:data:`QUANT_BITS`) or a mixed recipe (:data:`QUANT_RECIPES`).
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    dtype = dtype or p.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if quantize not in (None, 0, *QUANT_BITS, *QUANT_RECIPES):
        raise ValueError(
            f"quantize must be 2, 3, 4, 6 or 8 bits or one of {', '.join(QUANT_RECIPES)}, not {quantize!r}"
        )
    family = chat_family(p)
    tok = bpe.build(p.config["vocab_size"], family)
    config = _config(p, dtype, tok)
    model_cls, args_cls = _model_class(p.model_type)
    model = model_cls(args_cls.from_dict(config))
    trained = len(json.loads(bpe.base_tokenizer_json())["model"]["vocab"])
    # every special token is in the vocabulary (trained in as one), so none is dropped here
    specials = [i for t in bpe.SPECIAL_TOKENS if (i := tok.token_to_id(t)) is not None]
    damped = specials + list(range(trained, p.config["vocab_size"]))
    if config.get("tie_word_embeddings") and hasattr(model, "lm_head"):
        # a tied checkpoint stores no head (Gemma 3): the model's sanitize drops the module
        model.sanitize({})
    weights = _initial_weights(model, seed, damped, p.extra.get("norm_init"))
    weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    del weights
    if quantize:
        config = _quantize(model, config, quantize)
    mx.eval(model.parameters())
    return model, config, tok


def _save_weights(path: Path, model: nn.Module) -> None:
    # without a destination tree_flatten returns the list of (name, array) pairs (its stub says either)
    weights = dict(sorted(cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))))
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, w in weights.items():
        if shards[-1] and size + w.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    n = len(shards)
    index: dict[str, Any] = {
        "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
        "weight_map": {},
    }
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(path / fname), shard, metadata={"format": "mlx"})
        for name in shard:
            index["weight_map"][name] = fname
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def create(
    path: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str | None = None,
    quantize: int | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Create a synthetic model directory at ``path`` and return it.

    ``preset``: one of :data:`PRESETS`; ``dtype``: ``float32``, ``bfloat16`` or
    ``float16`` (default: the preset's); ``quantize``: bits (e.g. 4) or a mixed
    recipe (``mixed_3_6``) for an mlx_lm-quantized model, quantized from weights in ``dtype``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model, config, tok = build_model(preset, seed, dtype, quantize)
    _save_weights(tmp, model)
    del model
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    family = chat_family(PRESETS[preset])
    tok.save(str(tmp / "tokenizer.json"))
    tcfg = bpe.tokenizer_config(family, tok)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (tmp / "exo_lab_synthetic.json").write_text(
        json.dumps({"preset": preset, "seed": seed, "dtype": config["torch_dtype"], "quantize": quantize}, indent=2)
        + "\n"
    )
    if path.exists():
        path.rmdir()
    tmp.rename(path)
    return path


def with_dtype(preset: str, dtype: str) -> Preset:
    """A copy of ``preset`` with another default dtype."""
    return replace(PRESETS[preset], dtype=dtype)
