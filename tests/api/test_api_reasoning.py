"""A thinking model's reasoning apart from its answer, in every family, through the official clients.

Two models: a scripted one (its output is fixed: it thinks, answers, then calls a tool, so what each family
shows can be checked exactly) and the synthetic thinking model (``qwen3-think-tiny``: a real Engine whose chat
template opens a ``<think>`` block, or closes it at once when thinking is turned off).
"""

from __future__ import annotations

import json
import threading

import anthropic
import httpx
import ollama
import openai
import pytest
from openai.types.responses import ResponseUsage

import exo_lab
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server
from exo_lab.engine.backend import Backend
from exo_lab.engine.generator import Chunk, Generation, Usage
from exo_lab.models import synthetic

THOUGHT = "The user wants Paris. I should call the tool."
SCRIPT = (
    f"<think>\n{THOUGHT}\n</think>\n\nLet me check.<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    + "\n</tool_call>"
)
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


class Tokenizer:
    """A template that mentions think tags (so the model is read as a thinking one) and renders no tools."""

    chat_template = "{{ messages }} <think></think>"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text] or [0]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def __len__(self):
        return 256

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **kwargs):
        self.kwargs = kwargs
        return self.encode(json.dumps(messages))


class Scripted(Backend):
    """'Generates' SCRIPT three characters (one token) at a time."""

    tokenizer = Tokenizer()
    context_length = 100_000
    stats = {}

    def __init__(self) -> None:
        super().__init__("scripted")

    def _check_open(self):
        pass

    def _enqueue(self, gen: Generation) -> None:
        request = gen.request

        def run():
            pieces = [SCRIPT[i : i + 3] for i in range(0, len(SCRIPT), 3)]
            for p in pieces:
                gen._push(Chunk(p, (1,)))
            usage = Usage(len(request.prompt_tokens), len(pieces))
            self._finish(gen, Chunk("", finish_reason="stop", usage=usage), record=True)

        threading.Thread(target=run, daemon=True).start()

    def close(self):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    think = exo_lab.Engine(synthetic.create(tmp_path_factory.mktemp("think") / "think", "qwen3-think-tiny"))
    registry = ModelRegistry()
    scripted = Scripted()
    registry.add(scripted, "m")
    registry.add(think, "think")
    srv = Server(registry, port=0).start()
    srv.scripted = scripted
    yield srv
    srv.stop()
    think.close()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_chat_completions_reasoning_content_then_answer_and_tool_call(server, oai):
    r = oai.chat.completions.create(model="m", messages=MSGS, tools=[TOOL])
    message = r.choices[0].message
    assert message.reasoning_content == f"{THOUGHT}\n"
    assert message.content == "Let me check." and r.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens

    chunks = list(oai.chat.completions.create(model="m", messages=MSGS, tools=[TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == f"{THOUGHT}\n"
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert sum(len(d.tool_calls or []) for d in deltas) == 1
    # reasoning_effort and chat_template_kwargs reach the chat template
    oai.chat.completions.create(
        model="m", messages=MSGS, reasoning_effort="low", extra_body={"chat_template_kwargs": {"x": 1}}
    )
    assert server.scripted.tokenizer.kwargs == {"reasoning_effort": "low", "enable_thinking": True, "x": 1}


def test_responses_reasoning_item_and_usage_under_strict_validation(server, oai):
    r = oai.responses.create(model="m", input="Weather in Paris?", tools=[{**TOOL["function"], "type": "function"}])
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[0].content[0].text == f"{THOUGHT}\n" and r.output_text == "Let me check."
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.usage.input_tokens_details.cache_write_tokens == 0

    events = list(oai.responses.create(model="m", input="Weather in Paris?", stream=True, reasoning={"effort": "high"}))
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == f"{THOUGHT}\n"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning", "message"]
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.reasoning.effort == "high"
    assert server.scripted.tokenizer.kwargs == {"reasoning_effort": "high", "enable_thinking": True}

    # every usage field the client's types require is there (missing ones fail validation)
    raw = httpx.post(server.url + "/v1/responses", json={"model": "m", "input": "hi"}, timeout=30).json()
    usage = ResponseUsage.model_validate(raw["usage"])
    assert usage.input_tokens_details.cache_write_tokens == 0 and usage.output_tokens_details.reasoning_tokens > 0


def test_anthropic_thinking_blocks_only_when_thinking_is_asked_for(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    m = client.messages.create(model="m", max_tokens=2000, messages=MSGS, tools=tools, thinking=thinking)
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    assert m.content[0].thinking == f"{THOUGHT}\n" and m.content[0].signature
    assert m.content[1].text == "Let me check." and m.content[2].input == {"city": "Paris"}
    assert server.scripted.tokenizer.kwargs == {"enable_thinking": True}

    with client.messages.stream(model="m", max_tokens=2000, messages=MSGS, tools=tools, thinking=thinking) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == f"{THOUGHT}\n" and final.content[0].signature == m.content[0].signature

    plain = client.messages.create(model="m", max_tokens=100, messages=MSGS, tools=tools, thinking={"type": "disabled"})
    assert [b.type for b in plain.content] == ["text", "tool_use"]
    assert server.scripted.tokenizer.kwargs == {"enable_thinking": False}
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model="m", max_tokens=100, messages=MSGS, thinking={"type": "enabled"})


def test_ollama_think(server):
    client = ollama.Client(host=server.url)
    r = client.chat(model="m", messages=MSGS, tools=[TOOL], think=True)
    assert r.message.thinking == f"{THOUGHT}\n" and r.message.content == "Let me check."
    assert r.message.tool_calls[0].function.arguments == {"city": "Paris"}
    parts = list(client.chat(model="m", messages=MSGS, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == f"{THOUGHT}\n"
    hidden = client.chat(model="m", messages=MSGS, think=False)
    assert not hidden.message.thinking and hidden.message.content.startswith("Let me check.")
    assert server.scripted.tokenizer.kwargs == {"enable_thinking": False}
    gen = client.generate(model="m", prompt="Weather?", think="low")
    assert gen.thinking == f"{THOUGHT}\n" and gen.response.startswith("Let me check.")


# ---------------------------------------------------------------- the synthetic thinking model


def test_synthetic_thinking_model_thinks_unless_told_not_to(oai):
    thinking = oai.chat.completions.create(model="think", messages=MSGS, max_tokens=6, temperature=0)
    message = thinking.choices[0].message
    # the template opened a think block and the model (random weights) never closes it: all of it is reasoning
    assert message.reasoning_content and not message.content
    assert thinking.usage.completion_tokens_details.reasoning_tokens == thinking.usage.completion_tokens == 6

    answer = oai.chat.completions.create(
        model="think", messages=MSGS, max_tokens=6, temperature=0, reasoning_effort="none"
    )
    assert answer.choices[0].message.content and answer.choices[0].message.reasoning_content is None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0
    low = oai.chat.completions.create(model="think", messages=MSGS, max_tokens=1, reasoning_effort="low")
    assert low.usage.prompt_tokens > thinking.usage.prompt_tokens  # the template said the effort


def test_synthetic_thinking_model_in_anthropic_and_ollama(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    m = client.messages.create(
        model="think", max_tokens=5, messages=MSGS, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking
    off = client.messages.create(model="think", max_tokens=5, messages=MSGS, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text

    oll = ollama.Client(host=server.url)
    r = oll.chat(model="think", messages=MSGS, think=True, options={"num_predict": 5, "temperature": 0})
    assert r.message.thinking and not r.message.content
    r = oll.chat(model="think", messages=MSGS, think=False, options={"num_predict": 5, "temperature": 0})
    assert r.message.content and not r.message.thinking
