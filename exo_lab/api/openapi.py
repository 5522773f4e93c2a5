"""``GET /openapi.json``: an OpenAPI 3.1 description of every route this server answers."""

from __future__ import annotations

from typing import Any

from exo_lab import __version__
from exo_lab.api.base import ApiHandler

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}


def _num(low: float, high: float) -> dict[str, Any]:
    return {"type": "number", "minimum": low, "maximum": high}


def _str_or_list(items: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"anyOf": [STR, {"type": "array", "items": items or STR}]}


TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"enum": ["text", "input_text", "output_text"]}, "text": STR}}
TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"],
                 "properties": {"name": STR, "description": STR, "parameters": OBJ}}}}

CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": STR,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {"anyOf": [STR, {"type": "array", "items": TEXT_PART}, {"type": "null"}]},
                "tool_calls": {"type": "array", "items": OBJ},
                "tool_call_id": STR,
                "name": STR,
            }}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": _num(0, 2),
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "seed": INT,
        "stop": _str_or_list(),
        "n": {"const": 1},
        "stream": BOOL,
        "stream_options": {"type": "object", "properties": {"include_usage": BOOL}},
        "logprobs": BOOL,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "tools": {"type": "array", "items": TOOL},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, OBJ]},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {"name": STR, "schema": OBJ, "strict": BOOL}}}},
        "ignore_eos": BOOL,
    },
}

RESPONSES_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": STR,
        "input": {"anyOf": [STR, {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]},
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {"anyOf": [STR, {"type": "array", "items": TEXT_PART}]},
            "call_id": STR, "name": STR, "arguments": STR, "output": STR}}}]},
        "instructions": STR,
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": _num(0, 2),
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stream": BOOL,
        "text": {"type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]}, "name": STR, "schema": OBJ, "strict": BOOL}}}},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "function"}, "name": STR, "description": STR, "parameters": OBJ, "strict": BOOL}}},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["type", "name"], "properties": {"type": {"const": "function"}, "name": STR}}]},
        "metadata": OBJ,
    },
}

ANTHROPIC_CONTENT = {"anyOf": [STR, {"type": "array", "items": {"anyOf": [
    {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": STR}},
    {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
        "type": {"const": "tool_use"}, "id": STR, "name": STR, "input": OBJ}},
    {"type": "object", "required": ["type", "tool_use_id"], "properties": {
        "type": {"const": "tool_result"}, "tool_use_id": STR, "content": STR, "is_error": BOOL}},
]}}]}
ANTHROPIC_TOOLS = {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
    "name": STR, "description": STR, "input_schema": OBJ}}}
MESSAGES_COMMON = {
    "model": STR,
    "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["user", "assistant"]}, "content": ANTHROPIC_CONTENT}}},
    "system": ANTHROPIC_CONTENT,
    "tools": ANTHROPIC_TOOLS,
}
MESSAGES_REQUEST = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        **MESSAGES_COMMON,
        "max_tokens": {"type": "integer", "minimum": 1},
        "stop_sequences": {"type": "array", "items": STR},
        "temperature": _num(0, 1),
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "stream": BOOL,
        "metadata": OBJ,
        "tool_choice": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["auto", "any", "tool", "none"]}, "name": STR}},
    },
}
COUNT_TOKENS_REQUEST = {"type": "object", "required": ["model", "messages"], "properties": MESSAGES_COMMON}

OLLAMA_OPTIONS = {"type": "object", "properties": {
    "num_predict": INT, "temperature": {"type": "number", "minimum": 0}, "seed": INT,
    "top_p": _num(0, 1), "top_k": INT, "stop": _str_or_list()}}
OLLAMA_FORMAT = {"anyOf": [{"const": "json"}, OBJ]}
OLLAMA_CHAT = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": STR,
        "messages": {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
            "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": STR,
            "tool_calls": {"type": "array", "items": OBJ}, "tool_name": STR}}},
        "tools": {"type": "array", "items": TOOL},
        "stream": BOOL, "format": OLLAMA_FORMAT, "options": OLLAMA_OPTIONS, "keep_alive": {},
    },
}
OLLAMA_GENERATE = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": STR, "prompt": STR, "system": STR, "raw": BOOL, "context": {"type": "array", "items": INT},
        "stream": BOOL, "format": OLLAMA_FORMAT, "options": OLLAMA_OPTIONS, "keep_alive": {},
    },
}
OLLAMA_SHOW = {"type": "object", "required": ["model"], "properties": {"model": STR}}


def _post(summary: str, schema: dict[str, Any], tag: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "tags": [tag],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                     "responses": _responses(tag, stream=True)}}


def _get(summary: str, tag: str, parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": _responses(tag)}
    if parameters:
        op["parameters"] = parameters
    return {"get": op}


def _responses(tag: str, stream: bool = False) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": OBJ}}
    if stream:
        ok["application/x-ndjson" if tag == "Ollama" else "text/event-stream"] = {"schema": STR}
    shape = {"$ref": f"#/components/schemas/{tag}Error"}
    err = {"content": {"application/json": {"schema": shape}}}
    return {"200": {"description": "OK", "content": ok}, "400": {"description": "invalid request", **err},
            "401": {"description": "missing or wrong API key", **err},
            "404": {"description": "unknown model or path", **err},
            "429": {"description": "queue full; see Retry-After", **err},
            "503": {"description": "model loading or unavailable; see Retry-After", **err}}


def spec() -> dict[str, Any]:
    model_param = [{"name": "model", "in": "path", "required": True, "schema": STR}]
    paths: dict[str, Any] = {
        "/v1/chat/completions": _post("OpenAI Chat Completions", CHAT_REQUEST, "OpenAI"),
        "/v1/responses": _post("OpenAI Responses", RESPONSES_REQUEST, "OpenAI"),
        "/v1/messages": _post("Anthropic Messages", MESSAGES_REQUEST, "Anthropic"),
        "/v1/messages/count_tokens": _post("Anthropic token count", COUNT_TOKENS_REQUEST, "Anthropic"),
        "/v1/models": _get("Models (OpenAI and Anthropic list shapes)", "OpenAI", [
            {"name": n, "in": "query", "required": False, "schema": s}
            for n, s in (("limit", {"type": "integer", "minimum": 1, "maximum": 1000}), ("after_id", STR),
                         ("before_id", STR))]),
        "/v1/models/{model}": _get("One model", "OpenAI", model_param),
        "/health": _get("Liveness and models (no API key needed)", "Admin"),
        "/openapi.json": _get("This document", "Admin"),
        "/instance/previews": _get("Placement plans for a model", "Admin", [
            {"name": "model_id", "in": "query", "required": True, "schema": STR},
            *({"name": n, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}
              for n in ("context", "prompt_tokens", "batch")),
            {"name": "objective", "in": "query", "required": False, "schema": {"enum": ["decode", "ttft"]}}]),
        "/": _get("'Ollama is running' (no API key needed)", "Ollama"),
    }
    for prefix in ("/api", "/ollama/api"):
        paths[f"{prefix}/chat"] = _post("Ollama chat", OLLAMA_CHAT, "Ollama")
        paths[f"{prefix}/generate"] = _post("Ollama generate", OLLAMA_GENERATE, "Ollama")
        paths[f"{prefix}/show"] = _post("Ollama model details", OLLAMA_SHOW, "Ollama")
        paths[f"{prefix}/tags"] = _get("Ollama model list", "Ollama")
        paths[f"{prefix}/ps"] = _get("Ollama running models", "Ollama")
        paths[f"{prefix}/version"] = _get("Ollama API version", "Ollama")
    return {
        "openapi": "3.1.0",
        "info": {"title": "exo_lab API", "version": __version__,
                 "description": "OpenAI, Anthropic and Ollama APIs for models served by exo_lab."},
        "paths": paths,
        "components": {
            "schemas": {
                "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code"]}}},
                "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
                    "type": {"const": "error"},
                    "error": {"type": "object", "required": ["type", "message"]}}},
                "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": STR}},
                "AdminError": {"$ref": "#/components/schemas/OpenAIError"},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


class OpenApiHandler(ApiHandler):
    """``GET /openapi.json``."""

    def get(self) -> None:
        self.send_json(spec())
