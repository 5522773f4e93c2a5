"""Typed field readers for JSON request bodies, raising 400-style ApiErrors."""

from __future__ import annotations

import json
from typing import Any

from exo_lab.api.errors import ApiError, bad_request

_MISSING = object()


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
                raise ApiError(400, f"The request body holds invalid Unicode (a lone surrogate {item[exc.start]!r}); "
                                    "send well-formed UTF-8 text.", code="invalid_json") from None
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)


def get_str(data: dict, name: str, default: Any = _MISSING) -> Any:
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise bad_request(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {type(value).__name__}.", name, "invalid_type")
    return value


def get_int(data: dict, name: str, default: Any = None, minimum: int | None = None, maximum: int | None = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)}.", name, "invalid_type")
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {value}.", name)
    if maximum is not None and value > maximum:
        raise bad_request(f"'{name}' must be at most {maximum}, got {value}.", name)
    return value


def get_float(data: dict, name: str, default: Any, minimum: float, maximum: float) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)}.", name, "invalid_type")
    if not minimum <= value <= maximum:
        raise bad_request(f"'{name}' must be between {minimum} and {maximum}, got {value}.", name)
    return float(value)


def get_bool(data: dict, name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {json.dumps(value)}.", name, "invalid_type")
    return value


def get_stop(data: dict, name: str = "stop", max_items: int = 4) -> tuple[str, ...]:
    value = data.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > max_items:
            raise bad_request(f"'{name}' takes at most {max_items} sequences, got {len(value)}.", name)
        return tuple(s for s in value if s)
    raise bad_request(f"'{name}' must be a string or a list of strings.", name, "invalid_type")
