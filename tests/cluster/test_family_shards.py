"""Every model family as real MLX ranks: pipelines and tensor groups give one process's tokens and logits.

Each family's tiny preset runs as 2 and 3 pipeline stages (separate processes, ring backend):
the last stage's logits for a prompt longer than the sliding windows and than one prefill
chunk are bit-identical to ``mlx_lm`` in one process, and the greedy tokens the ranks generate
in lock step are the same. Tensor groups of 2 (fp32) give the same tokens for the families
mlx_lm can ``shard()``; 4-bit checkpoints (and a mixed per-layer one) load as shards and match.
Last, launched instances (agents, shard workers) decode concurrent requests of the families with
rotating and linear-attention caches in one batch and give each request its tokens alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import exo_lab
from exo_lab.models import synthetic
from tests.helpers.ranks import ranks_run, single_process_logits, single_process_tokens

pytestmark = pytest.mark.slow

FAMILIES = ["qwen3-moe-tiny", "deepseek-v3-tiny", "glm4-moe-tiny", "gpt-oss-tiny", "gemma3-tiny", "qwen3-next-tiny"]
TENSOR = ["qwen3-moe-tiny", "deepseek-v3-tiny", "glm4-moe-tiny", "gpt-oss-tiny"]  # mlx_lm has shard() for these
PROMPT = [(i * 31) % 8000 + 3 for i in range(40)]  # past gpt-oss's and Gemma's 16-token windows
LONG = [(i * 7919) % 8000 + 10 for i in range(150)]  # three 64-token prefill chunks
TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    made: dict[tuple[str, int | str | None], Path] = {}

    def get(preset: str, quantize: int | str | None = None) -> Path:
        if (preset, quantize) not in made:
            made[preset, quantize] = synthetic.create(root / f"{preset}-{quantize}", preset, quantize=quantize)
        return made[preset, quantize]

    return get


def layers(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def assert_matches_one_process(path: Path, tmp_path: Path, splits, prompt: list[int]) -> None:
    logits, tokens = ranks_run(path, tmp_path, splits, len(splits), prompt, tokens=TOKENS)
    ref = single_process_logits(path, prompt)
    assert logits.shape == ref.shape and np.array_equal(logits, ref)  # bit-identical, not merely close
    assert tokens == single_process_tokens(path, prompt, TOKENS)


@pytest.mark.parametrize("preset", FAMILIES)
def test_two_stage_pipeline_is_exact(model, tmp_path, preset):
    path = model(preset)
    n = layers(path)
    assert_matches_one_process(path, tmp_path, [n // 2, n - n // 2], PROMPT)


@pytest.mark.parametrize("preset", FAMILIES)
def test_three_stage_pipeline_is_exact(model, tmp_path, preset):
    """Uneven stages (1, n-2, 1): gpt-oss's and Qwen3-Next's first stage holds one layer kind only."""
    path = model(preset)
    n = layers(path)
    assert_matches_one_process(path, tmp_path, [1, n - 2, 1], LONG)


@pytest.mark.parametrize("preset,quantize", [(p, None) for p in TENSOR] + [("gpt-oss-tiny", 4)])
def test_tensor_two_gives_the_same_tokens(model, tmp_path, preset, quantize):
    """fp32 (and gpt-oss 4-bit, whose expert width 128 holds two groups of 64: one per rank)."""
    path = model(preset, quantize)  # partial sums in another order change only the last bits
    logits, tokens = ranks_run(path, tmp_path, "tensor", 2, PROMPT, tokens=TOKENS)
    ref = single_process_logits(path, PROMPT)
    assert np.max(np.abs(logits - ref)) <= 1e-3 * np.max(np.abs(ref))
    assert tokens == single_process_tokens(path, PROMPT, TOKENS)


def test_tensor_four_splits_mla_heads_and_experts(model, tmp_path):
    """DeepSeek-V3 over 4 ranks: one MLA head each (the latent cache stays whole on every rank), experts in quarters."""
    path = model("deepseek-v3-tiny")
    logits, tokens = ranks_run(path, tmp_path, "tensor", 4, PROMPT, tokens=TOKENS)
    ref = single_process_logits(path, PROMPT)
    assert np.max(np.abs(logits - ref)) <= 1e-3 * np.max(np.abs(ref))
    assert tokens == single_process_tokens(path, PROMPT, TOKENS)


@pytest.mark.parametrize("preset,quantize", [(p, 4) for p in FAMILIES] + [("deepseek-v3-tiny", "mixed_3_6")])
def test_quantized_checkpoints_load_as_shards_and_match(model, tmp_path, preset, quantize):
    path = model(preset, quantize)
    n = layers(path)
    assert_matches_one_process(path, tmp_path, [n // 2, n - n // 2], PROMPT)


BATCH_PROMPTS = [list(range(5, 60)), [3, 4, 5], [(i * 7919) % 8000 + 10 for i in range(90)]]
BATCH_TOKENS = [14, 20, 8]  # rows leave at different steps; the short prompt's row rotates its window while batched


@pytest.mark.parametrize("preset", ["gpt-oss-tiny", "qwen3-next-tiny"])
def test_instances_batch_rotating_and_linear_caches(model, preset):
    path = model(preset)
    with exo_lab.Engine(path, max_batch=1) as eng:
        refs = [
            [t for c in eng.generate(p, max_tokens=n, temperature=0, ignore_eos=True) for t in c.tokens]
            for p, n in zip(BATCH_PROMPTS, BATCH_TOKENS)
        ]
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(path, context=2048, prompt_tokens=64)
        inst = cluster.launch(path, plan=next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2))
        try:
            gens = [
                inst.generate(p, max_tokens=n, temperature=0, ignore_eos=True)
                for p, n in zip(BATCH_PROMPTS, BATCH_TOKENS)
            ]
            chunks = [list(g) for g in gens]
            assert all(c[-1].error is None for c in chunks)
            assert [[t for c in cs for t in c.tokens] for cs in chunks] == refs
            # rows decoded together (how many steps they shared depends on when each reached the ranks), and the
            # stages built steps before their input came, over twins of these caches on the first stage
            stats = inst.stats
            assert stats["peak_batch"] >= 2 and stats["steps_prebuilt"] > 0
        finally:
            inst.delete()
    finally:
        cluster.close()
