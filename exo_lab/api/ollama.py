"""Ollama's API: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, ``GET /``.

Mounted at ``/api/*`` and ``/ollama/api/*``. Streams NDJSON unless
``"stream": false``; the last object has ``done: true``, ``done_reason`` and
integer counts and nanosecond durations. Errors are ``{"error": "..."}``.
Bodies are read as JSON whatever their Content-Type. As in Ollama, a chat
with no messages (or a generate with no prompt) only loads the model and
answers ``done_reason: "load"``. Model names match with or without
``:latest``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_lab import __version__
from exo_lab.api import common
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.fields import get_bool, get_str
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.tools import ToolCallScanner, ToolFormat, check_tools, tool_format
from exo_lab.engine.chat import ROLES
from exo_lab.engine.generator import GenerationRequest, Usage

OLLAMA_VERSION = "0.12.0"  # the Ollama API this imitates (clients gate features on it)
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def ollama_name(name: str) -> str:
    """``name:latest`` unless the name has a tag already."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def find_model(registry: ModelRegistry, name: str) -> str:
    """The registry's id for ``name`` (with or without ``:latest``), or a 404."""
    names = registry.names()
    if name in names:
        return name
    if name.endswith(":latest") and name[: -len(":latest")] in names:
        return name[: -len(":latest")]
    raise ApiError(404, f'model "{name}" not found, try pulling it first', code="model_not_found")


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
    path = getattr(backend, "path", None)
    facts = _files_facts(str(path)) if path is not None else {"config": {}, "params": 0, "size": 0,
                                                                 "mtime": backend.created, "dtypes": []}
    config = facts["config"]
    family = config.get("model_type", "unknown")
    quant = config.get("quantization")
    if quant:
        level = f"Q{quant.get('bits', '?')}"
    else:
        level = (config.get("torch_dtype") or (facts["dtypes"][0] if facts["dtypes"] else "unknown")).upper()
        level = {"FLOAT32": "F32", "BFLOAT16": "BF16", "FLOAT16": "F16"}.get(level, level)
    details = {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
               "parameter_size": _param_size(facts["params"]), "quantization_level": level}
    digest = hashlib.sha256(f"{name}:{path}:{facts['size']}:{facts['mtime']}".encode()).hexdigest()
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(facts["mtime"]))
    return {"details": details, "size": facts["size"], "digest": digest, "modified_at": modified,
            "config": config, "params": facts["params"]}


def model_info(facts: dict[str, Any], backend: Backend) -> dict[str, Any]:
    """GGUF-style keys, as ``/api/show`` gives them."""
    c = facts["config"]
    arch = c.get("model_type", "unknown")
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": facts["params"],
                            "general.file_type": facts["details"]["quantization_level"]}
    keys = {
        "context_length": c.get("max_position_embeddings") or getattr(backend, "context_length", None),
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


# ------------------------------------------------------------------------------------ requests


@dataclass
class OllamaRequest:
    model: str  # as the client wrote it (echoed back)
    backend: Backend
    generation: GenerationRequest | None  # None: a load-only request
    stream: bool
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_format: ToolFormat | None = None  # None: tool calls are not parsed


def _options(data: dict[str, Any]) -> dict[str, Any]:
    opts = data.get("options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise bad_request("options must be an object", "options", "invalid_type")
    return opts


def _number(opts: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = opts.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"option {key!r} must be a number, got {json.dumps(value)}", key, "invalid_type")
    if not low <= value <= high:
        raise bad_request(f"option {key!r} must be between {low} and {high}, got {value}", key)
    return float(value)


def _integer(opts: dict[str, Any], key: str) -> int | None:
    value = opts.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"option {key!r} must be an integer, got {json.dumps(value)}", key, "invalid_type")
    return value


def _stop(opts: dict[str, Any]) -> tuple[str, ...]:
    value = opts.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise bad_request("option 'stop' must be a string or a list of strings", "stop", "invalid_type")


def _grammar(data: dict[str, Any]) -> Any:
    from exo_lab.engine.guided import json_object

    fmt = data.get("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_object()
    if isinstance(fmt, dict):
        return common.schema_grammar(fmt, "format")
    raise bad_request(f'format must be "json" or a JSON schema object, got {json.dumps(fmt)}', "format")


def _generation(backend: Backend, prompt: list[int], data: dict[str, Any]) -> GenerationRequest:
    opts = _options(data)
    temperature = _number(opts, "temperature", DEFAULTS["temperature"], 0.0, 100.0)
    top_p = _number(opts, "top_p", DEFAULTS["top_p"], 0.0, 1.0)
    if top_p == 0.0:
        top_p = 1.0  # Ollama treats 0 as "off"
    top_k = _integer(opts, "top_k")
    top_k = DEFAULTS["top_k"] if top_k is None else max(top_k, 0)
    seed = _integer(opts, "seed")
    num_predict = _integer(opts, "num_predict")
    max_tokens = num_predict if num_predict is not None and num_predict > 0 else None
    if max_tokens is None:  # -1 / -2 / unset: until the context is full
        context = getattr(backend, "context_length", None)
        max_tokens = (context - len(prompt)) if context and context > len(prompt) else None
    return common.generation_request(backend, prompt, max_tokens, common.sampling_params(temperature, top_p, top_k, seed),
                                     _stop(opts), max_tokens_param="num_predict", grammar=_grammar(data),
                                     grammar_param="format")


def _check_images(obj: dict[str, Any], where: str) -> None:
    images = obj.get("images")
    if images:
        raise bad_request(f"{where}: images are not supported: this model takes text only", "images")


def parse_chat(data: dict[str, Any], registry: ModelRegistry) -> OllamaRequest:
    model = get_str(data, "model")
    stream = get_bool(data, "stream", True)
    messages = data.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise bad_request("messages must be an array", "messages", "invalid_type")
    msgs = []
    for i, m in enumerate(messages or []):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}]: invalid role {role!r}; use system, user, assistant or tool", "messages")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string", "messages", "invalid_type")
        _check_images(m, f"messages[{i}]")
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise bad_request(f"messages[{i}].tool_calls must be an array", "messages", "invalid_type")
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool" and isinstance(m.get("tool_name"), str):
            msg["name"] = m["tool_name"]
        msgs.append(msg)
    tools = check_tools(data.get("tools"))
    backend = common.ready_backend(registry, find_model(registry, model))
    if not msgs:
        _options(data)
        return OllamaRequest(model, backend, None, stream)
    prompt = common.chat_tokens(backend, msgs, tools)
    fmt = tool_format(backend.tokenizer) if tools else None
    return OllamaRequest(model, backend, _generation(backend, prompt, data), stream, tools, fmt)


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parsed calls as Ollama writes them: ``{"function": {"name", "arguments": {...}}}``."""
    out = []
    for call in calls:
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
        except json.JSONDecodeError:
            args = {}
        out.append({"function": {"name": call["function"]["name"], "arguments": args if isinstance(args, dict) else {}}})
    return out


def parse_generate(data: dict[str, Any], registry: ModelRegistry) -> tuple[OllamaRequest, list[int]]:
    """The request, and the ``context`` tokens it continues (given back, extended, at the end)."""
    model = get_str(data, "model")
    stream = get_bool(data, "stream", True)
    prompt_text = get_str(data, "prompt", "")
    system = get_str(data, "system", None)
    raw = get_bool(data, "raw", False)
    if get_str(data, "suffix", ""):
        raise bad_request("suffix (fill-in-the-middle) is not supported by this server", "suffix")
    _check_images(data, "generate")
    context = data.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise bad_request("context must be an array of token ids", "context", "invalid_type")
    backend = common.ready_backend(registry, find_model(registry, model))
    vocab = len(backend.tokenizer)
    if any(not 0 <= t < vocab for t in context):
        raise bad_request(f"context holds token ids outside this model's vocabulary (0..{vocab - 1})", "context")
    if not prompt_text and not context:
        _options(data)
        return OllamaRequest(model, backend, None, stream), []
    if raw:
        prompt = list(backend.tokenizer.encode(prompt_text, add_special_tokens=not context)) if prompt_text else []
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt_text}]
        prompt = common.chat_tokens(backend, msgs, param="prompt")
    prompt = list(context) + prompt
    if not prompt:
        raise bad_request("the prompt encodes to no tokens", "prompt")
    return OllamaRequest(model, backend, _generation(backend, prompt, data), stream), list(context)


def done_fields(usage: Usage | None, finish: str | None) -> dict[str, Any]:
    u = usage or Usage()
    total = int(u.total_s * 1e9)
    prompt_ns = int(u.ttft_s * 1e9)
    return {
        "done_reason": "length" if finish == "length" else "stop",
        "done": True,
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": u.completion_tokens,
        "eval_duration": max(total - prompt_ns, 0),
    }


# ------------------------------------------------------------------------------------ handlers


class OllamaHandler(ApiHandler):
    family = "ollama"


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
            models.append({"name": ollama_name(name), "model": ollama_name(name), "modified_at": facts["modified_at"],
                           "size": facts["size"], "digest": facts["digest"], "details": facts["details"]})
        self.send_json({"models": models})


class PsHandler(OllamaHandler):
    def get(self) -> None:
        models = []
        for name, backend in self.registry.items():
            if getattr(backend, "state", "ready") != "ready":
                continue
            facts = model_facts(name, backend)
            models.append({"name": ollama_name(name), "model": ollama_name(name), "size": facts["size"],
                           "digest": facts["digest"], "details": facts["details"],
                           "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                           "context_length": getattr(backend, "context_length", None) or 0})
        self.send_json({"models": models})


class ShowHandler(OllamaHandler):
    def post(self) -> None:
        try:
            data = self.json_body()
            model = data.get("model") or data.get("name")
            if not isinstance(model, str) or not model:
                raise bad_request("model is required", "model", "missing_required_parameter")
            name = find_model(self.registry, model)
            backend = self.registry.get(name)
        except ApiError as err:
            self.send_api_error(err)
            return
        facts = model_facts(name, backend)
        template = getattr(backend.tokenizer, "chat_template", None) or ""
        capabilities = ["completion"] + (["tools"] if "tools" in template else [])
        self.send_json({
            "modelfile": f"# served by exo_lab {__version__}\nFROM {getattr(backend, 'path', name)}\n",
            "parameters": "",
            "template": template,
            "details": facts["details"],
            "model_info": model_info(facts, backend),
            "capabilities": capabilities,
            "modified_at": facts["modified_at"],
        })


class _GeneratingHandler(OllamaHandler):
    def _head(self, req: OllamaRequest) -> dict[str, Any]:
        return {"model": req.model, "created_at": now_iso()}

    async def _run(self, req: OllamaRequest, piece_key: str, extra_done: Any) -> None:
        """Stream or collect ``req``'s generation; ``piece_key`` is ``message`` (chat) or ``response``."""

        def piece(text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            if piece_key != "message":
                return {"response": text}
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = ollama_tool_calls(calls)
            return {"message": message}

        scanner = ToolCallScanner(req.tool_format, req.tools) if req.tool_format is not None else None

        if req.generation is None:
            self.send_json({**self._head(req), **piece(""), "done_reason": "load", "done": True})
            return
        try:
            self.generation = common.submit(req.backend, req.generation)
        except ApiError as err:
            self.send_api_error(err)
            return
        if self.client_gone:
            self.generation.cancel()
        if not req.stream:
            out = await common.collect(self.generation)
            if self.client_gone:
                return
            if out.error:
                self.send_api_error(ApiError(500, f"generation failed: {out.error}", type="server_error"))
                return
            text = out.text
            if scanner is not None:
                shown, _ = scanner.feed(out.text)
                rest, _ = scanner.finish()
                text = shown + rest
            self.send_json({**self._head(req), **piece(text, scanner.calls if scanner else None),
                            **done_fields(out.usage, out.finish_reason), **extra_done(out.tokens)})
            return
        self.set_header("Content-Type", "application/x-ndjson")
        tokens: list[int] = []
        async for chunk in self.generation:
            if chunk.error:
                await self.send_line({"error": f"generation failed: {chunk.error}"})
                break
            tokens.extend(chunk.tokens)
            text, calls = scanner.feed(chunk.text) if scanner else (chunk.text, [])
            if chunk.finish_reason is not None and scanner:
                rest, more = scanner.finish()
                text, calls = text + rest, calls + more
            if (text or calls) and not await self.send_line({**self._head(req), **piece(text, calls), "done": False}):
                return
            if chunk.finish_reason is not None:
                final = {**self._head(req), **piece(""), **done_fields(chunk.usage, chunk.finish_reason),
                         **extra_done(tokens)}
                if not await self.send_line(final):
                    return
        if not self.client_gone:
            self.finish()


class ChatHandler(_GeneratingHandler):
    """``POST /api/chat``."""

    async def post(self) -> None:
        try:
            req = parse_chat(self.json_body(), self.registry)
        except ApiError as err:
            self.send_api_error(err)
            return
        await self._run(req, "message", lambda tokens: {})


class GenerateHandler(_GeneratingHandler):
    """``POST /api/generate``."""

    async def post(self) -> None:
        try:
            req, _ = parse_generate(self.json_body(), self.registry)
        except ApiError as err:
            self.send_api_error(err)
            return
        prompt = list(req.generation.prompt_tokens) if req.generation else []
        await self._run(req, "response", lambda tokens: {"context": prompt + tokens})


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
        ]
    return out
