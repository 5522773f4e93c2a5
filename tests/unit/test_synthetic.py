import hashlib
import json
from pathlib import Path

import mlx.core as mx
import pytest

from exo_lab.models import synthetic
from exo_lab.models import tokenizer as bpe


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_arguments_give_byte_identical_files(tmp_path):
    a = synthetic.create(tmp_path / "a", "tiny", seed=3)
    b = synthetic.create(tmp_path / "b", "tiny", seed=3)
    c = synthetic.create(tmp_path / "c", "tiny", seed=4)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]


def test_hugging_face_layout(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"


def test_tiny_is_small_and_fast(tmp_path):
    import time

    bpe.base_tokenizer_json()  # trained once per machine, then cached
    t = time.perf_counter()
    path = synthetic.create(tmp_path / "t", "tiny")
    assert time.perf_counter() - t < 5
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 20e6


def test_transformers_autotokenizer_loads_offline(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = tok("def main():")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.decode(ids, skip_special_tokens=True) == "def main():"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_padded_vocabulary_decodes_every_id():
    tok = bpe.build(bpe.BASE_VOCAB + 300, "llama")
    assert tok.get_vocab_size() == bpe.BASE_VOCAB + 300
    for i in range(tok.get_vocab_size()):
        assert tok.id_to_token(i) is not None
    assert tok.decode([bpe.BASE_VOCAB + 299]) == f"<pad_{bpe.BASE_VOCAB + 299}>"


FAMILY_PRESETS = [
    "qwen3-moe-tiny",
    "deepseek-v3-tiny",
    "glm4-moe-tiny",
    "gpt-oss-tiny",
    "gemma3-tiny",
    "qwen3-next-tiny",
]


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny", "qwen3-tiny", *FAMILY_PRESETS])
def test_greedy_output_varies_with_the_prompt(preset, tmp_path):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(synthetic.create(tmp_path / preset, preset)))[:2]
    outs = []
    for prompt in ["import os\nimport sys\n", "The quick brown fox jumps", "class Foo(object):"]:
        ids = mx.array(tok.encode(prompt))
        out = [t for t, _ in generate_step(ids, model, max_tokens=16)]
        assert len(set(out)) > 3, f"{preset} repeats itself: {out}"
        outs.append(tuple(out))
    assert len(set(outs)) == 3


def test_sharded_above_the_limit_loads_with_mlx_lm(tmp_path, monkeypatch):
    from mlx_lm import load

    monkeypatch.setattr(synthetic, "SHARD_BYTES", 1_000_000)
    path = synthetic.create(tmp_path / "sharded", "tiny")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model, tok = load(str(path))[:2]
    single = load(str(synthetic.create(tmp_path / "single", "tiny")))[0]
    x = mx.array([tok.encode("hello world")])
    assert mx.array_equal(model(x), single(x))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtypes_and_quantization(tmp_path, dtype):
    from mlx_lm import load

    path = synthetic.create(tmp_path / f"q-{dtype}", "tiny", dtype=dtype, quantize=4)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"} and cfg["torch_dtype"] == dtype
    model, tok = load(str(path))[:2]
    logits = model(mx.array([tok.encode("hello")]))
    assert logits.dtype == getattr(mx, dtype)
    assert mx.isfinite(logits).all().item()


def test_family_presets_are_byte_identical_per_arguments(tmp_path):
    a = synthetic.create(tmp_path / "a", "deepseek-v3-tiny", seed=1, quantize=4)
    b = synthetic.create(tmp_path / "b", "deepseek-v3-tiny", seed=1, quantize=4)
    assert digest(a) == digest(b)


def test_family_presets_carry_their_real_config_fields(tmp_path):
    from mlx_lm import load

    cfg = synthetic.build_model("deepseek-v3-tiny")[1]
    assert cfg["first_k_dense_replace"] == 1 and cfg["n_shared_experts"] == 1 and cfg["kv_lora_rank"] == 64
    assert cfg["n_group"] == 2 and cfg["topk_group"] == 1 and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    model = synthetic.build_model("gpt-oss-tiny")[0]
    assert model.model.layer_types == ["sliding_attention", "full_attention"] * 2
    assert [type(c).__name__ for c in model.make_cache()] == ["RotatingKVCache", "KVCache"] * 2
    path = synthetic.create(tmp_path / "gemma", "gemma3-tiny")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index  # tied, as Gemma 3 checkpoints are
    model = load(str(path))[0]
    assert model.tie_word_embeddings
    experts = [k for k in index if "switch_mlp" in k]
    assert not experts  # gemma is dense; MoE presets store stacked experts:
    moe = synthetic.build_model("qwen3-moe-tiny")[0]
    assert moe.model.layers[0].mlp.switch_mlp.gate_proj.weight.shape == (8, 64, 128)


def test_quantized_like_mlx_lm_writes_it(tmp_path):
    from mlx_lm import load

    oss = synthetic.create(tmp_path / "oss", "gpt-oss-tiny", quantize=4)
    q = json.loads((oss / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}  # its quant_predicate
    mixed = synthetic.create(tmp_path / "mixed", "qwen3-moe-tiny", quantize="mixed_3_6")
    q = json.loads((mixed / "config.json").read_text())["quantization"]
    per_layer = {k: v["bits"] for k, v in q.items() if isinstance(v, dict)}
    assert set(per_layer.values()) == {3, 6} and q["bits"] == 3
    for path in (oss, mixed):
        model, tok = load(str(path))[:2]
        assert mx.isfinite(model(mx.array([tok.encode("hello")]))).all().item()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        synthetic.create(tmp_path / "x", "nope")
    with pytest.raises(ValueError, match="quantize"):
        synthetic.create(tmp_path / "q", "tiny", quantize="mixed_9_9")
    with pytest.raises(ValueError, match="dtype"):
        synthetic.create(tmp_path / "y", "tiny", dtype="int8")
    synthetic.create(tmp_path / "z", "tiny")
    with pytest.raises(FileExistsError):
        synthetic.create(tmp_path / "z", "tiny")
