"""Embeddings (OpenAI ``/v1/embeddings``, Ollama ``/api/embed`` and ``/api/embeddings``) and Ollama's
``/api/pull`` through the official clients, with malformed requests answered in each family's shape."""

from __future__ import annotations

import httpx
import mlx.core as mx
import ollama
import openai
import pytest

from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server


@pytest.fixture(scope="module")
def server(engine):
    registry = ModelRegistry()
    registry.add(engine, "tiny")
    srv = Server(registry, port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Embeddings computed here from the model's files: the mean of the normed last hidden state, length 1."""
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model))

    def embed(tokens):
        h = model.model(mx.array([tokens]))[0].astype(mx.float32).mean(axis=0)
        return (h / mx.linalg.norm(h)).tolist()

    return embed


def close(a, b):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_openai_embeddings(server, engine, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    texts = ["def main():", "import os"]
    r = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == sum(len(engine.encode(t)) for t in texts)
    for d, t in zip(r.data, texts):
        assert close(d.embedding, reference(engine.encode(t)))
    floats = client.embeddings.create(model="tiny", input=texts[0], encoding_format="float")
    assert close(floats.data[0].embedding, r.data[0].embedding) and len(floats.data[0].embedding) == 128
    ids = engine.encode(texts[1])
    assert close(client.embeddings.create(model="tiny", input=ids).data[0].embedding, r.data[1].embedding)
    short = client.embeddings.create(model="tiny", input=texts[0], dimensions=16).data[0].embedding
    assert len(short) == 16 and abs(sum(x * x for x in short) - 1) < 1e-4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "input"),
        ({"model": "tiny", "input": ""}, "input"),
        ({"model": "tiny", "input": ["a", ""]}, "input"),
        ({"model": "tiny", "input": 5}, "input"),
        ({"model": "tiny", "input": [99999999]}, "input"),
        ({"model": "tiny", "input": [5] * 5000}, "input"),
        ({"model": "tiny", "input": "x", "dimensions": 999}, "dimensions"),
        ({"model": "tiny", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_malformed_embeddings_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_ollama_embed(server, engine, reference):
    client = ollama.Client(host=server.url)
    r = client.embed(model="tiny", input=["def main():", "import os"])
    assert len(r.embeddings) == 2 and close(list(r.embeddings[0]), reference(engine.encode("def main():")))
    one = client.embed(model="tiny:latest", input="import os")
    assert close(list(one.embeddings[0]), list(r.embeddings[1]))
    old = client.embeddings(model="tiny", prompt="def main():")
    assert close(list(old.embedding), list(r.embeddings[0]))
    long = "x " * 5000
    assert len(client.embed(model="tiny", input=long).embeddings[0]) == 128  # cut to the context
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny", input=long, truncate=False)
    assert err.value.status_code == 400 and "context" in err.value.error
    for body in ({"model": "tiny", "input": []}, {"model": "tiny"}, {"model": "tiny", "input": [1]}):
        resp = httpx.post(server.url + "/api/embed", json=body, timeout=30)
        assert resp.status_code == 400 and isinstance(resp.json()["error"], str)
    for body in ({"model": "tiny"}, {"model": "tiny", "prompt": 5}):
        resp = httpx.post(server.url + "/api/embeddings", json=body, timeout=30)
        assert resp.status_code == 400 and "prompt" in resp.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nope", input="x")
    assert err.value.status_code == 404


def test_ollama_pull(server):
    client = ollama.Client(host=server.url)
    lines = list(client.pull("synthetic:tiny", stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    files = [line for line in lines if line.digest]
    assert files and all(line.total == line.completed > 0 for line in files)
    assert client.pull("tiny").status == "success"  # a model this server serves
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("no-such-model")
    assert err.value.status_code == 404 and "file does not exist" in err.value.error
    r = httpx.post(server.url + "/api/pull", json={}, timeout=30)
    assert r.status_code == 400 and "model is required" in r.json()["error"]
    r = httpx.post(server.url + "/api/pull", content=b"[", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    assert client.embed(model="tiny", input="still serving").embeddings
