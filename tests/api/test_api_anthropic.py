"""The official anthropic client against a running ``exo-lab serve`` on the tiny model."""

from __future__ import annotations

import json
import socket
import time

import anthropic
import pytest

from tests.helpers.raw_http import raw

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Tell me about Python."}]
GREEDY = {"temperature": 0}  # this client version sends sampling settings only through extra_body


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def create(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", MSGS)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("extra_body", GREEDY)
    return client.messages.create(**kw)


def prompt_of(usage) -> int:
    """The prompt's tokens: those prefilled and those read from the prefix cache (Anthropic counts them apart)."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_models_list_and_retrieve(client):
    page = client.models.list()
    assert [m.id for m in page.data] == ["tiny"]
    assert page.has_more is False and page.first_id == "tiny" and page.last_id == "tiny"
    model = page.data[0]
    assert model.type == "model" and model.display_name == "tiny" and model.created_at.year >= 2024
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-9")


def test_non_streaming_message(client):
    m = create(client, max_tokens=12)
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny" and m.id.startswith("msg_")
    assert len(m.content) == 1 and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 12 and m.usage.input_tokens > 0


@pytest.mark.parametrize("n", [1, 7, 30])
def test_max_tokens_is_exact(client, n):
    m = create(client, max_tokens=n)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == n


def test_system_string_and_blocks_are_the_same_prompt(client):
    a = client.messages.count_tokens(model="tiny", messages=MSGS, system="Be brief.")
    b = client.messages.count_tokens(model="tiny", messages=MSGS, system=[{"type": "text", "text": "Be brief."}])
    none = client.messages.count_tokens(model="tiny", messages=MSGS)
    assert a.input_tokens == b.input_tokens > none.input_tokens
    m1 = create(client, system="Be brief.")
    m2 = create(client, system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}])
    assert m1.content[0].text == m2.content[0].text
    assert prompt_of(m1.usage) == a.input_tokens


def test_content_blocks_equal_string_content(client):
    blocks = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "Python."}]}
    ]
    assert create(client, messages=blocks).content[0].text == create(client).content[0].text


def test_count_tokens_matches_usage(client):
    counted = client.messages.count_tokens(model="tiny", messages=MSGS)
    assert counted.input_tokens == prompt_of(create(client, max_tokens=2).usage)


def test_streaming_event_sequence_and_same_text(client, server):
    full = create(client, max_tokens=16)
    body = json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 16, "stream": True, "temperature": 0})
    status, data = raw(server, "POST", "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 200
    events = []
    for block in data.decode().strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, payload = lines[0][7:], json.loads(lines[1][6:])
        assert payload["type"] == name
        events.append((name, payload))
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert (
        start["content"] == []
        and start["stop_reason"] is None
        and start["usage"]["input_tokens"] == prompt_of(full.usage)
    )
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 16
    text = "".join(p["delta"]["text"] for n, p in events if n == "content_block_delta")
    assert text == full.content[0].text


def test_streaming_with_the_client(client):
    full = create(client, max_tokens=20)
    with client.messages.stream(model="tiny", messages=MSGS, max_tokens=20, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 20
    assert prompt_of(final.usage) == prompt_of(full.usage)


def test_stop_sequences(client):
    full = create(client, max_tokens=30).content[0].text
    stop = full[10:14]
    m = create(client, max_tokens=30, stop_sequences=[stop, "zzzz"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[: full.index(stop)]
    with client.messages.stream(
        model="tiny", messages=MSGS, max_tokens=30, stop_sequences=[stop], extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full[: full.index(stop)]
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_determinism_and_seeded_sampling(client):
    outs = {create(client, max_tokens=15).content[0].text for _ in range(3)}
    assert len(outs) == 1


def test_assistant_prefill_continues(client):
    m = create(client, messages=MSGS + [{"role": "assistant", "content": "Python is"}], max_tokens=5)
    assert m.usage.output_tokens == 5 and m.content[0].text


# --- tools ----------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


def test_tool_choice_any_gives_a_tool_use_block(client):
    m = create(client, tools=[WEATHER, CLOCK], tool_choice={"type": "any"}, max_tokens=80)
    assert m.stop_reason == "tool_use"
    (block,) = m.content
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name in ("get_weather", "get_time")
    assert isinstance(block.input, dict)


def test_tool_choice_tool_and_streaming(client):
    full = create(client, tools=[WEATHER, CLOCK], tool_choice={"type": "tool", "name": "get_time"}, max_tokens=80)
    assert [b.name for b in full.content] == ["get_time"] and full.stop_reason == "tool_use"
    with client.messages.stream(
        model="tiny",
        messages=MSGS,
        max_tokens=80,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "tool", "name": "get_time"},
        extra_body=GREEDY,
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [(b.type, b.name, b.input) for b in full.content]
    assert events[0] == "message_start" and "content_block_start" in events and events[-1] == "message_stop"
    assert final.usage.output_tokens == full.usage.output_tokens


def test_tool_round_trip_and_counting(client):
    call = create(client, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=80).content[0]
    history = MSGS + [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    m = create(client, messages=history, tools=[WEATHER], max_tokens=8)
    assert m.usage.output_tokens <= 8 and m.stop_reason in ("max_tokens", "end_turn", "tool_use")
    with_tools = client.messages.count_tokens(model="tiny", messages=history, tools=[WEATHER]).input_tokens
    assert with_tools == prompt_of(m.usage)
    assert with_tools > client.messages.count_tokens(model="tiny", messages=history).input_tokens
    err_result = [
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "is_error": True,
                    "content": [{"type": "text", "text": "boom"}],
                }
            ],
        }
    ]
    assert (
        create(
            client,
            messages=MSGS
            + [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]}]
            + err_result,
            tools=[WEATHER],
            max_tokens=3,
        ).usage.output_tokens
        == 3
    )


def test_tools_auto_without_a_call_is_text(client):
    m = create(client, tools=[WEATHER], max_tokens=10)
    assert m.stop_reason == "max_tokens" and m.content[0].type == "text"
    none = create(client, tools=[WEATHER], tool_choice={"type": "none"}, max_tokens=10)
    assert none.content[0].type == "text"


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": "get_weather"},
        {"tools": [{"description": "no name"}]},
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tools": [{"name": "f", "input_schema": "object"}]},
        {"tools": [WEATHER], "tool_choice": {"type": "sometimes"}},
        {"tools": [WEATHER], "tool_choice": "auto"},
        {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
        {"tool_choice": {"type": "any"}},
        {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
        {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": "x"}]}]},
    ],
)
def test_invalid_tools_are_400(server, extra):
    body = json.dumps({"model": "tiny", "max_tokens": 5, "messages": MSGS, **extra})
    assert_anthropic_error(*raw(server, "POST", "/v1/messages", body), 400, "invalid_request_error")


# --- errors: Anthropic's shape, and the server keeps serving ------------------------------


def assert_anthropic_error(status, body, expected_status, kind):
    assert status == expected_status, body
    data = json.loads(body)
    assert data["type"] == "error" and data["error"]["type"] == kind and data["error"]["message"], data


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[1]",
        json.dumps({"model": "tiny", "messages": MSGS}).encode(),  # max_tokens missing
        json.dumps({"max_tokens": 5, "messages": MSGS}).encode(),  # model missing
        json.dumps({"model": "tiny", "max_tokens": 5}).encode(),  # messages missing
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": []}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": "hi"}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user"}]}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]}).encode(),
        json.dumps(
            {
                "model": "tiny",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            }
        ).encode(),
        json.dumps({"model": "tiny", "max_tokens": 0, "messages": MSGS}).encode(),
        json.dumps({"model": "tiny", "max_tokens": "ten", "messages": MSGS}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 10**9, "messages": MSGS}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": MSGS, "temperature": 1.5}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": MSGS, "stop_sequences": "x"}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": MSGS, "system": 7}).encode(),
        json.dumps({"model": "tiny", "max_tokens": 5, "messages": MSGS, "stream": "yes"}).encode(),
    ],
)
def test_malformed_requests_get_400(server, body):
    assert_anthropic_error(*raw(server, "POST", "/v1/messages", body), 400, "invalid_request_error")


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        json.dumps({"model": "tiny"}).encode(),
        json.dumps({"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}).encode(),
    ],
)
def test_count_tokens_errors(server, body):
    assert_anthropic_error(*raw(server, "POST", "/v1/messages/count_tokens", body), 400, "invalid_request_error")


def test_unknown_model_is_404_before_streaming(server, client):
    body = json.dumps({"model": "claude-9", "max_tokens": 5, "messages": MSGS, "stream": True})
    assert_anthropic_error(*raw(server, "POST", "/v1/messages", body), 404, "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        create(client, model="claude-9")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-9", messages=MSGS)


def test_client_raises_bad_request(client):
    with pytest.raises(anthropic.BadRequestError) as err:
        create(client, messages=[])
    assert err.value.status_code == 400 and err.value.body["error"]["type"] == "invalid_request_error"


def test_wrong_method_and_unknown_path(server):
    assert_anthropic_error(*raw(server, "GET", "/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(*raw(server, "POST", "/v1/messages/nothing", b"{}"), 404, "not_found_error")


def test_unknown_fields_ignored(client):
    m = create(client, max_tokens=3, metadata={"user_id": "u1"}, extra_body={"temperature": 0, "frobnicate": 1})
    assert m.usage.output_tokens == 3


def test_disconnect_mid_stream_cancels(server, client):
    body = json.dumps(
        {"model": "tiny", "messages": MSGS, "max_tokens": 4000, "stream": True, "temperature": 0}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b"content_block_delta") < 10:
        got += sock.recv(65536)
    sock.close()
    t = time.monotonic()
    assert create(client, max_tokens=5).usage.output_tokens == 5
    assert time.monotonic() - t < 5


def test_server_survived(server, client):
    assert server.alive()
    assert create(client, max_tokens=2).usage.output_tokens == 2
