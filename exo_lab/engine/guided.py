"""Constrained output on llguidance, the same on one process and on the ranks of an instance.

Every constraint is an llguidance grammar (:class:`SchemaGrammar`): any JSON
object (:func:`json_object`, ``response_format`` ``json_object``), a JSON
schema (:func:`json_schema`), or a forced tool call in the Hermes format
(:func:`tool_calls`). It travels to the ranks of a distributed instance in
the job body (``to_json``), where the rank that samples applies it
(:mod:`exo_lab.engine.lockstep`); the Engine applies it in its batch.

:class:`SchemaConstraint` keeps one generation inside its grammar: it masks
the logits each step (end-of-sequence only once the output is complete) and
keeps the output completable within ``max_tokens``. It holds a *plan*:
tokens, checked by the matcher, that complete the output from where it is
(found by ``_complete``: the shortest JSON closing of
:class:`~exo_lab.engine.json_closer.JsonCloser`, spelled in the model's
tokens, helped by llguidance's forced tokens and a few fallback bytes where
the grammar wants more). A sampled token is kept only if the output after
it has a plan that fits in the tokens left; otherwise the current plan is
written out instead (masked to its next token each step) and the generation
ends there. By induction, once a plan fits at the start, the output is
complete when ``max_tokens`` runs out. So:

* ``json_object``: the plan from the start is ``{}``; the output is always a
  complete JSON object within ``max_tokens`` (a smaller budget is a 400
  naming ``max_tokens`` in the API; see :func:`shortest_output`).
* ``json_schema`` and forced tool calls: the same whenever a plan is found
  from the start (:func:`shortest_output` is not None; plans are searched up
  to :data:`MAX_PLAN` tokens). Otherwise the output follows the schema but
  may be cut off at ``max_tokens`` (``finish_reason`` ``length``, as with
  OpenAI).

A stop sequence or a cancel can still end any output early.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np

from exo_lab.engine.json_closer import JsonCloser, State

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # the stub's TypedDict; llguidance does not re-export it

log = logging.getLogger(__name__)

#: compact JSON: a model with random weights would otherwise fill the output with whitespace
COMPILE_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: the longest completion plan searched for (in tokens)
MAX_PLAN = 64
#: bytes tried, in this order, where neither the JSON closing nor llguidance's forced tokens continue a plan
_FALLBACK_BYTES = b'"}]0:, 1-.e+tfnul' + bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1))


class SchemaError(ValueError):
    """The JSON schema cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class SchemaGrammar:
    """An llguidance grammar (``grammar``, a string) for JSON, with what frames it and its shortest value.

    ``schema`` is the JSON schema as text; ``prefix`` and ``suffix`` are fixed texts around the JSON
    (a tool call's markers); ``empty`` is the shortest JSON the root may be, as far as is known.
    """

    schema: str
    grammar: str
    prefix: str = ""
    suffix: str = ""
    empty: str = "0"

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> SchemaGrammar:
        """Compile ``schema``; raises :class:`SchemaError` for a schema llguidance cannot follow."""
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise SchemaError("the schema must be a JSON object")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS.copy())
            problem = LLMatcher.validate_grammar(grammar)
        except Exception as exc:
            raise SchemaError(str(exc)) from exc
        if problem:
            raise SchemaError(problem)
        root = schema.get("type")
        empty = {"object": "{}", "array": "[]"}.get(root, "0") if isinstance(root, str) else "0"
        return cls(json.dumps(schema, sort_keys=True), grammar, empty=empty)

    @classmethod
    def tool_call(cls, tools: Sequence[dict[str, Any]], start: str, end: str) -> SchemaGrammar:
        """A call of one of ``tools`` (Chat Completions function tools) between ``start`` and ``end``.

        ``{"name": ..., "arguments": {...}}`` with the arguments following that tool's ``parameters``.
        """
        from llguidance import LLMatcher

        calls = []
        for tool in tools:
            fn = tool["function"]
            calls.append(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "arguments"],
                    "properties": {
                        "name": {"const": fn["name"]},
                        "arguments": fn.get("parameters") or {"type": "object"},
                    },
                }
            )
        schema = {"x-guidance": dict(COMPILE_OPTIONS), "anyOf": calls}
        lark = f"start: {json.dumps(start)} call {json.dumps(end)}\ncall: %json {json.dumps(schema)}"
        try:
            grammar = LLMatcher.grammar_from_lark(lark)
            problem = LLMatcher.validate_grammar(grammar)
        except Exception as exc:
            raise SchemaError(str(exc)) from exc
        if problem:
            raise SchemaError(problem)
        return cls(json.dumps(schema, sort_keys=True), grammar, start, end, "{}")

    def closer(self) -> JsonCloser:
        return JsonCloser(self.prefix.encode(), self.suffix.encode(), self.empty.encode())

    def to_json(self) -> dict[str, str]:
        return {
            "schema": self.schema,
            "grammar": self.grammar,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "empty": self.empty,
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> SchemaGrammar:
        return cls(
            data["schema"], data["grammar"], data.get("prefix", ""), data.get("suffix", ""), data.get("empty", "0")
        )


@functools.cache
def json_object() -> SchemaGrammar:
    """Any JSON object (``response_format`` ``json_object``)."""
    return SchemaGrammar.from_schema({"type": "object"})


def json_schema(schema: Any) -> SchemaGrammar:
    """Output that follows ``schema``; raises :class:`SchemaError` for one llguidance cannot follow."""
    return SchemaGrammar.from_schema(schema)


def tool_calls(tools: Sequence[dict[str, Any]], forced: str | None = None) -> SchemaGrammar:
    """A call of the tool named ``forced`` (or of any of ``tools``) in the Hermes format.

    Raises :class:`SchemaError` when a tool's parameters are not a schema llguidance can follow.
    """
    from exo_lab.engine.chat import HERMES_END, HERMES_START

    chosen = [t for t in tools if forced is None or t["function"]["name"] == forced]
    return SchemaGrammar.tool_call(chosen, f"{HERMES_START}\n", f"\n{HERMES_END}")


# --------------------------------------------------------------------- vocabulary


class Vocabulary:
    """A model's tokens for llguidance: the ``LLTokenizer``, each token's bytes, and spelling of texts."""

    def __init__(self, ll: Any, ends: Sequence[int] = ()) -> None:
        self.ll = ll
        self.size: int = ll.vocab_size
        self.eos: int = ll.eos_token
        self.ends = frozenset([self.eos, *ends])  # every end-of-sequence token
        self.texts: list[bytes] = [b"" if ll.is_special_token(i) else ll.decode_bytes([i]) for i in range(self.size)]
        self._byte_token: dict[int, int] = {}
        for i, text in enumerate(self.texts):
            if len(text) == 1:
                self._byte_token.setdefault(text[0], i)
        self._spelled: dict[bytes, list[int] | None] = {}

    def byte_token(self, byte: int) -> int | None:
        """A token that is exactly ``byte``, if there is one."""
        return self._byte_token.get(byte)

    def text(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.texts[t] if 0 <= t < self.size else b"" for t in tokens)

    def spell(self, data: bytes) -> list[int] | None:
        """Tokens whose bytes are exactly ``data`` (few, not always fewest), or None if none are found."""
        got = self._spelled.get(data)
        if got is not None or data in self._spelled:
            return got
        k = 0
        while k < len(data) and 0x80 <= data[k] <= 0xBF:  # the end of a character begun by an earlier token
            k += 1
        tokens = [self._byte_token.get(b, -1) for b in data[:k]]
        try:
            tokens += self.ll.greedy_tokenize(data[k:].decode("utf-8"))
        except UnicodeDecodeError:
            tokens = [-1]
        spelled = tokens if -1 not in tokens and self.text(tokens) == data else None
        if len(self._spelled) > 4096:
            self._spelled.clear()
        self._spelled[data] = spelled
        return spelled


_vocabularies: dict[int, tuple[Any, Vocabulary]] = {}
_vocab_lock = threading.Lock()


def vocabulary(tokenizer: Any, vocab_size: int | None = None) -> Vocabulary:
    """The :class:`Vocabulary` of an mlx_lm ``TokenizerWrapper`` (over ``vocab_size`` logits), built once.

    Building one takes a moment on a large vocabulary; later calls for the same tokenizer return it.
    """
    from llguidance.hf import from_tokenizer

    with _vocab_lock:
        held = _vocabularies.get(id(tokenizer))
        if held is not None and held[0] is tokenizer and vocab_size in (None, held[1].size):
            return held[1]
        ends = sorted(tokenizer.eos_token_ids)
        vocab = Vocabulary(from_tokenizer(tokenizer._tokenizer, n_vocab=vocab_size, eos_token=ends), ends)
        _vocabularies[id(tokenizer)] = (tokenizer, vocab)
        return vocab


def shortest_output(grammar: SchemaGrammar, vocab: Vocabulary) -> int | None:
    """Tokens in the shortest output of ``grammar`` found (None: none found within :data:`MAX_PLAN`).

    With a ``max_tokens`` of at least this, a :class:`SchemaConstraint` always ends with complete output.
    """
    key = (grammar, id(vocab))
    if key not in _shortest:
        plan = SchemaConstraint(grammar, vocab, MAX_PLAN).plan
        if len(_shortest) > 1024:
            _shortest.clear()
        _shortest[key] = None if plan is None else len(plan)
    return _shortest[key]


_shortest: dict[tuple[SchemaGrammar, int], int | None] = {}


# --------------------------------------------------------------------- the constraint


class SchemaConstraint:
    """Keeps one generation inside a :class:`SchemaGrammar`, completable within ``max_tokens``.

    Each step: :meth:`mask` (or :meth:`allowed`) the logits, sample, then :meth:`choose` the token
    to emit (the sampled one, or the plan's next when the sampled one would leave no room to finish).
    On one process it works as an mlx_lm logits processor (``processor(tokens, logits)``) together
    with :meth:`sampler`; the lock-step rank that samples calls :meth:`mask` and :meth:`choose`.
    """

    def __init__(
        self, grammar: SchemaGrammar | dict[str, str], vocab: Vocabulary, max_tokens: int | None = None
    ) -> None:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self.grammar = grammar if isinstance(grammar, SchemaGrammar) else SchemaGrammar.from_json(grammar)
        self.vocab = vocab
        self.matcher = LLMatcher(vocab.ll, self.grammar.grammar, log_level=0)
        self.closer = self.grammar.closer()
        self.state: State | None = self.closer.start()
        self._bits = allocate_token_bitmask(1, vocab.size)
        self.left = max_tokens  # tokens still to come (None: no limit)
        #: tokens that complete the output from here (None: none known, the output may be cut off)
        self.plan: list[int] | None = self._complete(max_tokens) if max_tokens is not None else None
        self.forcing = False  # writing out the plan: the budget is spent
        self._lost = False

    # ---------------------------------------------------------------- per step
    def allowed(self) -> np.ndarray:
        """The tokens allowed next (bool per token id)."""
        from llguidance.numpy import fill_next_token_bitmask

        if self._lost:
            return np.ones(self.vocab.size, dtype=bool)
        if self.forcing:
            only = np.zeros(self.vocab.size, dtype=bool)
            only[self.plan[0] if self.plan else self.vocab.eos] = True
            return only
        fill_next_token_bitmask(self.matcher, self._bits, 0)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab.size].astype(bool)

    def mask(self, logits: mx.array) -> mx.array:
        """``logits`` (``(1, vocab)`` or ``(vocab,)``) with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        vocab = logits.shape[-1]
        if vocab != allowed.shape[0]:
            full = np.zeros(vocab, dtype=bool)
            k = min(vocab, allowed.shape[0])
            full[:k] = allowed[:k]
            allowed = full
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def choose(self, token: int) -> int:
        """The token to emit for sampled ``token``, followed: ``token`` itself, or the plan's next one."""
        token = int(token)
        left, self.left = self.left, (None if self.left is None else self.left - 1)
        if self._lost or self.plan is None or left is None or left <= 0:
            self._follow(token)
            return token
        if not self.forcing:
            if token in self.vocab.ends:
                self._follow(token)
                return token
            if self.matcher.consume_token(token) and not self.matcher.is_error():
                state = self.closer.feed(self.state, self.vocab.texts[token])
                plan = self._complete(left - 1, state)
                if plan is not None:
                    self.state, self.plan = state, plan
                    return token
                self.matcher.rollback(1)
            self.forcing = True
        token = self.plan.pop(0) if self.plan else self.vocab.eos
        self._follow(token)
        return token

    def sampler(self, sample: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
        """``sample`` (an mlx_lm sampler for one row), then :meth:`choose`."""

        def choose(logprobs: mx.array) -> mx.array:
            sampled = sample(logprobs)
            return mx.array([self.choose(int(cast(int, sampled.item())))], sampled.dtype)

        return choose

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """As an mlx_lm logits processor: the mask (the tokens are followed by :meth:`choose`)."""
        return self.mask(logits)

    def _follow(self, token: int) -> None:
        if self._lost:
            return
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            log.warning("token %d left the grammar (%s); the constraint stops", token, self.matcher.get_error())
            self._lost = True
            return
        self.state = self.closer.feed(self.state, self.vocab.texts[token] if 0 <= token < self.vocab.size else b"")

    # ---------------------------------------------------------------- plans
    def _accepting(self) -> bool:
        return self.matcher.is_accepting()

    def _complete(self, limit: int, state: State | None = None) -> list[int] | None:
        """Tokens (at most ``limit``, at most :data:`MAX_PLAN`) that complete the output from the matcher's state.

        ``state`` is the closer's state there (the constraint's own by default). The matcher is left as it was.
        """
        m, vocab, closer = self.matcher, self.vocab, self.closer
        state = self.state if state is None else state
        limit = min(limit, MAX_PLAN)
        plan: list[int] = []
        taken = 0
        try:
            while True:
                if self._accepting():
                    return plan
                room = limit - len(plan)
                if room <= 0:
                    return None
                closing = vocab.spell(closer.closing(state)) if state is not None else None
                k = m.validate_tokens(closing[:room]) if closing else 0
                step = closing[:k] if closing and k else (m.compute_ff_tokens()[:room] or self._fallback())
                if not step or not m.consume_tokens(step):
                    return None
                taken += len(step)
                plan += step
                state = closer.feed(state, vocab.text(step)) if state is not None else None
        finally:
            if taken:
                m.rollback(taken)

    def _fallback(self) -> list[int]:
        """One allowed token to continue a plan with, by :data:`_FALLBACK_BYTES` (else any allowed but EOS)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bits, 0)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab.size].astype(bool)
        allowed[[t for t in self.vocab.ends if t < self.vocab.size]] = False
        for b in _FALLBACK_BYTES:
            t = self.vocab.byte_token(b)
            if t is not None and allowed[t]:
                return [t]
        ids = allowed.nonzero()[0]
        return [int(ids[0])] if len(ids) else []
