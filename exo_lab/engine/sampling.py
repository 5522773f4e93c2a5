"""Token sampling: greedy, temperature, top-k, top-p and min-p, seeded per request; and the logits
processing before it (logit bias, repetition, presence and frequency penalties).

Each sampler owns its PRNG key (split once per token), so the same seed gives
the same tokens whatever else runs in the process.

:class:`Penalties` changes one sequence's logits before they are normalised and sampled (greedy rows
too). It keeps the sequence's history itself: it is called once per step with the step's input token
(the previous step's output, or the prompt's last token first), in mlx_lm's logits-processor form
``(tokens, logits) -> logits`` where only ``tokens[-1]`` is read, so the Engine (mlx_lm's
``BatchGenerator``) and the distributed sampling rank (:mod:`exo_lab.engine.lockstep`) use it alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
#: seeds are unsigned 64-bit integers (what ``mx.random.key`` takes)
MAX_SEED = 2**64
MAX_REPETITION_PENALTY = 10.0
#: the most tokens one request may bias (OpenAI takes 300)
MAX_LOGIT_BIAS = 1024
#: fields :meth:`SamplingParams.to_json` writes only when they differ from their defaults
_OPTIONAL = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "repetition_context")


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
    #: keep tokens at least this fraction as likely as the most likely one (0: off)
    min_p: float = 0.0
    #: divide the positive logits (multiply the negative ones) of tokens in the prompt or output (1: off)
    repetition_penalty: float = 1.0
    #: subtract from the logits of tokens the output holds, once (0: off); OpenAI's range -2..2
    presence_penalty: float = 0.0
    #: subtract from the logits of tokens the output holds, once per occurrence (0: off)
    frequency_penalty: float = 0.0
    #: ``(token id, bias)`` pairs added to the logits (-100..100)
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: how many of the latest tokens (prompt and output) the repetition penalty looks at (0: all)
    repetition_context: int = 0

    def __post_init__(self) -> None:
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = bias.items()
        if isinstance(bias, list | tuple | type({}.items())):
            pairs = []
            for pair in bias:
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    raise ValueError(f"logit_bias must be (token id, bias) pairs, got {pair!r}")
                token = int(pair[0]) if isinstance(pair[0], str) and pair[0].isdigit() else pair[0]
                pairs.append((token, pair[1]))
            object.__setattr__(self, "logit_bias", tuple(sorted(pairs)))
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
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            return f"min_p must be between 0 and 1, got {self.min_p!r}"
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            return f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}"
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                return f"{name} must be between -2 and 2, got {value!r}"
        if not _is_int(self.repetition_context) or self.repetition_context < 0:
            return f"repetition_context must be an integer >= 0, got {self.repetition_context!r}"
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            return f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}"
        for token, bias in self.logit_bias:
            if not _is_int(token) or token < 0:
                return f"logit_bias keys must be token ids (integers >= 0), got {token!r}"
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                return f"logit_bias values must be between -100 and 100, got {bias!r} for token {token}"
        return None

    @property
    def processes(self) -> bool:
        """Whether logits are changed before sampling (a bias or a penalty)."""
        return bool(
            self.logit_bias
            or self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_json(self) -> dict:
        """The fields as JSON; those beyond temperature, top-p, top-k and seed only when they are set."""
        out = asdict(self)
        out["logit_bias"] = [list(pair) for pair in self.logit_bias]
        unset = SamplingParams()
        for name in _OPTIONAL:
            if getattr(self, name) == getattr(unset, name):
                del out[name]
        return out


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


def _min_p(logits: mx.array, p: float) -> mx.array:
    """Mask tokens less likely than ``p`` times the most likely one (the most likely always stays)."""
    if p <= 0.0:
        return logits
    top = mx.max(logits, axis=-1, keepdims=True)
    return mx.where(logits < top + math.log(p), -mx.inf, logits)


class Penalties:
    """One sequence's logits processing: logit bias, then repetition, presence and frequency penalties.

    Called once per decode step with the step's input token as ``tokens[-1]`` (see the module docstring);
    ``prompt`` is the sequence's prompt. The repetition penalty looks at prompt and output (the latest
    ``repetition_context`` tokens, or all), presence and frequency at the output only (as OpenAI and vLLM).
    """

    def __init__(self, params: SamplingParams, prompt: Sequence[int]) -> None:
        self.params = params
        self.prompt = mx.array(list(prompt[:-1]), mx.int32)  # the last prompt token comes as the first input
        self.inputs: list[mx.array] = []  # each step's input token, shape (1,)
        ids = [t for t, _ in params.logit_bias]
        self.bias_ids = mx.array(ids, mx.int32) if ids else None
        self.bias_values = mx.array([b for _, b in params.logit_bias], mx.float32) if ids else None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self.inputs.append(mx.array(tokens).reshape(-1)[-1:].astype(mx.int32))
        return self.apply(logits)

    def apply(self, logits: mx.array) -> mx.array:
        """``logits`` (``(1, vocab)``) changed by the bias and by the penalties for the history so far."""
        p = self.params
        vocab = logits.shape[-1]
        out = logits
        if self.bias_ids is not None and self.bias_values is not None:
            ids = self.bias_ids
            keep = ids < vocab
            out = out.at[:, mx.where(keep, ids, 0)].add(mx.where(keep, self.bias_values, 0.0).astype(out.dtype))
        history = mx.concatenate([self.prompt, *self.inputs]) if self.inputs else self.prompt
        if p.repetition_penalty != 1.0 and history.size:
            window = history[-p.repetition_context :] if p.repetition_context else history
            seen = (mx.zeros((vocab,), mx.int32).at[mx.minimum(window, vocab - 1)].add(1) > 0)[None]
            penalised = mx.where(out < 0, out * p.repetition_penalty, out / p.repetition_penalty)
            out = mx.where(seen, penalised, out).astype(logits.dtype)
        generated = self.inputs[1:]  # the first input is the prompt's last token
        if (p.presence_penalty or p.frequency_penalty) and generated:
            counts = mx.zeros((vocab,), mx.float32).at[mx.concatenate(generated)].add(1.0)
            change = p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            out = out - change.astype(out.dtype)[None]
        return out


def make_penalties(params: SamplingParams, prompt: Sequence[int]) -> Penalties | None:
    """The logits processing ``params`` asks for on a sequence with ``prompt``, or None."""
    return Penalties(params, prompt) if params.processes else None


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
        logits = _min_p(logits, params.min_p)
        return mx.random.categorical(logits, axis=-1, key=sub)

    return sample
