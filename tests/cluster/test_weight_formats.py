"""A quantized instance: ranks converting an fp32 checkpoint to q4 at load generate the tokens one
process computing in q4 generates (greedy, the same layers split over two nodes' real ranks)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import exo_lab

# isort: split

import mlx.core as mx

from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import synthetic

pytestmark = pytest.mark.slow

PROMPT = [(i * 7919) % 8000 + 10 for i in range(40)]
MAX_TOKENS = 10


def one_process(path, fmt: str) -> list[int]:
    """Greedy tokens of the whole model in ``fmt``, as the ranks compute them: the prompt but its last
    token, then one token at a time."""
    layers = synthetic.PRESETS["tiny"].config["num_hidden_layers"]
    shard, _ = load_shard(path, ShardSpec(0, layers, layers, fmt))
    cache = shard.make_cache()
    mx.eval(shard(mx.array(PROMPT[:-1])[None], cache))
    token, out = PROMPT[-1], []
    for _ in range(MAX_TOKENS):
        token = int(mx.argmax(shard(mx.array([[token]]), cache)[0, -1]).item())
        out.append(token)
    return out


def test_q4_pipeline_matches_one_process_q4(tmp_path):
    tiny = synthetic.create(tmp_path / "tiny", "tiny", dtype="float32")
    want = one_process(tiny, "q4")
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(tiny, context=1024, prompt_tokens=64)
        pipe = next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)
        q4 = replace(pipe, ranks=[replace(r, dtype="q4") for r in pipe.ranks], dtypes=dict.fromkeys(pipe.dtypes, "q4"))
        assert "q4" in q4.describe()
        inst = cluster.launch(tiny, plan=q4)
        try:
            chunks = list(inst.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
            assert chunks[-1].error is None, chunks[-1].error
            assert [t for c in chunks for t in c.tokens] == want
        finally:
            inst.close()
    finally:
        cluster.close()
