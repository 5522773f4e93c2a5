"""OpenAI Chat Completions beyond text: content parts, tools, response_format, logprobs."""

from __future__ import annotations

import json

import openai
import pytest

from tests.helpers.raw_http import assert_openai_error, raw

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Tell me about Python."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def create(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", MSGS)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


def test_content_as_list_of_parts(client):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "Python."}]}
    ]
    assert create(client, messages=parts).choices[0].message.content == create(client).choices[0].message.content
    system = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}] + MSGS
    assert create(client, messages=system).usage.prompt_tokens > create(client).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):
        create(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


# --- response_format: output constrained to valid JSON --------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 40, 120])
def test_json_object_is_always_valid_json(client, max_tokens):
    r = create(client, response_format={"type": "json_object"}, max_tokens=max_tokens)
    content = r.choices[0].message.content
    assert isinstance(json.loads(content), dict), content
    assert r.usage.completion_tokens <= max_tokens


def test_json_object_sampled_and_streamed(client):
    for seed in range(3):
        r = create(client, response_format={"type": "json_object"}, max_tokens=60, temperature=1.0, seed=seed)
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    full = create(client, response_format={"type": "json_object"}, max_tokens=50)
    chunks = list(create(client, response_format={"type": "json_object"}, max_tokens=50, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and isinstance(json.loads(text), dict)


# every part bounded, so that even a model with random weights finishes within the token budget
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"}, "maxItems": 2},
        "home": {
            "type": "object",
            "properties": {"x": {"type": "boolean"}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pet", "tags", "home"],
    "additionalProperties": False,
}


def test_json_schema_is_followed_in_full(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for kw in ({}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 4}):
        r = create(client, response_format=fmt, max_tokens=120, **kw)
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, PERSON)
        assert list(value) == list(PERSON["properties"])  # properties in the schema's order
        assert r.choices[0].finish_reason == "stop"
    chunks = list(create(client, response_format=fmt, max_tokens=120, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "list",
            "schema": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 4,
            },
        },
    }
    value = json.loads(create(client, response_format=fmt, max_tokens=50).choices[0].message.content)
    assert isinstance(value, list) and 1 <= len(value) <= 4 and all(-5 <= v <= 5 for v in value)


def test_json_mode_ends_with_end_of_sequence_when_the_object_closes(client):
    # with a small budget the object must close early; then only end-of-sequence is allowed
    r = create(
        client, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}, max_tokens=300
    )
    content = r.choices[0].message.content
    json.loads(content)
    if r.choices[0].finish_reason == "stop":
        assert r.usage.completion_tokens < 300


# --- tools -----------------------------------------------------------------------------------


def test_tool_choice_required_gives_a_parsed_call(client):
    r = create(client, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_a_forced_call_is_complete_within_a_tight_max_tokens(client):
    """From the shortest call's length (the 400 for a smaller budget says it) upward, every call is complete."""
    import re

    with pytest.raises(openai.BadRequestError) as refused:
        create(client, tools=[WEATHER, TIME], tool_choice="required", max_tokens=1)
    need = int(re.search(r"\((\d+) tokens\)", str(refused.value)).group(1))
    for max_tokens in (need, need + 1, need + 4):
        for seed in range(3):
            r = create(
                client, tools=[WEATHER, TIME], tool_choice="required", max_tokens=max_tokens, temperature=1.0, seed=seed
            )
            (call,) = r.choices[0].message.tool_calls
            assert isinstance(json.loads(call.function.arguments), dict)
            assert r.usage.completion_tokens <= max_tokens


def test_named_tool_choice(client):
    for name, _tool in (("get_time", TIME), ("get_weather", WEATHER)):
        r = create(
            client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": name}}, max_tokens=80
        )
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == name and isinstance(json.loads(call.function.arguments), dict)


def test_streamed_tool_call_matches(client):
    full = create(client, tools=[WEATHER], tool_choice="required", max_tokens=80)
    chunks = list(create(client, tools=[WEATHER], tool_choice="required", max_tokens=80, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0
    assert deltas[0].function.name == "get_weather"
    assert deltas[0].function.arguments == full.choices[0].message.tool_calls[0].function.arguments
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no markup leaked
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_round_trip(client):
    call = create(client, tools=[WEATHER], tool_choice="required", max_tokens=80).choices[0].message.tool_calls[0]
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    r = create(client, messages=history, tools=[WEATHER], max_tokens=10)
    assert r.usage.prompt_tokens > create(client, tools=[WEATHER]).usage.prompt_tokens
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_tools_auto_and_none_give_text(client):
    plain = create(client, max_tokens=10)
    auto = create(client, tools=[WEATHER], max_tokens=10)
    none = create(client, tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the template lists the tools
    assert auto.choices[0].finish_reason == "length" and auto.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
            "response_format.json_schema.schema",
        ),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"tools": [WEATHER], "tool_choice": "required", "max_tokens": 5}, "max_tokens"),  # no call fits in 5
        ({"messages": [{"role": "user", "content": "x", "tool_calls": "f"}]}, "messages[0].tool_calls"),
    ],
)
def test_invalid_options_are_400(server, extra, param):
    body = json.dumps({"model": "tiny", "messages": MSGS, **extra})
    assert_openai_error(*raw(server, "POST", "/v1/chat/completions", body), 400, param)


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_and_top_logprobs(client):
    r = create(client, logprobs=True, top_logprobs=3, max_tokens=8)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    only = create(client, logprobs=True, max_tokens=8).choices[0].logprobs.content
    assert [t.top_logprobs for t in only] == [[]] * 8
    assert [t.logprob for t in only] == pytest.approx([t.logprob for t in content])
    assert create(client, max_tokens=3).choices[0].logprobs is None


def test_streamed_logprobs(client):
    full = create(client, logprobs=True, top_logprobs=2, max_tokens=10)
    chunks = list(create(client, logprobs=True, top_logprobs=2, max_tokens=10, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in full.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in full.choices[0].logprobs.content])


def test_server_survived(server, client):
    assert server.alive()
    assert create(client, max_tokens=2).usage.completion_tokens == 2
