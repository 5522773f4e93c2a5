"""Ollama's ``/api/chat`` and ``/api/generate``: requests in, NDJSON (or one object) out.

Mounted at ``/api/*`` and ``/ollama/api/*``. Streams NDJSON unless
``"stream": false``; the last object has ``done: true``, ``done_reason`` and
integer counts and nanosecond durations. Errors are ``{"error": "..."}``.
Bodies are read as JSON whatever their Content-Type. As in Ollama, a chat
with no messages (or a generate with no prompt) only loads the model and
answers ``done_reason: "load"``. Model names match with or without
``:latest``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from exo_lab.api import common
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.events import Collected, Event, ReasoningDelta, TextDelta, ToolCall, ToolCallEvent
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.reply import Frame, Reply
from exo_lab.api.schema.ollama import ChatRequest, GenerateRequest, OllamaRequest, Options
from exo_lab.engine.generation import GenerationRequest, Usage

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


# ------------------------------------------------------------------------------------ requests


def _generation(backend: Backend, prompt: list[int], req: OllamaRequest, grammar: Any = None) -> GenerationRequest:
    opts = req.options or Options()
    num_predict = opts.num_predict
    max_tokens = num_predict if num_predict is not None and num_predict > 0 else None
    if max_tokens is None:  # -1 / -2 / unset: until the context is full
        context = backend.context_length
        max_tokens = (context - len(prompt)) if context and context > len(prompt) else None
    if req.format is not None:
        grammar = common.format_grammar("json_object" if req.format == "json" else "json_schema", req.format, "format")
    return common.generation_request(
        backend,
        prompt,
        max_tokens,
        common.sampling_params(
            backend,
            opts.temperature,
            (opts.top_p or 1.0) if opts.top_p is not None else None,  # 0 is "off"
            opts.top_k,
            opts.seed,
            min_p=opts.min_p,
            repetition_penalty=1.0 if opts.repeat_last_n == 0 else opts.repeat_penalty,  # 0 turns it off
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
            repetition_context=max(opts.repeat_last_n, 0) if opts.repeat_last_n is not None else None,  # -1: all
            defaults=DEFAULTS,
            bias_param="options",
        ),
        opts.stop,
        max_tokens_param="num_predict",
        grammar=grammar,
        grammar_param="format",
    )


def _think(req: OllamaRequest) -> dict[str, Any]:
    """``think`` as chat template variables: on, off, or a level (``reasoning_effort``)."""
    if isinstance(req.think, str):
        return common.thinking_kwargs(effort=req.think)
    return common.thinking_kwargs(enable=req.think)


def parse_chat(req: ChatRequest, registry: ModelRegistry) -> OllamaReply:
    """What to generate for an ``/api/chat`` body; raises ApiError (400 / 404 / 503) before any generation."""
    backend = common.ready_backend(registry, find_model(registry, req.model))
    stream = req.stream is not False
    if not req.messages:
        return OllamaReply(req.model, backend, None, stream)
    tools = [t.to_json() for t in req.tools or ()]
    prompt = common.chat_tokens(backend, [m.to_chat() for m in req.messages], tools, template_kwargs=_think(req))
    parsing, _ = common.tool_setup(backend, tools, "auto", None)
    return OllamaReply(
        req.model,
        backend,
        _generation(backend, prompt, req),
        stream,
        parsing,
        common.reasoning_for(backend, prompt),
        show_reasoning=req.think is not False,
    )


def parse_generate(req: GenerateRequest, registry: ModelRegistry) -> OllamaReply:
    """What to generate for an ``/api/generate`` body; the reply gives back the ``context`` it continues, extended."""
    backend = common.ready_backend(registry, find_model(registry, req.model))
    stream = req.stream is not False
    context = req.context or []
    vocab = len(backend.tokenizer)
    if any(not 0 <= t < vocab for t in context):
        raise bad_request(f"context holds token ids outside this model's vocabulary (0..{vocab - 1})", "context")
    text = req.prompt or ""
    if not text and not context:
        return OllamaReply(req.model, backend, None, stream, key="response")
    if req.raw:
        prompt = backend.encode(text, add_special_tokens=not context) if text else []
    else:
        msgs = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": text}]
        prompt = common.chat_tokens(backend, msgs, param="prompt", template_kwargs=_think(req))
    prompt = list(context) + prompt
    if not prompt:
        raise bad_request("the prompt encodes to no tokens", "prompt")
    return OllamaReply(
        req.model,
        backend,
        _generation(backend, prompt, req),
        stream,
        reasoning=None if req.raw else common.reasoning_for(backend, prompt),
        show_reasoning=req.think is not False,
        key="response",
        context=True,
    )


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Parsed calls as Ollama writes them: ``{"function": {"name", "arguments": {...}}}``."""
    return [{"function": {"name": c.name, "arguments": c.input()}} for c in calls]


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


@dataclass
class OllamaReply(Reply):
    """An Ollama answer: NDJSON objects (``done: false``...) and a last one with ``done: true`` and the counts."""

    framing = "ndjson"

    key: str = "message"  # ``message`` (chat) or ``response`` (generate)
    context: bool = False  # give back ``context``: the prompt and output tokens (generate)

    def _piece(self, text: str, calls: list[ToolCall] | None = None, thinking: str = "") -> dict[str, Any]:
        head = {"model": self.model, "created_at": now_iso()}
        shown = thinking if self.show_reasoning else ""
        if self.key != "message":
            return {**head, "response": text, **({"thinking": shown} if shown else {})}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if shown:
            message["thinking"] = shown
        if calls:
            message["tool_calls"] = ollama_tool_calls(calls)
        return {**head, "message": message}

    def _done(self, tokens: tuple[int, ...], usage: Usage, finish: str | None) -> dict[str, Any]:
        extra = {"context": list(self.prompt_tokens) + list(tokens)} if self.context else {}
        return {**done_fields(usage, finish), **extra}

    def immediate(self) -> dict[str, Any]:
        return {**self._piece(""), "done_reason": "load", "done": True}

    def complete(self, out: Collected) -> dict[str, Any]:
        return {
            **self._piece(out.text, out.tool_calls, out.reasoning),
            **self._done(out.final.tokens, out.final.usage, out.final.finish_reason),
        }

    async def frames(self, events: AsyncIterator[Event]) -> AsyncGenerator[Frame, None]:
        async for event in events:
            if isinstance(event, TextDelta):
                if event.text:
                    yield None, {**self._piece(event.text), "done": False}
            elif isinstance(event, ReasoningDelta):
                if self.show_reasoning:
                    yield None, {**self._piece("", thinking=event.text), "done": False}
            elif isinstance(event, ToolCallEvent):
                yield None, {**self._piece("", [event.call]), "done": False}
            elif event.error:
                yield None, {"error": f"generation failed: {event.error}"}
            else:
                yield None, {**self._piece(""), **self._done(event.tokens, event.usage, event.finish_reason)}

    def failure(self, error: str) -> ApiError:
        return ApiError(500, f"generation failed: {error}", type="server_error")
