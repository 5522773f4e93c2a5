"""Traces over the API: ``X-Exo-Trace`` on a generation request records one, ``/v1/traces`` serves it.

A real ``exo-lab serve`` process (the tiny model, one process) and the official OpenAI client.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MSGS = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_with_the_trace_header_records_a_trace(server, client, stream):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSGS, max_tokens=6, temperature=0, stream=stream, extra_headers={"X-Exo-Trace": "1"}
    )
    trace_id = raw.headers["x-exo-trace-id"]
    answer = raw.parse()
    if stream:
        assert [c for c in answer]  # the stream ends once the trace is kept
    listed = httpx.get(server.url + "/v1/traces").json()["data"]
    assert trace_id in [t["id"] for t in listed]
    entry = next(t for t in listed if t["id"] == trace_id)
    assert entry["model"] == "tiny" and entry["ranks"] == 1 and entry["spans"] > 0
    chrome = httpx.get(f"{server.url}/v1/traces/{trace_id}").json()
    spans = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert {"admit", "step"} <= {e["name"] for e in spans}
    assert all({"ts", "dur", "pid", "tid", "name"} <= set(e) for e in spans)
    own = httpx.get(f"{server.url}/v1/traces/{trace_id}?format=exo").json()
    assert own["id"] == trace_id and len(own["spans"]) == len(spans)


def test_without_the_header_nothing_is_recorded(server, client):
    before = len(httpx.get(server.url + "/v1/traces").json()["data"])
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSGS, max_tokens=3, extra_headers={"X-Exo-Trace": "0"}
    )
    assert "x-exo-trace-id" not in raw.headers
    assert len(httpx.get(server.url + "/v1/traces").json()["data"]) == before


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/traces/", 400),
        ("/v1/traces/xyz", 400),
        ("/v1/traces/0123456789ABCDEF", 400),
        ("/v1/traces/0123456789abcdef0", 400),
        ("/v1/traces/..%2F..%2Fetc", 400),
        ("/v1/traces/%00%00", 400),
        ("/v1/traces/0123456789abcdef", 404),
        ("/v1/traces/0123456789abcdef?format=svg", 400),
        ("/v1/traces/a/b", 404),
    ],
)
def test_malformed_and_unknown_trace_ids(server, path, status):
    r = httpx.get(server.url + path)
    assert r.status_code == status, r.text
    assert "error" in json.loads(r.text)
