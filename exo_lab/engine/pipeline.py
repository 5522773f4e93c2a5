"""Pipelined stages: every stage of a pipeline busy at once, in decode and in prefill.

Run one step at a time through all stages and stage 2 idles while stage 1 computes. Here:

- **decode** (:class:`GroupSchedule`): the running sequences are split into as many *groups* as there
  are stages, and the ranks advance in *ticks*. In tick ``t`` stage ``s`` computes group
  ``(t - s) mod G``; at the end of the tick every stage hands its hidden states to the next
  (:meth:`~exo_lab.engine.lockstep.Lockstep.pass_on` / ``take_in``) and one ``all_sum``
  (:meth:`~exo_lab.engine.lockstep.Lockstep.share`) gives every rank the tokens the last stage sampled
  for group ``(t + 1) mod G`` (the *landing* group), which the first stage computes next. Rows of the
  landing group end or join (prefilled) only then, when none of its hidden states is in flight, so
  every rank changes the same group at the same tick. With one stage this is the plain step.
- **prefill** (:func:`streamed_prefill`): the prompt's chunks (``prefill_step_size`` tokens, all but
  the last prompt token, as ``mlx_lm``'s ``generate_step`` chunks them) stream through the stages:
  in sub-step ``k`` stage ``s`` computes chunk ``k - s``, so stage 2 works on chunk 1 while stage 1
  works on chunk 2.

A stage builds each decode step's graph before its input comes, so that only evaluating it is left once the
input is there (a stage waits for the one before: on one core per stage the build is then free):

- a stage after the first computes next the group whose hidden states it receives in this tick, which never
  lands in it (only the group the first stage computes next does): it builds that step on the lazy receive
  (:meth:`~exo_lab.engine.lockstep.Lockstep.take_in_built`);
- the first stage computes next the landing group itself, on the tokens of this tick's shared vector: it
  builds that step on the lazy vector over twins of the group's caches (:class:`Speculation`) and keeps it
  once the group has landed with the same rows, which is every tick but those where a row ends or joins.

Not while tracing: a traced stage builds once its input is there, so its ``compute`` spans (from which
calibration fits each stage's compute) hold the build, as they did before.

Each group is its own :class:`~exo_lab.engine.lockstep.Batch` (its own KV caches). Every row sees
the same operations on the same values as in one process with the same chunking, so greedy tokens
are those of one process per request.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from exo_lab.engine.lockstep import Batch, Lockstep
from exo_lab.engine.trace import TRACER


@dataclass
class Group:
    """Rows that go through the stages together: their batch, the per-row state of the caller, and the hidden
    states this rank received for them (for its next tick)."""

    batch: Batch = field(default_factory=Batch)
    rows: list[Any] = field(default_factory=list)
    hidden: mx.array | None = None
    #: this stage's forward pass over ``hidden``, built while they were on their way (lazy), or None
    built: mx.array | None = None

    def __len__(self) -> int:
        return len(self.rows)


class GroupSchedule:
    """Which group each stage computes in each tick (see the module docstring); ``G`` = number of stages."""

    def __init__(self, stages: int, stage: int) -> None:
        self.stages = stages
        self.stage = stage
        self.groups = [Group() for _ in range(stages)]
        self.tick = 0

    @property
    def running(self) -> int:
        """Rows in every group."""
        return sum(len(g) for g in self.groups)

    def mine(self) -> Group:
        """The group this rank's stage computes in the current tick."""
        return self.groups[(self.tick - self.stage) % self.stages]

    def following(self) -> Group:
        """The group this rank's stage computes in the next tick (its hidden states arrive in this one)."""
        return self.groups[(self.tick + 1 - self.stage) % self.stages]

    def landing(self) -> Group:
        """The group the last stage samples in the current tick: its rows end or join at the tick's end."""
        return self.groups[(self.tick + 1) % self.stages]

    def room(self, arrived: int, max_batch: int) -> int:
        """How many of ``arrived`` waiting rows may join the landing group now: up to ``max_batch`` in all, and
        no more than keeps the groups balanced (each holding about ``1 / G`` of the rows)."""
        room = min(arrived, max_batch - self.running)
        if room <= 0:
            return 0
        target = math.ceil((self.running + room) / self.stages)
        return max(0, min(room, target - len(self.landing())))

    def rows(self) -> list[Any]:
        return [r for g in self.groups for r in g.rows]


def decode_tick(ls: Lockstep, sched: GroupSchedule, prebuild: bool = False) -> mx.array | None:
    """This rank's part of one tick: compute its group, pass the hidden states on, receive the next ones.

    With ``prebuild`` a stage after the first builds its next step's graph on the hidden states it is about to
    receive, before it waits for them (:meth:`Lockstep.take_in_built`; the worker does not while tracing). Returns the tokens sampled for the landing group (on the last stage's lead
    rank, else None); the caller then shares them (:meth:`Lockstep.share`) and changes the landing group.
    """
    group = sched.mine()
    out = tokens = None
    if len(group):
        out, tokens = ls.stage_step(group.batch, group.hidden, group.built)
        group.hidden = group.built = None
    if out is not None:
        ls.pass_on(out)
    nxt = sched.following()
    if len(nxt) and not ls.layout.first:
        if prebuild:
            nxt.hidden, nxt.built = ls.take_in_built(nxt.batch)
        else:
            nxt.hidden = ls.take_in(len(nxt), 1)
    return tokens


def fork(cache: Any) -> Any:
    """A twin of an ``mlx_lm`` layer cache that a step can advance while ``cache`` stays as it is: its attributes,
    with a new handle on each array (MLX updates an array in place through its handle) and lists copied."""
    twin = copy.copy(cache)
    for name, value in vars(cache).items():
        if isinstance(value, mx.array):
            setattr(twin, name, mx.array(value))
        elif isinstance(value, list):
            setattr(twin, name, [mx.array(v) if isinstance(v, mx.array) else v for v in value])
    return twin


@dataclass
class Speculation:
    """The first stage's next step of the landing group, built before the tick's tokens are read.

    The first stage computes next the group that lands now, on the tokens the last stage sampled for it, so it
    can build that step on the shared vector before it is evaluated (the tokens lazy) over twins of the group's
    caches (:func:`fork`). Once the group has landed it is kept when the group holds the same rows (none ended,
    none joined: the step is then exactly what building it afterwards gives) and dropped otherwise, the caches
    as they were. Only built, never evaluated before then: the dropped twins cost nothing, and the kept ones are
    the caches' only handles when the step runs, so MLX updates their buffers in place.
    """

    rows: list[Any]
    cache: list
    out: mx.array

    @classmethod
    def build(cls, ls: Lockstep, group: Group, shared: mx.array) -> Speculation:
        """The step of ``group`` (the landing group, on a one-rank first stage) on the lazy ``shared`` vector
        (:meth:`Lockstep.shared_vector`; a failed row's negative token is clamped: that row ends, so the step
        is dropped)."""
        assert group.batch.cache is not None, "a step needs a batch with rows"
        cache = [fork(c) for c in group.batch.cache]
        tokens = mx.maximum(shared[: len(group)], 0)
        return cls(list(group.rows), cache, ls.shard(tokens[:, None], cache))

    def settle(self, group: Group) -> bool:
        """Once ``group`` has landed: keep the step (its caches, and its output as ``group.built``) where it holds
        the same rows; whether it was kept."""
        same = len(group.rows) == len(self.rows) and all(a is b for a, b in zip(group.rows, self.rows))
        if same:
            group.batch.cache, group.built = self.cache, self.out
        return same


def prefill_chunks(total: int, step: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each prefill chunk of a ``total``-token prompt: all but the last token, ``step`` at a
    time (``mlx_lm``'s ``generate_step`` chunking)."""
    chunks, pos = [], 0
    while total - pos > 1:
        n = min(step, total - pos - 1)
        chunks.append((pos, n))
        pos += n
    return chunks


def streamed_prefill(ls: Lockstep, prompt: list[int], cache: list | None = None, start: int = 0) -> list:
    """Prefill ``prompt`` (all but its last token) with its chunks streamed through the stages; this stage's cache.

    In sub-step ``k`` stage ``s`` computes chunk ``k - s``, then hands it to stage ``s + 1`` and receives chunk
    ``k + 1 - s`` from stage ``s - 1``. Each chunk meets the same operations as in :meth:`Lockstep.prefill`.
    ``cache`` (holding the first ``start`` tokens, from the prefix cache) is extended instead of a fresh one.
    """
    lay = ls.layout
    cache = ls.shard.make_cache() if cache is None else cache
    tokens = mx.array(prompt, mx.int32)
    chunks = [(start + pos, n) for pos, n in prefill_chunks(len(prompt) - start, ls.prefill_step_size)]
    s, stages = lay.stage, len(lay.stages)
    x: mx.array | None = None
    for k in range(len(chunks) + stages - 1):
        i = k - s
        if 0 <= i < len(chunks):
            start, n = chunks[i]
            inp = tokens[start : start + n][None] if lay.first else x
            assert inp is not None, "a stage after the first receives each chunk before it computes it"
            with TRACER.span("prefill", tokens=n, pos=start):
                out = ls.shard.hidden(inp, cache)
                mx.eval(out, [c.state for c in cache])
            ls.pass_on(out)
            del out
            x = None
            mx.clear_cache()
        j = k + 1 - s
        if 0 <= j < len(chunks):
            x = ls.take_in(1, chunks[j][1])
    return cache
