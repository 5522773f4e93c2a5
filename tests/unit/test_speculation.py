"""A pipeline's first stage builds the landing group's next step before the tick's tokens are read.

The step is built on the lazy shared vector over twins of the group's caches (:class:`Speculation`): kept when
the group lands with the same rows, it must give exactly the step built afterwards; dropped, it must leave the
caches as they were. Each family whose caches differ (KV, rotating windows, linear attention) is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo_lab.engine.lockstep import Batch, Layout, Lockstep
from exo_lab.engine.pipeline import Group, Speculation
from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import synthetic

PROMPTS = [[(i * 31 + k) % 500 + 3 for i in range(n)] for k, n in ((0, 20), (7, 9))]  # past the 16-token windows
TOKENS = [41, 97]


class Row:
    """A batch row (compared by identity, as the worker's rows are)."""


@pytest.fixture(scope="module", params=["tiny", "gpt-oss-tiny", "qwen3-next-tiny"])
def lockstep(request, tmp_path_factory) -> Lockstep:
    path: Path = synthetic.create(tmp_path_factory.mktemp(request.param) / "m", request.param)
    cfg = json.loads((path / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    shard, _ = load_shard(path, ShardSpec(0, n, n))
    return Lockstep(shard, mx.distributed.init(), Layout(0, ((0,),)), cfg["hidden_size"], mx.float32, 64)


def group_of(ls: Lockstep) -> Group:
    """Both prompts prefilled, in one batch: the landing group."""
    batch = Batch()
    for p in PROMPTS:
        batch.add(ls.prefill(p), p[-1], lambda x: mx.argmax(x, axis=-1), True)
    return Group(batch, [Row(), Row()])


def shared(tokens: list[int]) -> mx.array:
    """A tick's shared vector, lazy (``[tokens, flags, admission mark]``), as the first stage holds it."""
    return mx.array([*tokens, 0, 0, 0], mx.int32) + mx.zeros((1,), mx.int32)


def offsets(group: Group) -> list:
    """Each layer cache's offsets (per row), None where it has none (linear attention)."""
    out = [getattr(c, "offset", None) for c in group.batch.cache or []]
    return [o.tolist() if isinstance(o, mx.array) else o for o in out]


def step(ls: Lockstep, group: Group, tokens: list[int]) -> np.ndarray:
    """The group's next step built now on ``tokens`` (what the first stage does without speculating)."""
    assert group.batch.cache is not None
    out = ls.shard(mx.array(tokens, mx.int32)[:, None], group.batch.cache)
    return np.array(out.astype(mx.float32))


def test_a_kept_speculation_is_the_step_built_afterwards_and_the_steps_after_it(lockstep):
    ref, group = group_of(lockstep), group_of(lockstep)
    spec = Speculation.build(lockstep, group, shared(TOKENS))
    assert spec.settle(group) and group.built is not None
    got = np.array(group.built.astype(mx.float32))
    assert np.array_equal(got, step(lockstep, ref, TOKENS))  # bit for bit
    assert np.array_equal(step(lockstep, group, [5, 6]), step(lockstep, ref, [5, 6]))  # the caches advanced


def test_a_dropped_speculation_leaves_the_caches_as_they_were(lockstep):
    ref, group = group_of(lockstep), group_of(lockstep)
    before = offsets(group)
    spec = Speculation.build(lockstep, group, shared([-1, TOKENS[1]]))  # row 0 failed: it ends, the step is dropped
    mx.eval(spec.out)  # even computed, the twins' updates do not reach the group's caches
    group.batch.keep([1])
    group.rows = group.rows[1:]
    ref.batch.keep([1])
    assert not spec.settle(group) and group.built is None
    after = offsets(group)
    assert after == [o[1:] if isinstance(o, list) else o for o in before]
    assert np.array_equal(step(lockstep, group, [TOKENS[1]]), step(lockstep, ref, [TOKENS[1]]))
    assert np.array_equal(step(lockstep, group, [8]), step(lockstep, ref, [8]))
