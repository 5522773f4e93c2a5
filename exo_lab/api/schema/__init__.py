"""Request schemas: one pydantic model per route's body, used both to validate requests and for ``/openapi.json``.

This module reads a body as a JSON object and turns a model's validation
errors into :class:`~exo_lab.api.errors.ApiError` in the family's terms.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, LiteralString, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from exo_lab.api.errors import ApiError


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong."""
    if not body or not body.strip():
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise ApiError(400, "The request body nests too deeply to parse.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {type(data).__name__}.", code="invalid_json")
    _check_text(data)
    return data


def _check_text(value: Any) -> None:
    """400 for strings no UTF-8 text can hold (lone surrogates such as ``"\\ud800"``)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(
                    400,
                    f"The request body holds invalid Unicode (a lone surrogate {item[exc.start]!r}); "
                    "send well-formed UTF-8 text.",
                    code="invalid_json",
                ) from None
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)


# ------------------------------------------------------------------------------------ models


class RequestModel(BaseModel):
    """A request body: strict JSON types, finite numbers, unknown fields kept (and ignored)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow", populate_by_name=True)

    #: how a field's place is written in errors: ``openai`` (``messages[0].role``), ``anthropic``
    #: (``messages.0.role``) or ``ollama`` (as anthropic)
    style: ClassVar[str] = "openai"

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Self:
        """The validated body, or a 400 :class:`ApiError` naming the first wrong field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise to_api_error(exc, cls.style) from None


class Part(BaseModel):
    """A nested object of a request body (same rules as :class:`RequestModel`)."""

    model_config = RequestModel.model_config


def fail(message: str, at: str | None = None, code: LiteralString = "invalid_value") -> PydanticCustomError:
    """A validation error for a validator to raise: ``message`` may say ``{param}`` for the field's place,
    and ``{invalid}`` for how the family opens such an error (``Invalid 'stop'`` for OpenAI, ``stop`` for
    the others); ``at`` names a field below the one validated (dotted)."""
    return PydanticCustomError(code, "{message}", {"message": message, "at": at or "", "custom": True})


def _integral(value: Any) -> Any:
    """Integer-valued floats (``2.0``) as integers, as JSON does not tell them apart."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: an integer (``2.0`` is accepted as 2; booleans and strings are not)
Int = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
TopLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_integral)]
#: a sampling seed: any 64-bit integer, signed (OpenAI's int64) or not; :func:`exo_lab.api.common.sampling_params`
#: maps it onto the sampler's unsigned 64-bit seeds
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64), BeforeValidator(_integral)]

#: sampling beyond temperature, top-p and top-k (the ranges :class:`~exo_lab.engine.sampling.SamplingParams` takes)
MinP = Annotated[float, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=10)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
#: the most tokens a ``logit_bias`` may name (OpenAI allows 300)
MAX_LOGIT_BIAS = 1024


def _bias_keys(value: dict[str, float]) -> dict[str, float]:
    if len(value) > MAX_LOGIT_BIAS:
        raise fail(f"{{invalid}}: at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(value)}.")
    for key in value:
        if not key.isdigit():
            raise fail(f"{{invalid}}: keys must be token ids (non-negative integers as strings), got {key!r}.")
    return value


#: ``{"token id": bias}`` with biases from -100 to 100 (OpenAI's ``logit_bias``)
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100, le=100)]],
    AfterValidator(_bias_keys),
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "propertyNames": {"pattern": "^[0-9]+$"},
            "maxProperties": MAX_LOGIT_BIAS,
        }
    ),
]

#: the most stop sequences a request may give (OpenAI's own limit is 4), and the longest one: every generated
#: token is matched against each of them, on the thread that generates for every request
MAX_STOPS = 16
MAX_STOP_CHARS = 256


def check_stops(value: list[str], max_items: int = MAX_STOPS) -> None:
    """Raise (a validation error naming the field) for more than ``max_items`` sequences or a too long one."""
    if len(value) > max_items:
        raise fail(f"{{invalid}}: at most {max_items} stop sequences are allowed, got {len(value)}.")
    for i, stop in enumerate(value):
        if len(stop) > MAX_STOP_CHARS:
            raise fail(
                f"{{invalid}}: a stop sequence has at most {MAX_STOP_CHARS} characters; number {i} has {len(stop)}."
            )


def _capped(value: list[str]) -> list[str]:
    check_stops(value)
    return value


def _stops(max_items: int) -> Any:
    """A validator: a string or a list of strings (empty strings dropped), as a tuple."""

    def check(value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            check_stops([value], max_items)
            return (value,) if value else ()
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            check_stops(value, max_items)
            return tuple(s for s in value if s)
        raise fail("'{param}' must be a string or a list of strings.", code="invalid_type")

    return check


def _stops_schema(max_items: int) -> dict[str, Any]:
    one = {"type": "string", "maxLength": MAX_STOP_CHARS}
    return {"anyOf": [one, {"type": "array", "items": one, "maxItems": max_items}]}


#: stop sequences: a string or a list of at most :data:`MAX_STOPS` strings (OpenAI takes at most 4)
Stops = Annotated[tuple[str, ...], PlainValidator(_stops(MAX_STOPS)), WithJsonSchema(_stops_schema(MAX_STOPS))]
Stops4 = Annotated[tuple[str, ...], PlainValidator(_stops(4)), WithJsonSchema(_stops_schema(4))]
#: a list of stop sequences (Anthropic's ``stop_sequences``), capped as :data:`Stops`
StopList = Annotated[
    list[str],
    AfterValidator(_capped),
    WithJsonSchema({"type": "array", "items": {"type": "string", "maxLength": MAX_STOP_CHARS}, "maxItems": MAX_STOPS}),
]


# ------------------------------------------------------------------------------------ errors

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "tuple"}


def _is_tag(item: str | int) -> bool:
    """Whether a location item names a union member (``str``, ``list[Part]``, ``Model``) rather than a field."""
    return isinstance(item, str) and (item in _TYPE_TAGS or not re.fullmatch(r"[a-z_][a-z0-9_]*", item))


def _where(error: Any) -> tuple[str | int, ...]:
    loc = tuple(i for i in error["loc"] if not _is_tag(i))
    at = (error.get("ctx") or {}).get("at")
    return loc + tuple(at.split(".")) if at else loc


def render_param(loc: tuple[str | int, ...], style: str) -> str:
    """``messages[0].role`` (OpenAI) or ``messages.0.role`` (Anthropic, Ollama)."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]" if style == "openai" else f".{item}"
        else:
            out += f".{item}" if out else item
    return out


def _code(kind: str) -> str:
    if kind == "missing":
        return "missing_required_parameter"
    if kind.endswith("_type") or kind in ("invalid_type", "model_attributes_type"):
        return "invalid_type"
    return kind if kind in ("empty_array", "invalid_value") else "invalid_value"


def _said(msg: str) -> str:
    """Pydantic's message, lower-cased and without model class names (``or instance of ChatTool``)."""
    msg = re.sub(r" or instance of \w+", "", msg)
    return msg[0].lower() + msg[1:]


def to_api_error(exc: ValidationError, style: str) -> ApiError:
    """The deepest error of ``exc`` (the union member that got furthest), said in ``style``'s words."""
    errors = exc.errors(include_url=False)
    depth = max(len(_where(e)) for e in errors)
    deepest = [e for e in errors if len(_where(e)) == depth]
    first = deepest[0]
    loc = _where(first)
    param = render_param(loc, style)
    ctx = first.get("ctx") or {}
    if ctx.get("custom"):
        invalid = f"Invalid '{param}'" if style == "openai" else param
        message = ctx["message"].replace("{param}", param).replace("{invalid}", invalid)
    else:
        said = ", or ".join(dict.fromkeys(_said(e["msg"]) for e in deepest if _where(e) == loc))
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'." if style == "openai" else f"{param}: Field required."
        elif style == "openai":
            message = f"Invalid '{param}': {said}."
        else:
            message = f"{param}: {said[0].upper() + said[1:]}."
    return ApiError(400, message, param=param or None, code=_code(first["type"]))
