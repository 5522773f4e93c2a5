import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from exo_lab.models import ModelCard, synthetic


def real_tensors(path):
    weights = {}
    for f in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


@pytest.mark.parametrize("preset,quantize", [("tiny", None), ("qwen3-tiny", None), ("qwen2-tiny", 4)])
def test_card_matches_the_tensors(tmp_path, preset, quantize):
    path = synthetic.create(tmp_path / preset, preset, quantize=quantize)
    card = ModelCard.from_dir(path)
    weights = real_tensors(path)
    assert card.weight_bytes == sum(w.nbytes for w in weights.values())
    for i, nbytes in enumerate(card.layer_bytes):
        assert nbytes == sum(w.nbytes for k, w in weights.items() if k.startswith(f"model.layers.{i}."))
    assert card.embedding_bytes == sum(w.nbytes for k, w in weights.items() if "embed_tokens" in k)
    assert card.head_bytes == sum(w.nbytes for k, w in weights.items() if k.startswith("lm_head"))
    assert card.num_layers == len(card.layer_bytes) == 4
    assert card.architecture == synthetic.PRESETS[preset].model_type
    assert card.tie_word_embeddings == (card.head_bytes == 0)
    written = json.loads((path / "config.json").read_text()).get("quantization")
    assert card.quantization == written  # as mlx_lm wrote it, mode and per-layer entries included
    assert (written or {}).get("bits") == quantize and (not quantize or written["group_size"] == 64)
    assert ModelCard.from_json(card.to_json()) == card


def test_kv_bytes_per_token_matches_a_real_cache(tiny_model):
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    card = ModelCard.from_dir(tiny_model)
    model, tok = load(str(tiny_model))
    cache = make_prompt_cache(model)
    n = 37
    model(mx.array([list(range(1, n + 1))]), cache=cache)
    assert all(c.offset == n for c in cache)
    used = sum(c.keys[..., :n, :].nbytes + c.values[..., :n, :].nbytes for c in cache)
    assert used == n * card.kv_bytes_per_token


def test_tensor_split_rules(tiny_model):
    card = ModelCard.from_dir(tiny_model)  # 4 heads, 2 KV heads, intermediate 384
    assert card.can_split_tensor(1) and card.can_split_tensor(2)
    assert "KV heads" in card.tensor_split_problem(4)
    assert "attention heads" in card.tensor_split_problem(3)


def test_in_memory_parameters_match_the_card(tiny_model):
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    card = ModelCard.from_dir(tiny_model)
    assert sum(v.nbytes for _, v in tree_flatten(model.parameters())) == card.weight_bytes


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny", "qwen3-tiny"])
def test_card_from_config_alone_matches_the_files(tmp_path, preset):
    import json

    from exo_lab.models.card import card_from_config

    path = synthetic.create(tmp_path / preset, preset)
    real = ModelCard.from_dir(path)
    computed = card_from_config(json.loads((path / "config.json").read_text()), real.name)
    assert computed.layer_bytes == real.layer_bytes
    assert computed.weight_bytes == real.weight_bytes
    assert computed.kv_bytes_per_token == real.kv_bytes_per_token


def test_card_from_config_alone_matches_a_quantized_checkpoint(tmp_path):
    import json

    from exo_lab.models.card import card_from_config

    path = synthetic.create(tmp_path / "q", "qwen2-tiny", quantize=4)
    real = ModelCard.from_dir(path)
    computed = card_from_config(json.loads((path / "config.json").read_text()), real.name)
    assert computed.layer_bytes == real.layer_bytes
    assert (computed.embedding_bytes, computed.head_bytes, computed.norm_bytes) == (
        real.embedding_bytes,
        real.head_bytes,
        real.norm_bytes,
    )


# published sizes: (total parameters, active parameters per token) in billions, head included
PUBLISHED = {
    "deepseek-v3": (671, 37),
    "kimi-k2": (1026, 32),
    "qwen3-235b-a22b": (235, 22),
    "gpt-oss-120b": (117, 5.1),
    "glm-4.6": (353, 33),  # 355B with the next-token-prediction layer, which inference does not load
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_what_if_cards_have_the_published_sizes(name):
    from exo_lab.models.whatif import what_if_card, what_if_names

    assert name in what_if_names()
    card = what_if_card(name)  # bfloat16: 2 bytes per parameter
    total, active = PUBLISHED[name]
    assert card.weight_bytes / 2e9 == pytest.approx(total, rel=0.02)
    assert card.active_bytes_per_token / 2e9 == pytest.approx(active, rel=0.1)
    four = what_if_card(f"what-if:{name}@4bit")
    assert 0.26 < four.weight_bytes / card.weight_bytes < 0.30  # 4 bits + a bf16 scale and bias per 64 weights
    assert ModelCard.from_json(four.to_json()) == four


def test_what_if_deepseek_v3_layers_and_cache():
    from exo_lab.models.whatif import what_if_card

    card = what_if_card("deepseek-v3")
    assert card.num_layers == 61 and card.num_experts == 256 and card.experts_per_token == 8
    assert card.layer_bytes[0] == card.layer_bytes[2] < card.layer_bytes[3] == card.layer_bytes[60]  # 3 dense layers
    assert card.kv_bytes_per_token == 61 * (512 + 64) * 2  # the MLA latent, not 128 heads of K and V
    assert not card.kv_splits_with_tensor
    gpt = what_if_card("gpt-oss-120b")
    assert gpt.kv_bytes(100_000, 0, 1) == gpt.kv_bytes(128, 0, 1)  # a sliding layer: window 128
    assert gpt.kv_bytes(100_000, 1, 2) > gpt.kv_bytes(128, 1, 2)
    with pytest.raises(KeyError):
        what_if_card("llama-9000")


def test_a_card_written_before_the_per_layer_fields_still_plans():
    from exo_lab.models.whatif import what_if_card

    old = what_if_card("qwen3-235b-a22b").to_json()
    for key in ("layer_active_bytes", "layer_flops", "layer_caches", "tensor_dims", "tensor_group_dims"):
        old.pop(key)
    card = ModelCard.from_json(old)
    assert card.active_bytes() == sum(card.layer_bytes)
    assert card.kv_bytes_per_token == 2 * card.num_layers * card.num_key_value_heads * card.head_dim * 2
    assert card.flops_per_token() > 0 and card.tensor_split_problem(2) is None
