"""JSON-schema constraints (llguidance): whatever path sampling takes through the mask, the output fits the schema."""

from __future__ import annotations

import json
import random

import jsonschema
import mlx.core as mx
import pytest

from exo_lab.engine.guided import SchemaConstraint, SchemaError, SchemaGrammar, guide_tokenizer

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -3, "maximum": 300},
                                      "b": {"type": "string", "maxLength": 4}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", 7, None]}, "minItems": 1, "maxItems": 3},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                      "additionalProperties": False}},
     "type": "object", "properties": {"p": {"$ref": "#/$defs/pt"},
                                      "q": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]}},
     "required": ["p", "q"], "additionalProperties": False},
    {"type": "string", "pattern": "^[ab]{2,5}$"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    config = json.loads((tiny_model / "config.json").read_text())
    tok = load_tokenizer(tiny_model, eos_token_ids=config.get("eos_token_id"))
    return tok, guide_tokenizer(tok, config["vocab_size"])


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
            constraint.consume(token)
            out.append(token)
        else:
            pytest.fail(f"no end after 300 tokens: {tok.decode(out)!r}")
        jsonschema.validate(json.loads(tok.decode(out)), schema)


def test_the_logits_mask_keeps_only_allowed_tokens(tokenizer):
    tok, guide = tokenizer
    constraint = SchemaConstraint(SchemaGrammar.from_schema(SCHEMAS[1]), guide)
    logits = mx.zeros((1, guide.vocab_size))
    masked = constraint.mask(logits)
    kept = [i for i, v in enumerate(masked[0].tolist()) if v > float("-inf")]
    assert kept and len(kept) < guide.vocab_size
    assert all(tok.decode([i])[0] == "[" for i in kept)  # an array must open first


@pytest.mark.parametrize("schema", [{"type": "bogus"}, {"type": "object", "properties": {"a": {"minimum": "x"}}}, [1]])
def test_schemas_it_cannot_follow_are_refused(schema):
    with pytest.raises(SchemaError):
        SchemaGrammar.from_schema(schema)


def test_a_forced_tool_call_follows_the_chosen_tools_parameters(tokenizer):
    tok, guide = tokenizer
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
               "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {}, "additionalProperties": False}}}]
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
            out.append(rng.choice(allowed))
            constraint.consume(out[-1])
        text = tok.decode(out)
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        names.add(call["name"])
        if call["name"] == "get_weather":
            jsonschema.validate(call["arguments"], weather)
        else:
            assert call == {"name": "get_time", "arguments": {}}
    assert names == {"get_weather", "get_time"}
