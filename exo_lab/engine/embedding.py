"""Embeddings: the mean over a text's tokens of the model's last hidden state (after the final norm), L2-normalised.

A causal model is no trained embedder, but this is what Ollama and llama.cpp give for such models, and it is
the same on one process (:meth:`exo_lab.engine.generator.Engine.embed`, on the engine's own thread through a
:class:`Task`) and on a pipeline, whose last stage holds the final norm.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
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


class Task:
    """Work for another thread (the engine's): run it there with :meth:`run`, wait for it with :meth:`result`."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self.fn()
        except Exception as exc:  # given to the waiting caller
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError("the engine did not run the task in time")
        if self._error is not None:
            raise self._error
        return self._value
