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

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from exo_lab.api import common
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.fields import get_bool, get_float, get_int, get_str
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.tools import ToolCallScanner, ToolFormat, tool_format
from exo_lab.engine.generator import GenerationRequest, Usage

ROLES = ("user", "assistant")


@dataclass
class MessagesRequest:
    model: str
    backend: Backend
    generation: GenerationRequest
    stream: bool
    tools: list[dict[str, Any]] = field(default_factory=list)  # as OpenAI function tools
    tool_format: ToolFormat | None = None  # None: calls are not parsed


def _blocks_text(content: Any, where: str) -> str:
    """The text of ``content``: a string or a list of content blocks (text only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: Input should be a valid string or a list of content blocks.", where)
    parts = []
    for i, block in enumerate(content):
        at = f"{where}.{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad_request(f"{at}: each content block must be an object with a 'type'.", at)
        kind = block["type"]
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{at}.text: Field required (a string).", f"{at}.text")
            parts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning is not sent back to the model
        else:
            raise bad_request(f"{at}.type: content blocks of type {kind!r} are not supported: this model takes text only.",
                              f"{at}.type")
    return "".join(parts)


def _system_text(system: Any) -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return _blocks_text(system, "system")
    raise bad_request("system: Input should be a valid string or a list of text blocks.", "system")


def _tool_result_text(block: dict[str, Any], at: str) -> str:
    content = block.get("content", "")
    text = content if isinstance(content, str) else _blocks_text(content, f"{at}.content")
    return ("Error: " + text) if block.get("is_error") else text


def _message(m: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages (tool results become ``tool`` messages, ahead of any text)."""
    if not isinstance(m, dict):
        raise bad_request(f"{where}: Input should be a valid dictionary.", where)
    role = m.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role: Input should be 'user' or 'assistant', got {role!r}.", f"{where}.role")
    if "content" not in m:
        raise bad_request(f"{where}.content: Field required.", f"{where}.content")
    content = m["content"]
    if not isinstance(content, list):
        return [{"role": role, "content": _blocks_text(content, f"{where}.content")}]
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.content.{i}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise bad_request(f"{at}: a tool_use block needs a 'name' and an object 'input'.", at)
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block["name"], "arguments": block.get("input", {})}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{at}.tool_use_id: Field required.", f"{at}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _tool_result_text(block, at)})
        else:
            texts.append(block)
    text = _blocks_text(texts, f"{where}.content") if texts else ""
    out = list(results)
    if calls:
        out.append({"role": role, "content": text, "tool_calls": calls})
    elif text or not results:
        out.append({"role": role, "content": text})
    return out


def chat_messages(data: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation as chat messages, and the prefill (a final assistant text message), validated."""
    messages = data.get("messages")
    if messages is None:
        raise bad_request("messages: Field required.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad_request("messages: Input should be a valid list.", "messages", "invalid_type")
    if not messages:
        raise bad_request("messages: at least one message is required.", "messages")
    out: list[dict[str, Any]] = []
    system = _system_text(data.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        out.extend(_message(m, f"messages.{i}"))
    prefill = None
    if len(out) > 1 and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
        prefill = out.pop()["content"].rstrip()
    if not any(m["role"] in ("user", "tool") for m in out):
        raise bad_request("messages: the conversation needs at least one user message.", "messages")
    return out, prefill


def parse_tools(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic ``tools`` as OpenAI function tools (what chat templates take)."""
    tools = data.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools: Input should be a valid list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"{at}.name: Field required.", f"{at}.name")
        if tool.get("type") not in (None, "custom"):
            raise bad_request(f"{at}.type: server tools ({tool['type']!r}) are not available here; "
                              "define client tools with 'name' and 'input_schema'.", f"{at}.type")
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad_request(f"{at}.input_schema: Input should be a valid dictionary.", f"{at}.input_schema")
        fn = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def parse_tool_choice(data: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """``(mode, name)`` as for OpenAI: ``auto``, ``required`` (Anthropic's ``any``), ``function``, ``none``."""
    choice = data.get("tool_choice")
    if choice is None:
        return ("auto" if tools else "none"), None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad_request("tool_choice: Input should be an object with type 'auto', 'any', 'tool' or 'none'.",
                          "tool_choice")
    kind = choice["type"]
    if kind in ("any", "tool") and not tools:
        raise bad_request(f"tool_choice: '{kind}' needs tools.", "tool_choice")
    if kind == "tool":
        name = choice.get("name")
        if name not in [t["function"]["name"] for t in tools]:
            raise bad_request(f"tool_choice.name: {name!r} is not among the tools.", "tool_choice.name")
        return "function", name
    return {"auto": "auto", "any": "required", "none": "none"}[kind], None


def _prompt(backend: Backend, messages: list[dict[str, Any]], prefill: str | None,
            tools: list[dict[str, Any]] | None = None) -> list[int]:
    prompt = common.chat_tokens(backend, messages, tools)
    if prefill:
        prompt += list(backend.tokenizer.encode(prefill, add_special_tokens=False))
    return prompt


def _stop_sequences(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("stop_sequences")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("stop_sequences: Input should be a valid list of strings.", "stop_sequences")
    return tuple(s for s in value if s)


def parse_messages_request(data: dict[str, Any], registry: ModelRegistry) -> MessagesRequest:
    model = get_str(data, "model")
    if data.get("max_tokens") is None:
        raise bad_request("max_tokens: Field required.", "max_tokens", "missing_required_parameter")
    max_tokens = get_int(data, "max_tokens", None, minimum=1)
    messages, prefill = chat_messages(data)
    temperature = get_float(data, "temperature", 1.0, 0.0, 1.0)
    top_p = get_float(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("top_p: must be greater than 0.", "top_p")
    top_k = get_int(data, "top_k", 0, minimum=0)
    stop = _stop_sequences(data)
    stream = get_bool(data, "stream", False)
    tools = parse_tools(data)
    mode, forced = parse_tool_choice(data, tools)
    backend = common.ready_backend(registry, model)
    fmt = tool_format(backend.tokenizer) if tools and mode != "none" else None
    grammar = None
    if fmt is not None and fmt.hermes and mode in ("required", "function") and not prefill:
        grammar = common.forced_tool_grammar(tools, forced)
    prompt = _prompt(backend, messages, prefill, tools)
    request = common.generation_request(backend, prompt, max_tokens, common.sampling_params(temperature, top_p, top_k),
                                        stop, grammar=grammar, grammar_param="tool_choice")
    return MessagesRequest(model, backend, request, stream, tools, fmt)


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style parsed call as an Anthropic ``tool_use`` block."""
    try:
        args = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError:
        args = {"arguments": call["function"]["arguments"]}
    if not isinstance(args, dict):
        args = {"value": args}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call["function"]["name"], "input": args}


def stop_reason(finish: str | None, stop_sequence: str | None, tool_use: bool = False) -> str:
    if tool_use:
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def anthropic_usage(usage: Usage | None, output: bool = True) -> dict[str, Any]:
    u = usage or Usage()
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens if output else 0,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


class AnthropicHandler(ApiHandler):
    family = "anthropic"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("request-id", f"req_{uuid.uuid4().hex[:24]}")


class MessagesHandler(AnthropicHandler):
    """``POST /v1/messages``."""

    async def post(self) -> None:
        try:
            req = parse_messages_request(self.json_body(), self.registry)
            self.generation = common.submit(req.backend, req.generation)
        except ApiError as err:
            self.send_api_error(err)
            return
        if self.client_gone:
            self.generation.cancel()
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if req.stream:
            await self._stream(req, mid)
        else:
            await self._complete(req, mid)

    def _message(self, req: MessagesRequest, mid: str, content: list, reason: str | None, seq: str | None,
                 usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": mid, "type": "message", "role": "assistant", "model": req.model, "content": content,
                "stop_reason": reason, "stop_sequence": seq, "usage": usage}

    async def _complete(self, req: MessagesRequest, mid: str) -> None:
        out = await common.collect(self.generation)
        if self.client_gone:
            return
        if out.error:
            self.send_api_error(ApiError(500, f"Generation failed: {out.error}", type="server_error"))
            return
        text, calls = out.text, []
        if req.tool_format is not None:
            scanner = ToolCallScanner(req.tool_format, req.tools)
            shown, _ = scanner.feed(out.text)
            rest, _ = scanner.finish()
            text, calls = shown + rest, scanner.calls
        content = [{"type": "text", "text": text}] if text and (text.strip() or not calls) else []
        content += [tool_use_block(c) for c in calls]
        self.send_json(self._message(req, mid, content, stop_reason(out.finish_reason, out.stop_sequence, bool(calls)),
                                     out.stop_sequence, anthropic_usage(out.usage)))

    async def _stream(self, req: MessagesRequest, mid: str) -> None:
        """``message_start``, then content blocks (text, and ``tool_use`` for each parsed call), then the end.

        Without tools the text block opens at once (before ``ping``); with tools
        it opens at the first text, so a reply that is only a call has no empty text block.
        """
        self.start_sse()
        usage = anthropic_usage(Usage(prompt_tokens=len(req.generation.prompt_tokens)), output=False)
        scanner = ToolCallScanner(req.tool_format, req.tools) if req.tool_format is not None else None
        index = -1
        text_open = False
        held = ""  # blank text ahead of a possible tool call: shown only if real text follows

        async def open_text() -> bool:
            nonlocal index, text_open
            index += 1
            text_open = True
            return await self.send_sse({"type": "content_block_start", "index": index,
                                        "content_block": {"type": "text", "text": ""}}, event="content_block_start")

        async def close_block() -> bool:
            nonlocal text_open
            text_open = False
            return await self.send_sse({"type": "content_block_stop", "index": index}, event="content_block_stop")

        async def emit(text: str, calls: list[dict[str, Any]], final: bool = False) -> bool:
            nonlocal index, held
            if scanner is not None and not text_open:
                text, held = held + text, ""
                if text and not text.strip() and not (final and not calls and index < 0):
                    held, text = text, ""
            if text:
                if not text_open and not await open_text():
                    return False
                delta = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
                if not await self.send_sse(delta, event="content_block_delta"):
                    return False
            for call in calls:
                if text_open and not await close_block():
                    return False
                block = tool_use_block(call)
                index += 1
                start = {"type": "content_block_start", "index": index,
                         "content_block": {**block, "input": {}}}
                delta = {"type": "content_block_delta", "index": index,
                         "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}
                for name, data in (("content_block_start", start), ("content_block_delta", delta)):
                    if not await self.send_sse(data, event=name):
                        return False
                if not await close_block():
                    return False
            return True

        if not await self.send_sse({"type": "message_start", "message": self._message(req, mid, [], None, None, usage)},
                                   event="message_start"):
            return
        if scanner is None and not await open_text():
            return
        if not await self.send_sse({"type": "ping"}, event="ping"):
            return
        used_tools = False
        async for piece in self.generation:
            if piece.error:
                err = ApiError(500, f"Generation failed: {piece.error}", type="server_error")
                await self.send_sse(err.anthropic(), event="error")
                break
            text, calls = scanner.feed(piece.text) if scanner else (piece.text, [])
            if piece.finish_reason is not None and scanner:
                rest, more = scanner.finish()
                text, calls = text + rest, calls + more
            used_tools = used_tools or bool(calls)
            if not await emit(text, calls, final=piece.finish_reason is not None and not used_tools):
                return
            if piece.finish_reason is not None:
                if index < 0 and not await open_text():  # an empty reply still has its (empty) text block
                    return
                if text_open and not await close_block():
                    return
                reason = stop_reason(piece.finish_reason, piece.stop_sequence, used_tools)
                tail = [
                    ("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": reason, "stop_sequence": piece.stop_sequence},
                                       "usage": anthropic_usage(piece.usage)}),
                    ("message_stop", {"type": "message_stop"}),
                ]
                for name, data in tail:
                    if not await self.send_sse(data, event=name):
                        return
        if not self.client_gone:
            self.finish()


class CountTokensHandler(AnthropicHandler):
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` for a Messages request."""

    def post(self) -> None:
        try:
            data = self.json_body()
            model = get_str(data, "model")
            messages, prefill = chat_messages(data)
            tools = parse_tools(data)
            backend = common.ready_backend(self.registry, model)
            n = len(_prompt(backend, messages, prefill, tools))
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json({"input_tokens": n})
