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

# Initialisation gains (see module docstring); chosen so greedy output varies.
