"""What a decode step costs beyond reading weights: MLX's per-operation cost per layer and per step, measured.

A decode step runs ~60 MLX operations per layer (projections, norms, RoPE, attention, the cache's
update, the residuals; on a CPU ``mx.fast``'s attention falls back to several operations, its norms and
RoPE would too but exo_lab computes them as one each: :mod:`exo_lab.models.fused`, swapped into the layers
measured here as into a shard's). Each costs a few microseconds to build and dispatch whatever its size: on
one core of this project's 2-core VM ~0.13 ms per layer (~0.29 ms with MLX's norms and RoPE), ~2 ms of
llama-1b's ~57 ms per q4 token. A tensor rank pays it in full for its half of every layer, so a tensor
pair's token costs more than half of one process's; a small model's decode is almost all of it.

:func:`measure_layer_overhead` times decode steps through a stack of Llama layers of hidden 64 (weights
of a few kilobytes: what is left is the per-operation cost) after a short prompt, and divides by the layers.

A step also runs work outside its layers, once however many layers it has: the embedding, the final norm,
the head, sampling, and reading the tokens back into Python. :func:`measure_step_overhead` times whole
steps of the same small model (vocabulary 256, greedy, ``tolist``) against its layers alone; the
difference is that per-step cost (~0.3 ms on one core here). A 4-layer demo model's step is half
layers and half this; llama-1b's is almost all weights.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx

from exo_lab.models import fused
from exo_lab.models.presets import PRESETS

HIDDEN = 64
LAYERS = 8
CONTEXT = 64  #: prompt tokens in the cache before the timed steps


def _model(layers: int) -> Any:
    """A Llama model of hidden 64 and a vocabulary of 256, random weights, evaluated."""
    from mlx_lm.models import llama

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
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    fused.use_fused(model)  # as load_shard does
    return model


def measure_layer_overhead(steps: int = 48, layers: int = LAYERS) -> float:
    """Seconds one Llama decoder layer of hidden 64 takes per decoded token here (median over ``steps``)."""
    layers_step = _layers_stepper(_model(layers))
    return statistics.median(_timed(layers_step, steps)) / layers


def measure_step_overhead(steps: int = 24, layers: int = LAYERS) -> float:
    """Seconds a greedy decode step takes here beyond its layers (embedding, norm, head, argmax, reading the
    token): a whole model's steps against its layers' alone, taken in turns, medians over ``steps``, never
    below 0."""
    model = _model(layers)
    whole, alone = _whole_stepper(model), _layers_stepper(model)
    whole_s, alone_s = [], []
    for _ in range(steps + 2):
        whole_s += _timed(whole, 1)
        alone_s += _timed(alone, 1)
    return max(0.0, statistics.median(whole_s[2:]) - statistics.median(alone_s[2:]))


def _timed(step: Callable[[], None], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _layers_stepper(model: Any) -> Callable[[], None]:
    """One decode step through ``model``'s layers alone (no embedding, head or sampling), after a short prompt."""
    from mlx_lm.models.cache import KVCache

    stack = model.model.layers
    caches = [KVCache() for _ in stack]

    def forward(h: mx.array, mask: Any) -> mx.array:  # mlx_lm takes "causal" or an array
        for layer, cache in zip(stack, caches):
            h = layer(h, mask, cache=cache)
        return h

    mx.eval(forward(mx.random.normal((1, CONTEXT, HIDDEN), key=mx.random.key(0)), "causal"))
    h = [mx.random.normal((1, 1, HIDDEN), key=mx.random.key(1))]

    def step() -> None:
        h[0] = forward(h[0], None)
        mx.eval(h[0])

    return step


def _whole_stepper(model: Any) -> Callable[[], None]:
    """One greedy decode step of the whole ``model`` with its token read back, after a short prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[i % 256 for i in range(CONTEXT)]]), cache=cache))
    token = [1]

    def step() -> None:
        logits = model(mx.array([token], mx.int32), cache=cache)
        token[0] = cast(int, mx.argmax(logits[0, -1, :]).item())

    return step
