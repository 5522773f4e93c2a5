"""Family adapters in one process: layer kinds, tied heads, the tensors a shard reads, batched caches."""

from __future__ import annotations

import json
from typing import cast

import mlx.core as mx
import pytest

from exo_lab.engine.families import FULL, LINEAR, SLIDING, family, tensor_split_problem, tied_embeddings
from exo_lab.engine.lockstep import Batch, Layout, Lockstep
from exo_lab.engine.shard import ShardSpec, load_shard, tensor_names
from exo_lab.models import synthetic

FAMILIES = ["qwen3-moe-tiny", "deepseek-v3-tiny", "glm4-moe-tiny", "gpt-oss-tiny", "gemma3-tiny", "qwen3-next-tiny"]


def test_layer_kinds_follow_each_models_own_masks():
    kinds = {p: family(m).kinds(m) for p in FAMILIES for m in [synthetic.build_model(p)[0]]}
    assert kinds["gpt-oss-tiny"] == [SLIDING, FULL] * 2  # layer_types
    assert kinds["gemma3-tiny"] == [SLIDING, SLIDING, FULL] * 2  # sliding_window_pattern 3
    assert kinds["qwen3-next-tiny"] == [LINEAR, FULL] * 2  # full_attention_interval 2
    assert (
        kinds["deepseek-v3-tiny"] == [FULL] * 4 and family(synthetic.build_model("deepseek-v3-tiny")[0]).full_mask_array
    )


def test_tensor_split_problem_names_the_families_mlx_lm_cannot_shard():
    for preset in ("gemma3-tiny", "qwen3-next-tiny"):
        model = synthetic.build_model(preset)[0]
        problem = tensor_split_problem(model, 2)
        assert problem is not None and "shard()" in problem
        assert tensor_split_problem(model, 1) is None
    for preset in ("qwen3-moe-tiny", "deepseek-v3-tiny", "glm4-moe-tiny", "gpt-oss-tiny", "tiny"):
        assert tensor_split_problem(synthetic.build_model(preset)[0], 2) is None


class Pair:
    """A stand-in group of two: splitting fails before any communication."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def test_tensor_splits_that_cannot_work_fail_with_the_reason(tmp_path):
    path = synthetic.create(tmp_path / "g", "gemma3-tiny")
    with pytest.raises(ValueError, match="no shard"):
        load_shard(path, ShardSpec(0, 6, 6), tensor_group=Pair())  # type: ignore[arg-type]
    # 4-bit experts of intermediate size 64 hold one group of 64: half of it is no whole group
    path = synthetic.create(tmp_path / "q", "qwen3-moe-tiny", quantize=4)
    with pytest.raises(ValueError, match="qwen3_moe cannot be split over 2 tensor ranks at group size 64"):
        load_shard(path, ShardSpec(0, 4, 4), tensor_group=Pair())  # type: ignore[arg-type]


def test_tensor_pairs_inside_a_pipeline_refuse_layers_they_cannot_split(tmp_path):
    path = synthetic.create(tmp_path / "m", "qwen3-moe-tiny")
    with pytest.raises(ValueError, match="dense Llama-like layers only, not qwen3_moe"):
        load_shard(path, ShardSpec(0, 2, 4), pair=(0, None))


def test_a_stage_reads_only_its_layers_stacked_experts_and_the_tied_embedding(tmp_path):
    path = synthetic.create(tmp_path / "g", "gemma3-tiny")
    assert tied_embeddings(json.loads((path / "config.json").read_text()))
    last = tensor_names(path, ShardSpec(4, 6, 6), tied=False)  # no head stored: tied whatever the caller says
    assert "model.embed_tokens.weight" in last and "model.norm.weight" in last
    assert {int(n.split(".")[2]) for n in last if n.startswith("model.layers.")} == {4, 5}
    moe = synthetic.create(tmp_path / "m", "qwen3-moe-tiny", quantize=4)
    first = tensor_names(moe, ShardSpec(0, 1, 4), tied=False)
    assert "model.layers.0.mlp.switch_mlp.gate_proj.scales" in first  # experts stacked per layer, as mlx_lm stores them
    assert not any(n.startswith(("lm_head", "model.norm", "model.layers.1.")) for n in first)


@pytest.mark.parametrize("preset", FAMILIES)
def test_batched_decoding_gives_each_rows_tokens_alone(tmp_path, preset):
    """Rows of different lengths join and leave a batch (rotating and linear-attention caches merge too)."""
    path = synthetic.create(tmp_path / preset, preset)
    cfg = json.loads((path / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    shard, _ = load_shard(path, ShardSpec(0, n, n))
    group = mx.distributed.init()
    ls = Lockstep(shard, group, Layout(0, ((0,),)), cfg["hidden_size"], mx.float32, prefill_step_size=64)
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    prompts = [[(i * 31) % 8000 + 3 for i in range(40)], [(i * 17) % 8000 + 5 for i in range(9)], list(range(5, 105))]
    steps = 10
    alone = [list(ls.generate(p, steps, greedy, lambda: False, greedy=True)) for p in prompts]
    batch, outs, rows = Batch(), [[], [], []], [0, 1]
    for r in rows:
        batch.add(ls.prefill(prompts[r]), prompts[r][-1], greedy, True)
    while rows:
        if len(outs[0]) == 3:  # a long row joins mid-way
            batch.add(ls.prefill(prompts[2]), prompts[2][-1], greedy, True)
            rows.append(2)
        tokens = ls.step(batch)
        assert tokens is not None
        batch.inputs = cast("list[int]", tokens.tolist())
        for r, t in zip(rows, batch.inputs):
            outs[r].append(t)
        keep = [i for i, r in enumerate(rows) if len(outs[r]) < steps]
        rows = [rows[i] for i in keep]
        batch.keep(keep)
    assert outs == alone
