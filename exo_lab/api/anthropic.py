"""Anthropic Messages: ``POST /v1/messages`` (plain and SSE) and ``POST /v1/messages/count_tokens``.

Errors are ``{"type": "error", "error": {"type", "message"}}``, also in the
middle of a stream (an ``error`` event). A final assistant message is a
prefill: the reply continues it. Tools: ``tools`` (``name``, ``description``,
``input_schema``) and ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``)
go to the chat template; ``tool_use`` / ``tool_result`` blocks in the
conversation become its tool calls and tool messages; calls the model writes
come back as ``tool_use`` blocks with ``stop_reason: "tool_use"`` (``any`` and
``tool`` force a call with a grammar where the template's format allows).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from exo_lab.api import common
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.events import Collected, Event, ReasoningDelta, TextDelta, ToolCall, ToolCallEvent
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.reply import Frame, Reply
from exo_lab.api.schema.anthropic import Block, CountTokensRequest, MessagesRequest
from exo_lab.engine.generation import Usage


def _text(content: str | list[Block]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content if b.type == "text")


def chat_messages(req: CountTokensRequest) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation as chat messages (tool results become ``tool`` messages, ahead of any text), and the
    prefill (a final assistant text message)."""
    out: list[dict[str, Any]] = []
    system = _text(req.system) if req.system is not None else None
    if system:
        out.append({"role": "system", "content": system})
    for m in req.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        calls, results, texts = [], [], []
        for block in m.content:
            if block.type == "tool_use" and m.role == "assistant":
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": block.input or {}},
                    }
                )
            elif block.type == "tool_result" and m.role == "user":
                content = block.content or ""
                text = content if isinstance(content, str) else _text([Block.model_validate(b) for b in content])
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": ("Error: " + text) if block.is_error else text,
                    }
                )
            else:
                texts.append(block)
        text = _text(texts)
        out.extend(results)
        if calls:
            out.append({"role": m.role, "content": text, "tool_calls": calls})
        elif text or not results:
            out.append({"role": m.role, "content": text})
    prefill = None
    if len(out) > 1 and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
        prefill = out.pop()["content"].rstrip()
    if not any(m["role"] in ("user", "tool") for m in out):
        raise bad_request("messages: the conversation needs at least one user message.", "messages")
    return out, prefill


def _thinking(req: CountTokensRequest) -> dict[str, Any]:
    """The chat template's thinking variables for a request's ``thinking`` (none when it says nothing)."""
    return common.thinking_kwargs(enable=req.thinking.enabled) if req.thinking is not None else {}


def _prompt(
    backend: Backend,
    messages: list[dict[str, Any]],
    prefill: str | None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    prompt = common.chat_tokens(backend, messages, tools, template_kwargs=template_kwargs)
    if prefill:
        prompt += backend.encode(prefill, add_special_tokens=False)
    return prompt


def parse_request(req: MessagesRequest, registry: ModelRegistry) -> MessagesReply:
    """What to generate for a validated body; raises ApiError (400 / 404 / 503) before any generation."""
    messages, prefill = chat_messages(req)
    backend = common.ready_backend(registry, req.model)
    tools = [t.to_chat() for t in req.tools or ()]
    parsing, forcing = common.tool_setup(backend, tools, *req.tool_mode(), can_force=not prefill)
    prompt = _prompt(backend, messages, prefill, tools, _thinking(req))
    request = common.generation_request(
        backend,
        prompt,
        req.max_tokens,
        common.sampling_params(backend, req.temperature, req.top_p, req.top_k),
        tuple(s for s in req.stop_sequences or () if s),
        grammar=forcing,
        grammar_param="tool_choice",
    )
    return MessagesReply(
        req.model,
        backend,
        request,
        bool(req.stream),
        parsing,
        common.reasoning_for(backend, prompt),
        show_reasoning=req.thinking is not None and req.thinking.enabled,
    )


def count_tokens(req: CountTokensRequest, registry: ModelRegistry) -> dict[str, Any]:
    """``{"input_tokens": N}`` for a Messages request's conversation and tools."""
    messages, prefill = chat_messages(req)
    backend = common.ready_backend(registry, req.model)
    tools = [t.to_chat() for t in req.tools or ()]
    return {"input_tokens": len(_prompt(backend, messages, prefill, tools, _thinking(req)))}


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A parsed call as an Anthropic ``tool_use`` block."""
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name, "input": call.input()}


def thinking_block(text: str) -> dict[str, Any]:
    """A ``thinking`` block; its signature is a digest of the text (nothing here checks it when sent back)."""
    return {"type": "thinking", "thinking": text, "signature": _signature(text)}


def _signature(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def stop_reason(finish: str | None, stop_sequence: str | None, tool_use: bool = False) -> str:
    if tool_use:
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def anthropic_usage(usage: Usage | None, output: bool = True) -> dict[str, Any]:
    """Messages usage: ``input_tokens`` are the prompt tokens prefilled, ``cache_read_input_tokens`` those whose
    KV cache was reused (their sum is the prompt, as Anthropic counts)."""
    u = usage or Usage()
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "output_tokens": u.completion_tokens if output else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
    }


@dataclass
class MessagesReply(Reply):
    """A ``message``, or its events: ``message_start``, content blocks (text, ``tool_use``), ``message_stop``."""

    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")

    def _message(self, content: list, reason: str | None, seq: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": usage,
        }

    def complete(self, out: Collected) -> dict[str, Any]:
        text, calls, final = out.text, out.tool_calls, out.final
        content = [thinking_block(out.reasoning)] if out.reasoning and self.show_reasoning else []
        content += [{"type": "text", "text": text}] if text and (text.strip() or not calls) else []
        content += [tool_use_block(c) for c in calls]
        return self._message(
            content,
            stop_reason(final.finish_reason, final.stop_sequence, bool(calls)),
            final.stop_sequence,
            anthropic_usage(final.usage),
        )

    async def frames(self, events: AsyncIterator[Event]) -> AsyncGenerator[Frame, None]:
        """Without tools the text block opens at once (before ``ping``); with tools it opens at the first
        text, so a reply that is only a call has no empty text block."""
        index = -1
        text_open = False
        held = ""  # blank text ahead of a possible tool call: shown only if real text follows

        def block(kind: str, **fields: Any) -> Frame:
            return kind, {"type": kind, "index": index, **fields}

        def open_text() -> Frame:
            nonlocal index, text_open
            index += 1
            text_open = True
            return block("content_block_start", content_block={"type": "text", "text": ""})

        def close_block() -> Frame:
            nonlocal text_open
            text_open = False
            return block("content_block_stop")

        def text_delta(text: str) -> Frame:
            return block("content_block_delta", delta={"type": "text_delta", "text": text})

        usage = anthropic_usage(Usage(prompt_tokens=len(self.prompt_tokens)), output=False)
        yield "message_start", {"type": "message_start", "message": self._message([], None, None, usage)}
        shows_thinking = self.reasoning is not None and self.show_reasoning
        if self.tools is None and not shows_thinking:
            yield open_text()
        yield "ping", {"type": "ping"}
        thinking: list[str] | None = None  # the open thinking block's text
        async for event in events:
            if isinstance(event, ReasoningDelta):
                if not shows_thinking:
                    continue
                if thinking is None:
                    if text_open:
                        yield close_block()
                    thinking, index = [], index + 1
                    yield block(
                        "content_block_start", content_block={"type": "thinking", "thinking": "", "signature": ""}
                    )
                thinking.append(event.text)
                yield block("content_block_delta", delta={"type": "thinking_delta", "thinking": event.text})
                continue
            if thinking is not None:  # the answer begins: the thinking block is done, with its signature
                yield block(
                    "content_block_delta", delta={"type": "signature_delta", "signature": _signature("".join(thinking))}
                )
                yield block("content_block_stop")
                thinking = None
            if isinstance(event, TextDelta):
                text = event.text
                if self.tools is not None and not text_open:
                    text, held = held + text, ""
                    if text and not text.strip():
                        held, text = text, ""
                if text:
                    if not text_open:
                        yield open_text()
                    yield text_delta(text)
            elif isinstance(event, ToolCallEvent):
                if text_open:
                    yield close_block()
                call = tool_use_block(event.call)
                index += 1
                yield block("content_block_start", content_block={**call, "input": {}})
                yield block(
                    "content_block_delta", delta={"type": "input_json_delta", "partial_json": json.dumps(call["input"])}
                )
                yield close_block()
            elif event.error:
                err = ApiError(500, f"Generation failed: {event.error}", type="server_error")
                yield "error", err.anthropic()
            else:
                if held and index < 0 and not event.tool_calls:  # a blank reply: its text after all
                    yield open_text()
                    yield text_delta(held)
                if index < 0:  # an empty reply still has its (empty) text block
                    yield open_text()
                if text_open:
                    yield close_block()
                reason = stop_reason(event.finish_reason, event.stop_sequence, bool(event.tool_calls))
                yield (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": event.stop_sequence},
                        "usage": anthropic_usage(event.usage),
                    },
                )
                yield "message_stop", {"type": "message_stop"}
