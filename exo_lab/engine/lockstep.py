"""Generation in lock step across the ranks of an instance.

Every rank runs this same loop on the same request. Pipeline stages pass
hidden states to the next stage with ``send``/``recv``; tensor ranks share
each layer through the all-reduces inside their sharded linears. After each
step one small ``all_sum`` gives every rank the sampled token and a stop
flag (rank 0's: cancellation or a stop string), so all ranks stop together.

Prefill is chunked exactly like ``mlx_lm.generate.generate_step`` (all but
the last prompt token in chunks of ``prefill_step_size``, then the last one
with sampling), so a pipeline gives bit-identical logits to one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from exo_lab.engine.shard import Shard

log = logging.getLogger(__name__)


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

    def peer(self, stage: int) -> int:
        """The rank of ``stage`` this rank exchanges hidden states with (same tensor index)."""
        mine = self.stages[self.stage]
        return self.stages[stage][mine.index(self.rank) % len(self.stages[stage])]


class Lockstep:
    """Runs one shard's part of generation in step with the other ranks."""

    def __init__(self, shard: Shard, group: mx.distributed.Group, layout: Layout, hidden_size: int,
                 act_dtype: mx.Dtype, prefill_step_size: int = 2048) -> None:
        self.shard = shard
        self.group = group
        self.layout = layout
        self.hidden = hidden_size
        self.act_dtype = act_dtype
        self.prefill_step_size = prefill_step_size

    def _forward(self, tokens: mx.array, cache: list, logits: bool) -> mx.array | None:
        """This stage's part of one forward pass over ``tokens`` (shape ``[1, n]``).

        Between stages the last rank of a stage hands the hidden states to the
        first rank of the next (ring neighbours); inside a multi-rank stage of a
        pipeline, the first rank passes them on to the others.
        """
        lay = self.layout
        n = tokens.shape[1]
        mine = lay.stages[lay.stage]
        multi = len(lay.stages) > 1 and len(mine) > 1
        if lay.first:
            x = tokens
        elif not multi:
            x = mx.distributed.recv((1, n, self.hidden), self.act_dtype, lay.peer(lay.stage - 1), group=self.group)
        elif lay.rank == mine[0]:
            x = mx.distributed.recv((1, n, self.hidden), self.act_dtype, lay.stages[lay.stage - 1][-1], group=self.group)
            sent = mx.distributed.send(x, mine[1], group=self.group)
            (x,) = mx.depends([x], [sent])
        else:
            x = mx.distributed.recv((1, n, self.hidden), self.act_dtype, mine[0], group=self.group)
        out = self.shard(x, cache) if (logits or not lay.last) else self._hidden_only(x, cache)
        if not lay.last:
            if not multi and len(lay.stages[lay.stage + 1]) == 1:
                return mx.distributed.send(out, lay.peer(lay.stage + 1), group=self.group)
            if lay.rank == mine[-1]:
                return mx.distributed.send(out, lay.stages[lay.stage + 1][0], group=self.group)
            return out
        return out

    def _hidden_only(self, x: mx.array, cache: list) -> mx.array:
        from mlx_lm.models.base import create_attention_mask

        h = self.shard.embed_tokens(x) if self.layout.first else x
        mask = create_attention_mask(h, cache[0] if cache else None)
        for layer, c in zip(self.shard.layers, cache):
            h = layer(h, mask, cache=c)
        return h

    def _share(self, token: mx.array | None, flag: int) -> tuple[int, int]:
        """All ranks learn the sampled token (from the last stage) and the stop flag (from rank 0)."""
        lead = self.layout.stages[-1][0]
        tok = token.astype(mx.int32).reshape(1) if (token is not None and self.layout.rank == lead) else mx.zeros((1,), mx.int32)
        fl = mx.array([flag if self.layout.rank == 0 else 0], mx.int32)
        both = mx.distributed.all_sum(mx.concatenate([tok, fl]), group=self.group)
        mx.eval(both)
        t, f = both.tolist()
        return int(t), int(f)

    def generate(self, prompt: list[int], max_tokens: int, sampler: Callable[[mx.array], mx.array],
                 stop_flag: Callable[[], bool]) -> Iterator[int]:
        """Yield sampled tokens; every rank yields the same ones and stops at the same step."""
        cache = self.shard.make_cache()
        tokens = mx.array(prompt, mx.int32)
        pos = 0
        total = len(prompt)
        while total - pos > 1:  # prefill: same chunking as mlx_lm's generate_step
            n = min(self.prefill_step_size, total - pos - 1)
            out = self._forward(tokens[pos : pos + n][None], cache, logits=False)
            mx.eval(out, [c.state for c in cache])
            pos += n
            mx.clear_cache()
        y = tokens[pos:][None]
        for _ in range(max_tokens):
            out = self._forward(y, cache, logits=True)
            token = None
            if self.layout.last:
                logits = out[:, -1, :]
                logprobs = logits - mx.logsumexp(logits, keepdims=True)
                token = sampler(logprobs)
                if self.layout.rank != self.layout.stages[-1][0]:
                    mx.eval(token)  # tensor peers: run the step's all-reduces even though rank lead samples
            else:
                mx.eval(out)
            t, flag = self._share(token, 1 if stop_flag() else 0)
            if flag:
                return
            yield t
            y = mx.array([[t]], mx.int32)

    def barrier(self) -> None:
        """Drain and wait for every rank (before exiting: a rank that leaves early breaks its peers)."""
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=self.group))
