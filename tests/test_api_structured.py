"""Units behind structured output: the JSON grammar, vocabulary masks, and tool-call parsing."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_lab.api.schema.openai import ChatCompletionRequest
from exo_lab.api.tools import ToolCallScanner, ToolFormat, _hermes_parse, tool_format
from exo_lab.engine.constrain import Json, VocabIndex, tool_call_grammar

OBJ = Json("object")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize(
    "text,ok",
    [
        ("{}", True),
        ('{"a": 1}', True),
        ('{"a":[1,2.5e-3,-0.5E+2,"x\\n\\"",true,false,null,{}]}', True),
        ('{"a": "\\u00e9\\ud83d\\ude00"}', True),
        ('{"é": "ü"}', True),
        ('{"a" :1}', True),
        ('{\n"a": 1\n}', True),
        ('{"a"  :1}', False),  # two blanks in a row
        (' {"a": 1}', False),  # no blank before the root
        ('{"a": 1} ', False),  # nor after it
        ('{"a":01}', False),
        ('{"a":1.}', False),
        ('{"a":-}', False),
        ('{"a":tru}', False),
        ('{"a":"x\ny"}', False),  # control character in a string
        ('{"a":"\\x"}', False),
        ('{"a":1,}', False),
        ("{'a':1}", False),
        ("[1]", False),  # an object at the root
        ("{", False),
    ],
)
def test_json_grammar_cases(text, ok):
    assert OBJ.matches(text) is ok
    if ok:
        json.loads(text)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), st.sampled_from([(",", ":"), (", ", ": ")]))
@settings(max_examples=100, deadline=None)
def test_every_dumped_object_is_accepted(value, separators):
    assert OBJ.matches(json.dumps(value, separators=separators))
    assert OBJ.matches(json.dumps(value, separators=separators, ensure_ascii=False))


@given(st.text(alphabet='{}[]":,0123456789.-+eEtrufalsn \\ab', max_size=24))
@settings(max_examples=300, deadline=None)
def test_whatever_the_grammar_accepts_is_json(text):
    for root in ("object", "array", "any"):
        if Json(root).matches(text):
            json.loads(text)


@given(json_values)
@settings(max_examples=100, deadline=None)
def test_completions_are_shortest_and_consistent(value):
    """From every prefix of a valid text, ``completion`` finishes it and is as long as ``closing``."""
    grammar = Json("any")
    text = json.dumps(value, separators=(",", ":"))
    state = grammar.start()
    for ch in text:
        done = grammar.completion(state)
        assert len(done) == grammar.closing(state)
        s = state
        for c in done:
            s = grammar.step(s, c)
        assert grammar.accepting(s)
        state = grammar.step(state, ch)
        assert state is not None
    assert grammar.accepting(state)


def test_tool_call_grammar():
    g = tool_call_grammar(["get_weather", "get_time"])
    assert g.matches('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert g.matches('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert not g.matches('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')
    assert not g.matches('<tool_call>\n{"name": "get_time", "arguments": []}\n</tool_call>')


@pytest.fixture(scope="module")
def index(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return VocabIndex(load_tokenizer(tiny_model))


@pytest.mark.parametrize("grammar", [Json("object"), Json("array"), Json("any"), tool_call_grammar(["f", "get_time"])])
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 8, 40])
def test_random_walks_through_the_mask_always_end_valid(index, grammar, max_tokens):
    """Picking any allowed token at every step, the output is complete when the tokens run out."""
    rng = random.Random(max_tokens)
    need = index.tokens_to_spell(grammar.completion(grammar.start()))
    for _ in range(10):
        state, text = grammar.start(), ""
        for n in range(max_tokens):
            allowed = index.mask(grammar, state, max_tokens - n - 1).nonzero()[0]
            assert len(allowed), (grammar, state)
            if max_tokens < need:  # too few tokens for any complete text: only end of sequence is left
                assert set(allowed) == set(index.eos_ids)
            token = int(rng.choice(allowed))
            if token in index.eos_ids:
                break
            for ch in index.texts[token]:
                state = grammar.step(state, ch)
            text += index.texts[token]
        if max_tokens >= need:
            assert grammar.matches(text), (max_tokens, text)
        if isinstance(grammar, Json) and grammar.matches(text):
            json.loads(text)


def test_mask_allows_end_of_sequence_only_when_complete(index):
    eos = index.eos_ids
    assert not index.mask(OBJ, OBJ.start(), 100)[eos].any()
    done = OBJ.start()
    for ch in "{}":
        done = OBJ.step(done, ch)
    mask = index.mask(OBJ, done, 100)
    assert mask[eos].all() and mask.sum() == len(eos)


def test_vocabulary_texts(index):
    assert index.texts[index.eos_ids[0]] is None  # special tokens are never picked by a grammar
    assert index.tokens_to_spell("{}") <= 2 and index.tokens_to_spell("") == 0


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
    text = ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
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
