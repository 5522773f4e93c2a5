"""Units behind tool calls: parsing calls out of text, tool formats and ``tool_choice``.

(The constraints themselves are tested in test_guided.py and unit/test_json_closer.py.)"""

from __future__ import annotations

import json

from exo_lab.api.schema.openai import ChatCompletionRequest
from exo_lab.api.tools import ToolCallScanner, ToolFormat, _hermes_parse, tool_format

# --- tool calls out of text, as the model writes them -----------------------------------------

HERMES = ToolFormat("<tool_call>", "</tool_call>", _hermes_parse, True)
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]


def scan(fmt, text, cuts):
    scanner = ToolCallScanner(fmt, TOOLS)
    shown, calls, last = [], [], 0
    for cut in [*cuts, len(text)]:
        s, c = scanner.feed(text[last:cut])
        shown.append(s)
        calls += c
        last = cut
    s, c = scanner.finish()
    return "".join(shown) + s, calls + c


SCRIPT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> Done.'


def test_scripted_call_split_anywhere():
    for cut in range(len(SCRIPT) + 1):
        for cuts in ([cut], [cut // 2, cut], list(range(0, len(SCRIPT), 3))):
            shown, calls = scan(HERMES, SCRIPT, sorted(set(cuts)))
            assert shown == "Let me check. Done."
            assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
            assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
            assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_two_calls_and_string_arguments():
    text = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    shown, calls = scan(HERMES, text, [])
    assert shown == "" and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}


def test_unparseable_or_unfinished_calls_are_text():
    bad = "<tool_call>not json</tool_call>!"
    assert scan(HERMES, bad, [5]) == (bad, [])
    cut = 'ok <tool_call>{"name": "get_weather", "argu'
    assert scan(HERMES, cut, [4]) == (cut, [])
    assert scan(HERMES, "a <tool", []) == ("a <tool", [])  # a held-back partial marker comes out at the end


def test_bare_json_calls():
    bare = ToolFormat(None, None, _hermes_parse, False)
    shown, calls = scan(bare, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', [3])
    assert shown == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert scan(bare, '{"name": "rm", "parameters": {}}', []) == ('{"name": "rm", "parameters": {}}', [])
    assert scan(bare, "plain text", [2]) == ("plain text", [])


def test_tool_formats_from_templates(tiny_model):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    fmt = tool_format(tok)
    assert fmt.start == "<tool_call>" and fmt.end == "</tool_call>" and fmt.hermes

    class NoTools:
        chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    assert tool_format(NoTools()).hermes


def test_tool_choice_values():
    def mode(choice, tools):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools}
        return ChatCompletionRequest.parse({**body, "tool_choice": choice} if choice is not None else body).tool_mode()

    assert mode(None, TOOLS) == ("auto", None)
    assert mode(None, []) == ("none", None)
    assert mode({"type": "function", "function": {"name": "get_weather"}}, TOOLS) == ("function", "get_weather")
