"""Previews: plans for a named model on a live cluster, a what-if spec, or this machine."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from exo_lab.cluster.topology import NodeInfo, Topology
from exo_lab.models.card import ModelCard, card_from_config
from exo_lab.models.local import local_card
from exo_lab.models.store import resolve
from exo_lab.models.whatif import parse_what_if, what_if_card
from exo_lab.placement.plan import Plans
from exo_lab.placement.planner import plan


def model_card(model: str | Path | ModelCard, download: bool = True) -> ModelCard:
    """A card for ``model``: a card, a ``config.json`` file (what-if), a shipped what-if model
    (``[what-if:]deepseek-v3[@4bit]``, see :mod:`exo_lab.models.whatif`), or anything ``resolve`` accepts.

    ``download=False``: only what is on this machine, nothing fetched or built, one error for the rest
    (:func:`exo_lab.models.local.local_card`, what previews asked over the network use)."""
    if isinstance(model, ModelCard):
        return model
    if not download:
        return local_card(model)
    path = Path(str(model)).expanduser()
    if path.is_file() and path.suffix == ".json":
        return card_from_config(json.loads(path.read_text()), path.parent.name or path.stem)
    if not path.exists() and parse_what_if(str(model)) is not None:
        return what_if_card(str(model))
    return ModelCard.from_dir(resolve(model), name=str(model))


def this_machine() -> Topology:
    """A one-node topology of the machine this runs on (its cached profile)."""
    from exo_lab.cluster.profile import load_or_measure  # MLX: measures this machine when nothing is cached

    profile = load_or_measure().to_json()
    node = NodeInfo("local", socket.gethostname(), ["127.0.0.1"], profile=profile)
    return Topology({"local": node}, [])


def preview(
    topology: Topology,
    model: str | Path | ModelCard,
    context: int = 4096,
    prompt_tokens: int = 512,
    batch: int = 1,
    objective: str = "decode",
    download: bool = True,
    lossy: bool = False,
) -> Plans:
    """Ranked plans for ``model`` on ``topology`` (``download=False``: see :func:`model_card`; ``lossy``:
    see :func:`exo_lab.placement.plan`)."""
    card = model_card(model, download)
    return plan(
        topology, card, context=context, prompt_tokens=prompt_tokens, batch=batch, objective=objective, lossy=lossy
    )
