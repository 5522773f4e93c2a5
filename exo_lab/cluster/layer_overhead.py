"""What one decoder layer costs at decode beyond reading its weights: MLX's per-operation cost, measured.

A decode step runs ~100 MLX operations per layer (projections, norms, RoPE, attention, the cache's
update, the residuals; on a CPU the fused ``mx.fast`` norms, RoPE and attention fall back to several
operations each). Each costs a few microseconds to build and dispatch whatever its size: ~0.7 ms per
layer on this project's 2-core VM, 11 ms of llama-1b's ~150 ms per token on one core. A tensor rank
pays it in full for its half of every layer, so a tensor pair's token costs more than half of one
process's (measured: a tensor rank's shapes of llama-1b 87 ms against the whole model's 159 and a
16-layer model of hidden 64's 12); a small model's decode is almost all of it.

:func:`measure_layer_overhead` times decode steps through a stack of Llama layers of hidden 64 (weights
of a few kilobytes: what is left is the per-operation cost) after a short prompt, and divides by the layers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import mlx.core as mx

from exo_lab.models.presets import PRESETS

HIDDEN = 64
LAYERS = 8
CONTEXT = 64  #: prompt tokens in the cache before the timed steps


def measure_layer_overhead(steps: int = 48, layers: int = LAYERS) -> float:
    """Seconds one Llama decoder layer of hidden 64 takes per decoded token here (median over ``steps``)."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        intermediate_size=2 * HIDDEN,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HIDDEN // 2,
        rms_norm_eps=1e-5,
        vocab_size=256,
        rope_theta=500000.0,
        rope_scaling=PRESETS["llama-1b"].config["rope_scaling"],  # Llama 3's RoPE, as the models use
    )
    stack = llama.LlamaModel(args).layers
    mx.eval([layer.parameters() for layer in stack])
    caches = [KVCache() for _ in stack]

    def step(h: mx.array, mask: Any) -> mx.array:  # mlx_lm takes "causal" or an array
        for layer, cache in zip(stack, caches):
            h = layer(h, mask, cache=cache)
        return h

    mx.eval(step(mx.random.normal((1, CONTEXT, HIDDEN), key=mx.random.key(0)), "causal"))
    h = mx.random.normal((1, 1, HIDDEN), key=mx.random.key(1))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        h = step(h, None)
        mx.eval(h)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) / layers
