"""Tool calls end to end with a scripted model output, through every family's parser and the official clients."""

from __future__ import annotations

import json
import threading

import anthropic
import ollama
import openai
import pytest

from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server
from exo_lab.engine.backend import Backend
from exo_lab.engine.generator import Chunk, Generation, Usage

SCRIPT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
OPENAI_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


class Tokenizer:
    chat_template = None  # no template: tools are described in the Hermes format, calls parsed as such

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text] or [0]

    def __len__(self):
        return 256


class Scripted(Backend):
    """A backend that 'generates' SCRIPT in small pieces, one token each."""

    tokenizer = Tokenizer()
    context_length = 100_000
    stats = {}

    def __init__(self) -> None:
        super().__init__("scripted")
        self.prompts: list[tuple[int, ...]] = []

    def _check_open(self):
        pass

    def _enqueue(self, gen: Generation) -> None:
        request = gen.request
        self.prompts.append(request.prompt_tokens)

        def run():
            pieces = [SCRIPT[i : i + 3] for i in range(0, len(SCRIPT), 3)]
            for p in pieces:
                gen._push(Chunk(p, (1,)))
            self._finish(
                gen, Chunk("", finish_reason="stop", usage=Usage(len(request.prompt_tokens), len(pieces))), record=True
            )

        threading.Thread(target=run, daemon=True).start()

    def close(self):
        pass


@pytest.fixture(scope="module")
def server():
    registry = ModelRegistry()
    backend = Scripted()
    registry.add(backend, "m")
    srv = Server(registry, port=0).start()
    srv.backend = backend
    yield srv
    srv.stop()


def test_openai_chat(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="m", messages=MSGS, tools=[OPENAI_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert b"<tools>" in bytes(server.backend.prompts[-1])  # the tools were described to the model

    chunks = list(client.chat.completions.create(model="m", messages=MSGS, tools=[OPENAI_TOOL], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert text == "Let me check." and len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    plain = client.chat.completions.create(model="m", messages=MSGS)  # no tools: the text as it is
    assert plain.choices[0].message.content == SCRIPT and plain.choices[0].message.tool_calls is None


RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": OPENAI_TOOL["function"]["parameters"],
}


def test_openai_responses(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.responses.create(model="m", input="Weather in Paris?", tools=[RESPONSES_TOOL])
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output_text == "Let me check." and r.status == "completed"
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert r.tools[0].name == "get_weather" and r.tool_choice == "auto"
    assert b"<tools>" in bytes(server.backend.prompts[-1])

    events = list(client.responses.create(model="m", input="Weather in Paris?", tools=[RESPONSES_TOOL], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # one item at a time: the message is done before the call's item is added
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"] and final.output_text == "Let me check."
    assert final.output[1].arguments == done.arguments
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]

    # the call and its output go back in as input items
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    assert client.responses.create(model="m", input=history, tools=[RESPONSES_TOOL]).status == "completed"
    assert b"<tool_response>\nsunny\n</tool_response>" in bytes(server.backend.prompts[-1])

    plain = client.responses.create(model="m", input="Weather in Paris?")  # no tools: the text as it is
    assert plain.output_text == SCRIPT and [o.type for o in plain.output] == ["message"]


def test_anthropic_messages(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    m = client.messages.create(model="m", messages=MSGS, max_tokens=100, tools=[tool])
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use"]
    assert m.content[0].text == "Let me check." and m.content[1].input == {"city": "Paris"}
    with client.messages.stream(model="m", messages=MSGS, max_tokens=100, tools=[tool]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "text", None), getattr(b, "input", None)) for b in final.content] == [
        ("text", "Let me check.", None),
        ("tool_use", None, {"city": "Paris"}),
    ]


def test_ollama_chat(server):
    client = ollama.Client(host=server.url)
    r = client.chat(model="m", messages=MSGS, tools=[OPENAI_TOOL], stream=False)
    assert r.message.content == "Let me check."
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(client.chat(model="m", messages=MSGS, tools=[OPENAI_TOOL], stream=True))
    assert "".join(p.message.content for p in parts) == "Let me check."
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.arguments for c in calls] == [{"city": "Paris"}]
    # the call and its result go back into the conversation
    history = MSGS + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    assert client.chat(model="m", messages=history, tools=[OPENAI_TOOL], stream=False).done
    prompt = bytes(server.backend.prompts[-1])
    assert b"<tool_response>\nsunny\n</tool_response>" in prompt and b'"city": "Paris"' in prompt
