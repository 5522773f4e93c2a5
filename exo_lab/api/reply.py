"""One family's answer to one validated request, built from the event stream, with no HTTP state.

A family module turns a request body into a :class:`Reply` (which backend,
what to generate, how to find tool calls) and says how events become its
JSON answer (:meth:`Reply.complete`) or its stream (:meth:`Reply.frames`).
:class:`~exo_lab.api.base.GenerationHandler` does the rest the same way for all.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from exo_lab.api.errors import ApiError
from exo_lab.api.events import Collected, Event, ToolParsing
from exo_lab.api.reasoning import ReasoningParsing
from exo_lab.engine.backend import Backend
from exo_lab.engine.generation import GenerationRequest

#: one piece of a stream: ``(SSE event name or None, data)``; NDJSON streams ignore the name
Frame = tuple[str | None, Any]


@dataclass
class Reply:
    """What to generate for one request, and how to answer it."""

    #: ``sse`` (``event:``/``data:`` lines) or ``ndjson`` (one JSON object a line)
    framing: ClassVar[str] = "sse"

    model: str  # as the client named it
    backend: Backend
    request: GenerationRequest | None  # None: answered without generating (see :meth:`immediate`)
    stream: bool
    tools: ToolParsing | None = None  # None: tool calls are not looked for
    reasoning: ReasoningParsing | None = None  # None: the output is all answer (the model does not think)
    show_reasoning: bool = True  # False: reasoning is told apart but not shown (the client did not ask for it)

    @property
    def prompt_tokens(self) -> tuple[int, ...]:
        return self.request.prompt_tokens if self.request is not None else ()

    def immediate(self) -> dict[str, Any]:
        """The answer to a request that generates nothing."""
        raise NotImplementedError

    def complete(self, out: Collected) -> dict[str, Any]:
        """The whole answer, from the collected events (``out.final.error`` is None here)."""
        raise NotImplementedError

    def frames(self, events: AsyncIterator[Event]) -> AsyncGenerator[Frame, None]:
        """The streamed answer; a failed generation ends it with the family's error frame."""
        raise NotImplementedError

    def failure(self, error: str) -> ApiError:
        """The error answer when generation fails before a non-streamed reply."""
        return ApiError(500, f"Generation failed: {error}", type="server_error")
