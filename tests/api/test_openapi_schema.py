"""/openapi.json is generated from the request models the handlers validate with, so they agree."""

from __future__ import annotations

import jsonschema
import pytest
from pydantic.json_schema import models_json_schema

from exo_lab.api.app import make_app
from exo_lab.api.errors import ApiError
from exo_lab.api.openapi import routes, spec
from exo_lab.api.registry import ModelRegistry

APP = make_app(ModelRegistry())
SPEC = spec(APP)
POSTS = [(path, handler) for path, handler in routes(APP) if "post" in SPEC["paths"][path]]
MODELS = {path: handler.schema for path, handler in POSTS if handler.schema is not None}
MSGS = [{"role": "user", "content": "hi"}]
#: per route: bodies the model takes, and bodies it refuses
EXAMPLES = {
    "/v1/chat/completions": (
        [
            {"model": "m", "messages": MSGS, "max_tokens": 3, "stop": ["x"], "top_p": 0.5},
            {"model": "m", "messages": MSGS, "logit_bias": {"5": -100}, "min_p": 0.1, "reasoning_effort": "low"},
        ],
        [
            {"model": "m", "messages": MSGS, "presence_penalty": 2.5},
            {"model": "m", "messages": MSGS, "logit_bias": {"5": 101}},
            {"model": "m", "messages": []},
            {"model": "m", "messages": MSGS, "temperature": 3},
            {"model": "m", "messages": MSGS, "max_tokens": True},
        ],
    ),
    "/v1/responses": (
        [{"model": "m", "input": "hi"}, {"model": "m", "input": [{"role": "user", "content": "hi"}]}],
        [{"model": "m", "input": 5}, {"model": "m", "input": "hi", "max_output_tokens": 0}],
    ),
    "/v1/messages": (
        [{"model": "m", "messages": MSGS, "max_tokens": 5, "system": "be brief"}],
        [{"model": "m", "messages": MSGS}, {"model": "m", "messages": MSGS, "max_tokens": 5, "temperature": 1.5}],
    ),
    "/v1/messages/count_tokens": ([{"model": "m", "messages": MSGS}], [{"model": "m"}]),
    "/api/chat": (
        [{"model": "m", "messages": MSGS, "options": {"num_predict": 2}, "format": "json"}],
        [{"model": "m", "options": "fast"}, {"model": 5}],
    ),
    "/api/generate": ([{"model": "m", "prompt": "hi", "context": [1, 2]}], [{"model": "m", "context": ["a"]}]),
    "/api/show": ([{"model": "m"}], []),
    "/v1/completions": (
        [{"model": "m", "prompt": "hi", "logprobs": 2, "echo": True}, {"model": "m", "prompt": [[1, 2], [3]]}],
        [{"model": "m", "prompt": {"a": 1}}, {"model": "m", "prompt": "hi", "logprobs": 6}],
    ),
    "/v1/embeddings": (
        [{"model": "m", "input": ["a", "b"], "encoding_format": "float"}],
        [{"model": "m"}, {"model": "m", "input": "a", "encoding_format": "hex"}],
    ),
    "/api/embed": ([{"model": "m", "input": ["a"], "truncate": False}], [{"model": "m", "input": []}]),
    "/api/pull": ([{"model": "m", "stream": False}], [{"model": "m", "stream": "yes"}]),
}


def resolve(schema: dict) -> dict:
    """``schema`` with the document's components, for a validator."""
    return {**schema, "components": SPEC["components"]}


def test_every_post_route_declares_the_model_it_validates_with():
    assert {p for p, _ in POSTS} >= {"/v1/chat/completions", "/v1/responses", "/v1/messages", "/api/chat"}
    assert len(MODELS) == len(POSTS)
    for path, handler in POSTS:
        assert handler.schema is not None, path
        body = SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{handler.schema.__name__}"}, path
        refs, defs = models_json_schema([(handler.schema, "validation")], ref_template="#/components/schemas/{model}")
        for name, schema in defs["$defs"].items():
            assert SPEC["components"]["schemas"][name] == schema, (path, name)


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_the_document_and_the_validator_agree(path):
    model = MODELS[path]
    schema = resolve({"$ref": f"#/components/schemas/{model.__name__}"})
    good, bad = EXAMPLES[path]
    for body in good:
        jsonschema.validate(body, schema)
        model.parse(body)
    for body in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
        with pytest.raises(ApiError) as err:
            model.parse(body)
        assert err.value.status == 400 and err.value.param


def test_errors_name_the_field_in_the_family_style():
    chat = MODELS["/v1/chat/completions"]
    with pytest.raises(ApiError) as err:
        chat.parse({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    assert err.value.param == "messages[0].role" and err.value.code == "invalid_value"
    with pytest.raises(ApiError) as err:
        chat.parse({"messages": MSGS})
    assert err.value.param == "model" and err.value.code == "missing_required_parameter"
    assert err.value.message == "Missing required parameter: 'model'."
    messages = MODELS["/v1/messages"]
    with pytest.raises(ApiError) as err:
        messages.parse({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]})
    assert err.value.param == "messages.0.content" and err.value.message.startswith("messages.0.content: ")
