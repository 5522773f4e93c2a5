"""The official openai client against a running ``exo-lab serve`` on the tiny model."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.helpers.raw_http import assert_openai_error, raw

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Tell me about Python."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    status, body = raw(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_non_streaming(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_matches_non_streaming_with_usage(client):
    full = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize("n", [1, 5, 33])
def test_max_tokens_gives_exactly_that_many(client, n):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=n, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_completion_tokens=n, temperature=0)
    assert r.usage.completion_tokens == n


def test_stop_sequence(client):
    full = (
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30, temperature=0)
        .choices[0]
        .message.content
    )
    stop = full[10:14]
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == full[: full.index(stop)]


def test_determinism_at_temperature_zero_and_with_seed(client):
    outs = {
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0)
        .choices[0]
        .message.content
        for _ in range(3)
    }
    assert len(outs) == 1
    seeded = [
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=1.0, top_p=0.95, seed=11)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_eight_concurrent_requests(client):
    def ask(i):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=20, temperature=0
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert all(r.usage.completion_tokens == 20 for r in results)
    assert len({r.choices[0].message.content for r in results}) > 1
    assert results[5].choices[0].message.content == ask(5).choices[0].message.content


# --- malformed input: an OpenAI-shaped 4xx, and the server keeps serving -----------------


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "tiny"}).encode(), "messages"),
        (json.dumps({"model": "tiny", "messages": []}).encode(), "messages"),
        (json.dumps({"model": "tiny", "messages": "hi"}).encode(), "messages"),
        (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages[0].role"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user"}]}).encode(), "messages[0].content"),
        (json.dumps({"messages": MSGS}).encode(), "model"),
        (json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": "ten"}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "messages": MSGS, "temperature": 5}).encode(), "temperature"),
        (json.dumps({"model": "tiny", "messages": MSGS, "top_p": 0}).encode(), "top_p"),
        (json.dumps({"model": "tiny", "messages": MSGS, "stop": [1, 2]}).encode(), "stop"),
        (json.dumps({"model": "tiny", "messages": MSGS, "n": 2}).encode(), "n"),
        (json.dumps({"model": "tiny", "messages": MSGS, "stream": "yes"}).encode(), "stream"),
    ],
)
def test_malformed_requests_get_400(server, body, param):
    status, data = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert_openai_error(status, data, 400, param)


def test_unknown_model_is_404_before_streaming(server, client):
    body = json.dumps({"model": "gpt-9", "messages": MSGS, "stream": True}).encode()
    status, data = raw(server, "POST", "/v1/chat/completions", body)
    assert_openai_error(status, data, 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSGS)


def test_client_errors_raise_the_right_exceptions(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert err.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, extra_body={"frobnicate": True})
    assert r.usage.completion_tokens == 3


def test_wrong_method_and_path(server):
    assert_openai_error(*raw(server, "GET", "/v1/chat/completions"), 405)
    assert_openai_error(*raw(server, "POST", "/v1/nothing-here", b"{}"), 404)


def test_disconnect_mid_stream_cancels_and_frees_the_model(server, client):
    body = json.dumps(
        {"model": "tiny", "messages": MSGS, "max_tokens": 100000, "temperature": 0, "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b"data:") < 5:
        got += sock.recv(65536)
    sock.close()
    # the next request is served promptly: the abandoned 100k-token generation stopped
    t = time.monotonic()
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert time.monotonic() - t < 10


def test_server_survived_everything(server, client):
    assert server.alive()
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).usage.completion_tokens == 2
