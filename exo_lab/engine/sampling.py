"""Token sampling: greedy, temperature, top-k and top-p, seeded per request.

Each sampler owns its PRNG key (split once per token), so the same seed gives
the same tokens whatever else runs in the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
#: seeds are unsigned 64-bit integers (what ``mx.random.key`` takes)
MAX_SEED = 2**64


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is wrong with these parameters, or None (anything accepted here samples without error)."""
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            return f"temperature must be between 0 and 100, got {self.temperature!r}"
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            return f"top_p must be in (0, 1], got {self.top_p!r}"
        if not _is_int(self.top_k) or self.top_k < 0:
            return f"top_k must be an integer >= 0, got {self.top_k!r}"
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            return f"seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _top_k(logits: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    n = logits.shape[-1]
    kth = mx.sort(logits, axis=-1)[..., n - k : n - k + 1]
    return mx.where(logits < kth, -mx.inf, logits)


def _top_p(logits: mx.array, p: float) -> mx.array:
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < p  # always keeps the most likely token
    keep = mx.zeros_like(keep_sorted)
    keep = mx.put_along_axis(keep, order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def make_sampler(params: SamplingParams) -> Sampler:
    """A function from log-probabilities ``(1, vocab)`` to a token ``(1,)``."""
    if params.greedy:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    state = {"key": mx.random.key(seed)}

    def sample(logprobs: mx.array) -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        logits = logprobs.astype(mx.float32) / params.temperature
        logits = _top_k(logits, params.top_k)
        logits = _top_p(logits, params.top_p)
        return mx.random.categorical(logits, axis=-1, key=sub)

    return sample
