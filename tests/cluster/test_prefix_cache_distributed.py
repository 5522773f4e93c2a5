"""The prefix cache on a pipeline of real rank processes: every rank keeps its own layers' caches, rank 0
decides the hit, and a conversation's greedy tokens are those of one process without the cache."""

from __future__ import annotations

import pytest

import exo_lab
from exo_lab.models import synthetic

pytestmark = pytest.mark.slow

SYSTEM = [(i * 7919) % 5000 + 10 for i in range(120)]
TURNS = [[(t * 31 + k) % 3000 + 20 for k in range(9)] for t in range(3)]


def conversation(backend) -> tuple[list[list[int]], list[int]]:
    """Each turn's greedy tokens and cached prompt tokens; the next prompt holds the reply, its end changed (as a
    chat template re-tokenizes a reply), so prefixes diverge inside what the cache holds."""
    history, replies, cached = list(SYSTEM), [], []
    for turn in TURNS:
        history += turn
        chunks = list(backend.generate(history, max_tokens=10, temperature=0, ignore_eos=True))
        assert chunks[-1].error is None, chunks[-1].error
        reply = [t for c in chunks for t in c.tokens]
        replies.append(reply)
        cached.append(chunks[-1].usage.cached_tokens)
        history += reply[:-2] + [5, 6]
    return replies, cached


@pytest.mark.parametrize("strategy", ["pipeline", "tensor", "single"])
def test_ranks_reuse_their_caches_and_match_one_process(tmp_path_factory, strategy):
    """Also for one-stage instances, whose rows end with one step more in their caches (decoded ahead)."""
    tiny = synthetic.create(tmp_path_factory.mktemp("prefix-dist") / "tiny", "tiny")
    with exo_lab.Engine(tiny, prefix_cache_bytes=0) as eng:
        reference, none = conversation(eng)
    assert none == [0, 0, 0]
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(tiny, context=2048, prompt_tokens=64)
        plan = next(p for p in plans if p.strategy == strategy and p.num_nodes == (1 if strategy == "single" else 2))
        inst = cluster.launch(tiny, plan=plan)
        try:
            replies, cached = conversation(inst)
            assert replies == reference
            # turn 2 reuses turn 1's prompt and its reply but the last 2 tokens (+ the first turn's first reply token)
            assert cached[0] == 0 and cached[1] == len(SYSTEM) + 9 + 8 and cached[2] > cached[1]
            status = [inst._worker(r, "GET", "/status")["prefix_cache"] for r in sorted(inst.controls)]
            assert [s["hits"] for s in status] == [2] * plan.num_nodes and all(s["entries"] >= 1 for s in status)
        finally:
            inst.delete()
    finally:
        cluster.close()
