"""One typed event stream under every API family: reasoning and text deltas, parsed tool calls, then one final event.

:func:`events` turns a backend's :class:`~exo_lab.engine.generation.Generation`
into these events, telling a thinking model's reasoning from its answer (when the
model thinks, :mod:`exo_lab.api.reasoning`) and running the tool-call scanner on
the answer once per request (when the request has tools), so no family parses
either itself. A non-streaming answer is the same stream gathered by :func:`collect`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_lab.api.reasoning import ANSWER, ReasoningParsing
from exo_lab.api.tools import ToolCallScanner, ToolFormat
from exo_lab.engine.generation import Chunk, TokenLogprob, Usage


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: its id, the function's name and the arguments as JSON text."""

    id: str
    name: str
    arguments: str

    @classmethod
    def from_openai(cls, call: dict[str, Any]) -> ToolCall:
        """From ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return cls(
            call.get("id") or f"call_{uuid.uuid4().hex[:24]}", call["function"]["name"], call["function"]["arguments"]
        )

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def input(self) -> dict[str, Any]:
        """The arguments as an object (what Anthropic and Ollama send); text that is not one is wrapped."""
        try:
            args = json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            return {"arguments": self.arguments}
        return args if isinstance(args, dict) else {"value": args}


@dataclass(frozen=True)
class TextDelta:
    """New text to show (never part of a tool call), with its tokens' logprobs when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """New reasoning text (a thinking model's thoughts, never part of the answer)."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete tool call; ``index`` counts the calls of this reply from 0."""

    call: ToolCall
    index: int


@dataclass(frozen=True)
class Final:
    """The end: why it stopped (``stop``, ``length``, ``cancelled``, ``error``), usage, and what it held.

    ``error`` is set when generation failed (the text so far is then not a reply).
    """

    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None
    error: str | None = None
    tokens: tuple[int, ...] = ()  # every token generated
    tool_calls: int = 0  # calls parsed
    reasoning_tokens: int = 0  # tokens generated while the model was reasoning

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


Event = TextDelta | ReasoningDelta | ToolCallEvent | Final


@dataclass(frozen=True)
class ToolParsing:
    """How a request's tool calls are found in the output: the model's format and the tools offered."""

    format: ToolFormat
    tools: Sequence[dict[str, Any]]


async def events(
    chunks: AsyncIterable[Chunk], tools: ToolParsing | None = None, reasoning: ReasoningParsing | None = None
) -> AsyncGenerator[Event, None]:
    """The events of one generation; always ends with exactly one :class:`Final`."""
    scanner = ToolCallScanner(tools.format, tools.tools) if tools is not None else None
    splitter = reasoning.splitter() if reasoning is not None else None
    tokens: list[int] = []
    calls = thought = 0
    async for chunk in chunks:
        if chunk.error:
            yield Final(
                "error", chunk.usage or Usage(), chunk.stop_sequence, chunk.error, tuple(tokens), calls, thought
            )
            return
        tokens.extend(chunk.tokens)
        pieces = [(ANSWER, chunk.text)]
        if splitter is not None:
            was = splitter.reasoning
            pieces = splitter.feed(chunk.text)
            if chunk.finish_reason is not None:
                pieces += splitter.finish()
            if was or splitter.reasoning:  # the chunk's tokens were thought (the closing tag's too)
                thought += len(chunk.tokens)
        items: list[Any] = []
        for kind, text in pieces:
            if kind != ANSWER:
                items.append(ReasoningDelta(text))
            else:
                items += scanner.scan(text) if scanner else [text]
        if chunk.finish_reason is not None and scanner:
            items += scanner.scan_end()
        logprobs = chunk.logprobs  # they go with the chunk's first text (or alone, when it shows none)
        for item in items:
            if isinstance(item, ReasoningDelta):
                if item.text:
                    yield item
            elif isinstance(item, dict):
                yield ToolCallEvent(ToolCall.from_openai(item), calls)
                calls += 1
            elif item or logprobs:
                yield TextDelta(item, logprobs)
                logprobs = ()
        if logprobs:
            yield TextDelta("", logprobs)
        if chunk.finish_reason is not None:
            yield Final(
                chunk.finish_reason, chunk.usage or Usage(), chunk.stop_sequence, None, tuple(tokens), calls, thought
            )
            return
    yield Final("error", error="generation produced nothing", tokens=tuple(tokens), tool_calls=calls)


@dataclass
class Collected:
    """A whole reply, gathered for a non-streaming answer."""

    text: str
    tool_calls: list[ToolCall]
    logprobs: list[TokenLogprob]
    final: Final
    reasoning: str = ""


async def collect(stream: AsyncIterable[Event]) -> Collected:
    """Gather ``stream`` (from :func:`events`) into one reply."""
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] = []
    final = Final("error", error="generation produced nothing")
    async for event in stream:
        if isinstance(event, TextDelta):
            parts.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, ReasoningDelta):
            thoughts.append(event.text)
        elif isinstance(event, ToolCallEvent):
            calls.append(event.call)
        else:
            final = event
    return Collected("".join(parts), calls, logprobs, final, "".join(thoughts))
