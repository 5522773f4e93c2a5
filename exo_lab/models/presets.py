"""The shapes of synthetic models (``synthetic:<preset>``): plain data, no MLX.

:mod:`exo_lab.models.synthetic` builds them; the model store and the CLI only name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exo_lab.models import tokenizer as bpe

DTYPE_NAMES = ("float32", "bfloat16", "float16")  #: the dtypes a synthetic model can be saved in


@dataclass(frozen=True)
class Preset:
    """Shape of a synthetic model; ``config`` holds Hugging Face config fields."""

    model_type: str
    config: dict[str, Any]
    dtype: str = "float32"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_TINY = dict(
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=bpe.BASE_VOCAB,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "llama",
        {**_TINY, "rope_theta": 10000.0, "tie_word_embeddings": False},
        description="Llama architecture, 4 layers, hidden 128 (~5 MB): for tests and the demo",
    ),
    "tiny-mha": Preset(
        "llama",
        {**_TINY, "num_key_value_heads": 4, "rope_theta": 10000.0, "tie_word_embeddings": False},
        description="tiny with 4 KV heads (splits over 4 tensor ranks)",
    ),
    "qwen2-tiny": Preset(
        "qwen2",
        {**_TINY, "rope_theta": 1000000.0, "tie_word_embeddings": False},
        description="Qwen2 architecture (attention biases), 4 layers, hidden 128",
    ),
    "qwen3-tiny": Preset(
        "qwen3",
        {**_TINY, "head_dim": 32, "rope_theta": 1000000.0, "tie_word_embeddings": True},
        description="Qwen3 architecture (q/k norms, tied head), 4 layers, hidden 128",
    ),
    "qwen3-think-tiny": Preset(
        "qwen3",
        {
            **_TINY,
            "vocab_size": bpe.BASE_VOCAB + 64,
            "head_dim": 32,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
        extra={"chat": "think"},
        description="qwen3-tiny as a thinking model: <think> tags in the vocabulary, a template that opens a think block",
    ),
    "qwen3-moe-tiny": Preset(
        "qwen3_moe",
        {
            **_TINY,
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        description="Qwen3-MoE: 8 routed experts, 2 per token, 4 layers, hidden 128",
    ),
    "deepseek-v3-tiny": Preset(
        "deepseek_v3",
        {
            **_TINY,
            "num_key_value_heads": 4,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "first_k_dense_replace": 1,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "moe_layer_freq": 1,
            "kv_lora_rank": 64,
            "q_lora_rank": 96,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 64,
            "v_head_dim": 64,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
        description="DeepSeek-V3 (MLA ranks 96/64, 1 dense layer then shared + 8 routed experts in 2 groups), 4 layers",
    ),
    "glm4-moe-tiny": Preset(
        "glm4_moe",
        {
            **_TINY,
            "head_dim": 32,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "first_k_dense_replace": 1,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "partial_rotary_factor": 0.5,
            "use_qk_norm": True,
            "attention_bias": True,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "tie_word_embeddings": False,
        },
        description="GLM-4 MoE: 1 dense layer then shared + 8 routed experts, partial rotary, q/k norms, 4 layers",
    ),
    "gpt-oss-tiny": Preset(
        "gpt_oss",
        {
            **_TINY,
            "head_dim": 32,
            "intermediate_size": 128,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "rope_theta": 150000,
            "tie_word_embeddings": False,
        },
        description="gpt-oss: alternating sliding (window 16) / full attention with sinks, 4 experts, 4 layers",
    ),
    "gemma3-tiny": Preset(
        "gemma3_text",
        {
            **_TINY,
            "num_hidden_layers": 6,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 16,
            "sliding_window_pattern": 3,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
        # Gemma's norms scale by 1 + weight: 0 is the identity; the post-norms' gain lets the blocks
        # outweigh the sqrt(hidden)-scaled embedding and the q/k norms' gain sharpens attention
        extra={"norm_init": {"post_": 15.0, "q_norm": 3.0, "k_norm": 3.0, "": 0.0}},
        description="Gemma 3 text: sliding window 16 on 2 of every 3 layers, scaled tied embedding, 6 layers",
    ),
    "qwen3-next-tiny": Preset(
        "qwen3_next",
        {
            **_TINY,
            "head_dim": 32,
            "full_attention_interval": 2,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [],
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        description="Qwen3-Next: linear attention (gated delta) on every other layer, 8 experts + shared, 4 layers",
    ),
    "llama-1b": Preset(
        "llama",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            tie_word_embeddings=True,
        ),
        dtype="bfloat16",
        description="the shape of Llama-3.2-1B (16 layers, hidden 2048, 32/8 heads, vocab 128256)",
    ),
}


def card_config(preset: Preset, dtype: str | None = None) -> dict[str, Any]:
    """The ``config.json`` fields of ``preset`` that its card reads: what :mod:`exo_lab.models.synthetic` writes,
    less the tokenizer's ids, so a preset is planned for without building it (the card is the same)."""
    return {
        "model_type": preset.model_type,
        "torch_dtype": dtype or preset.dtype,
        "attention_bias": preset.model_type == "qwen2",
        **preset.config,
    }


# Initialisation gains (see module docstring); chosen so greedy output varies.
