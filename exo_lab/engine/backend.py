"""What every model server is to its callers: admission, generate/chat, usage history, state.

:class:`Backend` is the one type the API, the dashboard and notebooks talk to.
An :class:`~exo_lab.engine.generator.Engine` (one process) and an
:class:`~exo_lab.instance.Instance` (ranks on the cluster) both subclass it:
they only say how a queued :class:`Generation` reaches the model
(:meth:`Backend._enqueue`), whether it can take work now (:meth:`Backend._check_open`),
their batching counters and how they close.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from exo_lab.engine.chat import chat_prompt_tokens
from exo_lab.engine.generation import Chunk, EngineBusy, Generation, GenerationError, GenerationRequest, Usage
from exo_lab.engine.sampling import SamplingParams

#: finished requests kept in ``Backend.usage_history``
USAGE_HISTORY = 256
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
    ) -> Generation:
        """Generate from raw text (or token ids); returns a streaming handle."""
        tokens = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.submit(
            GenerationRequest(
                tuple(tokens), max_tokens, SamplingParams(temperature, top_p, top_k, seed), tuple(stop), ignore_eos
            )
        )

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
