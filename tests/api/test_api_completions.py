"""``POST /v1/completions`` (legacy) through the official openai client: prompts as text, token ids or lists,
``echo``, ``logprobs``, streaming, stop, and malformed requests answered in OpenAI's shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server

PROMPT = "def main():"


@pytest.fixture(scope="module")
def server(engine):
    registry = ModelRegistry()
    registry.add(engine, "tiny")
    srv = Server(registry, port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_text_prompt_is_continued_as_the_engine_does(client, engine):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == engine.generate(PROMPT, max_tokens=12, temperature=0).text()
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens == len(engine.encode(PROMPT))
    assert r.usage.completion_tokens <= 12
    default = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_token_prompts_lists_echo_and_logprobs(client, engine):
    ids = engine.encode(PROMPT)
    r = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=6, temperature=0, echo=True, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    text = engine.generate(PROMPT, max_tokens=6, temperature=0).text()
    for c in r.choices:
        assert c.text.endswith(text) and c.text.startswith(engine.tokenizer.decode(ids)[:5])
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + r.usage.completion_tokens // 2
        assert lp.token_logprobs[: len(ids)] == [None] * len(ids)  # prompts are not scored
        assert all(v <= 0 for v in lp.token_logprobs[len(ids) :])
        assert all(len(t) == 2 for t in lp.top_logprobs[len(ids) :])
        # tokens decoded one at a time may differ in spacing from the text decoded together
        assert lp.text_offset[0] == 0 and "".join(lp.tokens).replace(" ", "") == c.text.replace(" ", "")
    assert r.usage.prompt_tokens == 2 * len(ids)
    texts = client.completions.create(model="tiny", prompt=[PROMPT, "import os"], max_tokens=4, temperature=0)
    assert [c.text for c in texts.choices] == [
        engine.generate(p, max_tokens=4, temperature=0).text() for p in (PROMPT, "import os")
    ]


def test_streaming_with_stop_and_usage(client, engine):
    full = engine.generate(PROMPT, max_tokens=20, temperature=0).text()
    stop = full[6:9]
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stop=[stop],
            stream=True,
            stream_options={"include_usage": True},
            logprobs=0,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full[: full.index(stop)]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens).strip().startswith(text.strip())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": []}, "prompt"),
        ({"model": "tiny", "prompt": {"x": 1}}, "prompt"),
        ({"model": "tiny", "prompt": [99999999]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "n": 2}, "n"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "tiny", "prompt": "x", "presence_penalty": 9}, "presence_penalty"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_and_bad_json_then_still_serving(server, client):
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(
        server.url + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", best_of=3)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None
