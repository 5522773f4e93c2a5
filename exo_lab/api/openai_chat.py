"""OpenAI Chat Completions: ``POST /v1/chat/completions`` (plain and SSE).

Beyond text: content as a list of parts, ``tools`` / ``tool_choice`` (calls
parsed from the output in the model's own format; ``required`` or a named
function forces a call with a grammar where the format allows),
``response_format`` ``json_object`` / ``json_schema`` (output constrained to
valid JSON), ``logprobs`` / ``top_logprobs``, sampling beyond temperature (``presence_penalty``,
``frequency_penalty``, ``logit_bias``; vLLM's ``min_p``, ``repetition_penalty``), and a thinking
model's reasoning apart from its answer (``reasoning_content``, in the message and in stream deltas;
``reasoning_effort`` and vLLM's ``chat_template_kwargs`` go to the chat template).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from exo_lab import __version__
from exo_lab.api import common
from exo_lab.api.errors import ApiError
from exo_lab.api.events import Collected, Event, ReasoningDelta, TextDelta, ToolCallEvent
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.reply import Frame, Reply
from exo_lab.api.schema.openai import ChatCompletionRequest
from exo_lab.engine.generation import TokenLogprob, Usage

FINGERPRINT = f"exo_lab-{__version__}"


def parse_request(req: ChatCompletionRequest, registry: ModelRegistry) -> ChatReply:
    """What to generate for a validated body; raises ApiError (400 / 404 / 503) before any generation."""
    fmt = req.response_format
    grammar = (
        common.format_grammar(
            fmt.type, fmt.json_schema and fmt.json_schema.schema_, "response_format.json_schema.schema"
        )
        if fmt
        else None
    )
    backend = common.ready_backend(registry, req.model)
    tools = [t.to_json() for t in req.tools or ()]
    parsing, forcing = common.tool_setup(backend, tools, *req.tool_mode())
    template_kwargs = {**common.thinking_kwargs(effort=req.reasoning_effort), **(req.chat_template_kwargs or {})}
    prompt = common.chat_tokens(
        backend, [m.model_dump(exclude_unset=True) for m in req.messages], tools, template_kwargs=template_kwargs
    )
    limit, limit_param = (
        (req.max_completion_tokens, "max_completion_tokens")
        if req.max_completion_tokens is not None
        else (req.max_tokens, "max_tokens")
    )
    request = common.generation_request(
        backend,
        prompt,
        limit,
        common.sampling_params(
            backend,
            req.temperature,
            req.top_p,
            req.top_k,
            req.seed,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias,
        ),
        req.stop,
        max_tokens_param=limit_param,
        ignore_eos=bool(req.ignore_eos),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        grammar=forcing or grammar,
        grammar_param="tool_choice" if forcing else "response_format",
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatReply(
        req.model,
        backend,
        request,
        bool(req.stream),
        parsing,
        common.reasoning_for(backend, prompt),
        include_usage=include_usage,
        logprobs=bool(req.logprobs),
    )


def openai_usage(usage: Usage | None, reasoning_tokens: int = 0) -> dict[str, Any]:
    u = usage or Usage()
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def openai_finish_reason(reason: str | None) -> str:
    return {"length": "length", "stop": "stop"}.get(reason or "", "stop")


def openai_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}``."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(text, lp) for _, text, lp in t.top]} for t in items
        ],
        "refusal": None,
    }


@dataclass
class ChatReply(Reply):
    """A chat completion: one ``chat.completion`` object, or ``chat.completion.chunk`` events then ``[DONE]``."""

    include_usage: bool = False
    logprobs: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def complete(self, out: Collected) -> dict[str, Any]:
        calls = [c.to_openai() for c in out.tool_calls]
        content = out.text if out.text.strip() or not calls else None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        if self.reasoning is not None:
            message["reasoning_content"] = out.reasoning or None
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": openai_logprobs(out.logprobs) if self.logprobs else None,
                    "finish_reason": "tool_calls" if calls else openai_finish_reason(out.final.finish_reason),
                }
            ],
            "usage": openai_usage(out.final.usage, out.final.reasoning_tokens),
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self.include_usage:
            body["usage"] = None
        return body

    async def frames(self, events: AsyncIterator[Event]) -> AsyncGenerator[Frame, None]:
        yield None, self._chunk({"role": "assistant", "content": ""})
        async for event in events:
            if isinstance(event, TextDelta):
                yield (
                    None,
                    self._chunk(
                        {"content": event.text},
                        logprobs=openai_logprobs(list(event.logprobs)) if self.logprobs else None,
                    ),
                )
            elif isinstance(event, ReasoningDelta):
                yield None, self._chunk({"reasoning_content": event.text})
            elif isinstance(event, ToolCallEvent):
                yield None, self._chunk({"tool_calls": [{"index": event.index, **event.call.to_openai()}]})
            elif event.error:
                yield None, ApiError(500, f"Generation failed: {event.error}", type="server_error").openai()
            else:
                finish = "tool_calls" if event.tool_calls else openai_finish_reason(event.finish_reason)
                yield None, self._chunk({}, finish)
                if self.include_usage:
                    yield (
                        None,
                        {**self._chunk({}), "choices": [], "usage": openai_usage(event.usage, event.reasoning_tokens)},
                    )
        yield None, "[DONE]"
