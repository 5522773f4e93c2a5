"""The prefix cache through the official clients: a 10-turn conversation reuses the earlier turns' KV caches
(``cached_tokens`` from turn 2) and gets the tokens of a server without the cache; each family reports it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from tests.helpers.servers import ServerProcess

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. " * 40  # a long system prompt, resent every turn


@pytest.fixture(scope="module")
def uncached(tiny_model: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_model, extra=("--prefix-cache-mb", "0"))
    yield srv
    assert srv.stop() == 0


def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def converse(srv: ServerProcess, turns: int = 10) -> tuple[list[str], list[int], list[int]]:
    """Each turn's reply, prompt tokens and cached tokens (greedy, 8 tokens a reply)."""
    c = client(srv)
    messages: list = [{"role": "system", "content": SYSTEM}]
    replies, prompts, cached = [], [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: tell me about topic {turn * 7}."})
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        text = r.choices[0].message.content or ""
        replies.append(text)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        prompts.append(r.usage.prompt_tokens)
        cached.append(r.usage.prompt_tokens_details.cached_tokens or 0)
        messages.append({"role": "assistant", "content": text})
    return replies, prompts, cached


def test_ten_turns_hit_the_cache_with_the_same_tokens(server, uncached):
    replies, prompts, cached = converse(server)
    reference, ref_prompts, ref_cached = converse(uncached)
    assert replies == reference and prompts == ref_prompts
    assert ref_cached == [0] * 10
    assert all(0 < c < p for c, p in zip(cached[1:], prompts[1:])), (cached, prompts)
    # the previous prompt, but for its last token (the generation prompt's newlines merge with the reply's text)
    assert all(c >= p - 1 for c, p in zip(cached[1:], prompts[:-1])), (cached, prompts)


def test_each_family_reports_cached_tokens(server):
    messages = [{"role": "user", "content": SYSTEM + " Summarise."}]
    a = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    kw = dict(model="tiny", messages=messages, max_tokens=4, system="Be brief.", extra_body={"temperature": 0})
    counted = a.messages.count_tokens(model="tiny", messages=messages, system="Be brief.").input_tokens
    first, again = a.messages.create(**kw), a.messages.create(**kw)  # type: ignore[arg-type]
    assert first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0) == counted
    assert again.usage.cache_read_input_tokens == counted - 1 and again.usage.input_tokens == 1

    c = client(server)
    r1 = c.responses.create(model="tiny", input=SYSTEM + " Again.", max_output_tokens=4, temperature=0)
    r2 = c.responses.create(model="tiny", input=SYSTEM + " Again.", max_output_tokens=4, temperature=0)
    assert r1.usage is not None and r2.usage is not None
    assert r2.usage.input_tokens_details.cached_tokens == r2.usage.input_tokens - 1

    o = ollama.Client(host=server.url, timeout=60)
    opts = {"temperature": 0, "num_predict": 4}
    full = o.generate(model="tiny", prompt=SYSTEM + " Ollama.", options=opts)
    assert (
        o.generate(model="tiny", prompt=SYSTEM + " Ollama.", options=opts).prompt_eval_count == full.prompt_eval_count
    )
