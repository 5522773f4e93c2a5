"""Single-process generation: one model, one worker thread, streamed tokens.

All MLX work for a model runs on the engine's own thread, so callers on an
event loop (a notebook kernel, the API server) are never blocked by it.
Requests are batched continuously (mlx_lm's ``BatchGenerator``): a request
joins the running batch at the next step and leaves it when it finishes or
is cancelled, so concurrent requests share decode steps. Up to ``max_batch``
decode together; up to ``max_queue`` more wait; beyond that ``submit``
raises :class:`EngineBusy`. Each request returns a :class:`Generation`
handle that can be iterated synchronously or asynchronously and cancelled
from any thread (effective within one token). Greedy output is the same
alone or batched.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm.generate  # noqa: F401  (import here, not on the engine thread: its module-level stream is thread-local)

from exo_lab.engine.chat import chat_prompt_tokens
from exo_lab.engine.sampling import SamplingParams, make_sampler
from exo_lab.engine.stopping import StopMatcher

log = logging.getLogger(__name__)
_parked = threading.Condition()  # closed engines' worker threads wait here forever


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


class GenerationError(RuntimeError):
    """Generation failed inside the engine."""


class EngineBusy(GenerationError):
    """Every decode slot and queue place is taken; retry later."""


@dataclass
class _Active:
    """A generation in the running batch (engine thread only)."""

    gen: Generation
    uid: int
    detok: Any
    stopper: StopMatcher
    usage: Usage
    start: float
    first: float = 0.0
    n: int = 0


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
        """Stop generating; takes effect within one token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            chunk = self._events.get()
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
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            with self._lock:
                self._wakers.remove((loop, wake))

    def text(self) -> str:
        """Block until done; the whole generated text (raises on engine errors)."""
        parts = []
        for chunk in self:
            if chunk.error:
                raise GenerationError(chunk.error)
            parts.append(chunk.text)
        return "".join(parts)


class Engine:
    """A model loaded with mlx_lm, generating on its own worker thread."""

    #: what this backend does beyond plain generation: logprobs, and output constrained by a grammar
    features = frozenset({"logprobs", "grammar"})

    def __init__(self, model: str | Path, name: str | None = None, max_batch: int = 16, max_queue: int = 256) -> None:
        from exo_lab.models import resolve

        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.path = resolve(model)
        self.name = name or str(model)
        self.created = int(time.time())
        self.max_batch = max_batch
        self.max_queue = max_queue
        #: decode steps taken, tokens they produced, and the most sequences one step decoded
        self.stats = {"decode_steps": 0, "decode_tokens": 0, "peak_batch": 0}
        self._pending = 0  # submitted and not finished
        self._pending_lock = threading.Lock()
        self._closing = False
        self.usage_history: deque[tuple[float, Usage]] = deque(maxlen=256)  # (unix time, usage) per request
        self.requests_completed = 0  # all of them, not only those still in the history
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"exo-lab-engine-{self.name}", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    # public API
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt tokens for chat ``messages`` (raises ValueError on bad messages)."""
        return chat_prompt_tokens(self.tokenizer, messages)

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue ``request``; returns at once with a handle to iterate.

        Raises :class:`EngineBusy` when ``max_batch + max_queue`` requests are already in.
        """
        if self._closing or self._closed.is_set():
            raise GenerationError("the engine is closed")
        with self._pending_lock:
            if self._pending >= self.max_batch + self.max_queue:
                raise EngineBusy(f"{self.name} is busy: {self._pending} requests are generating or queued "
                                 f"(at most {self.max_batch} + {self.max_queue}); retry shortly")
            self._pending += 1
        gen = Generation(request)
        self._queue.put(gen)
        return gen

    @property
    def pending(self) -> int:
        """Requests generating or waiting."""
        return self._pending

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

    def close(self) -> None:
        """Finish queued work, then free the model; later submissions fail."""
        if not self._closed.is_set():
            self._closing = True
            self._queue.put(None)
            self._closed.wait(timeout=30)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # worker thread
    def _run(self) -> None:
        try:
            from mlx_lm import load

            self.model, self.tokenizer, config = load(str(self.path), return_config=True)
            # materialise non-parameter arrays too (e.g. RoPE frequency tables): a lazy array made on
            # this thread's stream cannot be evaluated from another thread
            mx.eval([v for m in self.model.modules() for v in [*vars(m).values(), *m.values()]
                     if isinstance(v, mx.array)])
            self.config = config
            self.context_length = config.get("max_position_embeddings")
            self.eos_ids = set(self.tokenizer.eos_token_ids)
            self.stream = mx.new_stream(mx.default_device())
        except BaseException as exc:  # reported to the constructor's caller
            self._load_error = exc
            self._loaded.set()
            self._release()
        self._loaded.set()
        self._batch: Any = None
        active: dict[int, _Active] = {}
        closing = False
        while True:
            closing = self._take_new(active, block=not active and not closing) or closing
            if closing and not active:
                if self._batch is not None:
                    self._batch.close()
                self._release()
                return
            if active:
                self._step(active)

    # ---------------------------------------------------------------- batching (engine thread)
    def _take_new(self, active: dict[int, _Active], block: bool) -> bool:
        """Move queued requests into the batch; True once ``close()`` was asked for."""
        while True:
            try:
                gen = self._queue.get(block=block)
            except queue.Empty:
                return False
            block = False
            if gen is None:
                return True
            if gen.cancelled:
                self._finish(gen, Chunk("", finish_reason="cancelled", usage=Usage(len(gen.request.prompt_tokens))))
                continue
            try:
                self._admit(gen, active)
            except Exception as exc:
                log.exception("generation %s could not start", gen.request.id)
                self._finish(gen, Chunk("", finish_reason="error", error=f"{type(exc).__name__}: {exc}", usage=Usage()))

    def _admit(self, gen: Generation, active: dict[int, _Active]) -> None:
        from mlx_lm.generate import BatchGenerator

        req = gen.request
        if self._batch is None:
            self._batch = BatchGenerator(self.model, max_tokens=256, completion_batch_size=self.max_batch,
                                         prefill_batch_size=min(8, self.max_batch), stream=self.stream)
        processors: list = []
        sampler = make_sampler(req.sampling)
        if req.grammar is not None:  # the constraint masks the logits, then picks the token to keep
            from exo_lab.engine.guided import SchemaConstraint, vocabulary

            vocab = vocabulary(self.tokenizer, int(self.config.get("vocab_size") or len(self.tokenizer._tokenizer)))
            constraint = SchemaConstraint(req.grammar, vocab, req.max_tokens)
            processors, sampler = [constraint], constraint.sampler(sampler)
        (uid,) = self._batch.insert([list(req.prompt_tokens)], max_tokens=[req.max_tokens],
                                    samplers=[sampler], logits_processors=[processors])
        active[uid] = _Active(gen, uid, self.tokenizer.detokenizer, StopMatcher(req.stop),
                              Usage(prompt_tokens=len(req.prompt_tokens)), time.perf_counter())

    def _step(self, active: dict[int, _Active]) -> None:
        """One decode step for the whole batch (joining prompts are prefilled as part of it)."""
        for uid in [u for u, a in active.items() if a.gen.cancelled]:
            self._batch.remove([uid])
            self._complete(active.pop(uid), "cancelled")
        if not active:
            return
        try:
            responses = self._batch.next_generated()
        except Exception as exc:  # the batch is unusable: fail what it held, start afresh
            log.exception("batch step failed")
            for a in active.values():
                self._finish(a.gen, Chunk("", finish_reason="error", error=f"{type(exc).__name__}: {exc}", usage=Usage()))
            active.clear()
            self._batch = None
            return
        if not responses:  # the batch holds nothing, so these were lost: never leave a caller waiting
            for a in active.values():
                self._finish(a.gen, Chunk("", finish_reason="error", error="the batch lost this request",
                                          usage=Usage()))
            active.clear()
            return
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(responses)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(responses))
        now = time.perf_counter()
        for r in responses:
            a = active.get(r.uid)
            if a is None:
                continue
            finish = self._on_token(a, r.token, r.logprobs, now)
            if finish is None and r.finish_reason is not None:
                finish = "length"  # the batch stopped it at max_tokens
            if finish is not None:
                if r.finish_reason is None:
                    self._batch.remove([r.uid])
                self._complete(active.pop(r.uid), finish)

    def _on_token(self, a: _Active, token: int, logprobs: mx.array, now: float) -> str | None:
        """Stream one new token of ``a``; the finish reason if it ends here."""
        gen, req = a.gen, a.gen.request
        if a.n == 0:
            a.first = now
            a.usage.ttft_s = now - a.start
        a.n += 1
        if gen.cancelled:
            return "cancelled"
        if token in self.eos_ids and not req.ignore_eos:
            return "stop"
        lp = (self._logprob(token, logprobs, req.logprobs),) if req.logprobs is not None else ()
        a.detok.add_token(token)
        text, hit = a.stopper.feed(a.detok.last_segment)
        if hit:
            if text or lp:
                gen._push(Chunk(text, (token,), logprobs=lp))
            return "stop"
        gen._push(Chunk(text, (token,), logprobs=lp))
        return None

    def _complete(self, a: _Active, finish: str) -> None:
        """Flush held text, then the final chunk with usage."""
        gen, stopper, detok = a.gen, a.stopper, a.detok
        if finish in ("length", "stop") and stopper.matched is None:
            detok.finalize()
            tail, hit = stopper.feed(detok.last_segment)
            tail += "" if hit else stopper.flush()
            if tail:
                gen._push(Chunk(tail))
        end = time.perf_counter()
        usage, n = a.usage, a.n
        usage.completion_tokens = n
        usage.prompt_tps = usage.prompt_tokens / usage.ttft_s if usage.ttft_s else 0.0
        usage.generation_tps = (n - 1) / (end - a.first) if n > 1 and end > a.first else 0.0
        usage.total_s = end - a.start
        self.usage_history.append((time.time(), usage))
        self.requests_completed += 1
        self._finish(gen, Chunk("", finish_reason=finish, usage=usage, stop_sequence=stopper.matched))

    def _finish(self, gen: Generation, final: Chunk) -> None:
        with self._pending_lock:
            self._pending -= 1
        gen._push(final)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprob(self, token: int, logprobs: mx.array, top: int) -> TokenLogprob:
        """``token``'s log-probability and the ``top`` most likely tokens at its step."""
        import numpy as np

        values = np.array(logprobs.astype(mx.float32))
        alternatives: tuple[tuple[int, str, float], ...] = ()
        if top:
            ids = np.argpartition(-values, top - 1)[:top]
            ids = ids[np.argsort(-values[ids], kind="stable")]
            alternatives = tuple((int(i), self._token_text(int(i)), float(values[i])) for i in ids)
        return TokenLogprob(token, self._token_text(token), float(values[token]), alternatives)

    def _release(self) -> None:
        """Drop the model and park this thread for good.

        A thread that ran MLX work and then exits makes the process abort at
        exit now and then ("terminate called without an active exception");
        a parked daemon thread does not, so the worker never returns.
        """
        self.model = None
        mx.synchronize()
        mx.clear_cache()
        self._closed.set()
        while True:
            with _parked:
                _parked.wait()
