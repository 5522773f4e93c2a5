"""OpenAI Responses: ``POST /v1/responses`` (plain and SSE with typed events).

``input`` is a string or a list of items (messages with text parts, earlier
``function_call`` / ``function_call_output`` items); ``instructions`` become
the system message. Streaming sends ``response.created``,
``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` and ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it short), each with
its ``sequence_number``. Responses are not stored: ``previous_response_id``
is refused with a 400.

Function tools (``tools: [{"type": "function", "name", "parameters"}]``,
``tool_choice``): calls the model writes become ``function_call`` output
items (``call_id``, ``name``, ``arguments`` as a JSON string); streamed as
``response.output_item.added``, ``response.function_call_arguments.delta`` /
``.done`` and ``response.output_item.done``. With tools, the message item
opens only when there is text to show.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from exo_lab.api import common
from exo_lab.api.errors import bad_request
from exo_lab.api.events import Collected, Event, Final, ReasoningDelta, TextDelta, ToolCall, ToolCallEvent
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.reply import Frame, Reply
from exo_lab.api.schema.openai import InputItem, ResponsesContent, ResponsesRequest
from exo_lab.engine.generation import Usage


def _text(content: ResponsesContent) -> str:
    return content if isinstance(content, str) else "".join(p.value for p in content)


def _dump(value: Any) -> Any:
    return value.model_dump(exclude_unset=True) if hasattr(value, "model_dump") else value


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items: list[InputItem] = [InputItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if item.type == "message":
            messages.append({"role": item.role, "content": _text(item.content or "")})
        elif item.type == "function_call":
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments or "{}"},
            }
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output or "")})
    if not any(m["role"] in ("user", "tool") for m in messages):
        raise bad_request("'input' needs at least one user message.", "input")
    return messages


def parse_request(req: ResponsesRequest, registry: ModelRegistry) -> ResponsesReply:
    """What to generate for a validated body; raises ApiError (400 / 404 / 503) before any generation."""
    messages = input_messages(req)
    fmt = req.text.format if req.text and req.text.format else None
    grammar = common.format_grammar(fmt.type, fmt.schema_, "text.format.schema") if fmt else None
    backend = common.ready_backend(registry, req.model)
    tools = [t.to_chat() for t in req.tools or ()]
    parsing, forcing = common.tool_setup(backend, tools, *req.tool_mode())
    effort = req.reasoning.effort if req.reasoning is not None else None
    prompt = common.chat_tokens(
        backend, messages, tools or None, param="input", template_kwargs=common.thinking_kwargs(effort=effort)
    )
    request = common.generation_request(
        backend,
        prompt,
        req.max_output_tokens,
        common.sampling_params(backend, req.temperature, req.top_p),
        max_tokens_param="max_output_tokens",
        prompt_param="input",
        grammar=forcing or grammar,
        grammar_param="tool_choice" if forcing else "text.format",
    )
    echo = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_unset=True) if fmt else {"type": "text"}},
        "reasoning": {"effort": effort, "summary": req.reasoning.summary if req.reasoning is not None else None},
        "metadata": req.metadata if isinstance(req.metadata, dict) else {},
        "user": req.user,
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": True if t.strict is None else t.strict,
            }
            for t in req.tools or ()
        ],
        "tool_choice": _dump(req.tool_choice) if req.tool_choice is not None else ("auto" if tools else "none"),
    }
    return ResponsesReply(
        req.model, backend, request, bool(req.stream), parsing, common.reasoning_for(backend, prompt), echo=echo
    )


def responses_usage(usage: Usage | None, reasoning_tokens: int = 0) -> dict[str, Any]:
    """Every field the openai client's ``ResponseUsage`` requires (``cache_write_tokens`` too: nothing is
    written to a cache a client pays for)."""
    u = usage or Usage()
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.total_tokens,
    }


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """A ``reasoning`` output item: the model's thoughts as ``reasoning_text`` content, no summary."""
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: ToolCall) -> dict[str, Any]:
    """A tool call as a Responses ``function_call`` output item."""
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": "completed",
    }


@dataclass
class ResponsesReply(Reply):
    """A ``response`` object, or its typed events from ``response.created`` to ``response.completed``."""

    echo: dict[str, Any] = field(default_factory=dict)  # request settings echoed in the response object
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    reasoning_id: str = field(default_factory=lambda: f"rs_{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_part(text)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def _response(
        self,
        status: str,
        output: list,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
        reasoning_tokens: int = 0,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "truncation": "disabled",
            "usage": responses_usage(usage, reasoning_tokens) if usage is not None else None,
            **self.echo,
        }

    def complete(self, out: Collected) -> dict[str, Any]:
        status = "incomplete" if out.final.truncated else "completed"
        output = [_reasoning_item(self.reasoning_id, out.reasoning, status)] if out.reasoning else []
        output += [self._item(out.text, status)] if (out.text.strip() or not out.tool_calls) else []
        output += [_call_item(c) for c in out.tool_calls]
        return self._response(status, output, out.final.usage, reasoning_tokens=out.final.reasoning_tokens)

    async def frames(self, events: AsyncIterator[Event]) -> AsyncGenerator[Frame, None]:
        seq = 0

        def send(kind: str, **fields: Any) -> Frame:
            nonlocal seq
            seq += 1
            return kind, {"type": kind, "sequence_number": seq - 1, **fields}

        for kind in ("response.created", "response.in_progress"):
            yield send(kind, response=self._response("in_progress", []))
        items: list[dict[str, Any]] = []  # output items, in output order
        message: int | None = None  # output index of the message item once it is open
        parts: list[str] = []
        held = ""  # blank text before any message: shown only if text follows
        closed = False  # whether the open message item was closed (a call followed it)

        def open_message() -> list[Frame]:
            nonlocal message
            if message is not None:  # text after a call: a new message item
                self.message_id = f"msg_{uuid.uuid4().hex}"
                parts.clear()
            message = len(items)
            items.append(self._item(None, "in_progress"))  # replaced when the text is done
            return [
                send("response.output_item.added", output_index=message, item=items[message]),
                send(
                    "response.content_part.added",
                    item_id=self.message_id,
                    output_index=message,
                    content_index=0,
                    part=_part(""),
                ),
            ]

        def close_message(status: str) -> list[Frame]:
            assert message is not None
            text = "".join(parts)
            where = {"item_id": self.message_id, "output_index": message, "content_index": 0}
            items[message] = self._item(text, status)
            return [
                send("response.output_text.done", **where, text=text, logprobs=[]),
                send("response.content_part.done", **where, part=_part(text)),
                send("response.output_item.done", output_index=message, item=items[message]),
            ]

        def delta(text: str) -> Frame:
            parts.append(text)
            return send(
                "response.output_text.delta",
                item_id=self.message_id,
                output_index=message,
                content_index=0,
                delta=text,
                logprobs=[],
            )

        thought: int | None = None  # output index of the reasoning item while it is open
        thoughts: list[str] = []

        def close_reasoning(status: str) -> list[Frame]:
            nonlocal thought
            assert thought is not None
            text, where = "".join(thoughts), {"item_id": self.reasoning_id, "output_index": thought}
            items[thought] = _reasoning_item(self.reasoning_id, text, status)
            frames = [
                send("response.reasoning_text.done", **where, content_index=0, text=text),
                send("response.output_item.done", output_index=thought, item=items[thought]),
            ]
            thought = None
            return frames

        if self.tools is None and self.reasoning is None:  # plain text: the message opens at once
            for frame in open_message():
                yield frame
        async for event in events:
            if isinstance(event, ReasoningDelta):
                if thought is None:
                    thought = len(items)
                    items.append(_reasoning_item(self.reasoning_id, None, "in_progress"))
                    yield send("response.output_item.added", output_index=thought, item=items[thought])
                thoughts.append(event.text)
                yield send(
                    "response.reasoning_text.delta",
                    item_id=self.reasoning_id,
                    output_index=thought,
                    content_index=0,
                    delta=event.text,
                )
                continue
            if thought is not None:  # the answer begins (or the reply ends): the reasoning is done
                status = "incomplete" if isinstance(event, Final) and event.truncated else "completed"
                for frame in close_reasoning(status):
                    yield frame
            if isinstance(event, TextDelta):
                text = event.text
                if (message is None or closed) and text and not text.strip():
                    held, text = held + text, ""
                if not text:
                    continue
                if message is None or closed:
                    for frame in open_message():
                        yield frame
                    text, held, closed = held + text, "", False
                yield delta(text)
            elif isinstance(event, ToolCallEvent):
                if message is not None and not closed:  # one item at a time: the text before the call is done
                    closed = True
                    for frame in close_message("completed"):
                        yield frame
                item = _call_item(event.call)
                index = len(items)
                items.append(item)
                where = {"item_id": item["id"], "output_index": index}
                yield send(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
                yield send("response.function_call_arguments.delta", **where, delta=item["arguments"])
                yield send(
                    "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]
                )
                yield send("response.output_item.done", output_index=index, item=item)
            elif event.error:
                error = {"code": "server_error", "message": f"Generation failed: {event.error}"}
                yield send("response.failed", response=self._response("failed", [], event.usage, error))
            else:
                status = "incomplete" if event.truncated else "completed"
                if message is None and not event.tool_calls:  # no call and no text: the (blank) message after all
                    for frame in open_message():
                        yield frame
                    if held:
                        yield delta(held)
                if message is not None and not closed:
                    for frame in close_message(status):
                        yield frame
                yield send(
                    f"response.{status}",
                    response=self._response(status, items, event.usage, reasoning_tokens=event.reasoning_tokens),
                )
