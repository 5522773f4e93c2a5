"""Sampling beyond temperature through the official clients: min_p, penalties, logit_bias, the model's defaults,
and the 400s that name a field out of range (in each family's error shape)."""

from __future__ import annotations

import json
import shutil

import ollama
import openai
import pytest

import exo_lab
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server

MSGS = [{"role": "user", "content": "Tell me about Python."}]
TOKEN = 500  # an ordinary token of the synthetic tokenizer


@pytest.fixture(scope="module")
def server(engine, tiny_model, tmp_path_factory):
    copy = tmp_path_factory.mktemp("defaults") / "tiny-defaults"
    shutil.copytree(tiny_model, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "top_k": 1}))
    greedy_by_default = exo_lab.Engine(copy, name="tiny-defaults")
    registry = ModelRegistry()
    registry.add(engine, "tiny")
    registry.add(greedy_by_default, "tiny-defaults")
    srv = Server(registry, port=0).start()
    yield srv
    srv.stop()
    greedy_by_default.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def chat(client, n=8, model="tiny", **kw):
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=n, logprobs=True, **kw)
    return [t.token for t in r.choices[0].logprobs.content]


def test_logit_bias_forces_and_forbids_tokens(client, engine):
    forced = chat(client, temperature=0, logit_bias={str(TOKEN): 100})
    assert forced == [engine.tokenizer.decode([TOKEN])] * 8
    greedy = chat(client, temperature=0)
    first = engine.tokenizer.encode(greedy[0], add_special_tokens=False)
    banned = chat(client, temperature=0, logit_bias={str(first[0]): -100})
    assert banned[0] != greedy[0]


def test_min_p_one_keeps_only_the_most_likely_token(client):
    greedy = chat(client, 10, temperature=0)
    assert chat(client, 10, temperature=2.0, seed=3, extra_body={"min_p": 1.0}) == greedy
    assert chat(client, 10, temperature=2.0, seed=3) != greedy  # without min_p a hot sampler wanders


def test_penalties_change_greedy_output(client):
    greedy = chat(client, 24, temperature=0)
    for field, value in [("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 10.0)]:
        changed = chat(client, 24, temperature=0, extra_body={field: value})
        assert changed != greedy, field
        assert chat(client, 24, temperature=0, extra_body={field: value}) == changed  # still deterministic


def test_model_defaults_from_generation_config(client):
    greedy = chat(client, 10, temperature=0)
    # the copy's generation_config.json says temperature 0: without a temperature of its own a request is greedy
    assert chat(client, 10, model="tiny-defaults") == greedy
    assert chat(client, 10, model="tiny-defaults", temperature=1.5, seed=1, extra_body={"top_k": 0}) != greedy


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ],
)
def test_out_of_range_fields_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2, extra_body=extra)
    assert err.value.body["param"] == param and param.split(".")[0] in err.value.body["message"]


def test_ollama_options(server):
    oll = ollama.Client(host=server.url)

    def tokens(**options):
        r = oll.generate(model="tiny", prompt="def main():", options={"num_predict": 16, "temperature": 0, **options})
        return r.response

    plain = tokens()
    assert tokens(repeat_penalty=10.0) != plain
    assert tokens(repeat_penalty=10.0, repeat_last_n=0) == plain  # 0 turns the penalty off
    assert tokens(frequency_penalty=2.0) != plain
    assert tokens(temperature=2.0, min_p=1.0, seed=4) == plain
    for options, name in [({"min_p": 2}, "min_p"), ({"repeat_penalty": -1}, "repeat_penalty")]:
        with pytest.raises(ollama.ResponseError) as err:
            oll.generate(model="tiny", prompt="x", options=options)
        assert err.value.status_code == 400 and name in err.value.error
    assert oll.generate(model="tiny", prompt="x", options={"num_predict": 2}).done  # still serving
