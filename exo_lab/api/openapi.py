"""``GET /openapi.json``: OpenAPI 3.1 for every route, generated from the routes and their request models.

A POST route's body schema is the JSON schema of the very model its handler
validates with (``schema``), so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic.json_schema import models_json_schema
from tornado.web import Application, RequestHandler

from exo_lab import __version__
from exo_lab.api.base import ApiHandler

STR = {"type": "string"}
OBJ = {"type": "object"}

#: query parameters of the GET routes that take them
QUERY: dict[str, list[dict[str, Any]]] = {
    "/v1/models": [
        {"name": n, "in": "query", "required": False, "schema": s}
        for n, s in (
            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            ("after_id", STR),
            ("before_id", STR),
        )
    ],
    "/instance/previews": [
        {"name": "model_id", "in": "query", "required": True, "schema": STR},
        *(
            {"name": n, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}
            for n in ("context", "prompt_tokens", "batch")
        ),
        {"name": "objective", "in": "query", "required": False, "schema": {"enum": ["decode", "ttft"]}},
        {"name": "sharding", "in": "query", "required": False, "schema": STR},
        {"name": "min_nodes", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
        {"name": "node_ids", "in": "query", "required": False, "schema": STR, "description": "comma-separated"},
    ],
}


def route_path(pattern: str) -> str:
    """A tornado route pattern as an OpenAPI path: ``/v1/models/(.+)`` -> ``/v1/models/{model}``."""
    path = re.sub(r"\(\.\+\)", "{model}", pattern.rstrip("$")).replace("/?", "")
    return re.sub(r"\(\[[^)]*\][+*]\)", "{id}", path) or "/"


def _tag(path: str) -> str:
    if path == "/" or path.startswith(("/api/", "/ollama")):
        return "Ollama"
    if path.startswith("/v1/messages"):
        return "Anthropic"
    return "OpenAI" if path.startswith("/v1/") else "Admin"


def _summary(handler: type) -> str:
    return (handler.__doc__ or handler.__name__).strip().splitlines()[0]


def _responses(tag: str, stream: bool = False) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": OBJ}}
    if stream:
        ok["application/x-ndjson" if tag == "Ollama" else "text/event-stream"] = {"schema": STR}
    err = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{tag}Error"}}}}
    return {
        "200": {"description": "OK", "content": ok},
        "400": {"description": "invalid request", **err},
        "401": {"description": "missing or wrong API key", **err},
        "404": {"description": "unknown model or path", **err},
        "429": {"description": "queue full; see Retry-After", **err},
        "503": {"description": "model loading or unavailable; see Retry-After", **err},
    }


def routes(app: Application) -> list[tuple[str, type[ApiHandler]]]:
    """``(OpenAPI path, handler)`` for every route of ``app``."""
    out = []
    for rule in app.default_router.rules[0].target.rules:
        handler = rule.target
        if isinstance(handler, type) and issubclass(handler, ApiHandler):
            out.append((route_path(rule.matcher.regex.pattern), handler))
    return out


def _methods(handler: type) -> list[str]:
    return [m for m in ("get", "post", "delete") if getattr(handler, m) is not getattr(RequestHandler, m)]


def spec(app: Application) -> dict[str, Any]:
    """The OpenAPI document for ``app``'s routes."""
    table = routes(app)
    models = sorted({h.schema for _, h in table if h.schema is not None}, key=lambda m: m.__name__)
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    paths: dict[str, Any] = {}
    for path, handler in table:
        tag = _tag(path)
        for method in _methods(handler):
            op: dict[str, Any] = {
                "summary": _summary(handler),
                "tags": [tag],
                "responses": _responses(tag, stream=method == "post"),
            }
            if method == "post" and handler.schema is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(handler.schema, "validation")]}},
                }
            params = QUERY.get(path, []) + [
                {"name": name, "in": "path", "required": True, "schema": STR}
                for name in ("model", "id")
                if "{" + name + "}" in path
            ]
            if params:
                op["parameters"] = params
            paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "exo_lab API",
            "version": __version__,
            "description": "OpenAI, Anthropic and Ollama APIs for models served by exo_lab.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                **defs.get("$defs", {}),
                "OpenAIError": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"]}},
                },
                "AnthropicError": {
                    "type": "object",
                    "required": ["type", "error"],
                    "properties": {
                        "type": {"const": "error"},
                        "error": {"type": "object", "required": ["type", "message"]},
                    },
                },
                "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": STR}},
                "AdminError": {"$ref": "#/components/schemas/OpenAIError"},
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


class OpenApiHandler(ApiHandler):
    """This document."""

    def get(self) -> None:
        self.send_json(spec(self.application))
