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
from dataclasses import dataclass, field
from typing import Any

from exo_lab.api import common
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.fields import get_bool, get_float, get_int, get_str
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.tools import ToolCallScanner, ToolFormat, check_tool_choice, check_tools, tool_format
from exo_lab.engine.chat import ROLES
from exo_lab.engine.generator import GenerationRequest, Usage

_TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass
class ResponsesRequest:
    model: str
    backend: Backend
    generation: GenerationRequest
    stream: bool
    echo: dict[str, Any]  # request settings echoed in the response object
    tools: list[dict[str, Any]] = field(default_factory=list)  # as Chat Completions function tools
    tool_format: ToolFormat | None = None  # how the model writes calls (None: no tools)


def parse_tools(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Responses ``tools`` (flat function tools): as Chat Completions tools, and as echoed back."""
    tools = data.get("tools")
    if tools is None:
        return [], []
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of tools.", "tools", "invalid_type")
    chat_tools, echo = [], []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{where}' must be an object.", where, "invalid_type")
        if tool.get("type") != "function":
            raise bad_request(f"Tool type {tool.get('type')!r} at '{where}' is not available here: only "
                              "'function' tools (the caller runs them).", f"{where}.type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"Missing required parameter: '{where}.name'.", f"{where}.name",
                              "missing_required_parameter")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"'{where}.description' must be a string.", f"{where}.description", "invalid_type")
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise bad_request(f"'{where}.parameters' must be a JSON schema object.", f"{where}.parameters",
                              "invalid_type")
        function = {"name": tool["name"], "description": description or "", "parameters": tool.get("parameters")}
        chat_tools.append({"type": "function", "function": function})
        echo.append({"type": "function", "name": tool["name"], "description": description,
                     "parameters": tool.get("parameters"), "strict": tool.get("strict", True)})
    check_tools(chat_tools, "tools")
    return chat_tools, echo


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of content parts.", where, "invalid_type")
    parts = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise bad_request(f"'{at}' must be an object.", at, "invalid_type")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise bad_request(f"'{at}.text' must be a string.", f"{at}.text", "invalid_type")
            parts.append(part["text"])
        elif kind == "refusal":
            parts.append(str(part.get("refusal", "")))
        else:
            raise bad_request(f"Content part type {kind!r} at '{at}' is not supported: this model takes text only.",
                              f"{at}.type")
    return "".join(parts)


def input_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages."""
    messages: list[dict[str, Any]] = []
    instructions = get_str(data, "instructions", None)
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = data.get("input")
    if items is None:
        raise bad_request("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list):
        raise bad_request("'input' must be a string or an array of input items.", "input", "invalid_type")
    if not items:
        raise bad_request("'input' must contain at least one item.", "input", "empty_array")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{where}' must be an object.", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES or role == "tool":
                raise bad_request(f"Invalid value for '{where}.role': {role!r}. Supported values are: 'user', "
                                  "'assistant', 'system' and 'developer'.", f"{where}.role")
            if "content" not in item:
                raise bad_request(f"Missing required parameter: '{where}.content'.", f"{where}.content",
                                  "missing_required_parameter")
            messages.append({"role": role, "content": _content(item["content"], f"{where}.content")})
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(args, str):
                raise bad_request(f"'{where}' needs 'name' and 'arguments' strings.", where)
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": args}}
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, (str, list)):
                raise bad_request(f"'{where}.output' must be a string.", f"{where}.output", "invalid_type")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _content(output, f"{where}.output")})
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(f"Input item type {kind!r} at '{where}' is not supported.", f"{where}.type")
    if not any(m["role"] in ("user", "tool") for m in messages):
        raise bad_request("'input' needs at least one user message.", "input")
    return messages


def _text_format(data: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The ``text.format`` echoed back and the grammar it asks for."""
    from exo_lab.engine.guided import json_object

    text = data.get("text")
    if text is None:
        return {"type": "text"}, None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object.", "text", "invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}, None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("'text.format' must be an object with a 'type'.", "text.format", "invalid_type")
    kind = fmt["type"]
    if kind == "text":
        return fmt, None
    if kind == "json_object":
        return fmt, json_object()
    if kind == "json_schema":
        return fmt, common.schema_grammar(fmt.get("schema"), "text.format.schema")
    raise bad_request(f"'text.format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                      "text.format.type")


def parse_responses_request(data: dict[str, Any], registry: ModelRegistry) -> ResponsesRequest:
    model = get_str(data, "model")
    messages = input_messages(data)
    max_tokens = get_int(data, "max_output_tokens", None, minimum=1)
    temperature = get_float(data, "temperature", 1.0, 0.0, 2.0)
    top_p = get_float(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("'top_p' must be greater than 0.", "top_p")
    stream = get_bool(data, "stream", False)
    if data.get("previous_response_id") is not None:
        raise bad_request("This server does not store responses, so 'previous_response_id' cannot be used: "
                          "send the whole conversation in 'input'.", "previous_response_id")
    tools, tools_echo = parse_tools(data)
    mode, forced = check_tool_choice(data.get("tool_choice"), tools)
    fmt, grammar = _text_format(data)
    grammar_param = "text.format"
    backend = common.ready_backend(registry, model)
    calls_format = tool_format(backend.tokenizer) if tools and mode != "none" else None
    if calls_format is not None and calls_format.hermes and mode in ("required", "function"):
        grammar, grammar_param = common.forced_tool_grammar(tools, forced), "tool_choice"
    prompt = common.chat_tokens(backend, messages, tools or None, param="input")
    request = common.generation_request(backend, prompt, max_tokens, common.sampling_params(temperature, top_p),
                                        max_tokens_param="max_output_tokens", prompt_param="input", grammar=grammar,
                                        grammar_param=grammar_param)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    choice = data.get("tool_choice", "auto" if tools else "none")
    echo = {"instructions": data.get("instructions"), "max_output_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "text": {"format": fmt}, "metadata": metadata, "user": data.get("user"),
            "tools": tools_echo, "tool_choice": choice}
    return ResponsesRequest(model, backend, request, stream, echo, tools, calls_format)


def responses_usage(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


class ResponsesHandler(ApiHandler):
    """``POST /v1/responses``."""

    async def post(self) -> None:
        try:
            req = parse_responses_request(self.json_body(), self.registry)
            self.generation = common.submit(req.backend, req.generation)
        except ApiError as err:
            self.send_api_error(err)
            return
        if self.client_gone:
            self.generation.cancel()
        self.rid = f"resp_{uuid.uuid4().hex}"
        self.mid = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        if req.stream:
            await self._stream(req)
        else:
            await self._complete(req)

    def _item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self._part(text)]
        return {"type": "message", "id": self.mid, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _response(self, req: ResponsesRequest, status: str, output: list, usage: Usage | None = None,
                  error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "truncation": "disabled",
            "usage": responses_usage(usage) if usage is not None else None,
            **req.echo,
        }

    @staticmethod
    def _call_item(call: dict[str, Any]) -> dict[str, Any]:
        """A Chat Completions tool call as a Responses ``function_call`` output item."""
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}

    async def _complete(self, req: ResponsesRequest) -> None:
        out = await common.collect(self.generation)
        if self.client_gone:
            return
        if out.error:
            self.send_api_error(ApiError(500, f"Generation failed: {out.error}", type="server_error"))
            return
        status = "incomplete" if out.finish_reason == "length" else "completed"
        text, calls = out.text, []
        if req.tool_format is not None:
            scanner = ToolCallScanner(req.tool_format, req.tools)
            shown, _ = scanner.feed(out.text)
            rest, _ = scanner.finish()
            text, calls = shown + rest, scanner.calls
        output = [self._item(text, status)] if (text.strip() or not calls) else []
        output += [self._call_item(c) for c in calls]
        self.send_json(self._response(req, status, output, out.usage))

    async def _stream(self, req: ResponsesRequest) -> None:
        self.start_sse()
        seq = 0

        async def send(kind: str, **fields: Any) -> bool:
            nonlocal seq
            ok = await self.send_sse({"type": kind, "sequence_number": seq, **fields}, event=kind)
            seq += 1
            return ok

        for kind in ("response.created", "response.in_progress"):
            if not await send(kind, response=self._response(req, "in_progress", [])):
                return
        items: list[dict[str, Any]] = []  # finished output items, in output order
        message: int | None = None  # output index of the message item once it is open
        parts: list[str] = []
        held = ""
        closed = False  # whether the open message item was closed (a call followed it)

        async def open_message() -> bool:
            nonlocal message
            if message is not None:  # text after a call: a new message item
                self.mid = f"msg_{uuid.uuid4().hex}"
                parts.clear()
            message = len(items)
            items.append(self._item(None, "in_progress"))  # replaced when the text is done
            return (await send("response.output_item.added", output_index=message, item=items[message])
                    and await send("response.content_part.added", item_id=self.mid, output_index=message,
                                   content_index=0, part=self._part("")))

        async def close_message(status: str) -> bool:
            text = "".join(parts)
            where = {"item_id": self.mid, "output_index": message, "content_index": 0}
            items[message] = self._item(text, status)
            return (await send("response.output_text.done", **where, text=text, logprobs=[])
                    and await send("response.content_part.done", **where, part=self._part(text))
                    and await send("response.output_item.done", output_index=message, item=items[message]))

        async def emit_call(call: dict[str, Any]) -> bool:
            nonlocal closed
            if message is not None and not closed:  # one item at a time: the text before the call is done
                closed = True
                if not await close_message("completed"):
                    return False
            item = self._call_item(call)
            index = len(items)
            items.append(item)
            where = {"item_id": item["id"], "output_index": index}
            return (await send("response.output_item.added", output_index=index,
                               item={**item, "arguments": "", "status": "in_progress"})
                    and await send("response.function_call_arguments.delta", **where, delta=item["arguments"])
                    and await send("response.function_call_arguments.done", **where, name=item["name"],
                                   arguments=item["arguments"])
                    and await send("response.output_item.done", output_index=index, item=item))

        if req.tool_format is None and not await open_message():  # plain text: the message opens at once
            return
        scanner = ToolCallScanner(req.tool_format, req.tools) if req.tool_format is not None else None
        async for piece in self.generation:
            if piece.error:
                error = {"code": "server_error", "message": f"Generation failed: {piece.error}"}
                await send("response.failed", response=self._response(req, "failed", [], piece.usage, error))
                break
            text, calls = scanner.feed(piece.text) if scanner else (piece.text, [])
            if piece.finish_reason is not None and scanner:
                rest, more = scanner.finish()
                text, calls = text + rest, calls + more
            if (message is None or closed) and text and not text.strip():
                held += text  # blank text before any message: shown only if text follows
                text = ""
            if text:
                if message is None or closed:
                    if not await open_message():
                        return
                    text, held, closed = held + text, "", False
                parts.append(text)
                if not await send("response.output_text.delta", item_id=self.mid, output_index=message,
                                  content_index=0, delta=text, logprobs=[]):
                    return
            for call in calls:
                if not await emit_call(call):
                    return
            if piece.finish_reason is not None:
                status = "incomplete" if piece.finish_reason == "length" else "completed"
                if message is None and not any(i["type"] == "function_call" for i in items):
                    if not await open_message():  # no call and no text: the (blank) message after all
                        return
                    if held:
                        parts.append(held)
                        if not await send("response.output_text.delta", item_id=self.mid, output_index=message,
                                          content_index=0, delta=held, logprobs=[]):
                            return
                if message is not None and not closed and not await close_message(status):
                    return
                if not await send(f"response.{status}", response=self._response(req, status, items, piece.usage)):
                    return
        if not self.client_gone:
            self.finish()
