"""Tool calls: the model's call format, and parsing calls out of generated text.

The format comes from the tokenizer: mlx_lm infers a tool parser (and the
markers around a call) from the chat template, so real models (Qwen, Mistral,
Gemma, ...) are parsed as their templates write calls. A template that takes
``tools`` but has no markers (Llama 3.1 style) is read as a bare JSON object
``{"name", "arguments"|"parameters"}``. A template without tools gets the
Hermes format (see :mod:`exo_lab.engine.chat`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from exo_lab.engine.chat import HERMES_END, HERMES_START, template_renders_tools


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a tool call: between ``start`` and ``end`` markers (or as bare JSON)."""

    start: str | None
    end: str | None
    parse: Callable[[str, Any], Any]
    hermes: bool  # ``<tool_call>{"name", "arguments"}</tool_call>``: calls can be forced with a grammar


def _hermes_parse(text: str, tools: Any = None) -> Any:
    return json.loads(text.strip())


def tool_format(tokenizer: Any) -> ToolFormat:
    if template_renders_tools(tokenizer):
        if getattr(tokenizer, "has_tool_calling", False):
            parser = tokenizer.tool_parser
            hermes = tokenizer.tool_call_start == HERMES_START and getattr(parser, "__module__", "").endswith(
                "json_tools"
            )
            return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, parser, hermes)
        return ToolFormat(None, None, _hermes_parse, False)
    return ToolFormat(HERMES_START, HERMES_END, _hermes_parse, True)


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _as_calls(parsed: Any) -> list[dict[str, Any]]:
    """Parser output to OpenAI tool calls (``arguments`` as a JSON string)."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a tool call must be a JSON object")
        if isinstance(item.get("function"), dict):
            item = item["function"]
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("a tool call needs a 'name'")
        args = item.get("arguments", item.get("parameters", {}))
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append(
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}
        )
    return calls


class ToolCallScanner:
    """Feed generated text; get back the text to show and the tool calls found, as they complete.

    Text that might begin a call marker is held back, and a call's text is
    never shown. A call that does not parse is shown as text.
    """

    def __init__(self, fmt: ToolFormat, tools: Sequence[dict[str, Any]]) -> None:
        self.fmt = fmt
        self.tools = list(tools)
        self.names = set(tool_names(tools))
        self._buf = ""
        self._in_call = False
        self._bare: bool | None = None  # bare-JSON format: whether the output is a JSON call candidate
        self.calls: list[dict[str, Any]] = []

    def _parse(self, text: str) -> list[dict[str, Any]] | None:
        try:
            calls = _as_calls(self.fmt.parse(text, self.tools))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return None
        if self.fmt.start is None and not all(c["function"]["name"] in self.names for c in calls):
            return None
        return calls

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The text to show and the calls completed by ``text`` (see :meth:`scan` for their order)."""
        items = self.scan(text)
        return "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, dict)]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of generation: what is still held back."""
        items = self.scan_end()
        return "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, dict)]

    def scan(self, text: str) -> list[str | dict[str, Any]]:
        """Text to show (str) and completed calls (dict), in the order the model wrote them."""
        self._buf += text
        if self.fmt.start is None:
            if self._bare is None and self._buf.strip():
                self._bare = self._buf.lstrip().startswith(("{", "["))
            if self._bare is False:
                out, self._buf = self._buf, ""
                return [out]
            return []
        items: list[str | dict[str, Any]] = []
        start, end = self.fmt.start, self.fmt.end
        while True:
            if self._in_call:
                if not end:  # a call without an end marker runs to the end of the output
                    break
                i = self._buf.find(end)
                if i < 0:
                    break
                inner, self._buf = self._buf[:i], self._buf[i + len(end) :]
                self._in_call = False
                calls = self._parse(inner)
                if calls is None:
                    items.append(start + inner + end)
                else:
                    self.calls.extend(calls)
                    items.extend(calls)
                continue
            i = self._buf.find(start)
            if i >= 0:
                items.append(self._buf[:i])
                self._buf = self._buf[i + len(start) :]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buf, start)
            items.append(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            break
        return [i for i in items if i != ""]

    def scan_end(self) -> list[str | dict[str, Any]]:
        """The end of generation: what is still held back, as :meth:`scan` gives it."""
        buf, self._buf = self._buf, ""
        calls = None
        if self.fmt.start is None:
            calls = self._parse(buf) if self._bare else None
        elif self._in_call:
            self._in_call = False
            calls = self._parse(buf)  # some parsers read a call cut short by the token limit
            buf = self.fmt.start + buf
        if calls is not None:
            self.calls.extend(calls)
            return list(calls)
        return [buf] if buf else []


def _partial_suffix(buf: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0
