"""The official ollama client against a running ``exo-lab serve`` on the tiny model."""

from __future__ import annotations

import json
import socket
import time

import ollama
import pytest

from tests.helpers.raw_http import raw

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Tell me about Python."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def chat(client, n=12, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", MSGS)
    kw.setdefault("options", {**GREEDY, "num_predict": n})
    kw.setdefault("stream", False)
    return client.chat(**kw)


def test_root_version_tags_ps(client, server):
    status, body = raw(server, "GET", "/")
    assert status == 200 and body == b"Ollama is running"
    assert raw(server, "HEAD", "/")[0] == 200
    assert raw(server, "GET", "/ollama")[1] == b"Ollama is running"
    status, body = raw(server, "GET", "/api/version")
    assert status == 200 and json.loads(body)["version"]
    models = client.list().models
    assert [m.model for m in models] == ["tiny:latest"]
    m = models[0]
    assert m.size > 0 and m.digest and m.details.family == "llama" and m.details.format == "safetensors"
    assert m.details.quantization_level == "F32" and m.details.parameter_size.endswith("M")
    running = client.ps().models
    assert [r.model for r in running] == ["tiny:latest"] and running[0].context_length == 4096


def test_show_has_model_info(client):
    for name in ("tiny", "tiny:latest"):
        info = client.show(name)
        mi = info.modelinfo
        assert mi["general.architecture"] == "llama" and mi["general.parameter_count"] > 0
        assert (
            mi["llama.context_length"] == 4096 and mi["llama.block_count"] == 4 and mi["llama.embedding_length"] == 128
        )
        assert "completion" in info.capabilities and info.template and info.details.family == "llama"


def test_chat_non_streaming(client):
    r = chat(client, 12)
    assert r.model == "tiny" and r.done is True and r.done_reason == "length"
    assert r.message.role == "assistant" and r.message.content
    assert r.eval_count == 12 and r.prompt_eval_count > 0
    assert isinstance(r.total_duration, int) and r.total_duration > 0
    assert r.eval_duration > 0 and r.prompt_eval_duration > 0 and r.load_duration >= 0
    assert r.total_duration >= r.eval_duration
    assert r.created_at


def test_chat_streams_ndjson_by_default(client, server):
    full = chat(client, 16)
    parts = list(client.chat(model="tiny", messages=MSGS, options={**GREEDY, "num_predict": 16}, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content for p in parts) == full.message.content
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count == 16 and last.prompt_eval_count == full.prompt_eval_count
    # on the wire: one JSON object per line, a message in every line
    body = json.dumps({"model": "tiny", "messages": MSGS, "options": {"num_predict": 5, "temperature": 0}})
    status, data = raw(server, "POST", "/api/chat", body)
    lines = data.decode().strip().split("\n")
    assert status == 200 and len(lines) >= 2
    objs = [json.loads(line) for line in lines]
    assert all("message" in o for o in objs) and objs[-1]["done"] is True
    assert all(
        isinstance(objs[-1][k], int)
        for k in (
            "total_duration",
            "load_duration",
            "prompt_eval_count",
            "prompt_eval_duration",
            "eval_count",
            "eval_duration",
        )
    )


@pytest.mark.parametrize("n", [1, 8, 33])
def test_num_predict_is_exact(client, n):
    r = chat(client, n)
    assert r.eval_count == n and r.done_reason == "length"


def test_generate(client):
    r = client.generate(
        model="tiny", prompt="Tell me about Python.", options={**GREEDY, "num_predict": 10}, stream=False
    )
    assert r.done and r.done_reason == "length" and r.eval_count == 10 and r.response
    assert len(r.context) == r.prompt_eval_count + 10
    parts = list(
        client.generate(
            model="tiny", prompt="Tell me about Python.", options={**GREEDY, "num_predict": 10}, stream=True
        )
    )
    assert "".join(p.response for p in parts) == r.response and parts[-1].done
    # the generate prompt goes through the chat template: same as a one-message chat
    assert chat(client, 10).message.content == r.response
    raw_r = client.generate(
        model="tiny", prompt="def main():", raw=True, options={**GREEDY, "num_predict": 5}, stream=False
    )
    assert raw_r.eval_count == 5 and raw_r.prompt_eval_count < r.prompt_eval_count


def test_generate_with_system_and_context(client):
    a = client.generate(
        model="tiny", prompt="Hi", system="Be brief.", options={**GREEDY, "num_predict": 4}, stream=False
    )
    b = client.generate(model="tiny", prompt="Hi", options={**GREEDY, "num_predict": 4}, stream=False)
    assert a.prompt_eval_count > b.prompt_eval_count
    c = client.generate(
        model="tiny", prompt="More", context=a.context, options={**GREEDY, "num_predict": 4}, stream=False
    )
    assert c.prompt_eval_count > len(a.context)


def test_load_only_requests(client):
    r = client.chat(model="tiny", messages=[], stream=False)
    assert r.done and r.done_reason == "load"
    g = client.generate(model="tiny", prompt="", stream=False)
    assert g.done and g.done_reason == "load" and g.response == ""


def test_stop_option(client):
    full = chat(client, 30).message.content
    stop = full[10:14]
    r = chat(client, options={**GREEDY, "num_predict": 30, "stop": [stop]})
    assert r.message.content == full[: full.index(stop)] and r.done_reason == "stop"
    parts = list(
        client.chat(model="tiny", messages=MSGS, options={**GREEDY, "num_predict": 30, "stop": [stop]}, stream=True)
    )
    assert "".join(p.message.content for p in parts) == full[: full.index(stop)]


def test_determinism_and_seed(client):
    assert len({chat(client, 15).message.content for _ in range(3)}) == 1
    seeded = [
        chat(
            client, options={"temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": 7, "num_predict": 15}
        ).message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_format_json(client):
    r = chat(client, 60, format="json")
    assert isinstance(json.loads(r.message.content), dict)
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    r = chat(client, 60, format=schema)
    value = json.loads(r.message.content)
    assert set(value) == {"name", "n"} and len(value["name"]) <= 5 and 1 <= value["n"] <= 9
    parts = list(
        client.generate(
            model="tiny", prompt="A cat as JSON", format="json", options={**GREEDY, "num_predict": 40}, stream=True
        )
    )
    assert isinstance(json.loads("".join(p.response for p in parts)), dict)


def test_ollama_prefix_mount(server):
    body = json.dumps({"model": "tiny", "messages": MSGS, "stream": False, "options": {"num_predict": 3}})
    status, data = raw(server, "POST", "/ollama/api/chat", body)
    assert status == 200 and json.loads(data)["eval_count"] == 3
    status, data = raw(server, "GET", "/ollama/api/tags")
    assert status == 200 and json.loads(data)["models"][0]["name"] == "tiny:latest"


def test_a_keyless_server_takes_json_bodies_only(server):
    """What a web page can send without asking (text/plain, a form) is refused by a server without a key
    (415 in Ollama's shape); JSON, with or without a charset, is served. (A server with a key takes any type
    as Ollama does, see test_api_browsers.py.)"""
    body = json.dumps({"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        status, data = raw(server, "POST", "/api/generate", body, {"Content-Type": ctype})
        assert status == 200 and json.loads(data)["eval_count"] == 2, (ctype, data)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, data = raw(server, "POST", "/api/generate", body, {"Content-Type": ctype})
        assert_ollama_error(status, data, 415)
        assert "application/json" in json.loads(data)["error"]


# --- errors: {"error": "..."} ---------------------------------------------------------------


def assert_ollama_error(status, body, expected):
    assert status == expected, body
    data = json.loads(body)
    assert list(data) == ["error"] and isinstance(data["error"], str) and data["error"]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/show", "/ollama/api/chat"])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[1]", json.dumps({"messages": MSGS}).encode()])
def test_malformed_bodies(server, path, body):
    assert_ollama_error(*raw(server, "POST", path, body), 400)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/chat", {"model": "tiny", "messages": "hi"}),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "options": {"temperature": "hot"}}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "options": {"num_predict": 10**9}}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "options": {"num_predict": "ten"}}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "options": {"stop": 5}}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "options": "fast"}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "format": "yaml"}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "format": {"type": "bogus"}}),
        ("/api/chat", {"model": "tiny", "messages": MSGS, "stream": "no"}),
        ("/api/chat", {"model": 5, "messages": MSGS}),
        ("/api/generate", {"model": "tiny", "prompt": 5}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": ["a"]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": [10**9]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}),
        ("/api/show", {}),
    ],
)
def test_invalid_fields(server, path, body):
    assert_ollama_error(*raw(server, "POST", path, json.dumps(body).encode()), 400)


def test_unknown_model_is_404(server, client):
    for path, body in [
        ("/api/chat", {"model": "llama9", "messages": MSGS}),
        ("/api/generate", {"model": "llama9", "prompt": "x"}),
        ("/api/show", {"model": "llama9"}),
    ]:
        assert_ollama_error(*raw(server, "POST", path, json.dumps(body).encode()), 404)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama9", messages=MSGS)
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError):
        client.show("llama9")


def test_unknown_ollama_path_and_method(server):
    assert_ollama_error(*raw(server, "POST", "/api/nothing", b"{}"), 404)
    assert_ollama_error(*raw(server, "GET", "/api/chat"), 405)


def test_disconnect_mid_stream_cancels(server, client):
    body = json.dumps({"model": "tiny", "messages": MSGS, "options": {"num_predict": 4000, "temperature": 0}}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b'"done": false') < 10:
        got += sock.recv(65536)
    sock.close()
    t = time.monotonic()
    assert chat(client, 5).eval_count == 5
    assert time.monotonic() - t < 5


def test_server_survived(server, client):
    assert server.alive()
    assert chat(client, 2).eval_count == 2
