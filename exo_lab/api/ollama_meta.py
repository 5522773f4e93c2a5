"""Ollama's model endpoints: ``GET /``, ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, ``/api/pull``.

``/api/pull`` maps a name onto the model store (:func:`exo_lab.models.resolve`): a model this server serves,
a directory, ``demo`` or ``synthetic:<preset>`` (made on first use), a name in the store, or a hub id
(downloaded where the hub is reachable). It answers Ollama's progress lines (one per file) and ``success``;
a name the store cannot give is Ollama's error. Pulling puts a model in the store; serving it is a launch.

Mounted at ``/api/*`` and ``/ollama/api/*``, with ``/api/chat`` and ``/api/generate``
(whose requests and answers :mod:`exo_lab.api.ollama` maps).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from tornado.ioloop import IOLoop

from exo_lab import __version__
from exo_lab.api.base import ApiHandler, GenerationHandler
from exo_lab.api.errors import ApiError
from exo_lab.api.ollama import OLLAMA_VERSION, find_model, ollama_name, parse_chat, parse_generate
from exo_lab.api.registry import Backend
from exo_lab.api.schema.ollama import ChatRequest, GenerateRequest, OllamaPullRequest, ShowRequest

# ------------------------------------------------------------------------------------ model facts


@functools.lru_cache(maxsize=32)
def _files_facts(path: str) -> dict[str, Any]:
    from exo_lab.models.card import read_tensor_index

    p = Path(path)
    config = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
    try:
        tensors = read_tensor_index(p)
    except (FileNotFoundError, OSError, ValueError):
        tensors = []
    params = sum(math.prod(t.shape) for t in tensors)
    size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    mtime = max((f.stat().st_mtime for f in p.glob("*.safetensors")), default=time.time())
    dtypes = sorted({t.dtype for t in tensors})
    return {"config": config, "params": params, "size": size, "mtime": mtime, "dtypes": dtypes}


def _param_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def model_facts(name: str, backend: Backend) -> dict[str, Any]:
    path = backend.path
    facts = (
        _files_facts(str(path))
        if path is not None
        else {"config": {}, "params": 0, "size": 0, "mtime": backend.created, "dtypes": []}
    )
    config = facts["config"]
    family = config.get("model_type", "unknown")
    quant = config.get("quantization")
    if quant:
        level = f"Q{quant.get('bits', '?')}"
    else:
        level = (config.get("torch_dtype") or (facts["dtypes"][0] if facts["dtypes"] else "unknown")).upper()
        level = {"FLOAT32": "F32", "BFLOAT16": "BF16", "FLOAT16": "F16"}.get(level, level)
    details = {
        "parent_model": "",
        "format": "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": _param_size(facts["params"]),
        "quantization_level": level,
    }
    digest = hashlib.sha256(f"{name}:{path}:{facts['size']}:{facts['mtime']}".encode()).hexdigest()
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(facts["mtime"]))
    return {
        "details": details,
        "size": facts["size"],
        "digest": digest,
        "modified_at": modified,
        "config": config,
        "params": facts["params"],
    }


def model_info(facts: dict[str, Any], backend: Backend) -> dict[str, Any]:
    """GGUF-style keys, as ``/api/show`` gives them."""
    c = facts["config"]
    arch = c.get("model_type", "unknown")
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": facts["params"],
        "general.file_type": facts["details"]["quantization_level"],
    }
    keys = {
        "context_length": c.get("max_position_embeddings") or backend.context_length,
        "embedding_length": c.get("hidden_size"),
        "block_count": c.get("num_hidden_layers"),
        "feed_forward_length": c.get("intermediate_size"),
        "attention.head_count": c.get("num_attention_heads"),
        "attention.head_count_kv": c.get("num_key_value_heads"),
        "attention.layer_norm_rms_epsilon": c.get("rms_norm_eps"),
        "rope.freq_base": c.get("rope_theta"),
        "vocab_size": c.get("vocab_size"),
    }
    info.update({f"{arch}.{k}": v for k, v in keys.items() if v is not None})
    return info


# ------------------------------------------------------------------------------------ handlers


class OllamaHandler(ApiHandler):
    family = "ollama"


class ChatHandler(GenerationHandler):
    """``POST /api/chat``."""

    family = "ollama"
    schema = ChatRequest
    parse = staticmethod(parse_chat)


class GenerateHandler(GenerationHandler):
    """``POST /api/generate``."""

    family = "ollama"
    schema = GenerateRequest
    parse = staticmethod(parse_generate)


class RootHandler(OllamaHandler):
    """``GET /``: Ollama's liveness answer (open even with an API key)."""

    auth_required = False

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")

    def get(self) -> None:
        self.finish("Ollama is running")

    def head(self) -> None:
        self.finish()


class VersionHandler(OllamaHandler):
    def get(self) -> None:
        self.send_json({"version": OLLAMA_VERSION, "exo_lab": __version__})


class TagsHandler(OllamaHandler):
    def get(self) -> None:
        models = []
        for name, backend in self.registry.items():
            facts = model_facts(name, backend)
            models.append(
                {
                    "name": ollama_name(name),
                    "model": ollama_name(name),
                    "modified_at": facts["modified_at"],
                    "size": facts["size"],
                    "digest": facts["digest"],
                    "details": facts["details"],
                }
            )
        self.send_json({"models": models})


class PsHandler(OllamaHandler):
    def get(self) -> None:
        models = []
        for name, backend in self.registry.items():
            if backend.state != "ready":
                continue
            facts = model_facts(name, backend)
            models.append(
                {
                    "name": ollama_name(name),
                    "model": ollama_name(name),
                    "size": facts["size"],
                    "digest": facts["digest"],
                    "details": facts["details"],
                    "expires_at": "2318-01-01T00:00:00Z",
                    "size_vram": 0,
                    "context_length": backend.context_length or 0,
                }
            )
        self.send_json({"models": models})


class ShowHandler(OllamaHandler):
    schema = ShowRequest

    def post(self) -> None:
        try:
            req = self.body()
            name = find_model(self.registry, req.model or req.name)
            backend = self.registry.get(name)
        except ApiError as err:
            self.send_api_error(err)
            return
        facts = model_facts(name, backend)
        template = getattr(backend.tokenizer, "chat_template", None) or ""
        capabilities = ["completion"] + (["tools"] if "tools" in template else [])
        self.send_json(
            {
                "modelfile": f"# served by exo_lab {__version__}\nFROM {backend.path or name}\n",
                "parameters": "",
                "template": template,
                "details": facts["details"],
                "model_info": model_info(facts, backend),
                "capabilities": capabilities,
                "modified_at": facts["modified_at"],
            }
        )


def pull_model(name: str, registry: Any) -> Path:
    """The directory of the model ``name`` names (see the module docstring); ModelNotFoundError when none."""
    from exo_lab.models import ModelNotFoundError, resolve

    try:
        path = registry.get(find_model(registry, name)).path
        if path is not None:
            return Path(path)
    except ApiError:
        pass
    try:
        return resolve(name)
    except ModelNotFoundError:
        if name.endswith(":latest"):
            return resolve(name[: -len(":latest")])
        raise


def pull_progress(path: Path) -> list[dict[str, Any]]:
    """Ollama's pull progress for a model already in the store: each file, complete."""
    lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        size = f.stat().st_size
        digest = hashlib.sha256(f"{f.name}:{size}:{f.stat().st_mtime}".encode()).hexdigest()
        lines.append(
            {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": size, "completed": size}
        )
    lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
    return lines


class PullHandler(OllamaHandler):
    """``POST /api/pull``: the model into the store (see the module docstring)."""

    schema = OllamaPullRequest

    async def post(self) -> None:
        from exo_lab.models import ModelNotFoundError

        try:
            req = self.body()
        except ApiError as err:
            self.send_api_error(err)
            return
        name = req.model or req.name or ""
        try:
            path = await IOLoop.current().run_in_executor(None, pull_model, name, self.registry)
        except (ModelNotFoundError, ValueError, OSError) as exc:
            self.send_api_error(
                ApiError(404, f"pull model manifest: file does not exist: {exc}", code="model_not_found")
            )
            return
        lines = pull_progress(path)
        if req.stream is False:
            self.send_json(lines[-1])
            return
        self.set_header("Content-Type", "application/x-ndjson")
        for line in lines:
            if not await self.send_line(line):
                return
        self.finish()


def routes(kw: dict[str, Any]) -> list[tuple]:
    """Ollama's routes, under ``/api`` and ``/ollama/api``."""
    out: list[tuple] = [(r"/", RootHandler, kw), (r"/ollama/?", RootHandler, kw)]
    for prefix in ("/api", "/ollama/api"):
        out += [
            (prefix + r"/chat", ChatHandler, kw),
            (prefix + r"/generate", GenerateHandler, kw),
            (prefix + r"/tags", TagsHandler, kw),
            (prefix + r"/show", ShowHandler, kw),
            (prefix + r"/ps", PsHandler, kw),
            (prefix + r"/version", VersionHandler, kw),
            (prefix + r"/pull", PullHandler, kw),
        ]
    return out
