"""Output that follows a JSON schema, with llguidance.

:class:`SchemaGrammar` compiles a JSON schema (properties, required keys,
types, enums, lengths, nested objects and arrays, ``$ref`` ...) into an
llguidance grammar; :class:`SchemaConstraint` follows the generated tokens
with an ``LLMatcher`` and masks the logits each step so that only tokens the
schema allows remain (end-of-sequence only once the JSON is complete).

The grammar is a plain string, so it travels to the ranks of a distributed
instance in the job body (see :mod:`exo_lab.engine.worker`). The character
grammars of :mod:`exo_lab.engine.constrain` stay for ``json_object`` and
forced tool calls: they also guarantee complete output within ``max_tokens``,
which a schema constraint cannot (output cut off by ``max_tokens`` ends with
``finish_reason`` ``length``, as with OpenAI).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

#: compact JSON: a model with random weights would otherwise fill the output with whitespace
COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(ValueError):
    """The JSON schema cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class SchemaGrammar:
    """A JSON schema compiled to an llguidance grammar (``grammar`` is a string)."""

    schema: str  # the schema as JSON text
    grammar: str

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> "SchemaGrammar":
        """Compile ``schema``; raises :class:`SchemaError` for a schema llguidance cannot follow."""
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise SchemaError("the schema must be a JSON object")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=dict(COMPILE_OPTIONS))
            problem = LLMatcher.validate_grammar(grammar)
        except Exception as exc:  # noqa: BLE001 - whatever the compiler objects to is the schema's fault
            raise SchemaError(str(exc)) from exc
        if problem:
            raise SchemaError(problem)
        return cls(json.dumps(schema, sort_keys=True), grammar)

    @classmethod
    def tool_call(cls, tools: list[dict[str, Any]], start: str, end: str) -> "SchemaGrammar":
        """A call of one of ``tools`` (Chat Completions function tools) between ``start`` and ``end``.

        ``{"name": ..., "arguments": {...}}`` with the arguments following that tool's ``parameters``.
        """
        from llguidance import LLMatcher

        calls = []
        for tool in tools:
            fn = tool["function"]
            calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                          "properties": {"name": {"const": fn["name"]},
                                         "arguments": fn.get("parameters") or {"type": "object"}}})
        schema = {"x-guidance": dict(COMPILE_OPTIONS), "anyOf": calls}
        lark = f"start: {json.dumps(start)} call {json.dumps(end)}\ncall: %json {json.dumps(schema)}"
        try:
            grammar = LLMatcher.grammar_from_lark(lark)
            problem = LLMatcher.validate_grammar(grammar)
        except Exception as exc:  # noqa: BLE001 - a tool's parameters the compiler cannot follow
            raise SchemaError(str(exc)) from exc
        if problem:
            raise SchemaError(problem)
        return cls(json.dumps(schema, sort_keys=True), grammar)


def guide_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """An llguidance tokenizer for an mlx_lm ``TokenizerWrapper`` over a model with ``vocab_size`` logits.

    Building one takes a moment on a large vocabulary: keep it with the model.
    """
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer._tokenizer, n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids))


class SchemaConstraint:
    """Keeps one generation inside a :class:`SchemaGrammar`.

    As an mlx_lm logits processor (``processor(tokens, logits)``) it follows the
    tokens it is shown (the prompt first, then one new token per call); the
    lock-step ranks call :meth:`mask` and :meth:`consume` directly instead.
    """

    def __init__(self, grammar: SchemaGrammar | str, tokenizer: Any) -> None:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        text = grammar.grammar if isinstance(grammar, SchemaGrammar) else grammar
        self.matcher = LLMatcher(tokenizer, text, log_level=0)
        self.vocab = tokenizer.vocab_size
        self._bits = allocate_token_bitmask(1, self.vocab)
        self._prompt_len: int | None = None
        self._generated = 0
        self._lost = False

    def consume(self, token: int) -> None:
        """Follow a generated token (the end-of-sequence token included)."""
        if self._lost:
            return
        if not self.matcher.consume_token(int(token)) or self.matcher.is_error():
            log.warning("token %d left the schema (%s); the constraint stops", token, self.matcher.get_error())
            self._lost = True

    def allowed(self) -> np.ndarray:
        """The tokens allowed next (bool per token id)."""
        from llguidance.numpy import fill_next_token_bitmask

        if self._lost:
            return np.ones(self.vocab, dtype=bool)
        fill_next_token_bitmask(self.matcher, self._bits, 0)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)

    def mask(self, logits: mx.array) -> mx.array:
        """``logits`` (``(1, vocab)`` or ``(vocab,)``) with every token the schema forbids at -inf."""
        allowed = self.allowed()
        vocab = logits.shape[-1]
        if vocab != allowed.shape[0]:
            full = np.zeros(vocab, dtype=bool)
            k = min(vocab, allowed.shape[0])
            full[:k] = allowed[:k]
            allowed = full
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._prompt_len is None:
            self._prompt_len = len(tokens)
        else:
            seen = len(tokens) - self._prompt_len
            while self._generated < seen:
                self._generated += 1
                self.consume(int(tokens[self._prompt_len + self._generated - 1].item()))
        return self.mask(logits)
