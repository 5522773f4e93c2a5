"""What every API family does the same way: find a ready model, build a generation request, submit it.

Each step raises :class:`ApiError` (400 / 404 / 503) before any response
starts, so a handler renders it in its own family's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.events import ToolParsing
from exo_lab.api.reasoning import ReasoningParsing, reasoning_setup
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.api.tools import tool_format
from exo_lab.engine.chat import chat_prompt_tokens
from exo_lab.engine.generation import EngineBusy, Generation, GenerationRequest
from exo_lab.engine.guided import SchemaError, json_object, json_schema, shortest_output, tool_calls, vocabulary
from exo_lab.engine.sampling import SamplingParams
from exo_lab.models.generation_config import sampling_defaults

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
    backend: Backend,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict] | None = None,
    param: str = "messages",
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Prompt tokens for chat messages (400 when the messages cannot be rendered); ``template_kwargs`` go to the
    chat template (see :func:`thinking_kwargs`)."""
    try:
        if tools or template_kwargs:
            return chat_prompt_tokens(backend.tokenizer, messages, tools, template_kwargs)
        return backend.chat_tokens(messages)
    except ValueError as exc:
        raise bad_request(str(exc), param) from exc
    except Exception as exc:  # a chat template that raises (jinja errors) on what the client sent
        if type(exc).__module__.startswith("jinja2"):
            raise bad_request(f"The model's chat template rejected the messages: {exc}", param) from exc
        raise


def thinking_kwargs(enable: bool | None = None, effort: str | None = None) -> dict[str, Any]:
    """What a request says about thinking, as chat template variables: ``enable_thinking`` (Qwen3, DeepSeek and
    most thinking templates) and ``reasoning_effort`` (gpt-oss); effort ``none`` turns thinking off."""
    out: dict[str, Any] = {}
    if effort == "none":
        enable = False
    elif effort is not None:
        out["reasoning_effort"] = effort
        enable = True if enable is None else enable
    if enable is not None:
        out["enable_thinking"] = enable
    return out


def reasoning_for(backend: Backend, prompt: Sequence[int]) -> ReasoningParsing | None:
    """How ``backend``'s reasoning is told from its answer after ``prompt`` (None: the model does not think)."""
    return reasoning_setup(backend.tokenizer, tuple(prompt))


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
    backend: Backend | None,
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    default_temperature: float = 1.0,
    *,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: dict[str, float] | None = None,
    repetition_context: int | None = None,
    defaults: dict[str, Any] | None = None,
    bias_param: str = "logit_bias",
) -> SamplingParams:
    """Sampling from a request's fields; a field left out (None) takes the model's default (its
    ``generation_config.json``), else the family's (``defaults``, ``default_temperature``), else none.

    A signed 64-bit ``seed`` (OpenAI's type) is taken modulo 2**64: the sampler's seeds are unsigned.
    ``logit_bias`` maps token ids (as strings) to biases; an id outside the vocabulary is a 400 naming it.
    """
    model = sampling_defaults(backend.path if backend is not None else None)
    family = {"temperature": default_temperature, **(defaults or {})}

    def pick(name: str, value: Any, off: Any) -> Any:
        if value is not None:
            return value
        return model.get(name, family.get(name, off))

    bias: list[tuple[int, float]] = []
    if logit_bias:
        vocab = vocab_size(backend)
        for key, value in logit_bias.items():
            token = int(key)
            if vocab is not None and not 0 <= token < vocab:
                raise bad_request(
                    f"Invalid '{bias_param}': token id {key} is outside this model's vocabulary (0..{vocab - 1}).",
                    bias_param,
                )
            bias.append((token, float(value)))
    try:
        return SamplingParams(
            pick("temperature", temperature, 1.0),
            pick("top_p", top_p, 1.0) or 1.0,
            max(pick("top_k", top_k, 0) or 0, 0),
            None if seed is None else seed % 2**64,
            min_p=pick("min_p", min_p, 0.0),
            repetition_penalty=pick("repetition_penalty", repetition_penalty, 1.0),
            presence_penalty=pick("presence_penalty", presence_penalty, 0.0),
            frequency_penalty=pick("frequency_penalty", frequency_penalty, 0.0),
            logit_bias=tuple(bias),
            repetition_context=pick("repetition_context", repetition_context, 0),
        )
    except ValueError as exc:  # a model default out of range (the request's own values were checked already)
        raise bad_request(f"Invalid sampling parameters: {exc}", None) from exc


def vocab_size(backend: Backend | None) -> int | None:
    tokenizer = getattr(backend, "tokenizer", None)
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return None


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
