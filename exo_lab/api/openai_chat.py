"""OpenAI Chat Completions: ``POST /v1/chat/completions`` (plain and SSE).

Beyond text: content as a list of parts, ``tools`` / ``tool_choice`` (calls
parsed from the output in the model's own format; ``required`` or a named
function forces a call with a grammar where the format allows),
``response_format`` ``json_object`` / ``json_schema`` (output constrained to
valid JSON), and ``logprobs`` / ``top_logprobs``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from exo_lab import __version__
from exo_lab.api import common
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.fields import get_bool, get_float, get_int, get_stop, get_str
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.tools import ToolCallScanner, ToolFormat, check_tool_choice, check_tools, tool_format
from exo_lab.engine.chat import ROLES
from exo_lab.engine.generator import GenerationRequest, TokenLogprob, Usage

DEFAULT_MAX_TOKENS = common.DEFAULT_MAX_TOKENS
FINGERPRINT = f"exo_lab-{__version__}"


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str
    backend: Backend
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    logprobs: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_format: ToolFormat | None = None  # None: tool calls are not parsed (no tools, or tool_choice "none")


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
        if content is None and not (role == "assistant"):
            raise bad_request(f"Missing required parameter: '{where}.content'.", f"{where}.content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"'{where}.content' must be a string or an array of parts.", f"{where}.content")
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise bad_request(f"'{where}.tool_calls' must be an array, on an assistant message.", f"{where}.tool_calls")
    return messages


def _grammar_for_format(data: dict[str, Any]) -> Any:
    """The grammar ``response_format`` asks for, or None for plain text."""
    from exo_lab.engine.guided import json_object

    fmt = data.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("'response_format' must be an object with a 'type'.", "response_format", "invalid_type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema'.",
                              "response_format.json_schema")
        return common.schema_grammar(spec.get("schema"), "response_format.json_schema.schema")
    raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                      "response_format.type")


def parse_chat_request(data: dict[str, Any], registry: ModelRegistry) -> ChatRequest:
    """Validate a request body; raises ApiError (400 / 404 / 503) before any generation."""
    messages = _check_messages(data.get("messages"))
    model = get_str(data, "model")
    n = get_int(data, "n", 1)
    if n != 1:
        raise bad_request("Only n=1 is supported: ask for several completions with several requests.", "n")
    max_tokens = get_int(data, "max_completion_tokens", None, minimum=1)
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = get_int(data, "max_tokens", None, minimum=1)
        param = "max_tokens"
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
    want_logprobs = get_bool(data, "logprobs", False)
    top_logprobs = get_int(data, "top_logprobs", None, minimum=0, maximum=20)
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
    tools = check_tools(data.get("tools"))
    mode, forced = check_tool_choice(data.get("tool_choice"), tools)
    grammar = _grammar_for_format(data)

    backend = common.ready_backend(registry, model)
    fmt = tool_format(backend.tokenizer) if tools and mode != "none" else None
    grammar_param = "response_format"
    if fmt is not None and fmt.hermes and mode in ("required", "function"):
        grammar = common.forced_tool_grammar(tools, forced)
        grammar_param = "tool_choice"
    prompt = common.chat_tokens(backend, messages, tools)
    request = common.generation_request(
        backend, prompt, max_tokens, common.sampling_params(temperature, top_p, top_k, seed), stop,
        max_tokens_param=param, ignore_eos=ignore_eos,
        logprobs=(top_logprobs or 0) if want_logprobs else None, grammar=grammar, grammar_param=grammar_param,
    )
    return ChatRequest(model, backend, request, stream, include_usage, want_logprobs, tools, fmt)


def openai_usage(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def openai_finish_reason(reason: str | None) -> str:
    return {"length": "length", "stop": "stop"}.get(reason or "", "stop")


def openai_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}``."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(text, lp) for _, text, lp in t.top]}
                    for t in items],
        "refusal": None,
    }


class ChatCompletionsHandler(ApiHandler):
    """``POST /v1/chat/completions``."""

    async def post(self) -> None:
        try:
            req = parse_chat_request(self.json_body(), self.registry)
            self.generation = common.submit(req.backend, req.generation)
        except ApiError as err:
            self.send_api_error(err)
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
        out = await common.collect(self.generation)
        if self.client_gone:
            return
        if out.error:
            self.send_api_error(ApiError(500, f"Generation failed: {out.error}", type="server_error"))
            return
        content: str | None = out.text
        calls: list[dict[str, Any]] = []
        if req.tool_format is not None:
            scanner = ToolCallScanner(req.tool_format, req.tools)
            shown, _ = scanner.feed(out.text)
            rest, _ = scanner.finish()
            calls = scanner.calls
            content = (shown + rest) if (shown + rest).strip() or not calls else None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
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
                        "message": message,
                        "logprobs": openai_logprobs(out.logprobs) if req.logprobs else None,
                        "finish_reason": "tool_calls" if calls else openai_finish_reason(out.finish_reason),
                    }
                ],
                "usage": openai_usage(out.usage),
            }
        )

    async def _stream(self, req: ChatRequest, cid: str, created: int) -> None:
        self.start_sse()
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if req.include_usage:
                body["usage"] = None
            return body

        scanner = ToolCallScanner(req.tool_format, req.tools) if req.tool_format is not None else None
        n_calls = 0

        async def emit(text: str, calls: list[dict[str, Any]], lps: list[TokenLogprob]) -> bool:
            nonlocal n_calls
            if text or lps:
                lp = openai_logprobs(lps) if req.logprobs else None
                if not await self.send_sse(chunk({"content": text}, logprobs=lp)):
                    return False
            for call in calls:
                delta = {"tool_calls": [{"index": n_calls, **call}]}
                n_calls += 1
                if not await self.send_sse(chunk(delta)):
                    return False
            return True

        if not await self.send_sse(chunk({"role": "assistant", "content": ""})):
            return
        async for piece in self.generation:
            if piece.error:
                await self.send_sse(ApiError(500, f"Generation failed: {piece.error}", type="server_error").openai())
                break
            text, calls = scanner.feed(piece.text) if scanner else (piece.text, [])
            if piece.finish_reason is not None and scanner:
                rest, more = scanner.finish()
                text, calls = text + rest, calls + more
            if not await emit(text, calls, list(piece.logprobs) if req.logprobs else []):
                return
            if piece.finish_reason is not None:
                finish = "tool_calls" if n_calls else openai_finish_reason(piece.finish_reason)
                if not await self.send_sse(chunk({}, finish)):
                    return
                if req.include_usage:
                    await self.send_sse({**base, "choices": [], "usage": openai_usage(piece.usage)})
        await self.send_sse("[DONE]")
        if not self.client_gone:
            self.finish()
