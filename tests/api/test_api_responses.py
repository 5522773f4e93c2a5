"""The official openai client's Responses API against a running ``exo-lab serve`` on the tiny model."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

from tests.helpers.raw_http import assert_openai_error, raw

pytestmark = pytest.mark.slow

PROMPT = "Tell me about Python."


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def create(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("input", PROMPT)
    kw.setdefault("max_output_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.responses.create(**kw)


def test_non_streaming_incomplete_at_max_output_tokens(client):
    r = create(client, max_output_tokens=12)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text" and r.output_text
    u = r.usage
    assert u.output_tokens == 12 and u.input_tokens > 0 and u.total_tokens == u.input_tokens + 12
    assert u.input_tokens_details.cached_tokens == 0 and u.output_tokens_details.reasoning_tokens == 0
    assert r.max_output_tokens == 12 and r.temperature == 0


@pytest.mark.parametrize("n", [1, 9, 25])
def test_exact_output_tokens(client, n):
    r = create(client, max_output_tokens=n)
    assert r.usage.output_tokens == n and r.status == "incomplete"


def test_string_input_equals_item_input(client):
    items = [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Tell me about "}, {"type": "input_text", "text": "Python."}],
        }
    ]
    typed = [{"type": "message", "role": "user", "content": PROMPT}]
    a, b, c = create(client), create(client, input=items), create(client, input=typed)
    assert a.output_text == b.output_text == c.output_text
    assert a.usage.input_tokens == b.usage.input_tokens == c.usage.input_tokens


def test_instructions_are_the_system_message(client):
    plain = create(client)
    with_instr = create(client, instructions="Answer in one word.")
    as_item = create(
        client, input=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": PROMPT}]
    )
    assert with_instr.usage.input_tokens > plain.usage.input_tokens
    assert with_instr.output_text == as_item.output_text
    assert with_instr.instructions == "Answer in one word."


def test_multi_turn_input(client):
    r = create(
        client,
        input=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": PROMPT},
        ],
    )
    assert r.output_text


def test_streaming_events_in_order(client):
    full = create(client, max_output_tokens=16)
    events = list(create(client, max_output_tokens=16, stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == full.output_text == events[-4].text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == full.output_text
    assert final.usage.output_tokens == 16 and final.usage.input_tokens == full.usage.input_tokens
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


def test_completed_when_the_model_stops(client):
    # a stop at end of sequence: ask for JSON, which ends with EOS once the object closes
    r = create(client, max_output_tokens=200, text={"format": {"type": "json_object"}})
    json.loads(r.output_text)
    if r.status == "completed":
        assert r.incomplete_details is None and r.usage.output_tokens < 200
    events = list(create(client, max_output_tokens=200, text={"format": {"type": "json_object"}}, stream=True))
    assert events[-1].type == f"response.{r.status}"
    assert events[-1].response.output_text == r.output_text


def test_json_schema_text_format(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99, "minimum": 0}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    r = create(client, max_output_tokens=60, text={"format": {"type": "json_schema", "name": "s", "schema": schema}})
    value = json.loads(r.output_text)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
    assert r.status == "completed" and r.text.format.type == "json_schema"


def test_streaming_sse_has_event_lines(server):
    body = json.dumps({"model": "tiny", "input": PROMPT, "max_output_tokens": 3, "stream": True})
    status, data = raw(server, "POST", "/v1/responses", body)
    assert status == 200
    for block in data.decode().strip().split("\n\n"):
        event, payload = block.split("\n")
        assert event.startswith("event: ") and json.loads(payload[6:])["type"] == event[7:]


def test_determinism(client):
    assert len({create(client, max_output_tokens=15).output_text for _ in range(3)}) == 1


def test_function_call_items_round_trip(client):
    r = create(
        client,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
        ],
    )
    assert r.output_text and r.usage.output_tokens == 12


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
}


def test_forced_tool_call_on_a_real_model(client):
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = create(client, tools=[WEATHER], tool_choice=choice, max_output_tokens=80)
        calls = [o for o in r.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather"
        assert isinstance(json.loads(calls[0].arguments), dict)
    events = list(create(client, tools=[WEATHER], tool_choice="required", max_output_tokens=80, stream=True))
    assert [o.type for o in events[-1].response.output if o.type == "function_call"] == ["function_call"]


# --- errors: OpenAI's shape ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"", None),
        (json.dumps({"model": "tiny"}).encode(), "input"),
        (json.dumps({"input": "hi"}).encode(), "model"),
        (json.dumps({"model": "tiny", "input": []}).encode(), "input"),
        (json.dumps({"model": "tiny", "input": 5}).encode(), "input"),
        (json.dumps({"model": "tiny", "input": [{"role": "wizard", "content": "x"}]}).encode(), "input[0].role"),
        (json.dumps({"model": "tiny", "input": [{"role": "user"}]}).encode(), "input[0].content"),
        (
            json.dumps({"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}).encode(),
            "input[0].content[0].type",
        ),
        (json.dumps({"model": "tiny", "input": [{"type": "mystery"}]}).encode(), "input[0].type"),
        (json.dumps({"model": "tiny", "input": "hi", "max_output_tokens": 0}).encode(), "max_output_tokens"),
        (json.dumps({"model": "tiny", "input": "hi", "max_output_tokens": "x"}).encode(), "max_output_tokens"),
        (json.dumps({"model": "tiny", "input": "hi", "max_output_tokens": 10**9}).encode(), "max_output_tokens"),
        (json.dumps({"model": "tiny", "input": "hi", "temperature": 3}).encode(), "temperature"),
        (json.dumps({"model": "tiny", "input": "hi", "instructions": 5}).encode(), "instructions"),
        (json.dumps({"model": "tiny", "input": "hi", "stream": 1}).encode(), "stream"),
        (
            json.dumps({"model": "tiny", "input": "hi", "previous_response_id": "resp_1"}).encode(),
            "previous_response_id",
        ),
        (json.dumps({"model": "tiny", "input": "hi", "tools": "get_weather"}).encode(), "tools"),
        (json.dumps({"model": "tiny", "input": "hi", "tools": [{"type": "web_search"}]}).encode(), "tools[0].type"),
        (json.dumps({"model": "tiny", "input": "hi", "tools": [{"type": "function"}]}).encode(), "tools[0].name"),
        (
            json.dumps(
                {"model": "tiny", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": 3}]}
            ).encode(),
            "tools[0].parameters",
        ),
        (
            json.dumps(
                {
                    "model": "tiny",
                    "input": "hi",
                    "tools": [{"type": "function", "name": "f"}],
                    "tool_choice": "sometimes",
                }
            ).encode(),
            "tool_choice",
        ),
        (
            json.dumps(
                {
                    "model": "tiny",
                    "input": "hi",
                    "tools": [{"type": "function", "name": "f"}],
                    "tool_choice": {"type": "function", "name": "g"},
                }
            ).encode(),
            "tool_choice",
        ),
        (
            json.dumps({"model": "tiny", "input": "hi", "text": {"format": {"type": "xml"}}}).encode(),
            "text.format.type",
        ),
        (
            json.dumps(
                {
                    "model": "tiny",
                    "input": "hi",
                    "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "bogus"}}},
                }
            ).encode(),
            "text.format.schema",
        ),
    ],
)
def test_malformed_requests_get_400(server, body, param):
    assert_openai_error(*raw(server, "POST", "/v1/responses", body), 400, param)


def test_unknown_model_404(server, client):
    body = json.dumps({"model": "gpt-9", "input": "hi", "stream": True})
    assert_openai_error(*raw(server, "POST", "/v1/responses", body), 404, "model")
    with pytest.raises(openai.NotFoundError):
        create(client, model="gpt-9")


def test_unknown_fields_ignored(client):
    r = create(client, max_output_tokens=3, store=False, metadata={"k": "v"}, extra_body={"frobnicate": True})
    assert r.usage.output_tokens == 3 and r.metadata == {"k": "v"}


def test_disconnect_mid_stream_cancels(server, client):
    body = json.dumps({"model": "tiny", "input": PROMPT, "max_output_tokens": 4000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b"output_text.delta") < 10:
        got += sock.recv(65536)
    sock.close()
    t = time.monotonic()
    assert create(client, max_output_tokens=5).usage.output_tokens == 5
    assert time.monotonic() - t < 5


def test_server_survived(server, client):
    assert server.alive()
    assert create(client, max_output_tokens=2).usage.output_tokens == 2
