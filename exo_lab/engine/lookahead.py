"""Decode one step ahead: the next step is built while this one computes (one-stage instances).

In lock step (:mod:`exo_lab.engine.lockstep`) a rank builds a step's graph in Python, evaluates it,
reads the sampled tokens and only then builds the next step: the graph building and the landing
(streaming, stop checks) leave the compute idle. For a small model that is a third of each token
(the demo model: 3.5 ms a step, 1.0 of it Python). Here, as ``mlx_lm``'s generators do with
``async_eval``, step ``t + 1`` is built on the *lazy* tokens of step ``t`` and queued before step
``t``'s tokens are read, so the Python work of one step runs while the other computes. A step built when
none is in flight (a batch's first, or the first after a pause) is queued at once too, before the one
after it is built: otherwise its tokens are read only once both have computed (on the demo model, a
request's first token came 10.2 ms after its admission that way, 6.6 ms now).

A step that is built ahead holds every row of its batch at that time. Rows that end when the step
before lands (EOS, ``max_tokens``, a stop flag) were computed once more for nothing and are dropped
afterwards; rows admitted then join the step after. So rank 0's stop flags and admissions take
effect one step later than without lookahead, and each row's tokens are unchanged (a row's result
does not depend on the other rows of its batch).

Only instances of one stage (one process, or a tensor group; a pipeline's stages build their steps before
their input comes instead, see :mod:`exo_lab.engine.pipeline`) and only *plain* rows (no grammar, no
log-probabilities, no penalties or bias: each of these needs the step's tokens in Python before the
next step) go ahead; every rank decides from the same shared state, so all ranks build the same
collectives in the same order.

It pays only where the Python thread has a core of its own while the step computes
(:func:`has_spare_core`): on a GPU, or with two cores for each rank on the machine. Ranks that share a
machine's cores otherwise take them from each other (measured on this project's 2-core machine: one rank
1.16-1.50x faster ahead, a tensor pair on the same two cores 0.75-0.90x). On a CPU it also has to be worth
it (:func:`build_share`): where building a step is a sliver of computing it (llama-1b: ~1 ms of ~250), the
compute's own threads use every core and the build only takes from them (measured 0.95x).
"""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from exo_lab.cluster.machine import boot_id, cpu_count
from exo_lab.defaults import LOOKAHEAD_MIN_BUILD_SHARE

#: on a CPU, step ahead only when building a step's graph takes at least this share of a step
MIN_BUILD_SHARE = LOOKAHEAD_MIN_BUILD_SHARE


def has_spare_core(group: mx.distributed.Group) -> bool:
    """Whether this rank can build a step while one computes: its device is a GPU, or it may run on two cores
    for each rank of ``group`` on this machine (one kernel boot id). Every rank of ``group`` calls it."""
    boot = boot_id()
    mine = zlib.crc32(boot.encode()) & 0x7FFFFFFF if boot else 0
    ids = cast("list[int]", mx.distributed.all_gather(mx.array([mine], mx.int32), group=group).tolist())
    sharing = ids.count(mine) if mine else 1
    return mx.default_device().type == mx.gpu or cpu_count() >= 2 * sharing


def build_share(shard: Any, steps: int = 5) -> float:
    """The median share of one decode step (one row, after a short prompt) that building its graph takes, on a
    one-stage shard (:class:`~exo_lab.engine.shard.Shard`). Every rank of a tensor group calls it together
    (the steps hold its all-reduces). Five steps: llama-1b q8's medians of three ranged 0.034-0.061 on a noisy
    2-core host, around the threshold it is compared with."""
    cache = shard.make_cache()
    mx.eval(shard(mx.array([[1, 2, 3, 4]], mx.int32), cache))
    shares = []
    for i in range(steps):
        t0 = time.perf_counter()
        out = shard(mx.array([[5 + i]], mx.int32), cache)
        built = time.perf_counter()
        mx.eval(out)
        shares.append((built - t0) / max(time.perf_counter() - t0, 1e-9))
    return statistics.median(shares)


def pays(group: mx.distributed.Group, shard: Any | None) -> bool:
    """This rank's vote on stepping ahead: a core to spare (:func:`has_spare_core`), and on a CPU a build that
    is at least :data:`MIN_BUILD_SHARE` of a step. ``shard``: this rank's, None where the instance has more than
    one stage (it never steps ahead). Every rank calls it: both measurements are collectives."""
    spare = has_spare_core(group)
    share = build_share(shard) if shard is not None else 0.0
    return shard is not None and spare and (mx.default_device().type == mx.gpu or share >= MIN_BUILD_SHARE)


@dataclass
class Step:
    """A decode step built and queued: its rows (in its batch order) and its shared vector (lazy):
    the sampled tokens, rank 0's stop flags (one per row) and its admission mark, as :meth:`Lockstep.share`."""

    rows: list[Any]
    shared: mx.array

    def carried(self, rows: list[Any]) -> list[int]:
        """Where each of ``rows`` that took part in this step sits in it: ``rows`` begins with those (rows
        that joined later come after them, as a batch appends them)."""
        at = {id(r): i for i, r in enumerate(self.rows)}
        out = []
        for r in rows:
            i = at.get(id(r))
            if i is None:
                break
            out.append(i)
        return out

    def inputs_for(self, rows: list[Any], inputs: list[int]) -> mx.array:
        """The next step's input tokens for ``rows``: this step's (lazy) tokens for the rows that took part,
        ``inputs`` (the batch's, in row order) for the rows that joined since."""
        idx = self.carried(rows)
        mine = self.shared[: len(self.rows)]
        if idx != list(range(len(self.rows))):
            mine = mine[mx.array(idx, mx.int32)] if idx else mx.zeros((0,), mx.int32)
        joined = inputs[len(idx) :]
        return mx.concatenate([mine, mx.array(joined, mx.int32)]) if joined else mine

    def split(self, values: list[int]) -> tuple[list[int], list[int], int]:
        """The evaluated shared vector as ``(tokens, flags, admission mark)``."""
        width = len(self.rows)
        return values[:width], values[width : 2 * width], values[-1]
