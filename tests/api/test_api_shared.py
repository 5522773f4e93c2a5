"""Behaviour every API family shares, on stub backends in process: 503 while loading, engine errors
mid-stream and before it, and options a backend cannot honour."""

from __future__ import annotations

import json
import threading

import pytest

from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server
from exo_lab.engine.backend import Backend
from exo_lab.engine.generator import Chunk, Generation, Usage
from tests.helpers.raw_http import raw

MSGS = [{"role": "user", "content": "Hello"}]
REQUESTS = {
    "/v1/chat/completions": {"model": "m", "messages": MSGS, "max_tokens": 5},
    "/v1/responses": {"model": "m", "input": "hi", "max_output_tokens": 5},
    "/v1/messages": {"model": "m", "messages": MSGS, "max_tokens": 5},
    "/api/chat": {"model": "m", "messages": MSGS, "options": {"num_predict": 5}},
}


class Stub(Backend):
    """A backend in a given state whose generations say 'hello' and then fail."""

    tokenizer = None
    context_length = 100
    stats = {}

    def __init__(self, state: str = "ready") -> None:
        super().__init__("m")
        self.state = state
        self.error = "a worker died"
        self.requests: list = []  # what was submitted

    def chat_tokens(self, messages):
        return [1, 2, 3]

    def _check_open(self):
        pass

    def _enqueue(self, gen: Generation) -> None:
        self.requests.append(gen.request)

        def run():
            gen._push(Chunk("hello", (5,)))
            self._finish(gen, Chunk("", finish_reason="error", error="rank 1 vanished", usage=Usage(3, 1)))

        threading.Thread(target=run, daemon=True).start()

    def close(self):
        pass


@pytest.fixture
def serve_stub():
    servers = []

    def start(state: str = "ready") -> Server:
        registry = ModelRegistry()
        registry.add(Stub(state), "m")
        srv = Server(registry, port=0).start()
        srv.stub = registry.get("m")  # type: ignore[attr-defined]
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def shape(path: str, data: dict) -> str:
    if path.startswith("/api"):
        assert list(data) == ["error"] and data["error"]
        return "ollama"
    if path.startswith("/v1/messages"):
        assert data["type"] == "error" and data["error"]["message"]
        return data["error"]["type"]
    assert set(data["error"]) == {"message", "type", "param", "code"}
    return data["error"]["type"]


@pytest.mark.parametrize("state", ["loading", "replacing", "launching", "failed"])
def test_503_with_retry_after_while_not_ready(serve_stub, state):
    srv = serve_stub(state)
    for path, body in {
        **REQUESTS,
        "/v1/messages/count_tokens": {"model": "m", "messages": MSGS},
        "/api/generate": {"model": "m", "prompt": "x"},
    }.items():
        for stream in (False, True):
            conn_body = json.dumps({**body, "stream": stream})
            status, data = _raw_with_headers(srv, path, conn_body)
            assert status == 503, (path, data)
            kind = shape(path, json.loads(data[0]))
            assert int(data[1]["Retry-After"]) > 0
            if path.startswith("/v1/messages"):
                assert kind == "overloaded_error"
            assert state in data[0].decode()


def _raw_with_headers(srv, path, body):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.read(), dict(resp.getheaders())
    conn.close()
    return resp.status, out


@pytest.mark.parametrize("path", list(REQUESTS))
def test_engine_error_before_any_output_is_a_family_shaped_500(serve_stub, path):
    srv = serve_stub()
    body = {**REQUESTS[path], "stream": False}
    status, data = raw(srv, "POST", path, json.dumps(body))
    assert status == 500
    kind = shape(path, json.loads(data))
    assert kind in ("server_error", "api_error", "ollama")
    assert b"rank 1 vanished" in data


def test_engine_error_mid_stream_in_each_family_shape(serve_stub):
    srv = serve_stub()
    status, data = raw(
        srv, "POST", "/v1/chat/completions", json.dumps({**REQUESTS["/v1/chat/completions"], "stream": True})
    )
    events = [b[6:] for b in data.decode().strip().split("\n\n")]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"

    status, data = raw(srv, "POST", "/v1/messages", json.dumps({**REQUESTS["/v1/messages"], "stream": True}))
    blocks = data.decode().strip().split("\n\n")
    assert blocks[-1].startswith("event: error\n")
    err = json.loads(blocks[-1].split("\n")[1][6:])
    assert err == {"type": "error", "error": {"type": "api_error", "message": err["error"]["message"]}}
    assert "rank 1 vanished" in err["error"]["message"]
    assert any(b.startswith("event: content_block_delta") for b in blocks)

    status, data = raw(srv, "POST", "/v1/responses", json.dumps({**REQUESTS["/v1/responses"], "stream": True}))
    last = json.loads(data.decode().strip().split("\n\n")[-1].split("\n")[1][6:])
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert "rank 1 vanished" in last["response"]["error"]["message"]

    status, data = raw(srv, "POST", "/api/chat", json.dumps({**REQUESTS["/api/chat"], "stream": True}))
    lines = [json.loads(line) for line in data.decode().strip().split("\n")]
    assert lines[0]["message"]["content"] == "hello" and "rank 1 vanished" in lines[-1]["error"]


@pytest.mark.parametrize(
    "path,extra",
    [
        ("/v1/chat/completions", {"logprobs": True}),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
        ("/v1/responses", {"text": {"format": {"type": "json_object"}}}),
        ("/api/chat", {"format": "json"}),
    ],
)
def test_options_a_backend_cannot_honour_are_400(serve_stub, path, extra):
    srv = serve_stub()
    status, data = raw(srv, "POST", path, json.dumps({**REQUESTS[path], **extra}))
    assert status == 400, data
    shape(path, json.loads(data))


MANY = [f"s{i}" for i in range(17)]
LONG = "x" * 257


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/v1/chat/completions", {"seed": 2**64, "temperature": 1}, "seed"),
        ("/v1/chat/completions", {"seed": -(2**63) - 1, "temperature": 1}, "seed"),
        ("/v1/chat/completions", {"temperature": 2.5}, "temperature"),
        ("/v1/chat/completions", {"top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"top_k": -1}, "top_k"),
        ("/v1/chat/completions", {"n": 2}, "n"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"stop": MANY[:5]}, "stop"),
        ("/v1/chat/completions", {"stop": LONG}, "stop"),
        ("/v1/responses", {"temperature": -0.5}, "temperature"),
        ("/v1/responses", {"top_p": 1.5}, "top_p"),
        ("/v1/responses", {"max_output_tokens": 0}, "max_output_tokens"),
        ("/v1/messages", {"temperature": 1.5}, "temperature"),
        ("/v1/messages", {"top_k": -1}, "top_k"),
        ("/v1/messages", {"max_tokens": 0}, "max_tokens"),
        ("/v1/messages", {"stop_sequences": MANY}, "stop_sequences"),
        ("/v1/messages", {"stop_sequences": ["ok", LONG]}, "stop_sequences"),
        ("/api/chat", {"options": {"seed": 2**64, "temperature": 1}}, "options.seed"),
        ("/api/chat", {"options": {"temperature": 101}}, "options.temperature"),
        ("/api/chat", {"options": {"top_p": 1.5}}, "options.top_p"),
        ("/api/chat", {"options": {"stop": MANY}}, "options.stop"),
        ("/api/chat", {"options": {"stop": [LONG]}}, "options.stop"),
    ],
)
def test_sampling_fields_out_of_range_are_a_400_naming_the_field(serve_stub, path, extra, param):
    """Nothing out of the sampler's range reaches a backend (a seed of 2**64 used to fail inside a worker)."""
    srv = serve_stub()
    body = {**REQUESTS[path], **extra}
    if "options" in extra:
        body["options"] = {**REQUESTS[path]["options"], **extra["options"]}
    for stream in (False, True):
        status, data = raw(srv, "POST", path, json.dumps({**body, "stream": stream}))
        assert status == 400, (path, extra, data)
        error = json.loads(data)
        shape(path, error)
        if path.startswith("/api"):
            assert error["error"].startswith(f"{param}:"), error
        elif path.startswith("/v1/messages"):
            assert error["error"]["type"] == "invalid_request_error"
            assert error["error"]["message"].startswith(f"{param}:"), error
        else:
            assert error["error"]["param"] == param, error
    assert srv.stub.requests == []


@pytest.mark.parametrize(
    "path,extra,seed",
    [
        ("/v1/chat/completions", {"seed": -1, "temperature": 1}, 2**64 - 1),
        ("/v1/chat/completions", {"seed": -(2**63), "temperature": 1}, 2**63),
        ("/v1/chat/completions", {"seed": 2**64 - 1, "temperature": 1}, 2**64 - 1),
        ("/api/chat", {"options": {"seed": -1, "temperature": 1, "num_predict": 5}}, 2**64 - 1),
    ],
)
def test_any_64_bit_seed_reaches_the_sampler_as_an_unsigned_one(serve_stub, path, extra, seed):
    srv = serve_stub()
    raw(srv, "POST", path, json.dumps({**REQUESTS[path], **extra, "stream": False}))
    (request,) = srv.stub.requests
    assert request.sampling.seed == seed
