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
    assert card.quantization == ({"group_size": 64, "bits": 4} if quantize else None)
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
