"""Continuous batching in the single-process Engine: shared decode steps, exact outputs, bounded queue (429)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

import exo_lab
from exo_lab.engine.generator import EngineBusy, GenerationRequest
from exo_lab.engine.guided import json_object
from exo_lab.engine.sampling import SamplingParams
from tests.helpers.raw_http import raw

PROMPTS = [f"Question {i}: " + "tell me more " * i for i in range(8)]


def tokens_of(gen) -> list[int]:
    out = []
    for chunk in gen:
        assert chunk.error is None, chunk.error
        out.extend(chunk.tokens)
    return out


def test_concurrent_greedy_outputs_equal_alone(engine):
    alone = [tokens_of(engine.chat([{"role": "user", "content": p}], max_tokens=40)) for p in PROMPTS]
    before = dict(engine.stats)
    gens = [engine.chat([{"role": "user", "content": p}], max_tokens=40) for p in PROMPTS]
    together = [tokens_of(g) for g in gens]
    assert together == alone
    steps = engine.stats["decode_steps"] - before["decode_steps"]
    produced = engine.stats["decode_tokens"] - before["decode_tokens"]
    assert produced == 8 * 40
    assert steps < produced / 3, (steps, produced)  # requests shared decode steps
    assert engine.stats["peak_batch"] >= 4


def test_requests_joining_and_leaving_a_running_batch_stay_exact(engine):
    alone = [
        tokens_of(engine.chat([{"role": "user", "content": p}], max_tokens=10 + 7 * i))
        for i, p in enumerate(PROMPTS[:5])
    ]
    started = []
    for i, p in enumerate(PROMPTS[:5]):
        chunks = iter(engine.chat([{"role": "user", "content": p}], max_tokens=10 + 7 * i))
        started.append((next(chunks), chunks))  # wait until it decodes, then add the next one mid-flight
    together = [[*first.tokens, *(t for c in rest for t in c.tokens)] for first, rest in started]
    assert together == alone


def test_seeded_sampling_and_features_are_per_request(engine):
    def request(i, **kw):
        prompt = tuple(engine.encode(PROMPTS[i]))
        return GenerationRequest(prompt, max_tokens=24, **kw)

    reqs = [
        request(0, sampling=SamplingParams(1.0, 0.9, 40, seed=3)),
        request(1, logprobs=2),
        request(2, grammar=json_object()),
        request(3),
        request(4, sampling=SamplingParams(0.7, seed=11), stop=("e",)),
    ]
    alone_chunks = [list(engine.submit(r)) for r in reqs]  # one at a time
    together = [list(g) for g in [engine.submit(r) for r in reqs]]  # all in one batch
    for a, b in zip(alone_chunks, together):
        assert [c.tokens for c in a] == [c.tokens for c in b]
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        # same alternatives; values agree to fp32 rounding (batched matmuls sum in another order)
        tops_a = [lp.top for c in a for lp in c.logprobs]
        tops_b = [lp.top for c in b for lp in c.logprobs]
        assert [[t[:2] for t in top] for top in tops_a] == [[t[:2] for t in top] for top in tops_b]
        assert [t[2] for top in tops_a for t in top] == pytest.approx([t[2] for top in tops_b for t in top], abs=1e-4)
    json.loads("".join(c.text for c in together[2]))
    assert all(c.logprobs for c in together[1] if c.tokens)


def test_cancel_one_leaves_the_others_exact(engine):
    alone = [tokens_of(engine.chat([{"role": "user", "content": p}], max_tokens=30)) for p in PROMPTS[:3]]
    gens = [
        engine.chat([{"role": "user", "content": p}], max_tokens=30 if i != 1 else 3000)
        for i, p in enumerate(PROMPTS[:3])
    ]
    next(iter(gens[1]))
    gens[1].cancel()
    assert [c.finish_reason for c in gens[1] if c.finish_reason] == ["cancelled"]
    assert tokens_of(gens[0]) == alone[0] and tokens_of(gens[2]) == alone[2]


@pytest.fixture(scope="module")
def small_engine(tiny_model):
    eng = exo_lab.Engine(tiny_model, name="tiny", max_batch=1, max_queue=1)
    yield eng
    eng.close()


def test_bounded_queue_raises_engine_busy(small_engine):
    long = dict(max_tokens=3000, ignore_eos=True)
    a = small_engine.generate("one", **long)
    b = small_engine.generate("two", **long)
    with pytest.raises(EngineBusy):
        small_engine.generate("three", max_tokens=2)
    a.cancel()
    b.cancel()
    list(a), list(b)
    assert small_engine.pending == 0
    assert small_engine.generate("four", max_tokens=2).text()


@pytest.mark.slow
def test_full_queue_is_a_family_shaped_429(small_engine):
    srv = exo_lab.serve(small_engine, port=0)
    try:
        holders = []
        for _ in range(2):  # one decoding, one queued
            body = json.dumps(
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3000,
                    "stream": True,
                    "ignore_eos": True,
                }
            ).encode()
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            holders.append(sock)
        deadline = time.monotonic() + 10
        while small_engine.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        msgs = [{"role": "user", "content": "hi"}]
        cases = {
            "/v1/chat/completions": {"model": "tiny", "messages": msgs, "max_tokens": 2},
            "/v1/responses": {"model": "tiny", "input": "hi", "max_output_tokens": 2},
            "/v1/messages": {"model": "tiny", "messages": msgs, "max_tokens": 2},
            "/api/chat": {"model": "tiny", "messages": msgs, "stream": False},
        }
        for path, body in cases.items():
            status, data = raw(srv, "POST", path, json.dumps(body))
            assert status == 429, (path, data)
            err = json.loads(data)
            if path.startswith("/api"):
                assert "busy" in err["error"]
            elif path == "/v1/messages":
                assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error"
            else:
                assert err["error"]["code"] == "rate_limit_exceeded"
        for sock in holders:
            sock.close()
        deadline = time.monotonic() + 10  # the disconnects free both places
        while small_engine.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        status, _ = raw(srv, "POST", "/v1/chat/completions", json.dumps(cases["/v1/chat/completions"]))
        assert status == 200
    finally:
        srv.stop()


def test_many_threads_at_once(engine):
    results: dict[int, list[int]] = {}

    def ask(i):
        results[i] = tokens_of(engine.chat([{"role": "user", "content": PROMPTS[i % 8]}], max_tokens=12))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 24
    for i in range(8, 24):
        assert results[i] == results[i % 8]
