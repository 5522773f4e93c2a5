"""Generation in lock step across the ranks of an instance, batched continuously.

Every rank runs the same loop over the same sequences. Pipeline stages pass
hidden states to the next stage with ``send``/``recv``; tensor ranks share
each layer through the all-reduces inside their sharded linears. Sequences
decode together in a :class:`Batch` (one ``BatchKVCache`` per layer, as in
mlx_lm's ``BatchGenerator``): a sequence's prompt is prefilled alone, then it
joins the batch at the next step and leaves it when it ends.

After each decode step one small ``all_sum`` (:meth:`Lockstep.share`) gives
every rank the step's sampled tokens (from the last stage), a stop flag per
sequence and the admission mark (both from rank 0), so all ranks change the
batch at the same step in the same way.

A sequence whose own sampling fails on the rank that samples (its sampler, its
grammar; also when they could not be made at admission) gets the token
:data:`FAILED` in that step: every rank sees it in the shared tokens, learns
why with :meth:`Lockstep.share_errors`, and drops that sequence alone.

Prefill is chunked exactly like ``mlx_lm.generate.generate_step`` (all but
the last prompt token in chunks of ``prefill_step_size``), so a pipeline gives
bit-identical logits to one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import mlx.core as mx
import numpy as np

from exo_lab.engine.peer_link import ChainLinks, PeerLink
from exo_lab.engine.shard import Shard
from exo_lab.engine.trace import TRACER

log = logging.getLogger(__name__)

#: the token a row gets in a step where its sampling failed (every rank then ends that row alone)
FAILED = -1
#: the longest error message (UTF-8 bytes) :meth:`Lockstep.share_errors` passes on per row
ERROR_BYTES = 400


def describe(exc: BaseException) -> str:
    """``Type: message``, what a failed row's caller is told."""
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: its pipeline stage and the world ranks of every stage."""

    rank: int
    stages: tuple[tuple[int, ...], ...]  # world ranks per stage, in order

    @property
    def stage(self) -> int:
        return next(i for i, ranks in enumerate(self.stages) if self.rank in ranks)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == len(self.stages) - 1

    @property
    def chain(self) -> list[int]:
        """Every rank, stage by stage: each two neighbours exchange (a pair's ranks, or a stage's last and the next
        stage's first), so sockets along it carry all of a step's messages (:mod:`exo_lab.engine.peer_link`)."""
        return [r for s in self.stages for r in s]

    def peer(self, stage: int) -> int:
        """The rank of ``stage`` this rank exchanges hidden states with (same tensor index)."""
        mine = self.stages[self.stage]
        return self.stages[stage][mine.index(self.rank) % len(self.stages[stage])]


class Batch:
    """The sequences decoding together on one rank: KV caches, next inputs and samplers, row by row."""

    def __init__(self) -> None:
        self.cache: list | None = None  # one batched cache per layer (BatchKVCache, BatchRotatingKVCache, ArraysCache)
        self.inputs: list[int] = []  # each row's next input token
        self.samplers: list[Callable[[mx.array], mx.array]] = []
        self.greedy: list[bool] = []
        self.constraints: list[Any] = []  # a SchemaConstraint or None per row (only on the rank that samples)
        self.logprobs: list[int | None] = []  # per row: how many alternatives to report with each token, or None
        self.errors: list[str | None] = []  # per row: why it cannot be sampled (found at admission), or None
        #: per row: its logits processing (sampling.Penalties: bias, penalties) or None; read where it samples
        self.processors: list[Callable[[mx.array, mx.array], mx.array] | None] = []

    def __len__(self) -> int:
        return len(self.inputs)

    def add(
        self,
        cache: list,
        first_input: int,
        sampler: Callable[[mx.array], mx.array],
        greedy: bool,
        constraint: Any = None,
        logprobs: int | None = None,
        error: str | None = None,
        processor: Callable[[mx.array, mx.array], mx.array] | None = None,
    ) -> None:
        """Append a prefilled sequence (its per-layer caches, merged with their own ``merge``) as the last row.

        ``error`` says why this row cannot be sampled (its sampler or grammar could not be made): on the
        rank that samples, it fails at its first step.
        """
        merged = [c.merge([c]) for c in cache]
        if self.cache is None:
            self.cache = merged
        else:
            for mine, new in zip(self.cache, merged):
                mine.extend(new)
        self.inputs.append(first_input)
        self.samplers.append(sampler)
        self.greedy.append(greedy)
        self.constraints.append(constraint)
        self.logprobs.append(logprobs)
        self.errors.append(error)
        self.processors.append(processor)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order)."""
        if len(rows) == len(self):
            return
        self.inputs = [self.inputs[i] for i in rows]
        self.samplers = [self.samplers[i] for i in rows]
        self.greedy = [self.greedy[i] for i in rows]
        self.constraints = [self.constraints[i] for i in rows]
        self.logprobs = [self.logprobs[i] for i in rows]
        self.errors = [self.errors[i] for i in rows]
        self.processors = [self.processors[i] for i in rows]
        if not rows:
            self.cache = None
        else:
            for c in self.cache or []:
                c.filter(rows)


class Lockstep:
    """Runs one shard's part of generation in step with the other ranks."""

    def __init__(
        self,
        shard: Shard,
        group: mx.distributed.Group,
        layout: Layout,
        hidden_size: int,
        act_dtype: mx.Dtype,
        prefill_step_size: int = 2048,
        links: Mapping[int, PeerLink] | None = None,
    ) -> None:
        self.shard = shard
        self.group = group
        #: sockets of this rank's own to its neighbours along :attr:`Layout.chain` (:mod:`exo_lab.engine.peer_link`),
        #: by rank: a tensor pair's, and those that carry hidden states between stages
        self.links = dict(links or {})
        self.layout = layout
        self.hidden = hidden_size
        self.act_dtype = act_dtype
        self.prefill_step_size = prefill_step_size
        self._masked: mx.array | None = None  # the last sampled step's logits, after grammar masks
        self._logprobs: mx.array | None = None  # and their log-probabilities, where sampling computed them

    def _send(self, x: mx.array, dst: int) -> mx.array:
        """``x``, sent to rank ``dst`` when evaluated: over the pair's link where there is one, else MLX's ring."""
        if dst in self.links:
            return self.links[dst].send(x)
        return mx.distributed.send(x, dst, group=self.group)

    def _recv(self, shape: tuple[int, ...], src: int) -> mx.array:
        """Hidden states of ``shape`` from rank ``src`` (in the activation dtype), as :meth:`_send` sent them."""
        if src in self.links:
            return self.links[src].recv(shape, self.act_dtype)
        return mx.distributed.recv(shape, self.act_dtype, src, group=self.group)

    def _forward(self, tokens: mx.array, cache: list, logits: bool) -> mx.array:
        """This stage's part of one forward pass over ``tokens`` (shape ``[batch, n]``).

        Between stages the last rank of a stage hands the hidden states to the
        first rank of the next (ring neighbours); inside a multi-rank stage of a
        pipeline, the first rank passes them on to the others.
        """
        lay = self.layout
        b, n = tokens.shape
        mine = lay.stages[lay.stage]
        stage_size = len(mine)  # len(mine) inside `multi` makes pyright narrow `mine` to a too-short tuple
        multi = len(lay.stages) > 1 and stage_size > 1
        if lay.first:
            x = tokens
        elif not multi:
            x = self._recv((b, n, self.hidden), lay.peer(lay.stage - 1))
            x = TRACER.ready("recv", x)
        elif lay.rank == mine[0]:
            x = self._recv((b, n, self.hidden), lay.stages[lay.stage - 1][-1])
            x = TRACER.ready("recv", x)
            sent = self._send(x, mine[1])
            (x,) = mx.depends([x], [sent])
        else:
            x = TRACER.ready("recv", self._recv((b, n, self.hidden), mine[0]))
        shard = self.shard if (logits or not lay.last) else self.shard.hidden
        out = TRACER.timed("compute", lambda: shard(x, cache))
        if not lay.last:
            if not multi and len(lay.stages[lay.stage + 1]) == 1:
                return TRACER.ready("send", self._send(out, lay.peer(lay.stage + 1)))
            if lay.rank == mine[-1]:
                return TRACER.ready("send", self._send(out, lay.stages[lay.stage + 1][0]))
            return out
        return out

    def take_in(self, rows: int, n: int) -> mx.array | None:
        """Receive the hidden states (``[rows, n, hidden]``) this stage computes on next, from the stage before.

        None on the first stage (it starts from tokens). In a multi-rank stage of a pipeline the first rank
        receives and passes them on to the others, as in :meth:`_forward`. Evaluated before it returns.
        """
        if self.layout.first:
            return None
        x = TRACER.ready("recv", self._incoming((rows, n, self.hidden)))
        mx.eval(x)
        return x

    def take_in_built(self, batch: Batch) -> tuple[mx.array, mx.array]:
        """:meth:`take_in` of one decode step of ``batch`` (not on the first stage), with this stage's forward pass
        over it built while it is on its way: ``(hidden states, evaluated; the forward's output, lazy)``.

        The graph is built before this rank waits for its input, so the next :meth:`stage_step` (given the
        output) only evaluates it. Built ahead of the batch's next step only: the group schedule changes a
        group's rows where the first stage computes it next, never here (:mod:`exo_lab.engine.pipeline`).
        """
        assert batch.cache is not None, "a step needs a batch with rows"
        x = self._incoming((len(batch), 1, self.hidden))
        mx.async_eval(x)
        out = self.shard(x, batch.cache)
        x = TRACER.ready("recv", x)
        mx.eval(x)
        return x, out

    def _incoming(self, shape: tuple[int, ...]) -> mx.array:
        """The hidden states of ``shape`` this stage receives from the stage before (lazy; see :meth:`take_in`)."""
        lay = self.layout
        mine = lay.stages[lay.stage]
        if len(mine) == 1:
            return self._recv(shape, lay.peer(lay.stage - 1))
        if lay.rank == mine[0]:
            x = self._recv(shape, lay.stages[lay.stage - 1][-1])
            sent = self._send(x, mine[1])
            (x,) = mx.depends([x], [sent])
            return x
        return self._recv(shape, mine[0])

    def pass_on(self, out: mx.array) -> None:
        """Send this stage's output hidden states to the next stage (its last rank sends; nothing on the last stage)."""
        lay = self.layout
        if lay.last:
            return
        mine = lay.stages[lay.stage]
        if len(mine) == 1 and len(lay.stages[lay.stage + 1]) == 1:
            mx.eval(TRACER.ready("send", self._send(out, lay.peer(lay.stage + 1))))
        elif lay.rank == mine[-1]:
            mx.eval(TRACER.ready("send", self._send(out, lay.stages[lay.stage + 1][0])))

    def stage_step(
        self, batch: Batch, x: mx.array | None, built: mx.array | None = None
    ) -> tuple[mx.array | None, mx.array | None]:
        """This stage's part of one decode step of ``batch`` (``x``: its input hidden states; None on the first
        stage, which embeds the rows' inputs): ``(hidden states for the next stage, sampled tokens)``.

        ``built``: the step's forward output, built on ``x`` as it arrived (:meth:`take_in_built`).
        The hidden states are evaluated (None on the last stage); the tokens are those of :meth:`step`
        (on the last stage's lead rank, else None). Used by the group schedule (:mod:`exo_lab.engine.pipeline`).
        """
        cache = batch.cache
        assert cache is not None, "a step needs a batch with rows"
        lay = self.layout
        inp = mx.array(batch.inputs, mx.int32)[:, None] if lay.first else x
        assert inp is not None, "a stage after the first needs the hidden states it received"
        out = TRACER.timed("compute", lambda: self.shard(inp, cache) if built is None else built)
        if not lay.last:
            self.errors = [None] * len(batch)
            mx.eval(out)
            return out, None
        return None, self._sample_step(batch, out)

    def prefill(self, prompt: list[int], cache: list | None = None, start: int = 0) -> list:
        """Run all but the last prompt token through this stage; the sequence's per-layer KV cache.

        ``cache`` (holding the first ``start`` tokens, from the prefix cache) is extended instead of a fresh one.
        """
        cache = self.shard.make_cache() if cache is None else cache
        tokens = mx.array(prompt, mx.int32)
        pos, total = start, len(prompt)
        while total - pos > 1:  # the same chunking as mlx_lm's generate_step
            n = min(self.prefill_step_size, total - pos - 1)
            with TRACER.span("prefill", tokens=n, pos=pos):
                out = self._forward(tokens[pos : pos + n][None], cache, logits=False)
                mx.eval(out, [c.state for c in cache])
            pos += n
            mx.clear_cache()
        return cache

    def embed(self, prompt: list[int]) -> list[float]:
        """The prompt's embedding (:mod:`exo_lab.engine.embedding`), on every rank: the whole prompt through the
        pipeline in prefill's chunks, the last stage's normed hidden states averaged, one ``all_sum`` to share."""
        lay = self.layout
        cache = self.shard.make_cache()
        tokens = mx.array(prompt, mx.int32)
        total = mx.zeros((self.hidden,), mx.float32)
        pos = 0
        while pos < len(prompt):
            n = min(self.prefill_step_size, len(prompt) - pos)
            out = self._forward(tokens[pos : pos + n][None], cache, logits=False)
            if lay.last:
                assert self.shard.norm is not None  # a last stage always holds the norm
                total = total + self.shard.norm(out)[0].astype(mx.float32).sum(axis=0)
                out = total
            mx.eval(out, [c.state for c in cache])
            pos += n
        mine = lay.last and lay.rank == lay.stages[-1][0]
        mean = total / len(prompt)
        vector = mean / mx.maximum(mx.linalg.norm(mean), 1e-12) if mine else mx.zeros((self.hidden,), mx.float32)
        shared = mx.distributed.all_sum(vector, group=self.group)
        mx.eval(shared)
        return cast("list[float]", shared.tolist())

    def step(self, batch: Batch) -> mx.array | None:
        """One decode step of every row of ``batch``: the sampled tokens on the last stage's lead rank, else None.

        A row whose sampling fails gets :data:`FAILED` (int32 tokens then) and its reason in :attr:`errors`;
        the other rows are sampled as if it were not there.
        """
        assert batch.cache is not None, "a step needs a batch with rows"
        out = self._forward(mx.array(batch.inputs, mx.int32)[:, None], batch.cache, logits=True)
        if not self.layout.last:
            self.errors = [None] * len(batch)
            mx.eval(out)
            return None
        return self._sample_step(batch, out)

    def step_ahead(self, batch: Batch, inputs: mx.array, flags: list[int], admit: int) -> mx.array:
        """One decode step of ``batch`` built and not evaluated (one-stage instances, rows without grammar,
        log-probabilities or logits processing; see :mod:`exo_lab.engine.lookahead`): the vector that
        :meth:`share` shares, lazily. ``inputs`` (int32, one per row) may be the lazy tokens of the step before.
        """
        assert batch.cache is not None, "a step needs a batch with rows"
        lay = self.layout
        assert len(lay.stages) == 1, "only a one-stage instance steps ahead"
        logits = self._forward(inputs[:, None], batch.cache, logits=True)[:, -1, :]
        width = len(batch)
        if lay.rank == lay.stages[-1][0]:
            if all(batch.greedy):  # as in _sample: the argmax of the logits is that of the log-probabilities
                tokens = mx.argmax(logits, axis=-1)
            else:
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                tokens = mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(batch.samplers)], axis=0)
            tok = tokens.astype(mx.int32).reshape(-1)
        else:  # tensor peers: the step's all-reduces run before the shared vector (it depends on the logits)
            (tok,) = mx.depends([mx.zeros((width,), mx.int32)], [logits])
        mine = mx.array([*flags, admit] if lay.rank == 0 else [0] * (width + 1), mx.int32)
        return self._shared(mx.concatenate([tok, mine]))

    def _shared(self, vector: mx.array) -> mx.array:
        """A step's int32 vector summed over every rank: over the pair's socket where there is one."""
        if self.group.size() == 2 and self.links:
            (link,) = self.links.values()
            return link.sum(vector)
        lay = self.layout
        if self.links and len(lay.chain) == self.group.size():  # linked along every rank
            return ChainLinks.of(self.links, lay.chain, lay.rank).sum(vector)
        return mx.distributed.all_sum(vector, group=self.group)

    def _sample_step(self, batch: Batch, out: mx.array) -> mx.array | None:
        """The last stage's end of a decode step: the sampled tokens on its lead rank (see :meth:`step`)."""
        lay = self.layout
        self.errors: list[str | None] = [None] * len(batch)
        logits = out[:, -1, :]
        if lay.rank != lay.stages[-1][0]:
            mx.eval(logits)  # tensor peers: run the step's all-reduces even though the lead samples
            return None
        errors = self.errors = list(batch.errors)
        if any(p is not None for p in batch.processors):  # bias and penalties, before grammar and sampling
            logits = mx.concatenate(
                [
                    logits[i : i + 1]
                    if p is None
                    else self._row(errors, i, partial(p, mx.array([t])), logits[i : i + 1])
                    for i, (p, t) in enumerate(zip(batch.processors, batch.inputs))
                ],
                axis=0,
            )
        with TRACER.span("sample", rows=len(batch)):
            values, dtype = self._sample(batch, logits, errors)
        if not any(errors):
            return mx.array(values, dtype)
        return mx.array([FAILED if e else v for v, e in zip(values, errors)], mx.int32)

    def _sample(self, batch: Batch, logits: mx.array, errors: list[str | None]) -> tuple[list[int], mx.Dtype]:
        """Each row's token (and its dtype): masked by its grammar, sampled, kept or replaced by its grammar.

        A row whose part of this raises is noted in ``errors`` and its token is meaningless; when evaluating
        the batch's tokens fails, the rows are evaluated one by one to find the ones that fail.
        """
        constrained = any(c is not None for c in batch.constraints)
        masked = logits
        if constrained:
            masked = mx.concatenate(
                [
                    logits[i : i + 1] if c is None else self._row(errors, i, c.mask, logits[i : i + 1])
                    for i, c in enumerate(batch.constraints)
                ],
                axis=0,
            )
        self._masked = masked
        if all(batch.greedy):
            # a row's argmax is its log-probabilities' (a shift keeps the order): no exp over the vocabulary
            # (MLX's CPU exp: ~9 ms for 4 rows of a 128k vocabulary, on the last stage's critical path)
            self._logprobs = None
            tokens = mx.argmax(masked, axis=-1)
        else:
            logprobs = self._logprobs = masked - mx.logsumexp(masked, axis=-1, keepdims=True)
            tokens = mx.concatenate(
                [self._row(errors, i, s, logprobs[i : i + 1], greedy=True) for i, s in enumerate(batch.samplers)],
                axis=0,
            )
        try:
            mx.eval(tokens)
            values = cast("list[int]", tokens.tolist())
        except Exception:
            log.exception("sampling the batch failed: sampling its rows one by one")
            values = self._sample_rows(batch, logits, errors)
        for i, c in enumerate(batch.constraints):  # each constraint keeps its token or writes its plan
            if c is not None and errors[i] is None:
                values[i] = self._row(errors, i, c.choose, values[i])
        return values, tokens.dtype

    def _sample_rows(self, batch: Batch, logits: mx.array, errors: list[str | None]) -> list[int]:
        """Each row's token sampled alone (after a batch whose sampling failed); rows that fail are noted."""
        mx.eval(logits)  # the forward pass itself: when this fails, nothing can be sampled (the caller fails)
        values, rows = [], []
        for i in range(len(batch)):
            row = logits[i : i + 1]
            c = batch.constraints[i]
            if c is not None:
                row = self._row(errors, i, c.mask, row)
            row = row - mx.logsumexp(row, axis=-1, keepdims=True)
            rows.append(row)
            token = self._row(errors, i, batch.samplers[i], row, greedy=True) if not batch.greedy[i] else None
            try:
                token = mx.argmax(row, axis=-1) if token is None else token
                values.append(int(cast(int, token.item())))
            except Exception as exc:
                log.exception("row %d of the batch failed to sample", i)
                errors[i] = errors[i] or describe(exc)
                values.append(0)
        self._logprobs = mx.concatenate(
            [r if e is None else mx.zeros_like(logits[:1]) for r, e in zip(rows, errors)], axis=0
        )
        return values

    def _row(self, errors: list[str | None], i: int, fn: Callable[[Any], Any], value: Any, greedy: bool = False) -> Any:
        """``fn(value)`` for row ``i``; when that raises (or the row failed already), note why and go on with
        ``value`` (its argmax with ``greedy``): the row's token is discarded, the others' are unaffected."""
        if errors[i] is None:
            try:
                return fn(value)
            except Exception as exc:
                log.exception("row %d of the batch failed to sample", i)
                errors[i] = describe(exc)
        return mx.argmax(value, axis=-1) if greedy else value

    def share_errors(self, failed: list[int]) -> dict[int, str]:
        """Every rank learns why the rows ``failed`` (those with :data:`FAILED` in the shared tokens) failed.

        Only the rank that sampled knows; an ``all_sum`` of their messages (UTF-8, up to :data:`ERROR_BYTES`
        each) tells the others. Every rank calls it in the same step with the same ``failed``.
        """
        lay = self.layout
        values = np.zeros((len(failed), ERROR_BYTES), np.int32)
        if lay.last and lay.rank == lay.stages[-1][0]:
            for k, i in enumerate(failed):
                said = (self.errors[i] if i < len(self.errors) else None) or "sampling failed"
                data = said.encode("utf-8", "replace")[:ERROR_BYTES]
                values[k, : len(data)] = np.frombuffer(data, np.uint8)
        both = mx.distributed.all_sum(mx.array(values), group=self.group)
        mx.eval(both)
        out = {}
        for k, i in enumerate(failed):
            data = bytes(np.array(both[k]).astype(np.uint8)).rstrip(b"\0")
            out[i] = data.decode("utf-8", "ignore") or "sampling failed"
        return out

    def share(self, tokens: mx.array | None, flags: list[int], admit: int) -> tuple[list[int], list[int], int]:
        """All ranks learn the step's tokens (last stage's lead), and rank 0's stop flags and admission mark."""
        return self.read_shared(self.shared_vector(tokens, flags, admit))

    def shared_vector(self, tokens: mx.array | None, flags: list[int], admit: int) -> mx.array:
        """What :meth:`share` shares, built and not evaluated: ``[tokens, flags, admission mark]`` (int32)."""
        width = len(flags)
        lead = self.layout.stages[-1][0]
        tok = (
            tokens.astype(mx.int32).reshape(-1)
            if tokens is not None and self.layout.rank == lead
            else mx.zeros((width,), mx.int32)
        )
        mine = mx.array([*flags, admit] if self.layout.rank == 0 else [0] * (width + 1), mx.int32)
        return self._shared(mx.concatenate([tok, mine]))

    def read_shared(self, vector: mx.array) -> tuple[list[int], list[int], int]:
        """A :meth:`shared_vector` evaluated: ``(tokens, flags, admission mark)``."""
        with TRACER.span("all_sum"):
            mx.eval(vector)
        values = cast("list[int]", vector.tolist())  # a 1-d int32 array
        width = (len(values) - 1) // 2
        return values[:width], values[width : 2 * width], values[-1]

    def _row_logprobs(self, i: int) -> mx.array:
        """Row ``i``'s log-probabilities in the last sampled step (computed here after a greedy step)."""
        if self._logprobs is not None:
            return self._logprobs[i]
        assert self._masked is not None, "no step was sampled"
        row = self._masked[i]
        return row - mx.logsumexp(row, axis=-1, keepdims=True)

    def share_logprobs(self, batch: Batch, tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Per row that asked for them: its token's log-probability and the most likely alternatives.

        The sampling rank has the step's log-probabilities; a float all_sum (only in steps where a
        row wants them) gives them to every rank. Token ids travel as float32, exact below 2**24.
        """
        want = batch.logprobs
        width = sum(1 + 2 * k for k in want if k is not None)
        if not width:
            return [None] * len(want)
        lay = self.layout
        values = np.zeros(width, np.float32)
        if lay.last and lay.rank == lay.stages[-1][0]:
            at = 0
            for i, k in enumerate(want):
                if k is None:
                    continue
                if tokens[i] < 0:  # the row failed in this step: it is dropped, its values are never read
                    at += 1 + 2 * k
                    continue
                row = np.array(self._row_logprobs(i).astype(mx.float32))
                top = np.argpartition(-row, k - 1)[:k] if k else np.zeros(0, np.int64)
                top = top[np.argsort(-row[top], kind="stable")]
                values[at : at + 1 + 2 * k] = [row[tokens[i]], *top, *row[top]]
                at += 1 + 2 * k
        both = mx.distributed.all_sum(mx.array(values), group=self.group)
        mx.eval(both)
        flat = cast("list[float]", both.tolist())  # a 1-d float32 array
        out: list[tuple[float, list[tuple[int, float]]] | None] = []
        at = 0
        for k in want:
            if k is None:
                out.append(None)
                continue
            ids, lps = flat[at + 1 : at + 1 + k], flat[at + 1 + k : at + 1 + 2 * k]
            out.append((flat[at], [(int(t), lp) for t, lp in zip(ids, lps)]))
            at += 1 + 2 * k
        return out

    def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        sampler: Callable[[mx.array], mx.array],
        stop_flag: Callable[[], bool],
        greedy: bool = False,
    ) -> Iterator[int]:
        """One sequence alone (a batch of one): yield its tokens; every rank yields the same ones.

        ``stop_flag`` is read on rank 0; the step in flight when it turns true is discarded.
        """
        batch = Batch()
        batch.add(self.prefill(prompt), prompt[-1], sampler, greedy)
        for _ in range(max_tokens):
            tokens, flags, _ = self.share(self.step(batch), [1 if stop_flag() else 0], 0)
            if flags[0]:
                return
            yield tokens[0]
            batch.inputs = tokens

    def barrier(self) -> None:
        """Drain and wait for every rank (before exiting: a rank that leaves early breaks its peers)."""
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=self.group))
