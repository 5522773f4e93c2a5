"""A model's own sampling defaults, from its ``generation_config.json`` (as vLLM's ``--generation-config auto``).

Only the fields a request can also set are read (``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``); a request's own value wins, and a field the file leaves out takes the API family's
default. ``do_sample`` is not read: a model that ships ``do_sample: false`` still samples when asked to.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the fields of ``generation_config.json`` that are sampling defaults, and the type each must have
FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
}


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime: float) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for name, kind in FIELDS.items():
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if kind is int and not float(value).is_integer():
            continue
        out[name] = kind(value)
    return out


def sampling_defaults(model_dir: Path | None) -> dict[str, Any]:
    """The sampling defaults ``model_dir``'s ``generation_config.json`` gives (empty without one)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    return dict(_read(str(path), mtime))
