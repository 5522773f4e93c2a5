"""Cards of the models this machine has without a download: what a preview asked over the network plans for.

A preview names a model; planning for it must neither fetch anything (a hub download, building a large
synthetic model) nor tell the caller which paths exist. :func:`local_card` reads a card only from:

- a model directory (``config.json`` and ``model*.safetensors``) or a ``config.json`` file (a what-if);
- the model store (a cached name; a hub id ``org/name`` once it is there);
- a shipped what-if model (``deepseek-v3@4bit``, :mod:`exo_lab.models.whatif`);
- a synthetic preset (``demo``, ``synthetic:<preset>``): read from its directory when it is built, else
  computed from the preset's shape, which gives the same card without building anything.

Anything else (a hub id not in the store, a missing path, a directory or file that is not a model) raises
one and the same :class:`~exo_lab.models.store.ModelNotFoundError`, whatever the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from exo_lab.models.card import ModelCard, card_from_config
from exo_lab.models.presets import PRESETS, card_config
from exo_lab.models.store import DEMO_MODEL, DEMO_PRESET, ModelNotFoundError, cache_name, is_model_dir
from exo_lab.models.whatif import parse_what_if, what_if_card
from exo_lab.paths import models_dir

log = logging.getLogger(__name__)


def not_here(model: str) -> ModelNotFoundError:
    """The one error for a model that is not available here, whatever the reason."""
    return ModelNotFoundError(
        f"no model {model!r} here to plan for: previews cover the models served here, model "
        "directories and config.json files on this machine, the model store, shipped what-if models "
        "(e.g. deepseek-v3@4bit) and synthetic presets ('demo', 'synthetic:<preset>'); a hub model is "
        "downloaded when it is launched"
    )


def _preset(text: str) -> str | None:
    if text == DEMO_MODEL:
        return DEMO_PRESET
    if text.startswith("synthetic:") and text.split(":", 1)[1] in PRESETS:
        return text.split(":", 1)[1]
    return None


def _card(text: str) -> ModelCard:
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json":
        return card_from_config(json.loads(path.read_text()), path.parent.name or path.stem)
    if path.is_dir():
        if is_model_dir(path):
            return ModelCard.from_dir(path.resolve(), name=text)
        raise not_here(text)
    if parse_what_if(text) is not None:
        return what_if_card(text)
    stored = models_dir() / cache_name(text)
    if is_model_dir(stored):
        return ModelCard.from_dir(stored, name=text)
    preset = _preset(text)
    if preset is not None:
        return card_from_config(card_config(PRESETS[preset]), text)
    raise not_here(text)


def local_card(model: str | Path) -> ModelCard:
    """The card of ``model`` from what is on this machine (see the module docstring); never downloads or builds.

    Raises the same :class:`ModelNotFoundError` for everything that is not a model available here.
    """
    text = str(model)
    try:
        return _card(text)
    except Exception as exc:  # an unreadable file, a config.json without a model's fields: not a model either
        log.debug("no local card for %r: %s: %s", text, type(exc).__name__, exc)
        raise not_here(text) from None
