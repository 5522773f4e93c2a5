"""What every API family does the same way: find a ready model, build a generation request, submit it.

Each step raises :class:`ApiError` (400 / 404 / 503) before any response
starts, so a handler renders it in its own family's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.events import ToolParsing
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.tools import tool_format
from exo_lab.engine.chat import chat_prompt_tokens
from exo_lab.engine.generation import EngineBusy, Generation, GenerationRequest
from exo_lab.engine.guided import SchemaError, json_object, json_schema, shortest_output, tool_calls, vocabulary
from exo_lab.engine.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 4096
#: a requested token limit above this (and above the model's context) is a mistake, answered with a 400;
#: below it, a limit beyond the room left in the context is cut to that room
MAX_TOKENS_CEILING = 1 << 20


def ready_backend(registry: ModelRegistry, model: str) -> Backend:
    """The backend serving ``model``: 404 if there is none, 503 (with Retry-After) while it is not ready."""
    backend = registry.get(model)
    state = backend.state
    if state in ("launching", "loading", "replacing"):
        raise ApiError(
            503,
            f"The model {model!r} is {state}; retry shortly.",
            type="server_error",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )
    if state in ("failed", "stopped"):
        raise ApiError(
            503,
            f"The model {model!r} is {state}: {backend.error or ''}",
            type="server_error",
            code="model_unavailable",
            headers={"Retry-After": "30"},
        )
    return backend


def chat_tokens(
    backend: Backend, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None, param: str = "messages"
) -> list[int]:
    """Prompt tokens for chat messages (400 when the messages cannot be rendered)."""
    try:
        if tools:
            return chat_prompt_tokens(backend.tokenizer, messages, tools)
        return backend.chat_tokens(messages)
    except ValueError as exc:
        raise bad_request(str(exc), param) from exc
    except Exception as exc:  # a chat template that raises (jinja errors) on what the client sent
        if type(exc).__module__.startswith("jinja2"):
            raise bad_request(f"The model's chat template rejected the messages: {exc}", param) from exc
        raise


def generation_request(
    backend: Backend,
    prompt: Sequence[int],
    max_tokens: int | None,
    sampling: SamplingParams,
    stop: Sequence[str] = (),
    *,
    max_tokens_param: str = "max_tokens",
    prompt_param: str = "messages",
    ignore_eos: bool = False,
    logprobs: int | None = None,
    grammar: Any = None,
    grammar_param: str = "response_format",
) -> GenerationRequest:
    """A GenerationRequest within the model's context; 400 for what the backend cannot do."""
    context = backend.context_length
    if context and len(prompt) >= context:
        raise bad_request(
            f"The prompt has {len(prompt)} tokens; this model's context is {context} tokens.",
            prompt_param,
            "context_length_exceeded",
        )
    ceiling = max(context or 0, MAX_TOKENS_CEILING)
    if max_tokens is not None and max_tokens > ceiling:
        raise bad_request(
            f"'{max_tokens_param}' is {max_tokens}, more than any context this server offers "
            f"({ceiling} tokens); ask for fewer.",
            max_tokens_param,
        )
    features = backend.features
    if logprobs is not None and "logprobs" not in features:
        raise bad_request("This model's backend does not report logprobs.", "logprobs")
    if grammar is not None and "grammar" not in features:
        raise bad_request(f"This model's backend cannot constrain its output ('{grammar_param}').", grammar_param)
    room = (context - len(prompt)) if context else DEFAULT_MAX_TOKENS
    limit = min(max_tokens or DEFAULT_MAX_TOKENS, room)
    if grammar is not None:
        need = shortest_output(grammar, vocabulary(backend.tokenizer))
        if need is not None and limit < need:
            raise bad_request(
                f"'{max_tokens_param}' is {limit}, too few for the shortest output '{grammar_param}' "
                f"asks for ({need} tokens); ask for more.",
                max_tokens_param,
            )
    return GenerationRequest(
        tuple(prompt),
        max_tokens=limit,
        sampling=sampling,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        grammar=grammar,
    )


def forced_tool_grammar(tools: Sequence[dict[str, Any]], forced: str | None, param: str = "tool_choice") -> Any:
    """The constraint that forces a call of ``forced`` (or of any of ``tools``) in the Hermes format.

    The call's arguments follow the tool's ``parameters`` schema.
    """
    try:
        return tool_calls(tools, forced)
    except SchemaError as exc:
        raise bad_request(f"A tool's parameters are not a JSON schema this server can follow: {exc}", param) from exc


def submit(backend: Backend, request: GenerationRequest) -> Generation:
    """Queue the request: 429 when the backend's queue is full, 503 when it failed since validation."""
    try:
        return backend.submit(request)
    except EngineBusy as exc:
        raise ApiError(
            429, str(exc), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
        ) from exc
    except RuntimeError as exc:
        raise ApiError(
            503, str(exc), type="server_error", code="model_unavailable", headers={"Retry-After": "5"}
        ) from exc


def format_grammar(kind: str, schema: Any, param: str) -> Any:
    """The constraint a response format asks for: None (``text``), any JSON object (``json_object``),
    or the schema's (``json_schema``; ``param`` names the schema in errors)."""
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        return schema_grammar(schema, param)
    return None


def tool_setup(
    backend: Backend, tools: Sequence[dict[str, Any]], mode: str, forced: str | None, can_force: bool = True
) -> tuple[ToolParsing | None, Any]:
    """How calls are found in ``backend``'s output (None when tools are off), and the grammar that forces
    a call (for ``required`` / a named function, where the model's format allows and ``can_force``)."""
    if not tools or mode == "none":
        return None, None
    fmt = tool_format(backend.tokenizer)
    grammar = None
    if fmt.hermes and mode in ("required", "function") and can_force:
        grammar = forced_tool_grammar(tools, forced)
    return ToolParsing(fmt, list(tools)), grammar


def sampling_params(
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    default_temperature: float = 1.0,
) -> SamplingParams:
    """Sampling from a request's fields; a field left out (None) takes its default.

    A signed 64-bit ``seed`` (OpenAI's type) is taken modulo 2**64: the sampler's seeds are unsigned.
    """
    return SamplingParams(
        default_temperature if temperature is None else temperature,
        1.0 if top_p is None else top_p,
        top_k or 0,
        None if seed is None else seed % 2**64,
    )


def schema_grammar(schema: Any, param: str) -> Any:
    """The constraint for a ``json_schema`` request: the whole schema (llguidance), or any JSON object without one.

    A schema that cannot be followed is the client's mistake: 400, naming ``param``.
    """
    if schema is None:
        return json_object()
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be an object.", param, "invalid_type")
    try:
        return json_schema(schema)
    except SchemaError as exc:
        raise bad_request(f"'{param}' is not a JSON schema this server can follow: {exc}", param) from exc
