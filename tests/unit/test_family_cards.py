"""The card of every family against mlx_lm's own models: parameter bytes exact, caches within 1%."""

from __future__ import annotations

import json

import pytest
from mlx_lm.utils import quantize_model

from exo_lab.models import synthetic
from exo_lab.models.card import ModelCard, card_from_config
from tests.helpers.family_configs import FAMILY_CONFIGS
from tests.helpers.family_models import (
    buffer_cache_bytes,
    build,
    layer_parameters,
    logical_cache_bytes,
    parameter_bytes,
    run_tokens,
)

FAMILIES = sorted(FAMILY_CONFIGS)


def _assert_bytes_match(card, model, layers: int) -> None:
    held, outside = parameter_bytes(model, layers)
    assert card.layer_bytes == held
    assert card.embedding_bytes == outside.get("model.embed_tokens", 0)
    assert card.head_bytes == outside.get("lm_head", 0)
    assert card.norm_bytes == outside.get("model.norm", 0)
    assert card.weight_bytes == sum(held) + sum(outside.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_per_layer_are_the_models(family, dtype):
    config = FAMILY_CONFIGS[family]
    card = card_from_config(config, family, dtype=dtype)
    _assert_bytes_match(card, build(config, dtype), config["num_hidden_layers"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bytes_are_what_mlx_lm_stores(family, bits):
    config = FAMILY_CONFIGS[family]
    model, qconfig = quantize_model(build(config), dict(config), 32, bits)  # the model's own predicate: 8-bit routers
    card = card_from_config(qconfig, family, dtype="float32")
    _assert_bytes_match(card, model, config["num_hidden_layers"])
    assert card.weight_bytes < card_from_config(config, family, dtype="float32").weight_bytes


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "gpt_oss"])
def test_mixed_per_layer_quantization(family):
    """mlx_lm's mixed form: each module path may carry its own bits (here: layer 0 and the head at 8, the rest 4).

    (A module a predicate leaves unquantized is not written to the config by mlx_lm, only missing its
    scales in the files: ``ModelCard.from_dir`` counts those bytes, a config alone cannot.)"""
    config = FAMILY_CONFIGS[family]

    def predicate(path, module):
        if path.startswith("model.layers.0.") or path == "lm_head":
            return {"group_size": 32, "bits": 8}
        return True

    model, qconfig = quantize_model(build(config), dict(config), 32, 4, quant_predicate=predicate)
    assert any(isinstance(v, dict) for v in qconfig["quantization"].values())
    card = card_from_config(qconfig, family, dtype="float32")
    _assert_bytes_match(card, model, config["num_hidden_layers"])
    uniform = card_from_config({**config, "quantization": {"group_size": 32, "bits": 4}}, family, dtype="float32")
    assert card.layer_bytes[0] > uniform.layer_bytes[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("prompt", "decode"), [(40, 5), (240, 16), (7, 3)])
def test_cache_bytes_match_the_real_cache(family, prompt, decode):
    """After N tokens the card's bytes per layer are those of mlx_lm's cache (full, sliding, MLA latent,
    linear state); the preallocated buffers (KVCache grows by 256 tokens) are at least that."""
    config = FAMILY_CONFIGS[family]
    card = card_from_config(config, family, dtype="float32")
    caches = run_tokens(build(config), prompt, decode)
    n = prompt + decode
    predicted = card.kv_bytes_per_layer(n)
    for i, (c, want) in enumerate(zip(caches, predicted)):
        assert abs(logical_cache_bytes(c) - want) <= 0.01 * want, (family, i)
        assert buffer_cache_bytes(c) >= want
    assert card.kv_bytes(n) == sum(predicted)


def test_sliding_layers_stop_at_the_window_and_linear_layers_stay_constant():
    gpt = card_from_config(FAMILY_CONFIGS["gpt_oss"], "gpt_oss", dtype="float32")
    small, large = gpt.kv_bytes_per_layer(8), gpt.kv_bytes_per_layer(8000)
    assert large[0] == gpt.kv_bytes_per_layer(16)[0]  # sliding: window 16
    assert large[1] == 1000 * small[1]  # full attention grows with the context
    nxt = card_from_config(FAMILY_CONFIGS["qwen3_next"], "qwen3_next", dtype="float32")
    assert nxt.kv_bytes_per_layer(1)[0] == nxt.kv_bytes_per_layer(100_000)[0] > 0
    mla = card_from_config(FAMILY_CONFIGS["deepseek_v3"], "deepseek_v3", dtype="bfloat16")
    assert mla.kv_bytes_per_token == 4 * (64 + 32) * 2  # kv_lora_rank + qk_rope_head_dim per layer


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss", "qwen3_next"])
def test_active_bytes_count_the_routed_experts_a_token_uses(family):
    config = FAMILY_CONFIGS[family]
    card = card_from_config(config, family, dtype="float32")
    model = build(config)
    for i in range(card.num_layers):
        params = layer_parameters(model, i)
        routed = sum(a.nbytes for k, a in params.items() if ".switch_mlp." in k or "mlp.experts." in k)
        rest = sum(a.nbytes for a in params.values()) - routed
        want = rest + routed * card.experts_per_token / card.num_experts if routed else rest
        assert card.layer_active_bytes is not None
        assert abs(card.layer_active_bytes[i] - want) <= 1, (family, i)
    assert card.active_bytes() < sum(card.layer_bytes)
    assert card.flops_per_token() > 0


def test_dense_layers_of_deepseek_differ_from_its_moe_layers():
    card = card_from_config(FAMILY_CONFIGS["deepseek_v3"], "deepseek_v3")
    assert card.layer_bytes[0] != card.layer_bytes[1] == card.layer_bytes[2]
    assert card.weight_bytes_of(0, 1) == card.layer_bytes[0]


@pytest.mark.parametrize(
    ("family", "n", "problem"),
    [
        ("gemma3_text", 2, "no shard()"),
        ("qwen3_next", 2, "no shard()"),
        ("qwen3_moe", 4, "KV heads 2 does not divide by 4"),
        ("deepseek_v3", 4, None),  # MLA: heads split, the latent cache is kept whole per rank
        ("deepseek_v3", 8, "attention heads 4 does not divide by 8"),
        ("gpt_oss", 2, None),
        ("glm4_moe", 2, None),
        ("llama", 2, None),
    ],
)
def test_tensor_split_problems_follow_mlx_lm_shard(family, n, problem):
    card = card_from_config(FAMILY_CONFIGS[family], family)
    got = card.tensor_split_problem(n)
    assert (got is None) if problem is None else (got is not None and problem in got), got
    assert card.tensor_split_problem(1) is None


def test_quantization_groups_limit_tensor_splits():
    config = {**FAMILY_CONFIGS["qwen3_moe"], "quantization": {"group_size": 64, "bits": 4}}
    card = card_from_config(config, "q")
    assert card.tensor_split_problem(2) is not None  # expert intermediate 64 / 2 = 32 < one group of 64
    assert "quantization group" in (card.tensor_split_problem(2) or "")


@pytest.mark.parametrize("family", FAMILIES)
def test_from_dir_reads_the_files_and_takes_the_rest_from_the_config(tmp_path, family):
    """A checkpoint as mlx_lm holds it (stacked experts, 4-bit with mlx_lm's predicate, one module left
    unquantized, which only the files show): ``from_dir`` counts the files; active bytes, caches and
    splits come from the config."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = FAMILY_CONFIGS[family]
    model = build(config)
    own = getattr(model, "quant_predicate", None)  # e.g. 8-bit routers

    def predicate(path, module):
        if path.endswith("layers.1.self_attn.o_proj"):
            return False
        return own(path, module) if own else True

    model, qconfig = quantize_model(model, dict(config), 32, 4, quant_predicate=predicate)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps({**qconfig, "torch_dtype": "float32"}))
    card = ModelCard.from_dir(tmp_path)
    computed = card_from_config(qconfig, family, dtype="float32")
    held, outside = parameter_bytes(model, config["num_hidden_layers"])
    assert card.layer_bytes == held and card.weight_bytes == sum(held) + sum(outside.values())
    assert card.layer_bytes[0] == computed.layer_bytes[0]
    assert card.layer_bytes[1] > computed.layer_bytes[1]  # the unquantized o_proj of layer 1: only the files say
    assert card.kv_bytes_per_layer(100) == computed.kv_bytes_per_layer(100)
    assert card.tensor_split_problem(2) == computed.tensor_split_problem(2)
    assert card.active_bytes() <= sum(card.layer_bytes)


def test_attention_flops_follow_each_layers_reach():
    """Full layers grow with the square of the prompt, sliding ones linearly past the window, linear ones not at all."""
    gpt = card_from_config(FAMILY_CONFIGS["gpt_oss"], "gpt_oss")  # window 16: layers 0 and 2 slide
    dense = card_from_config(FAMILY_CONFIGS["llama"], "llama")
    p = 1000
    assert dense.attention_flops(p, 0, 1) == 4 * dense.attention_dim * p * (p + 1) / 2
    assert gpt.attention_flops(2 * p, 0, 1) < 2.01 * gpt.attention_flops(p, 0, 1)  # sliding: linear in the prompt
    assert gpt.attention_flops(2 * p, 1, 2) > 3.9 * gpt.attention_flops(p, 1, 2)  # full: quadratic
    nxt = card_from_config(FAMILY_CONFIGS["qwen3_next"], "qwen3_next")
    assert nxt.attention_flops(p, 0, 1) == 0 < nxt.attention_flops(p, 1, 2)


FAMILY_PRESETS = [
    "qwen3-moe-tiny",
    "deepseek-v3-tiny",
    "glm4-moe-tiny",
    "gpt-oss-tiny",
    "gemma3-tiny",
    "qwen3-next-tiny",
]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_each_family_presets_config_alone_gives_its_files_card(tmp_path, preset):
    """The card from config.json alone equals the card read from the synthetic model's files."""

    path = synthetic.create(tmp_path / preset, preset)
    files = ModelCard.from_dir(path)
    config = json.loads((path / "config.json").read_text())
    alone = card_from_config(config, files.name, dtype=files.dtype)
    assert alone.layer_bytes == files.layer_bytes
    assert (alone.embedding_bytes, alone.head_bytes, alone.weight_bytes) == (
        files.embedding_bytes,
        files.head_bytes,
        files.weight_bytes,
    )
    assert alone.kv_bytes_per_layer(100) == files.kv_bytes_per_layer(100)
    assert alone.active_bytes_per_token == files.active_bytes_per_token
