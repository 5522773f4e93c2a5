"""Weight formats across ranks: ranks converting a checkpoint at load (an fp32 one to q4, a bf16 one to bf16w)
generate the tokens one process computing in that format generates (greedy, the model split over two nodes'
real ranks)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import exo_lab

# isort: split

import mlx.core as mx

from exo_lab import defaults
from exo_lab.engine.pipeline import prefill_chunks
from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import qmatmul, synthetic

pytestmark = pytest.mark.slow

PROMPT = [(i * 7919) % 8000 + 10 for i in range(40)]
MAX_TOKENS = 10


def one_process(path, fmt: str, prompt: list[int] = PROMPT) -> list[int]:
    """Greedy tokens of the whole model in ``fmt``, as the ranks compute them: the prompt but its last
    token, then one token at a time."""
    layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    shard, _ = load_shard(path, ShardSpec(0, layers, layers, fmt))
    cache = shard.make_cache()
    mx.eval(shard(mx.array(prompt[:-1])[None], cache))
    token, out = prompt[-1], []
    for _ in range(MAX_TOKENS):
        token = int(mx.argmax(shard(mx.array([[token]]), cache)[0, -1]).item())
        out.append(token)
    return out


def in_format(plan, fmt: str):
    """``plan`` with every rank computing in ``fmt``."""
    return replace(plan, ranks=[replace(r, dtype=fmt) for r in plan.ranks], dtypes=dict.fromkeys(plan.dtypes, fmt))


def launched_tokens(cluster, path, plan, prompt: list[int] = PROMPT) -> list[int]:
    """Greedy tokens of ``plan`` launched on ``cluster`` (closed after)."""
    inst = cluster.launch(path, plan=plan)
    try:
        chunks = list(inst.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        assert chunks[-1].error is None, chunks[-1].error
        return [t for c in chunks for t in c.tokens]
    finally:
        inst.close()


# 40 tokens; and 520: the pipeline prefills 8 chunks of 64 + 7 (q4 on every rank: finer chunks, the short one as
# decode rows), one process 519 at once
@pytest.mark.parametrize("length", [40, 520])
def test_q4_pipeline_matches_one_process_q4(tmp_path, length):
    prompt = [(i * 7919) % 8000 + 10 for i in range(length)]
    tiny = synthetic.create(tmp_path / "tiny", "tiny", dtype="float32")
    want = one_process(tiny, "q4", prompt)
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(tiny, context=1024, prompt_tokens=64)
        pipe = next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)
        q4 = in_format(pipe, "q4")
        assert "q4" in q4.describe()
        inst = cluster.launch(tiny, plan=q4)
        try:
            gen = inst.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, trace=True)
            chunks = list(gen)
            assert chunks[-1].error is None, chunks[-1].error
            assert [t for c in chunks for t in c.tokens] == want
            step = defaults.CPU_QUANTIZED_PREFILL_STEP  # every rank in q8/q4: finer chunks
            for rank in (0, 1):  # both stages
                sizes = [s.args["tokens"] for s in gen.trace.of(rank, "prefill")]
                assert sizes == [n for _, n in prefill_chunks(length, step)], (rank, sizes)
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
            assert launched_tokens(cluster, tiny, in_format(plan, "bf16w")) == want, strategy
    finally:
        cluster.close()


def test_tensor_ranks_in_q4_hold_quantized_slices_and_give_one_process_tokens(tmp_path):
    """tensor-2 over two nodes' real ranks in q4: from an fp32 checkpoint each rank quantizes its slices of the
    linears and of the vocabulary (once they stayed fp32, and the ranks generated fp32's tokens), and from the
    same weights stored quantized each rank splits the quantized vocabulary rows; both generate the tokens one
    process computing in q4 generates."""
    tiny = synthetic.create(tmp_path / "tiny", "tiny", dtype="float32")
    stored = synthetic.create(tmp_path / "tiny-q4", "tiny", dtype="float32", quantize=4)
    want = one_process(tiny, "q4")
    assert want != one_process(tiny, "float32")  # the format shows in the tokens
    cluster = exo_lab.local_cluster(2)
    try:
        for path, fmt in ((tiny, "q4"), (stored, None)):
            plans = cluster.preview(path, context=1024, prompt_tokens=64)
            plan = next(p for p in plans if p.strategy == "tensor" and p.num_nodes == 2)
            assert launched_tokens(cluster, path, in_format(plan, fmt) if fmt else plan) == want, path
    finally:
        cluster.close()


@pytest.mark.skipif(qmatmul.lane_groups() == 0, reason="no lane kernel on this CPU (AVX2 only)")
def test_q4_in_lane_order_splits_give_one_process_tokens(tmp_path, monkeypatch):
    """A model whose rows come in blocks of 8 groups (hidden 512; a tied head): every rank lays its q4 rows out
    in lane order (exo_lab.models.qmatmul.use_lanes) at load, its slices of a tensor split and of the vocabulary
    too, and pipeline-2 and tensor-2 generate the tokens one process in q4 generates."""
    base = synthetic.PRESETS["qwen3-tiny"]
    config = {**base.config, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 16}
    monkeypatch.setitem(synthetic.PRESETS, "lanes-tiny", replace(base, config=config, description="hidden 512"))
    model = synthetic.create(tmp_path / "lanes-tiny", "lanes-tiny", dtype="float32")
    shard, _ = load_shard(model, ShardSpec(0, 4, 4, "q4"))
    assert sum(1 for _, m in shard.named_modules() if getattr(m, "lanes", False)) == 1 + 4 * 7
    want = one_process(model, "q4")
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(model, context=1024, prompt_tokens=64)
        for strategy in ("pipeline", "tensor"):
            plan = next(p for p in plans if p.strategy == strategy and p.num_nodes == 2)
            assert launched_tokens(cluster, model, in_format(plan, "q4")) == want, strategy
    finally:
        cluster.close()
