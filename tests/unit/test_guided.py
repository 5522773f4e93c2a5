"""Constrained output (llguidance): whatever path sampling takes through the mask, the output fits the grammar,
and where a plan exists from the start it is complete within ``max_tokens``."""

from __future__ import annotations

import json
import random

import jsonschema
import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_lab.engine.guided import (
    SchemaConstraint,
    SchemaError,
    SchemaGrammar,
    json_object,
    shortest_output,
    tool_calls,
    vocabulary,
)

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -3, "maximum": 300},
            "b": {"type": "string", "maxLength": 4},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", 7, None]}, "minItems": 1, "maxItems": 3},
    {
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {"x": {"type": "boolean"}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "p": {"$ref": "#/$defs/pt"},
            "q": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]},
        },
        "required": ["p", "q"],
        "additionalProperties": False,
    },
    {"type": "string", "pattern": "^[ab]{2,5}$"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    config = json.loads((tiny_model / "config.json").read_text())
    tok = load_tokenizer(tiny_model, eos_token_ids=config.get("eos_token_id"))
    return tok, vocabulary(tok, config["vocab_size"])


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum-array", "ref-anyof", "pattern"])
def test_random_walks_through_the_mask_end_inside_the_schema(tokenizer, schema):
    tok, guide = tokenizer
    grammar = SchemaGrammar.from_schema(schema)
    eos = set(tok.eos_token_ids)
    for seed in range(12):
        rng = random.Random(seed)
        constraint = SchemaConstraint(grammar, guide)
        out: list[int] = []
        for _ in range(300):
            allowed = [i for i, ok in enumerate(constraint.allowed()) if ok]
            assert allowed, "the mask allows nothing"
            ends = [i for i in allowed if i in eos]
            if ends and (len(ends) == len(allowed) or rng.random() < 0.3):
                break
            token = rng.choice([i for i in allowed if i not in eos])
            out.append(constraint.choose(token))
        else:
            pytest.fail(f"no end after 300 tokens: {tok.decode(out)!r}")
        jsonschema.validate(json.loads(tok.decode(out)), schema)


def test_the_logits_mask_keeps_only_allowed_tokens(tokenizer):
    tok, guide = tokenizer
    constraint = SchemaConstraint(SchemaGrammar.from_schema(SCHEMAS[1]), guide)
    logits = mx.zeros((1, guide.size))
    masked = constraint.mask(logits)
    kept = [i for i, v in enumerate(masked[0].tolist()) if v > float("-inf")]
    assert kept and len(kept) < guide.size
    assert all(tok.decode([i])[0] == "[" for i in kept)  # an array must open first


@pytest.mark.parametrize("schema", [{"type": "bogus"}, {"type": "object", "properties": {"a": {"minimum": "x"}}}, [1]])
def test_schemas_it_cannot_follow_are_refused(schema):
    with pytest.raises(SchemaError):
        SchemaGrammar.from_schema(schema)


def test_a_forced_tool_call_follows_the_chosen_tools_parameters(tokenizer):
    tok, guide = tokenizer
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 6}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": weather}},
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            },
        },
    ]
    grammar = SchemaGrammar.tool_call(tools, "<tool_call>\n", "\n</tool_call>")
    eos = set(tok.eos_token_ids)
    names = set()
    for seed in range(10):
        rng = random.Random(seed)
        constraint = SchemaConstraint(grammar, guide)
        out: list[int] = []
        for _ in range(300):
            allowed = [i for i, ok in enumerate(constraint.allowed()) if ok and i not in eos]
            if not allowed:
                break
            out.append(constraint.choose(rng.choice(allowed)))
        text = tok.decode(out)
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
        call = json.loads(text[len("<tool_call>\n") : -len("\n</tool_call>")])
        names.add(call["name"])
        if call["name"] == "get_weather":
            jsonschema.validate(call["arguments"], weather)
        else:
            assert call == {"name": "get_time", "arguments": {}}
    assert names == {"get_weather", "get_time"}


# --- complete within max_tokens ------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def walk(constraint: SchemaConstraint, vocab, rng: random.Random, max_tokens: int) -> bytes:
    """Sample uniformly among the allowed tokens (a model that could say anything) for ``max_tokens`` steps."""
    out: list[int] = []
    for _ in range(max_tokens):
        allowed = constraint.allowed().nonzero()[0]
        token = constraint.choose(int(rng.choice(allowed)))
        if token in vocab.ends:
            break
        out.append(token)
    return vocab.text(out)


def parse(grammar: SchemaGrammar, text: bytes):
    assert text.startswith(grammar.prefix.encode()) and text.endswith(grammar.suffix.encode()), text
    return json.loads(text[len(grammar.prefix) : len(text) - len(grammar.suffix)])


@given(seed=st.integers(0, 10**6), extra=st.integers(0, 40))
@settings(max_examples=60, deadline=None)
def test_json_object_is_complete_within_any_max_tokens_from_the_minimum(tokenizer, seed, extra):
    _, vocab = tokenizer
    grammar = json_object()
    max_tokens = shortest_output(grammar, vocab) + extra
    value = parse(grammar, walk(SchemaConstraint(grammar, vocab, max_tokens), vocab, random.Random(seed), max_tokens))
    assert isinstance(value, dict)


@given(
    prompt=st.lists(st.integers(5, 8000), min_size=1, max_size=40),
    max_tokens=st.integers(1, 30),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=30, deadline=None)
def test_json_object_from_the_engine_parses_for_any_prompt_and_max_tokens(engine, prompt, max_tokens, seed):
    """On a real model, sampled hot (keys and strings open often), the reply is a whole object within max_tokens."""
    from exo_lab.engine.generator import GenerationRequest
    from exo_lab.engine.sampling import SamplingParams

    chunks = list(
        engine.submit(
            GenerationRequest(
                tuple(prompt), max_tokens=max_tokens, grammar=json_object(), sampling=SamplingParams(2.0, seed=seed)
            )
        )
    )
    assert isinstance(json.loads("".join(c.text for c in chunks)), dict)
    assert chunks[-1].usage.completion_tokens <= max_tokens


@pytest.mark.parametrize("which", ["object", "enum-array", "ref-anyof", "tools"])
def test_schemas_and_tool_calls_with_a_plan_are_complete_within_max_tokens(tokenizer, which):
    _, vocab = tokenizer
    grammar = (
        tool_calls([WEATHER, TIME])
        if which == "tools"
        else SchemaGrammar.from_schema(SCHEMAS[["object", "enum-array", "ref-anyof"].index(which)])
    )
    need = shortest_output(grammar, vocab)
    assert need is not None
    for extra in (0, 1, 3, 10, 30):
        for seed in range(8):
            value = parse(
                grammar, walk(SchemaConstraint(grammar, vocab, need + extra), vocab, random.Random(seed), need + extra)
            )
            if which == "tools":
                assert value["name"] in ("get_weather", "get_time") and isinstance(value["arguments"], dict)
                if value["name"] == "get_weather":
                    assert isinstance(value["arguments"]["city"], str)
            else:
                jsonschema.validate(value, SCHEMAS[["object", "enum-array", "ref-anyof"].index(which)])


def test_without_a_plan_the_output_follows_the_schema_but_may_be_cut_off(tokenizer):
    """A schema whose shortest value is longer than the plan search reaches: no completion is promised."""
    _, vocab = tokenizer
    long = {
        "type": "object",
        "properties": {f"k{i}": {"type": "string", "minLength": 8} for i in range(12)},
        "required": [f"k{i}" for i in range(12)],
        "additionalProperties": False,
    }
    grammar = SchemaGrammar.from_schema(long)
    assert shortest_output(grammar, vocab) is None
    text = walk(SchemaConstraint(grammar, vocab, 20), vocab, random.Random(0), 20)
    assert text.startswith(b'{"k0": "')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_the_shortest_outputs(tokenizer):
    tok, vocab = tokenizer
    assert vocab.text(SchemaConstraint(json_object(), vocab, 10).plan) == b"{}"
    plan = SchemaConstraint(tool_calls([WEATHER, TIME], "get_time"), vocab, 100).plan
    assert vocab.text(plan) == b'<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert shortest_output(json_object(), vocab) == len(tok.encode("{}", add_special_tokens=False))


def test_a_plan_being_written_out_is_masked_to_its_next_token(tokenizer):
    """Once the budget is spent, the mask allows only the plan's next token (then end-of-sequence)."""
    _, vocab = tokenizer
    forced = 0
    for seed in range(10):
        rng = random.Random(seed)
        c = SchemaConstraint(json_object(), vocab, 4)
        out = []
        for _ in range(4):
            allowed = c.allowed().nonzero()[0]
            if c.forcing:
                forced += 1
                assert len(allowed) == 1
            token = c.choose(int(rng.choice(allowed)))
            if token in vocab.ends:
                break
            out.append(token)
        assert isinstance(json.loads(vocab.text(out)), dict)
    assert forced


texts = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=6)  # llguidance wants DEL escaped
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(texts, json_values, max_size=4))
@settings(max_examples=60, deadline=None)
def test_json_object_plans_are_the_closers_shortest_closing(tokenizer, value):
    """After every token of any object, the plan is the closer's closing, and the grammar accepts it whole."""
    tok, vocab = tokenizer
    tokens = vocab.spell(json.dumps(value, separators=(", ", ": "), ensure_ascii=False).encode())
    c = SchemaConstraint(json_object(), vocab)
    for token in tokens:
        assert c.choose(token) == token
        plan = c._complete(64)
        assert plan is not None and vocab.text(plan) == c.closer.closing(c.state)
    assert c.matcher.is_accepting() and set(c.allowed().nonzero()[0].tolist()) == set(tok.eos_token_ids)


def test_end_of_sequence_only_when_complete(tokenizer):
    tok, vocab = tokenizer
    c = SchemaConstraint(json_object(), vocab, 50)
    assert not c.allowed()[vocab.eos]
    for token in vocab.spell(b'{"a": [1]'):
        c.choose(token)
    assert not c.allowed()[vocab.eos]
    for token in vocab.spell(b"}"):
        c.choose(token)
    assert set(c.allowed().nonzero()[0].tolist()) == set(tok.eos_token_ids)


def test_grammars_travel_as_json():
    grammar = tool_calls([WEATHER])
    assert SchemaGrammar.from_json(json.loads(json.dumps(grammar.to_json()))) == grammar
