"""Ollama request bodies: chat, generate, show."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from exo_lab.api.schema import Int, MinP, Part, Penalty, RepetitionPenalty, RequestModel, Seed, Stops, fail
from exo_lab.api.schema.openai import ChatTool
from exo_lab.engine.chat import ROLES


def _format(value: Any) -> Any:
    if value is None or value == "" or value == "json" or isinstance(value, dict):
        return value or None
    raise fail(f'{{param}} must be "json" or a JSON schema object, got {json.dumps(value)}')


#: ``"json"`` (any JSON object) or a JSON schema
Format = Annotated[Any, PlainValidator(_format), WithJsonSchema({"anyOf": [{"const": "json"}, {"type": "object"}]})]


class Options(Part):
    """The ``options`` Ollama's clients send; unknown ones (``num_ctx``, ...) are ignored."""

    num_predict: Int | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Int | None = None
    seed: Seed | None = None
    stop: Stops = ()
    min_p: MinP | None = None
    repeat_penalty: RepetitionPenalty | None = None
    repeat_last_n: Int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None


def _no_images(images: Any) -> None:
    if images:
        raise fail("{param}: images are not supported: this model takes text only", "images")


class OllamaMessage(Part):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier reply's reasoning (not sent to the model again)

    @model_validator(mode="after")
    def _text_only(self) -> OllamaMessage:
        _no_images(self.images)
        return self

    def to_chat(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.role == "assistant" and self.tool_calls is not None:
            msg["tool_calls"] = self.tool_calls
        if self.role == "tool" and self.tool_name is not None:
            msg["name"] = self.tool_name
        return msg


class OllamaRequest(RequestModel):
    style: ClassVar[str] = "ollama"

    model: str
    stream: bool | None = None
    format: Format = None
    options: Options | None = None
    keep_alive: Any = None
    #: a thinking model's thinking: on (its reasoning in ``thinking``), off, or a level (gpt-oss)
    think: bool | Literal["low", "medium", "high"] | None = None


class ChatRequest(OllamaRequest):
    """``POST /api/chat``: no messages only loads the model."""

    messages: list[OllamaMessage] | None = None
    tools: list[ChatTool] | None = None


class GenerateRequest(OllamaRequest):
    """``POST /api/generate``: no prompt (and no context) only loads the model."""

    prompt: str | None = None
    system: str | None = None
    raw: bool | None = None
    suffix: str | None = None
    images: list[Any] | None = None
    context: list[Int] | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerateRequest:
        if self.suffix:
            raise fail("{param} (fill-in-the-middle) is not supported by this server", "suffix")
        _no_images(self.images)
        return self


class ShowRequest(RequestModel):
    """``POST /api/show`` (``name`` is the older spelling of ``model``)."""

    style: ClassVar[str] = "ollama"

    model: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _named(self) -> ShowRequest:
        if not (self.model or self.name):
            raise fail("model is required", "model", "missing_required_parameter")
        return self


class OllamaEmbedRequest(RequestModel):
    """``POST /api/embed``: ``input`` (a string or strings), cut to the context unless ``truncate`` is false."""

    style: ClassVar[str] = "ollama"

    model: str
    input: str | Annotated[list[str], Field(min_length=1)]
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    dimensions: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _inputs(self) -> OllamaEmbedRequest:
        if any(not s for s in self.inputs()):
            raise fail("input must not be empty", "input")
        return self

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OllamaEmbeddingsRequest(RequestModel):
    """``POST /api/embeddings`` (Ollama's older route): one ``prompt``."""

    style: ClassVar[str] = "ollama"

    model: str
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class OllamaPullRequest(RequestModel):
    """``POST /api/pull`` (``name`` is the older spelling of ``model``)."""

    style: ClassVar[str] = "ollama"

    model: str | None = None
    name: str | None = None
    insecure: bool | None = None
    stream: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> OllamaPullRequest:
        if not (self.model or self.name):
            raise fail("model is required", "model", "missing_required_parameter")
        return self
