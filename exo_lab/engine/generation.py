"""What a generation is, whatever runs it: the request, its streamed chunks, and the handle to iterate.

:class:`Generation` is filled by a backend's thread (``_push``) and read by
anyone, synchronously or on an event loop; it can be cancelled from any thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from exo_lab.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: prompt tokens, limits, sampling and stop rules."""

    prompt_tokens: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    #: report each token's log-probability and this many most likely alternatives (None: no logprobs)
    logprobs: int | None = None
    #: what the output must follow: a :class:`~exo_lab.engine.guided.SchemaGrammar` (any JSON object, a JSON
    #: schema, a forced tool call), complete within ``max_tokens`` where it can be; or None
    grammar: Any = None
    #: compute the prompt's embedding instead of generating (the final chunk's ``embedding``)
    embed: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            raise ValueError("the prompt is empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")


@dataclass
class Usage:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    total_s: float = 0.0
    #: prompt tokens whose KV cache was reused from an earlier request (part of ``prompt_tokens``)
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives ``(id, text, logprob)``."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of output: new text (may be empty) and the token ids behind it.

    The last chunk has ``finish_reason`` (``stop``, ``length``, ``cancelled`` or
    ``error``) and ``usage``.
    """

    text: str
    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    stop_sequence: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    #: the prompt's embedding (the final chunk of an ``embed`` request)
    embedding: tuple[float, ...] | None = None


class GenerationError(RuntimeError):
    """Generation failed inside the engine."""


class EngineBusy(GenerationError):
    """Every decode slot and queue place is taken; retry later."""


class Generation:
    """Handle on a queued or running generation; iterate it for chunks."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self._events: queue.Queue[Chunk] = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self._traced: Any = None  # (backend, Recording) while a trace records this generation
        self._trace_done = threading.Event()

    # producer side (engine thread)
    def _push(self, chunk: Chunk) -> None:
        if chunk.finish_reason is not None:
            self.usage, self.finish_reason = chunk.usage, chunk.finish_reason
        self._events.put(chunk)
        if chunk.finish_reason is not None:
            self._done.set()
        with self._lock:
            wakers = list(self._wakers)
        for loop, event in wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop has closed
                pass

    # consumer side
    def cancel(self) -> None:
        """Stop generating; takes effect within one token. Chunks the engine made before it and the consumer has
        not read yet are dropped (a fast model runs ahead of a reader: once the tiny model had made 6 more tokens
        by the time a cancel from another thread returned); the last chunk says ``cancelled``, or why it ended
        first, with the usage of every token made."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _dropped(self, chunk: Chunk) -> bool:
        """Whether a chunk read now is one a cancel drops (not the last)."""
        return chunk.finish_reason is None and self._cancel.is_set()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            chunk = self._events.get()
            if self._dropped(chunk):
                continue
            yield chunk
            if chunk.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._lock:
            self._wakers.append((loop, wake))
        try:
            while True:
                try:
                    chunk = self._events.get_nowait()
                except queue.Empty:
                    await wake.wait()
                    wake.clear()
                    continue
                if self._dropped(chunk):
                    continue
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            with self._lock:
                self._wakers.remove((loop, wake))

    def _end_trace(self) -> None:
        """End the recording of a traced generation (its backend's ``trace_end``)."""
        backend, rec = self._traced
        try:
            backend.trace_end(rec)
        finally:
            self._trace_done.set()

    @property
    def trace(self) -> Any:
        """The :class:`~exo_lab.engine.trace.Trace` of a generation made with ``trace=True`` (waits until the
        generation is over and its spans are collected; None when it was not traced)."""
        if self._traced is None:
            return None
        self._done.wait()  # the trace ends with the generation
        self._trace_done.wait(60)
        return self._traced[1].trace

    def text(self) -> str:
        """Block until done; the whole generated text (raises on engine errors)."""
        parts = []
        for chunk in self:
            if chunk.error:
                raise GenerationError(chunk.error)
            parts.append(chunk.text)
        return "".join(parts)
