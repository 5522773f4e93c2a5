"""What every model server is to its callers: admission, generate/chat, usage history, state.

:class:`Backend` is the one type the API, the dashboard and notebooks talk to.
An :class:`~exo_lab.engine.generator.Engine` (one process) and an
:class:`~exo_lab.instance.Instance` (ranks on the cluster) both subclass it:
they only say how a queued :class:`Generation` reaches the model
(:meth:`Backend._enqueue`), whether it can take work now (:meth:`Backend._check_open`),
their batching counters and how they close.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from exo_lab.engine.chat import chat_prompt_tokens
from exo_lab.engine.generation import Chunk, EngineBusy, Generation, GenerationError, GenerationRequest, Usage
from exo_lab.engine.sampling import SamplingParams
from exo_lab.engine.trace import RankInfo, RawSpan, Recording, Trace, assemble, new_id, now_ns

log = logging.getLogger(__name__)

#: finished requests kept in ``Backend.usage_history``
USAGE_HISTORY = 256
#: finished traces kept in ``Backend.traces``
TRACE_HISTORY = 16
#: ``state`` values: ``ready`` takes requests; ``launching``, ``loading`` and ``replacing`` pass
#: (the API answers 503 with Retry-After); ``failed`` and ``stopped`` do not
STATES = ("launching", "loading", "ready", "replacing", "failed", "stopped")


class Backend(ABC):
    """A model that generates: ``submit`` a request, iterate the returned :class:`Generation`.

    Up to ``max_batch`` requests decode together and ``max_queue`` more wait;
    beyond that :meth:`submit` raises :class:`EngineBusy`.
    """

    #: what it does beyond plain generation: ``logprobs``, ``grammar`` (character automata), ``schema`` (llguidance),
    #: ``embeddings`` (:meth:`embed`)
    features: ClassVar[frozenset[str]] = frozenset()

    name: str
    created: int
    tokenizer: Any
    #: the model's directory (None for a backend without files)
    path: Path | None = None
    #: the longest sequence (prompt + output) the model takes; None when unknown
    context_length: int | None = None
    #: one of :data:`STATES`
    state: str = "ready"
    #: why the backend failed or stopped
    error: str | None = None

    def __init__(self, name: str, max_batch: int = 16, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.name = name
        self.created = int(time.time())
        self.max_batch = max_batch  # requests decoding together
        self.max_queue = max_queue  # more waiting; beyond that submit() raises EngineBusy
        self.usage_history: deque[tuple[float, Usage]] = deque(maxlen=USAGE_HISTORY)  # (unix time, usage)
        self.requests_completed = 0  # all finished requests, not only those still in the history
        self._pending = 0  # submitted, not finished
        self._lock = threading.RLock()
        self.traces: deque[Trace] = deque(maxlen=TRACE_HISTORY)  # the last recordings, oldest first
        self._recording = 0  # recordings in progress (the ranks trace while any is)
        self._trace_lock = threading.Lock()  # turning the ranks' tracing on and off

    # ---------------------------------------------------------------- what subclasses say
    @abstractmethod
    def _check_open(self) -> None:
        """Raise a RuntimeError (the API answers 503) when no request can be taken now."""

    @abstractmethod
    def _enqueue(self, gen: Generation) -> None:
        """Hand an admitted generation to whatever runs the model."""

    @property
    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Batching counters: ``decode_steps`` taken, ``peak_batch`` (most sequences in one step)."""

    @abstractmethod
    def close(self) -> None:
        """Stop taking requests and free the model."""

    def _on_finish(self, gen: Generation) -> None:  # noqa: B027  (an optional hook, empty by default)
        """Hook run (under the lock) when ``gen`` leaves: forget whatever tracks it."""

    def _trace_switch(self, on: bool, detail: bool = False) -> None:
        """Turn tracing on (clearing old spans; ``detail``: tensor all-reduces too) or off wherever this
        backend generates."""
        from exo_lab.engine.trace import TRACER

        TRACER.enable(on, detail)

    def _trace_collect(self, since_ns: int) -> list[tuple[RankInfo, list[RawSpan]]]:
        """Every rank's spans that ended since ``since_ns`` (coordinator clock), with its clock's offset."""
        from exo_lab.engine.trace import TRACER

        return [(RankInfo(0, 0, "local"), TRACER.since(since_ns))]

    def _trace_context(self) -> tuple[str, dict[str, float]]:
        """The plan described, and the cost model's decode seconds per component for it (none here)."""
        return "one process", {}

    # ---------------------------------------------------------------- admission
    def submit(self, request: GenerationRequest) -> Generation:
        """Queue ``request``; returns at once with a handle to iterate.

        Raises :class:`EngineBusy` when ``max_batch + max_queue`` requests are already in,
        and a RuntimeError when the backend is closed or failed.
        """
        self._check_open()
        with self._lock:
            if self._pending >= self.max_batch + self.max_queue:
                raise EngineBusy(
                    f"{self.name} is busy: {self._pending} requests are generating or queued "
                    f"(at most {self.max_batch} + {self.max_queue}); retry shortly"
                )
            self._pending += 1
        gen = Generation(request)
        self._enqueue(gen)
        return gen

    @property
    def pending(self) -> int:
        """Requests generating or waiting."""
        return self._pending

    def _finish(self, gen: Generation, final: Chunk, record: bool = False) -> None:
        """Push ``gen``'s final chunk (once) and free its place; ``record``: add its usage to the history."""
        with self._lock:
            if gen.done:
                return
            self._pending -= 1
            self._on_finish(gen)
            if record and final.usage is not None:
                self.usage_history.append((time.time(), final.usage))
                self.requests_completed += 1
            gen._push(final)
        if gen._traced is not None:  # its recording ends with it (collected on a thread of its own)
            threading.Thread(target=gen._end_trace, daemon=True, name="exo-lab-trace").start()

    # ---------------------------------------------------------------- tracing
    def trace_begin(self, label: str = "", detail: bool = False) -> Recording:
        """Start recording spans on every rank (see :mod:`exo_lab.engine.trace`); end with :meth:`trace_end`.

        ``detail``: also each in-layer all-reduce of a tensor group, apart from compute (an evaluation per
        all-reduce: it slows a tensor group's decode down; decided by the first of overlapping recordings).
        """
        with self._trace_lock:
            if self._recording == 0:
                self._trace_switch(True, detail)
            self._recording += 1
            return Recording(new_id(), label, now_ns())

    def trace_end(self, rec: Recording) -> Trace:
        """Collect ``rec``'s spans from every rank (clocks aligned), keep the trace in :attr:`traces`."""
        end = now_ns()
        try:
            per_rank = self._trace_collect(rec.start_ns)
        finally:
            with self._trace_lock:
                self._recording -= 1
                if self._recording == 0:
                    try:
                        self._trace_switch(False)
                    except Exception as exc:  # a rank gone: its tracer dies with it
                        log.debug("turning tracing off on %s: %s", self.name, exc)
        plan, predicted = self._trace_context()
        rec.trace = assemble(rec.id, self.name, rec.start_ns, end, per_rank, rec.label, plan, predicted, rec.started)
        with self._lock:
            self.traces.append(rec.trace)
        return rec.trace

    @contextmanager
    def trace(self, label: str = "", detail: bool = False) -> Iterator[Recording]:
        """``with backend.trace() as rec: ...``: every rank's spans while the block runs; ``rec.trace`` after.

        Requests of other callers that run meanwhile are in the trace too. ``detail``: see :meth:`trace_begin`.
        """
        rec = self.trace_begin(label, detail)
        try:
            yield rec
        finally:
            self.trace_end(rec)

    @property
    def last_trace(self) -> Trace | None:
        """The latest trace recorded, or None."""
        return self.traces[-1] if self.traces else None

    def find_trace(self, trace_id: str) -> Trace | None:
        """A kept trace by its id, or None."""
        return next((t for t in list(self.traces) if t.id == trace_id), None)

    def embed(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """Each prompt's embedding (:mod:`exo_lab.engine.embedding`), as ``embed`` requests queued with the
        others; backends with ``embeddings`` in :attr:`features` give them (blocking: call it off an event loop).

        Raises NotImplementedError for a backend without them, :class:`EngineBusy` when the queue is full and
        a RuntimeError when one fails.
        """
        if "embeddings" not in self.features:
            raise NotImplementedError(f"{type(self).__name__} does not compute embeddings")
        gens = [self.submit(GenerationRequest(tuple(p), max_tokens=1, embed=True)) for p in prompts]
        out = []
        for gen in gens:
            final = list(gen)[-1]
            if final.error or final.embedding is None:
                raise GenerationError(final.error or "no embedding came back")
            out.append(list(final.embedding))
        return out

    # ---------------------------------------------------------------- tokens
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt tokens for chat ``messages`` (raises ValueError on bad messages)."""
        return chat_prompt_tokens(self.tokenizer, messages)

    # ---------------------------------------------------------------- convenience
    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        trace: bool = False,
    ) -> Generation:
        """Generate from raw text (or token ids); returns a streaming handle.

        ``trace``: record every rank's spans while it runs; ``gen.trace`` (waits for it) once it is over.
        """
        tokens = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = GenerationRequest(
            tuple(tokens), max_tokens, SamplingParams(temperature, top_p, top_k, seed), tuple(stop), ignore_eos
        )
        if not trace:
            return self.submit(request)
        rec = self.trace_begin("generate")
        try:
            gen = self.submit(request)
        except BaseException:
            self.trace_end(rec)
            raise
        gen._traced = (self, rec)
        return gen

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Generation:
        """Generate a reply to chat ``messages``; same keywords as :meth:`generate`."""
        return self.generate(self.chat_tokens(messages), **kwargs)

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Yield text pieces as they are generated (raises on a failed generation)."""
        for chunk in self.generate(prompt, **kwargs):
            if chunk.error:
                raise RuntimeError(chunk.error)
            if chunk.text:
                yield chunk.text

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
