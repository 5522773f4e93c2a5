"""Embeddings: the mean over a text's tokens of the model's last hidden state (after the final norm), L2-normalised.

A causal model is no trained embedder, but this is what Ollama and llama.cpp give for such models, and it is
the same on one process (an ``embed`` request on the Engine's thread) and on a pipeline, whose last stage
holds the final norm (:meth:`exo_lab.engine.lockstep.Lockstep.embed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx


def mean_pooled(hidden: mx.array) -> list[float]:
    """``hidden`` (``(1, n, d)``, after the final norm) averaged over its tokens and scaled to length 1."""
    v = mx.mean(hidden[0].astype(mx.float32), axis=0)
    v = v / mx.maximum(mx.linalg.norm(v), 1e-12)
    return [float(x) for x in v.tolist()]  # type: ignore[union-attr]


def embed_tokens(model: Any, tokens: Sequence[int]) -> list[float]:
    """The embedding of ``tokens`` by an mlx_lm model (its inner model's output is the normed last hidden state)."""
    hidden = model.model(mx.array([list(tokens)], mx.int32))
    return mean_pooled(hidden)
