"""OpenAI's legacy Completions: ``POST /v1/completions`` (plain and SSE).

The prompt is continued as it is (no chat template): a string, token ids, or a list of up to
:data:`~exo_lab.api.schema.openai.MAX_PROMPTS` of either, each its own choice (``index``), generated
together. ``echo`` puts the prompt before each choice's text; ``logprobs`` (0-5) gives the legacy
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (with ``echo``, the prompt's tokens come
first with a null log-probability: this server does not score prompts). ``max_tokens`` defaults to 16,
as OpenAI's. A stream sends each choice's pieces in turn (choices one after the other), the last
with its ``finish_reason``, then a usage chunk when ``stream_options.include_usage``, then ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from exo_lab.api import common
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.openai_chat import FINGERPRINT, openai_finish_reason
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.schema.openai import CompletionRequest
from exo_lab.engine.generation import GenerationRequest, TokenLogprob, Usage

#: OpenAI's default ``max_tokens`` for legacy completions
DEFAULT_MAX_TOKENS = 16


@dataclass
class Choice:
    """One prompt of the request: its text (for ``echo``), its tokens and what to generate."""

    index: int
    prompt_text: str
    prompt_tokens: list[int]
    request: GenerationRequest


@dataclass
class Completion:
    """A validated legacy completion request: the backend, each prompt's generation, and how to answer."""

    model: str
    backend: Backend
    choices: list[Choice]
    stream: bool
    echo: bool
    logprobs: int | None
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if usage is not None or not self.stream:
            out["usage"] = usage
        elif self.include_usage:
            out["usage"] = None
        return out

    def logprobs_of(
        self, choice: Choice, items: list[TokenLogprob], offset: int, with_prompt: bool
    ) -> dict[str, Any] | None:
        """The legacy logprobs object of ``items`` (the prompt's tokens first ``with_prompt``), text offsets from
        ``offset``."""
        if self.logprobs is None:
            return None
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if with_prompt:
            decode = self.backend.tokenizer.decode
            for t in choice.prompt_tokens:
                tokens.append(decode([t]))
                values.append(None)
                tops.append(None)
        for item in items:
            tokens.append(item.text)
            values.append(item.logprob)
            tops.append({text: lp for _, text, lp in item.top} if self.logprobs else {})
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def failure(self, error: str) -> ApiError:
        return ApiError(500, f"Generation failed: {error}", type="server_error")


def usage_of(usages: list[Usage]) -> dict[str, Any]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def parse_request(req: CompletionRequest, registry: ModelRegistry) -> Completion:
    """What to generate for a validated body; raises ApiError (400 / 404 / 503) before any generation."""
    backend = common.ready_backend(registry, req.model)
    vocab = common.vocab_size(backend)
    sampling = common.sampling_params(
        backend,
        req.temperature,
        req.top_p,
        req.top_k,
        req.seed,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=req.logit_bias,
    )
    choices = []
    for i, prompt in enumerate(req.prompts()):
        if isinstance(prompt, str):
            tokens, text = backend.encode(prompt), prompt
        else:
            if vocab is not None and any(not 0 <= t < vocab for t in prompt):
                raise bad_request(
                    f"'prompt' holds token ids outside this model's vocabulary (0..{vocab - 1}).", "prompt"
                )
            tokens, text = list(prompt), backend.tokenizer.decode(list(prompt))
        if not tokens:
            raise bad_request("'prompt' encodes to no tokens.", "prompt")
        request = common.generation_request(
            backend,
            tokens,
            req.max_tokens or DEFAULT_MAX_TOKENS,
            sampling,
            req.stop,
            prompt_param="prompt",
            ignore_eos=bool(req.ignore_eos),
            logprobs=req.logprobs,
        )
        choices.append(Choice(i, text, tokens, request))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Completion(req.model, backend, choices, bool(req.stream), bool(req.echo), req.logprobs, include_usage)


def choice_json(
    c: Completion, choice: Choice, text: str, items: list[TokenLogprob], finish: str | None
) -> dict[str, Any]:
    """A whole choice of a non-streamed answer."""
    shown = (choice.prompt_text if c.echo else "") + text
    return {
        "text": shown,
        "index": choice.index,
        "logprobs": c.logprobs_of(choice, items, 0, c.echo),
        "finish_reason": openai_finish_reason(finish),
    }
