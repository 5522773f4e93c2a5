"""Embeddings: OpenAI's ``POST /v1/embeddings`` and Ollama's ``POST /api/embed`` (and its older ``/api/embeddings``).

Each input's embedding is the mean over its tokens of the model's last hidden state, L2-normalised
(:mod:`exo_lab.engine.embedding`), from any backend that lists ``embeddings`` in its features (an Engine;
a pipeline instance's last rank). ``dimensions`` keeps the first that many values, normalised again.
OpenAI's client asks for ``base64`` (little-endian float32) by default; ``float`` gives lists.
An input longer than the model's context is a 400, except for Ollama, which cuts it unless
``truncate`` is false.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Sequence
from typing import Any

from tornado.ioloop import IOLoop

from exo_lab.api import common
from exo_lab.api.base import GenerationHandler
from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.ollama import find_model
from exo_lab.api.registry import Backend
from exo_lab.api.schema.ollama import OllamaEmbeddingsRequest, OllamaEmbedRequest
from exo_lab.api.schema.openai import EmbeddingsRequest


def input_tokens(
    backend: Backend, inputs: Sequence[str | list[int]], truncate: bool = False, param: str = "input"
) -> list[list[int]]:
    """Each input as token ids, within the model's context (cut with ``truncate``, else a 400)."""
    if "embeddings" not in backend.features:
        raise bad_request(f"The model {backend.name!r} does not compute embeddings here.", "model")
    vocab = common.vocab_size(backend)
    context = backend.context_length
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            tokens = backend.encode(item)
        else:
            if vocab is not None and any(not 0 <= t < vocab for t in item):
                raise bad_request(f"'{param}' holds token ids outside this model's vocabulary (0..{vocab - 1}).", param)
            tokens = list(item)
        if not tokens:
            raise bad_request(f"'{param}' item {i} encodes to no tokens.", param)
        if context and len(tokens) > context:
            if not truncate:
                raise bad_request(
                    f"'{param}' item {i} has {len(tokens)} tokens; this model's context is {context} tokens.",
                    param,
                    "context_length_exceeded",
                )
            tokens = tokens[:context]
        out.append(tokens)
    return out


def cut(vector: list[float], dimensions: int | None, param: str = "dimensions") -> list[float]:
    """The first ``dimensions`` values, scaled back to length 1 (all of them for None)."""
    if dimensions is None:
        return vector
    if dimensions > len(vector):
        raise bad_request(f"'{param}' is {dimensions}; this model's embeddings have {len(vector)}.", param)
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


async def embed(backend: Backend, tokens: list[list[int]]) -> list[list[float]]:
    """The embeddings, computed off the event loop; 503 when the backend cannot take work now."""
    try:
        return await IOLoop.current().run_in_executor(None, backend.embed, tokens)
    except NotImplementedError as exc:
        raise bad_request(str(exc), "model") from exc
    except RuntimeError as exc:
        raise ApiError(
            503, str(exc), type="server_error", code="model_unavailable", headers={"Retry-After": "5"}
        ) from exc


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class EmbeddingsHandler(GenerationHandler):
    """``POST /v1/embeddings``."""

    schema = EmbeddingsRequest

    async def post(self) -> None:
        try:
            if await self.forwarded():
                return
            req = self.body()
            backend = common.ready_backend(self.registry, req.model)
            tokens = input_tokens(backend, req.inputs())
            vectors = [cut(v, req.dimensions) for v in await embed(backend, tokens)]
        except ApiError as err:
            self.send_api_error(err)
            return
        data = [
            {"object": "embedding", "index": i, "embedding": _base64(v) if req.encoding_format == "base64" else v}
            for i, v in enumerate(vectors)
        ]
        n = sum(len(t) for t in tokens)
        self.send_json(
            {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": n, "total_tokens": n}}
        )


class OllamaEmbedHandler(GenerationHandler):
    """``POST /api/embed``."""

    family = "ollama"
    schema = OllamaEmbedRequest

    async def post(self) -> None:
        start = time.perf_counter()
        try:
            if await self.forwarded():
                return
            req = self.body()
            backend = common.ready_backend(self.registry, find_model(self.registry, req.model))
            tokens = input_tokens(backend, req.inputs(), truncate=req.truncate is not False)
            vectors = [cut(v, req.dimensions) for v in await embed(backend, tokens)]
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(
            {
                "model": req.model,
                "embeddings": vectors,
                "total_duration": int((time.perf_counter() - start) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": sum(len(t) for t in tokens),
            }
        )


class OllamaEmbeddingsHandler(GenerationHandler):
    """``POST /api/embeddings`` (Ollama's older route): ``{"embedding": [...]}``."""

    family = "ollama"
    schema = OllamaEmbeddingsRequest

    async def post(self) -> None:
        try:
            if await self.forwarded():
                return
            req = self.body()
            backend = common.ready_backend(self.registry, find_model(self.registry, req.model))
            if not req.prompt:  # Ollama answers an empty prompt with an empty embedding
                self.send_json({"embedding": []})
                return
            (vector,) = await embed(backend, input_tokens(backend, [req.prompt], truncate=True, param="prompt"))
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json({"embedding": vector})


def routes(kw: dict[str, Any]) -> list[tuple]:
    """The embeddings routes: OpenAI's, and Ollama's under ``/api`` and ``/ollama/api``."""
    out: list[tuple] = [(r"/v1/embeddings", EmbeddingsHandler, kw)]
    for prefix in ("/api", "/ollama/api"):
        out += [(prefix + r"/embed", OllamaEmbedHandler, kw), (prefix + r"/embeddings", OllamaEmbeddingsHandler, kw)]
    return out
