"""Model store: turn what a user names into a local model directory.

``resolve(model)`` accepts, in order:

- an existing directory;
- ``demo``: the built-in synthetic model (the ``tiny`` preset), made on first use;
- ``synthetic:<preset>``: any synthetic preset, made on first use;
- a name already in the cache (``$EXO_LAB_MODELS_DIR``, default
  ``~/.cache/exo_lab/models``; a hub id ``org/name`` is cached as ``org--name``);
- a Hugging Face hub id, downloaded with a progress bar when online.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from filelock import FileLock

from exo_lab.models import partial
from exo_lab.models.presets import PRESETS
from exo_lab.paths import models_dir

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_PRESET = "tiny"


class ModelNotFoundError(LookupError):
    """The named model is neither local nor downloadable."""


def cache_name(model: str) -> str:
    """The directory name a model id has in the cache."""
    return model.replace("/", "--").replace(":", "--")


def is_model_dir(path: Path) -> bool:
    """A complete model: config.json and safetensors (every file its index names), not a partial fetch.

    A shard fetched from a peer lives in the store's partial area until it is complete
    (:mod:`exo_lab.models.partial`): it is never a model directory.
    """
    if not (path / "config.json").is_file() or not any(path.glob("model*.safetensors")) or partial.is_partial(path):
        return False
    index = path / "model.safetensors.index.json"
    try:
        files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    except (ValueError, KeyError, TypeError, AttributeError):
        files = set()  # an index we cannot read: the files present are the model, as before
    return all((path / f).is_file() for f in files)


# exo_lab.models.synthetic (MLX) is imported only to make a synthetic model, so that
# resolving a path or a cached name loads no MLX; huggingface_hub only to download.


def _synthesize(name: str, preset: str) -> Path:
    from exo_lab.models import synthetic

    target = models_dir() / cache_name(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not is_model_dir(target):
            log.info("creating synthetic model %s (preset %s) in %s", name, preset, target)
            synthetic.create(target, preset=preset, overwrite=True)
    return target


def _download(repo_id: str) -> Path:
    target = models_dir() / cache_name(repo_id)
    try:
        from huggingface_hub import snapshot_download

        with FileLock(str(target) + ".lock"):
            snapshot_download(
                repo_id,
                local_dir=str(target),
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"],
            )
    except Exception as exc:  # huggingface_hub raises many types for "offline"/"missing"
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Offline? Put the model's files (config.json, *.safetensors, tokenizer files) in "
            f"{target} or pass a local directory; 'demo' and 'synthetic:<preset>' work offline."
        ) from exc
    return target


def resolve(model: str | Path) -> Path:
    """The local directory of ``model`` (see the module docstring for what it accepts)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if partial.is_partial(path):
            raise ModelNotFoundError(f"{path} is a partial copy fetched from a peer, not a complete model")
        if not is_model_dir(path):
            raise ModelNotFoundError(f"{path} has no config.json and model*.safetensors")
        return path.resolve()
    if text == DEMO_MODEL:
        return _synthesize(DEMO_MODEL, DEMO_PRESET)
    if text.startswith("synthetic:"):
        preset = text.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelNotFoundError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return _synthesize(text, preset)
    cached = models_dir() / cache_name(text)
    if is_model_dir(cached):
        return cached
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download(text)
    raise ModelNotFoundError(
        f"no model {text!r}: not a directory, not in {models_dir()}, and not a hub id (org/name); "
        f"try 'demo' or 'synthetic:<preset>' ({', '.join(PRESETS)})"
    )


def list_cached() -> list[str]:
    """Names of the models in the cache."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name.replace("--", "/", 1) if "--" in p.name else p.name for p in root.iterdir() if is_model_dir(p))
