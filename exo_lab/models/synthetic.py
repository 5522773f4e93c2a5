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
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from exo_lab.models import tokenizer as bpe
from exo_lab.models.presets import DTYPE_NAMES, PRESETS, Preset

log = logging.getLogger(__name__)

SHARD_BYTES = 2 << 30  # the hub shards above 2 GiB; so do we
DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}
FAMILY = {"llama": "llama", "qwen2": "chatml", "qwen3": "chatml"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


EMBED_STD = 0.25
QK_GAIN = 4.0  # sharp attention: context, not a uniform average, steers the output
VO_GAIN = 1.0
MLP_GAIN = 2.0
HEAD_GAIN = 3.0
DAMPED_ROW_SCALE = 0.05


def _model_class(model_type: str):
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    return module.Model, module.ModelArgs


def _config(preset: Preset, dtype: str, quantize: int | None, tok) -> dict[str, Any]:
    family = FAMILY[preset.model_type]
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[preset.model_type]],
        "model_type": preset.model_type,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "attention_bias": preset.model_type == "qwen2",
        "use_cache": True,
        **preset.config,
    }
    if family == "llama":
        cfg["bos_token_id"] = tok.token_to_id("<|begin_of_text|>")
        cfg["eos_token_id"] = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    else:
        cfg["bos_token_id"] = tok.token_to_id("<|endoftext|>")
        cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    if quantize:
        q = {"group_size": 64, "bits": int(quantize)}
        cfg["quantization"] = q
        cfg["quantization_config"] = q
    return dict(sorted(cfg.items()))


def _initial_weights(model: nn.Module, seed: int, damped_ids: list[int]) -> dict[str, mx.array]:
    """Seeded fp32 weights for every parameter of ``model``, by name."""
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, mx.array] = {}
    for index, name in enumerate(sorted(params)):
        shape = params[name].shape
        key = mx.random.key(seed * 1_000_003 + index)
        if name.endswith("norm.weight"):
            w = mx.ones(shape)
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


def build_model(preset: str | Preset = "tiny", seed: int = 0, dtype: str | None = None, quantize: int | None = None):
    """An in-memory synthetic model: ``(model, config, hf_tokenizer)``."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    dtype = dtype or p.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if quantize not in (None, 0, 2, 3, 4, 6, 8):
        raise ValueError(f"quantize must be 2, 3, 4, 6 or 8 bits, not {quantize!r}")
    family = FAMILY[p.model_type]
    tok = bpe.build(p.config["vocab_size"], family)
    config = _config(p, dtype, quantize, tok)
    model_cls, args_cls = _model_class(p.model_type)
    model = model_cls(args_cls.from_dict(config))
    trained = len(json.loads(bpe.base_tokenizer_json())["model"]["vocab"])
    # every special token is in the vocabulary (trained in as one), so none is dropped here
    specials = [i for t in bpe.SPECIAL_TOKENS if (i := tok.token_to_id(t)) is not None]
    damped = specials + list(range(trained, p.config["vocab_size"]))
    weights = _initial_weights(model, seed, damped)
    weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    del weights
    if quantize:
        nn.quantize(model, group_size=64, bits=int(quantize))
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
    quantize: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Create a synthetic model directory at ``path`` and return it.

    ``preset``: one of :data:`PRESETS`; ``dtype``: ``float32``, ``bfloat16`` or
    ``float16`` (default: the preset's); ``quantize``: bits (e.g. 4) for an
    mlx_lm-quantized model, quantized from weights in ``dtype``.
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
    family = FAMILY[PRESETS[preset].model_type]
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
