"""OpenAI Chat Completions: ``POST /v1/chat/completions`` (plain and SSE)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from exo_lab import __version__
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.fields import get_bool, get_float, get_int, get_stop, get_str
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.engine.chat import ROLES
from exo_lab.engine.generator import GenerationRequest, Usage
from exo_lab.engine.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 4096
FINGERPRINT = f"exo_lab-{__version__}"


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str
    backend: Backend
    generation: GenerationRequest
    stream: bool
    include_usage: bool


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise bad_request("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array of message objects.", "messages", "invalid_type")
    if not messages:
        raise bad_request("'messages' must contain at least one message.", "messages", "empty_array")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object.", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(
                f"Invalid value for '{where}.role': {role!r}. Supported values are: {', '.join(map(repr, ROLES))}.",
                f"{where}.role",
            )
        content = m.get("content")
        if content is None and role != "assistant":
            raise bad_request(f"Missing required parameter: '{where}.content'.", f"{where}.content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"'{where}.content' must be a string or an array of parts.", f"{where}.content")
    return messages


def parse_chat_request(data: dict[str, Any], registry: ModelRegistry) -> ChatRequest:
    """Validate a request body; raises ApiError (400 / 404) before any generation."""
    messages = _check_messages(data.get("messages"))
    model = get_str(data, "model")
    n = get_int(data, "n", 1)
    if n != 1:
        raise bad_request("Only n=1 is supported: ask for several completions with several requests.", "n")
    max_tokens = get_int(data, "max_completion_tokens", None, minimum=1)
    if max_tokens is None:
        max_tokens = get_int(data, "max_tokens", None, minimum=1)
    temperature = get_float(data, "temperature", 1.0, 0.0, 2.0)
    top_p = get_float(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("'top_p' must be greater than 0.", "top_p")
    top_k = get_int(data, "top_k", 0, minimum=0)
    seed = get_int(data, "seed", None)
    stop = get_stop(data)
    ignore_eos = get_bool(data, "ignore_eos", False)  # vLLM-style extension: generate exactly max_tokens
    stream = get_bool(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options", "invalid_type")
    if options and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    include_usage = get_bool(options or {}, "include_usage", False)

    backend = registry.get(model)
    state = getattr(backend, "state", "ready")
    if state in ("launching", "loading", "replacing"):
        raise ApiError(503, f"The model {model!r} is {state}; retry shortly.", type="server_error",
                       code="model_not_ready", headers={"Retry-After": "5"})
    if state in ("failed", "stopped"):
        raise ApiError(503, f"The model {model!r} is {state}: {getattr(backend, 'error', '')}", type="server_error",
                       code="model_unavailable", headers={"Retry-After": "30"})
    try:
        prompt = backend.chat_tokens(messages)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    context = getattr(backend, "context_length", None)
    if context and len(prompt) >= context:
        raise bad_request(
            f"The prompt has {len(prompt)} tokens; this model's context is {context} tokens.",
            "messages",
            "context_length_exceeded",
        )
    limit = (context - len(prompt)) if context else DEFAULT_MAX_TOKENS
    max_tokens = min(max_tokens or DEFAULT_MAX_TOKENS, limit)
    request = GenerationRequest(
        tuple(prompt),
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature, top_p, top_k, seed),
        stop=stop,
        ignore_eos=ignore_eos,
    )
    return ChatRequest(model, backend, request, stream, include_usage)


def openai_usage(usage: Usage | None) -> dict[str, int]:
    u = usage or Usage()
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def openai_finish_reason(reason: str | None) -> str:
    return {"length": "length", "stop": "stop"}.get(reason or "", "stop")


class ChatCompletionsHandler(ApiHandler):
    """``POST /v1/chat/completions``."""

    async def post(self) -> None:
        try:
            req = parse_chat_request(self.json_body(), self.registry)
        except ApiError as err:
            self.send_api_error(err)
            return
        try:
            self.generation = req.backend.submit(req.generation)
        except RuntimeError as exc:  # the instance failed between validation and submission
            self.send_api_error(ApiError(503, str(exc), type="server_error", code="model_unavailable",
                                         headers={"Retry-After": "5"}))
            return
        if self.client_gone:
            self.generation.cancel()
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            await self._stream(req, cid, created)
        else:
            await self._complete(req, cid, created)

    async def _complete(self, req: ChatRequest, cid: str, created: int) -> None:
        parts: list[str] = []
        last = None
        async for chunk in self.generation:
            parts.append(chunk.text)
            last = chunk
        if self.client_gone:
            return
        if last is None or last.error:
            message = last.error if last else "generation produced nothing"
            self.send_api_error(ApiError(500, f"Generation failed: {message}", type="server_error"))
            return
        self.send_json(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                        "logprobs": None,
                        "finish_reason": openai_finish_reason(last.finish_reason),
                    }
                ],
                "usage": openai_usage(last.usage),
            }
        )

    async def _stream(self, req: ChatRequest, cid: str, created: int) -> None:
        self.start_sse()
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if req.include_usage:
                body["usage"] = None
            return body

        if not await self.send_sse(chunk({"role": "assistant", "content": ""})):
            return
        async for piece in self.generation:
            if piece.error:
                await self.send_sse(ApiError(500, f"Generation failed: {piece.error}", type="server_error").openai())
                break
            if piece.text and not await self.send_sse(chunk({"content": piece.text})):
                return
            if piece.finish_reason is not None:
                if not await self.send_sse(chunk({}, openai_finish_reason(piece.finish_reason))):
                    return
                if req.include_usage:
                    await self.send_sse({**base, "choices": [], "usage": openai_usage(piece.usage)})
        await self.send_sse("[DONE]")
        if not self.client_gone:
            self.finish()
