"""What-if cards: published ``config.json`` values of models people build clusters for (no weights).

``what_if_card("deepseek-v3")`` (or ``"what-if:deepseek-v3@4bit"``) is the card of that model as
:func:`~exo_lab.models.card.card_from_config` computes it, in bfloat16 or quantized the way
mlx-community checkpoints are (affine, group 64). The configs live in ``exo_lab/models/configs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exo_lab.models.card import ModelCard, card_from_config

CONFIGS_DIR = Path(__file__).parent / "configs"
PREFIX = "what-if:"
#: Quantizations a what-if name may carry after ``@``.
QUANTIZATIONS: dict[str, dict[str, Any] | None] = {
    "bf16": None,
    "4bit": {"group_size": 64, "bits": 4},
    "6bit": {"group_size": 64, "bits": 6},
    "8bit": {"group_size": 64, "bits": 8},
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
}


def what_if_names() -> list[str]:
    """The names of the shipped what-if configs."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def what_if_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` values of ``name``."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no what-if config {name!r}; choose one of {', '.join(what_if_names())}")
    return json.loads(path.read_text())


def parse_what_if(spec: str) -> tuple[str, str] | None:
    """``(name, quantization)`` of a what-if spec (``[what-if:]NAME[@bf16|4bit|6bit|8bit|mxfp4]``), else None."""
    text = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    name, _, quant = text.partition("@")
    if name not in what_if_names() or (quant or "bf16") not in QUANTIZATIONS:
        return None
    return name, quant or "bf16"


def what_if_card(spec: str, quantization: dict[str, Any] | None = None) -> ModelCard:
    """The card of a shipped model: ``spec`` as :func:`parse_what_if` reads it; ``quantization``
    (mlx_lm's ``quantization`` dict) overrides the one the spec names."""
    parsed = parse_what_if(spec)
    if parsed is None:
        raise KeyError(f"no what-if model {spec!r}; choose one of {', '.join(what_if_names())} (optionally @4bit, ...)")
    name, quant = parsed
    q = quantization if quantization is not None else QUANTIZATIONS[quant]
    label = (
        name if quant == "bf16" and quantization is None else f"{name}@{quant if quantization is None else 'custom'}"
    )
    return card_from_config(what_if_config(name), label, dtype="bfloat16", quantization=q)
