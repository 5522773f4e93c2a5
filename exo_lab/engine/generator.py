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
alone or batched. Finished requests leave their KV caches in a prefix cache
(:mod:`exo_lab.engine.prefix_cache`, ``prefix_cache_bytes``, 0 for none): a
prompt that starts like an earlier request's tokens prefills only the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx_lm.generate  # noqa: F401  (import here, not on the engine thread: its module-level stream is thread-local)

from exo_lab import defaults
from exo_lab.engine.backend import Backend
from exo_lab.engine.embedding import embed_tokens
from exo_lab.engine.generation import (  # noqa: F401  (re-exported: the request types' old home)
    Chunk,
    EngineBusy,
    Generation,
    GenerationError,
    GenerationRequest,
    TokenLogprob,
    Usage,
)
from exo_lab.engine.prefix_cache import DEFAULT_BYTES, PrefixCache
from exo_lab.engine.sampling import make_penalties, make_sampler
from exo_lab.engine.stopping import StopMatcher
from exo_lab.engine.trace import TRACER

log = logging.getLogger(__name__)
_parked = threading.Condition()  # closed engines' worker threads wait here forever


class _Guard:
    """Catches what one generation's sampler and logits processors raise inside the shared batch step.

    The batch goes on (the row's value that step is a stand-in: its logits unchanged, their argmax) and
    the engine then ends that generation alone with :attr:`error`.
    """

    def __init__(self) -> None:
        self.error: str | None = None

    def _failed(self, exc: Exception) -> None:
        if self.error is None:
            log.exception("a generation's sampling failed")
            self.error = f"{type(exc).__name__}: {exc}"

    def sampler(self, sample: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
        def guarded(logprobs: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return sample(logprobs)
                except Exception as exc:
                    self._failed(exc)
            return mx.argmax(logprobs, axis=-1)

        return guarded

    def processor(self, process: Callable[[mx.array, mx.array], mx.array]) -> Callable[[mx.array, mx.array], mx.array]:
        def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return process(tokens, logits)
                except Exception as exc:
                    self._failed(exc)
            return logits

        return guarded


@dataclass
class _Active:
    """A generation in the running batch (engine thread only)."""

    gen: Generation
    uid: int
    detok: Any
    stopper: StopMatcher
    usage: Usage
    start: float
    guard: _Guard
    first: float = 0.0
    n: int = 0
    key: int = 0  # its prefix cache key


class Engine(Backend):
    """A model loaded with mlx_lm, generating on its own worker thread."""

    #: what this backend does beyond plain generation: logprobs, and output constrained by a grammar
    features = frozenset({"logprobs", "grammar", "embeddings"})

    #: the mlx_lm model (an ``nn.Module`` used through its dynamic attributes); None once released
    model: Any
    #: the model's config.json
    config: dict[str, Any]

    def __init__(
        self,
        model: str | Path,
        name: str | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        prefix_cache_bytes: int = DEFAULT_BYTES,
    ) -> None:
        from exo_lab.models import resolve

        super().__init__(name or str(model), max_batch, max_queue)
        self.path = resolve(model)
        #: KV caches of finished requests, reused for a new prompt's longest common prefix (engine thread only)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._keys = 0
        #: decode steps taken, tokens they produced, and the most sequences one step decoded
        self._stats = {"decode_steps": 0, "decode_tokens": 0, "peak_batch": 0}
        self._closing = False
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
    @property
    def stats(self) -> dict[str, int]:
        return self._stats

    def _check_open(self) -> None:
        if self._closing or self._closed.is_set():
            raise GenerationError("the engine is closed")

    def _enqueue(self, gen: Generation) -> None:
        self._queue.put(gen)

    def close(self) -> None:
        """Finish queued work, then free the model; later submissions fail."""
        if not self._closed.is_set():
            self._closing = True
            self.state = "stopped"
            self._queue.put(None)
            self._closed.wait(timeout=30)

    def __enter__(self) -> Engine:
        return self

    # worker thread
    def _run(self) -> None:
        try:
            from mlx_lm import load

            # mlx_lm's stub has no overload for return_config=True: it returns (model, tokenizer, config)
            self.model, self.tokenizer, config = cast(
                "tuple[Any, Any, dict[str, Any]]", load(str(self.path), return_config=True)
            )
            # materialise non-parameter arrays too (e.g. RoPE frequency tables): a lazy array made on
            # this thread's stream cannot be evaluated from another thread
            mx.eval(
                [v for m in self.model.modules() for v in [*vars(m).values(), *m.values()] if isinstance(v, mx.array)]
            )
            self.config = config
            self.context_length = config.get("max_position_embeddings")
            self.eos_ids = set(self.tokenizer.eos_token_ids)
            self.mlx_stream = mx.new_stream(mx.default_device())
            if self.prefix_cache.enabled:
                from mlx_lm.models.cache import make_prompt_cache

                self.prefix_cache.check(make_prompt_cache(self.model))
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
                if gen.request.embed:  # an embedding, between decode steps: it never joins the batch
                    vector = embed_tokens(self.model, gen.request.prompt_tokens)
                    usage = Usage(prompt_tokens=len(gen.request.prompt_tokens))
                    self._finish(gen, Chunk("", finish_reason="stop", usage=usage, embedding=tuple(vector)))
                    continue
                with TRACER.span("admit", prompt_tokens=len(gen.request.prompt_tokens)):
                    self._admit(gen, active)
            except Exception as exc:
                log.exception("generation %s could not start", gen.request.id)
                self._finish(gen, Chunk("", finish_reason="error", error=f"{type(exc).__name__}: {exc}", usage=Usage()))

    def _admit(self, gen: Generation, active: dict[int, _Active]) -> None:
        from mlx_lm.generate import BatchGenerator

        req = gen.request
        if self._batch is None:
            self._batch = BatchGenerator(
                self.model,
                max_tokens=256,
                completion_batch_size=self.max_batch,
                prefill_batch_size=min(8, self.max_batch),
                prefill_step_size=defaults.prefill_step(1, self.mlx_stream.device == mx.gpu),
                stream=self.mlx_stream,
            )
        penalties = make_penalties(req.sampling, req.prompt_tokens)  # bias and penalties, before any grammar
        processors: list = [penalties] if penalties is not None else []
        sampler = make_sampler(req.sampling)
        if req.grammar is not None:  # the constraint masks the logits, then picks the token to keep
            from exo_lab.engine.guided import SchemaConstraint, vocabulary

            vocab = vocabulary(self.tokenizer, int(self.config.get("vocab_size") or len(self.tokenizer._tokenizer)))
            constraint = SchemaConstraint(req.grammar, vocab, req.max_tokens)
            processors, sampler = [*processors, constraint], constraint.sampler(sampler)
        guard = _Guard()
        prompt = list(req.prompt_tokens)
        hit = self.prefix_cache.lookup(prompt)
        layers = self.prefix_cache.take(hit, prompt) if hit is not None else None
        cached = hit.tokens if hit is not None and layers is not None else 0
        self.prefix_cache.count(cached)
        (uid,) = self._batch.insert(
            [prompt[cached:]],
            max_tokens=[req.max_tokens],
            caches=[layers] if layers is not None else None,
            all_tokens=[prompt[:cached]],  # the tokens the cache holds: they and the rest are the context
            samplers=[guard.sampler(sampler)],
            logits_processors=[[guard.processor(p) for p in processors]],
        )
        self._keys += 1
        active[uid] = _Active(
            gen,
            uid,
            self.tokenizer.detokenizer,
            StopMatcher(req.stop),
            Usage(prompt_tokens=len(prompt), cached_tokens=cached),
            time.perf_counter(),
            guard,
            key=self._keys,
        )

    def _remove(self, a: _Active) -> None:
        """Take ``a`` out of the batch, keeping its KV cache in the prefix cache."""
        if not self.prefix_cache.enabled:
            self._batch.remove([a.uid])
            return
        got = self._batch.remove([a.uid], return_prompt_caches=True).get(a.uid)
        if got is not None:
            self._remember(a, *got)

    def _remember(self, a: _Active, layers: Any, tokens: Any) -> None:
        if layers is not None and tokens is not None and a.guard.error is None:
            try:
                self.prefix_cache.store(a.key, list(tokens), layers)
            except Exception:  # a cache that cannot be kept costs the next request time, nothing more
                log.exception("keeping the KV cache of %s failed", a.gen.request.id)

    def _step(self, active: dict[int, _Active]) -> None:
        """One decode step for the whole batch (joining prompts are prefilled as part of it)."""
        for uid in [u for u, a in active.items() if a.gen.cancelled]:
            self._remove(active[uid])
            self._complete(active.pop(uid), "cancelled")
        if not active:
            return
        try:
            TRACER.step = self._stats["decode_steps"]
            with TRACER.span("step", rows=len(active)):
                responses = self._batch.next_generated()
        except Exception as exc:  # the batch is unusable: fail what it held, start afresh
            log.exception("batch step failed")
            for a in active.values():
                self._finish(
                    a.gen, Chunk("", finish_reason="error", error=f"{type(exc).__name__}: {exc}", usage=Usage())
                )
            active.clear()
            self._batch = None
            return
        if not responses:  # the batch holds nothing, so these were lost: never leave a caller waiting
            for a in active.values():
                self._finish(
                    a.gen, Chunk("", finish_reason="error", error="the batch lost this request", usage=Usage())
                )
            active.clear()
            return
        self._stats["decode_steps"] += 1
        self._stats["decode_tokens"] += len(responses)
        self._stats["peak_batch"] = max(self._stats["peak_batch"], len(responses))
        now = time.perf_counter()
        for r in responses:
            a = active.get(r.uid)
            if a is None:
                continue
            try:
                finish = self._on_token(a, r.token, r.logprobs, now)
            except Exception as exc:  # this generation's own text (detokenizer, stop strings, logprobs)
                a.guard._failed(exc)
                if r.finish_reason is not None:  # the batch dropped it already
                    active.pop(r.uid)
                    self._finish(a.gen, Chunk("", finish_reason="error", error=a.guard.error, usage=Usage()))
                continue
            if finish is None and r.finish_reason is not None:
                finish = "length"  # the batch stopped it at max_tokens
            if finish is not None:
                if r.finish_reason is None:
                    self._remove(a)
                elif self.prefix_cache.enabled:  # the batch dropped it and handed back its cache
                    self._remember(a, r.prompt_cache, r.all_tokens)
                self._complete(active.pop(r.uid), finish)
        for a in [a for a in active.values() if a.guard.error is not None]:  # failed alone: the others go on
            self._batch.remove([a.uid])
            del active[a.uid]
            self._finish(a.gen, Chunk("", finish_reason="error", error=a.guard.error, usage=Usage()))

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
            try:
                detok.finalize()
                tail, hit = stopper.feed(detok.last_segment)
                tail += "" if hit else stopper.flush()
            except Exception as exc:
                log.exception("generation %s failed at its end", gen.request.id)
                self._finish(gen, Chunk("", finish_reason="error", error=f"{type(exc).__name__}: {exc}", usage=Usage()))
                return
            if tail:
                gen._push(Chunk(tail))
        end = time.perf_counter()
        usage, n = a.usage, a.n
        usage.completion_tokens = n
        usage.prompt_tps = usage.prompt_tokens / usage.ttft_s if usage.ttft_s else 0.0
        usage.generation_tps = (n - 1) / (end - a.first) if n > 1 and end > a.first else 0.0
        usage.total_s = end - a.start
        self._finish(gen, Chunk("", finish_reason=finish, usage=usage, stop_sequence=stopper.matched), record=True)

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
        self.prefix_cache.clear()
        mx.synchronize()
        mx.clear_cache()
        self._closed.set()
        while True:
            with _parked:
                _parked.wait()
