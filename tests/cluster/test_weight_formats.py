"""Weight formats across ranks: ranks converting a checkpoint at load (an fp32 one to q4, a bf16 one to bf16w)
generate the tokens one process computing in that format generates (greedy, the model split over two nodes'
real ranks)."""

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


def one_process(path, fmt: str, prompt: list[int] = PROMPT) -> list[int]:
    """Greedy tokens of the whole model in ``fmt``, as the ranks compute them: the prompt but its last
    token, then one token at a time."""
    layers = synthetic.PRESETS["tiny"].config["num_hidden_layers"]
    shard, _ = load_shard(path, ShardSpec(0, layers, layers, fmt))
    cache = shard.make_cache()
    mx.eval(shard(mx.array(prompt[:-1])[None], cache))
    token, out = prompt[-1], []
    for _ in range(MAX_TOKENS):
        token = int(mx.argmax(shard(mx.array([[token]]), cache)[0, -1]).item())
        out.append(token)
    return out


# 40 tokens; and 520: the pipeline prefills 512 + 7 rows (the short chunk as decode rows), one process 519 at once
@pytest.mark.parametrize("length", [40, 520])
def test_q4_pipeline_matches_one_process_q4(tmp_path, length):
    prompt = [(i * 7919) % 8000 + 10 for i in range(length)]
    tiny = synthetic.create(tmp_path / "tiny", "tiny", dtype="float32")
    want = one_process(tiny, "q4", prompt)
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(tiny, context=1024, prompt_tokens=64)
        pipe = next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)
        q4 = replace(pipe, ranks=[replace(r, dtype="q4") for r in pipe.ranks], dtypes=dict.fromkeys(pipe.dtypes, "q4"))
        assert "q4" in q4.describe()
        inst = cluster.launch(tiny, plan=q4)
        try:
            chunks = list(inst.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
            assert chunks[-1].error is None, chunks[-1].error
            assert [t for c in chunks for t in c.tokens] == want
        finally:
            inst.close()
    finally:
        cluster.close()


def test_bf16_checkpoint_in_bf16w_splits_give_one_process_tokens(tmp_path):
    """A bf16 checkpoint held in 16 bits and computed in fp32 (``bf16w``, exo_lab's kernel): the planner picks it
    by default (exact weights, half fp32's memory, faster decode), and pipeline-2 and tensor-2 over two nodes'
    real ranks generate the tokens one process computing in bf16w generates."""
    tiny = synthetic.create(tmp_path / "tiny-bf16", "tiny", dtype="bfloat16")
    want = one_process(tiny, "bf16w")
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(tiny, context=1024, prompt_tokens=64)
        assert plans.best.ranks[0].dtype == "bf16w", plans.best.describe()
        for strategy in ("pipeline", "tensor"):
            plan = next(p for p in plans if p.strategy == strategy and p.num_nodes == 2)
            plan = replace(
                plan, ranks=[replace(r, dtype="bf16w") for r in plan.ranks], dtypes=dict.fromkeys(plan.dtypes, "bf16w")
            )
            inst = cluster.launch(tiny, plan=plan)
            try:
                chunks = list(inst.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
                assert chunks[-1].error is None, chunks[-1].error
                assert [t for c in chunks for t in c.tokens] == want, strategy
            finally:
                inst.close()
    finally:
        cluster.close()
