"""Constrained decoding: a character-level grammar masks the vocabulary each step.

A grammar is a small automaton over characters with immutable, hashable
states. :class:`TokenConstraint` turns one into an mlx_lm logits processor:
before each token it walks a trie of the vocabulary's texts along with the
grammar, allows only tokens whose whole text the grammar accepts from the
current state, and allows end-of-sequence only where the grammar may end.

Every grammar also knows a shortest text that finishes it from a state
(``completion``). A token is allowed only if what it leaves can still be
finished within the tokens left (``max_tokens``), counting the fewest tokens
that spell that completion, so output cut off by ``max_tokens`` is still
complete, valid JSON (given room for the shortest one).

Grammars here: :class:`Json` (any JSON value, or an object/array at the
root), :class:`Literal`, :class:`Choice` and :class:`Sequence` (used for a
forced ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``).
Masks are cached per (grammar, state, budget), so a steady state costs a
dictionary lookup; a new state costs one walk of the trie.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence as Seq
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

MAX_DEPTH = 12
_WS = " \n"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_NUM_DONE = frozenset("0ifx")  # number sub-states that form a complete number


class Grammar:
    """Interface: ``start``, ``step``, ``accepting`` and ``closing`` over hashable states."""

    def start(self) -> Hashable:
        raise NotImplementedError

    def step(self, state: Any, ch: str) -> Any:
        """The state after ``ch``, or None when ``ch`` is not allowed."""
        raise NotImplementedError

    def accepting(self, state: Any) -> bool:
        raise NotImplementedError

    def completion(self, state: Any) -> str:
        """A shortest text that leads from ``state`` to an accepting state.

        Consistent: after any prefix of it, the completion is the rest of it.
        """
        raise NotImplementedError

    def closing(self, state: Any) -> int:
        """``len(completion(state))``, cheaply."""
        return len(self.completion(state))

    def matches(self, text: str) -> bool:
        """Whether ``text`` is a complete sentence of this grammar."""
        state = self.start()
        for ch in text:
            state = self.step(state, ch)
            if state is None:
                return False
        return self.accepting(state)


@dataclass(frozen=True)
class Json(Grammar):
    """JSON text (RFC 8259), without whitespace at the ends and at most one blank in a row.

    ``root`` is ``"object"``, ``"array"`` or ``"any"`` (any value). States are
    ``(mode, stack, aux)``: ``stack`` holds ``o``/``a`` for the open containers.
    """

    root: str = "object"

    def start(self) -> Hashable:
        return ("R", "", False)

    def step(self, state: Any, ch: str) -> Any:
        mode, stack, aux = state
        if mode == "S" or mode == "SK":
            return self._in_string(mode, stack, aux, ch)
        if mode == "N":
            return self._in_number(stack, aux, ch)
        if mode == "L":
            if ch != aux[0]:
                return None
            return ("L", stack, aux[1:]) if len(aux) > 1 else ("A", stack, False)
        if ch in _WS:
            if aux or mode == "R" or (mode == "A" and not stack):
                return None
            return (mode, stack, True)
        if mode == "R":
            if self.root == "object" and ch != "{":
                return None
            if self.root == "array" and ch != "[":
                return None
            return self._value(stack, ch)
        if mode == "V":
            return self._value(stack, ch)
        if mode == "VA":
            if ch == "]":
                return ("A", stack[:-1], False)
            return self._value(stack, ch)
        if mode == "KO":
            if ch == "}":
                return ("A", stack[:-1], False)
            return ("SK", stack, "") if ch == '"' else None
        if mode == "K":
            return ("SK", stack, "") if ch == '"' else None
        if mode == "C":
            return ("V", stack, False) if ch == ":" else None
        if mode == "A":
            if not stack:
                return None
            top = stack[-1]
            if ch == ",":
                return ("K", stack, False) if top == "o" else ("V", stack, False)
            if (ch == "}" and top == "o") or (ch == "]" and top == "a"):
                return ("A", stack[:-1], False)
            return None
        raise ValueError(f"unknown JSON grammar mode {mode!r}")

    @staticmethod
    def _value(stack: str, ch: str) -> Any:
        if ch == "{":
            return ("KO", stack + "o", False) if len(stack) < MAX_DEPTH else None
        if ch == "[":
            return ("VA", stack + "a", False) if len(stack) < MAX_DEPTH else None
        if ch == '"':
            return ("S", stack, "")
        if ch == "-":
            return ("N", stack, "-")
        if ch == "0":
            return ("N", stack, "0")
        if ch in _DIGITS:
            return ("N", stack, "i")
        rest = {"t": "rue", "f": "alse", "n": "ull"}.get(ch)
        return ("L", stack, rest) if rest else None

    @staticmethod
    def _in_string(mode: str, stack: str, esc: Any, ch: str) -> Any:
        if esc == "":
            if ch == '"':
                return ("A", stack, False) if mode == "S" else ("C", stack, False)
            if ch == "\\":
                return (mode, stack, "\\")
            if ord(ch) < 0x20:
                return None
            return (mode, stack, "")
        if esc == "\\":
            if ch in '"\\/bfnrt':
                return (mode, stack, "")
            return (mode, stack, 4) if ch == "u" else None
        if ch not in _HEX:
            return None
        return (mode, stack, esc - 1 if esc > 1 else "")

    def _in_number(self, stack: str, sub: str, ch: str) -> Any:
        if ch in _DIGITS:
            nxt = {"-": "0" if ch == "0" else "i", "i": "i", ".": "f", "f": "f", "e": "x", "es": "x", "x": "x"}.get(sub)
            if nxt is not None:
                return ("N", stack, nxt)
            return None  # a digit after a leading 0
        if ch == "." and sub in ("0", "i"):
            return ("N", stack, ".")
        if ch in "eE" and sub in ("0", "i", "f"):
            return ("N", stack, "e")
        if ch in "+-" and sub == "e":
            return ("N", stack, "es")
        if sub in _NUM_DONE:
            return self.step(("A", stack, False), ch)
        return None

    def accepting(self, state: Any) -> bool:
        mode, stack, aux = state
        if stack:
            return False
        return mode == "A" or (mode == "N" and aux in _NUM_DONE)

    def completion(self, state: Any) -> str:
        mode, stack, aux = state
        closers = "".join("}" if c == "o" else "]" for c in reversed(stack))
        if mode == "R":
            return {"object": "{}", "array": "[]"}.get(self.root, "0")
        if mode in ("A", "VA", "KO"):
            return closers
        if mode == "V":
            return "0" + closers
        if mode == "K":
            return '"":0' + closers
        if mode == "C":
            return ":0" + closers
        if mode in ("S", "SK"):
            esc = "" if aux == "" else ("n" if aux == "\\" else "0" * aux)
            return esc + ('"' if mode == "S" else '":0') + closers
        if mode == "N":
            return ("" if aux in _NUM_DONE else "0") + closers
        if mode == "L":
            return aux + closers
        raise ValueError(f"unknown JSON grammar mode {mode!r}")

    def closing(self, state: Any) -> int:
        mode, stack, aux = state
        depth = len(stack)
        if mode == "R":
            return 1 if self.root == "any" else 2
        if mode in ("A", "VA", "KO"):
            return depth
        if mode == "V":
            return 1 + depth
        if mode == "K":
            return 4 + depth  # "":0
        if mode == "C":
            return 2 + depth
        if mode in ("S", "SK"):
            esc = 0 if aux == "" else (1 if aux == "\\" else aux)
            return esc + 1 + (2 if mode == "SK" else 0) + depth
        if mode == "N":
            return (0 if aux in _NUM_DONE else 1) + depth
        if mode == "L":
            return len(aux) + depth
        raise ValueError(f"unknown JSON grammar mode {mode!r}")


@dataclass(frozen=True)
class Literal(Grammar):
    """Exactly ``text``."""

    text: str

    def start(self) -> Hashable:
        return 0

    def step(self, state: Any, ch: str) -> Any:
        return state + 1 if state < len(self.text) and self.text[state] == ch else None

    def accepting(self, state: Any) -> bool:
        return state == len(self.text)

    def completion(self, state: Any) -> str:
        return self.text[state:]

    def closing(self, state: Any) -> int:
        return len(self.text) - state


@dataclass(frozen=True)
class Choice(Grammar):
    """Exactly one of ``options``."""

    options: tuple[str, ...]

    def start(self) -> Hashable:
        return ""

    def step(self, state: Any, ch: str) -> Any:
        nxt = state + ch
        return nxt if any(o.startswith(nxt) for o in self.options) else None

    def accepting(self, state: Any) -> bool:
        return state in self.options

    def completion(self, state: Any) -> str:
        best = min((o for o in self.options if o.startswith(state)), key=len)
        return best[len(state):]


@dataclass(frozen=True)
class Sequence(Grammar):
    """``parts`` one after the other."""

    parts: tuple[Grammar, ...]

    def start(self) -> Hashable:
        return (0, self.parts[0].start())

    def step(self, state: Any, ch: str) -> Any:
        i, inner = state
        nxt = self.parts[i].step(inner, ch)
        if nxt is not None:
            return (i, nxt)
        while self.parts[i].accepting(inner) and i + 1 < len(self.parts):
            i += 1
            inner = self.parts[i].start()
            nxt = self.parts[i].step(inner, ch)
            if nxt is not None:
                return (i, nxt)
        return None

    def accepting(self, state: Any) -> bool:
        i, inner = state
        if not self.parts[i].accepting(inner):
            return False
        return all(p.accepting(p.start()) for p in self.parts[i + 1 :])

    def completion(self, state: Any) -> str:
        i, inner = state
        return self.parts[i].completion(inner) + "".join(p.completion(p.start()) for p in self.parts[i + 1 :])

    def closing(self, state: Any) -> int:
        i, inner = state
        return self.parts[i].closing(inner) + sum(p.closing(p.start()) for p in self.parts[i + 1 :])


def tool_call_grammar(names: Seq[str]) -> Grammar:
    """``<tool_call>\\n{"name": "<one of names>", "arguments": {...}}\\n</tool_call>`` (Hermes / Qwen format)."""
    import json

    quoted = tuple(json.dumps(n)[1:-1] for n in names)
    return Sequence((
        Literal('<tool_call>\n{"name": "'),
        Choice(quoted),
        Literal('", "arguments": '),
        Json("object"),
        Literal("}\n</tool_call>"),
    ))


# --------------------------------------------------------------------- vocabulary


def token_texts(tokenizer: Any) -> list[str | None]:
    """The text each token id adds to the output, or None for ids a grammar must never pick.

    Special tokens and tokens that are only part of a UTF-8 character are None.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, _byte_decoder

    n = len(tokenizer)
    detok = tokenizer.detokenizer
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        special |= set(tokenizer.added_tokens_decoder)
    except (AttributeError, TypeError):
        pass
    texts: list[str | None] = []
    if isinstance(detok, BPEStreamingDetokenizer):
        decoder = _byte_decoder()
        for piece in detok.tokenmap:
            try:
                texts.append(bytes(decoder[c] for c in piece).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                texts.append(None)
    elif isinstance(detok, SPMStreamingDetokenizer):
        for raw in detok.tokenmap:
            try:
                texts.append(raw.replace("\u2581".encode(), b" ").decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(None)
    else:
        for i in range(n):
            text = tokenizer.decode([i])
            texts.append(None if "\ufffd" in text else text)
    texts = texts[:n] + [None] * (n - len(texts))
    for i in special:
        if 0 <= i < n:
            texts[i] = None
    return [t if t else None for t in texts]


class VocabIndex:
    """A trie of a tokenizer's token texts, and per grammar state the tokens it allows.

    For a state, each token gets the number of tokens still needed after it
    (the fewest that spell the grammar's completion from where the token
    leads), or "never"; a mask for a budget is one comparison over that array.
    """

    CACHE_BYTES = 64 << 20
    NEVER = np.iinfo(np.int16).max

    def __init__(self, tokenizer: Any) -> None:
        self.texts = token_texts(tokenizer)
        self.size = len(self.texts)
        self.eos_ids = sorted(i for i in tokenizer.eos_token_ids if 0 <= i < self.size)
        self.trie: dict = {}
        for tid, text in enumerate(self.texts):
            if text is None:
                continue
            node = self.trie
            for ch in text:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(tid)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_entries = max(16, self.CACHE_BYTES // (2 * max(self.size, 1)))
        self._spell: dict[str, int] = {}
        self._lock = threading.Lock()

    def tokens_to_spell(self, text: str) -> int:
        """Fewest tokens whose texts concatenate to ``text`` (``NEVER`` if none do)."""
        cached = self._spell.get(text)
        if cached is not None:
            return cached
        n = len(text)
        best = [0] + [int(self.NEVER)] * n  # best[k]: tokens to spell the last k characters
        for start in range(n - 1, -1, -1):
            node, k = self.trie, start
            while k < n:
                node = node.get(text[k])
                if node is None:
                    break
                k += 1
                if None in node:
                    best[n - start] = min(best[n - start], 1 + best[n - k])
        if len(self._spell) > 4096:
            self._spell.clear()
        self._spell[text] = best[n]
        return best[n]

    def needs(self, grammar: Grammar, state: Any) -> np.ndarray:
        """Per token: tokens still needed after it to finish ``grammar`` from ``state`` (``NEVER``: not allowed)."""
        key = (grammar, state)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        need = np.full(self.size, self.NEVER, dtype=np.int16)
        todo = [(self.trie, state)]
        step, completion, spell = grammar.step, grammar.completion, self.tokens_to_spell
        while todo:
            node, st = todo.pop()
            for ch, child in node.items():
                if ch is None:
                    continue
                nxt = step(st, ch)
                if nxt is None:
                    continue
                ids = child.get(None)
                if ids is not None:
                    need[ids] = min(spell(completion(nxt)), int(self.NEVER))
                if len(child) > (1 if ids is not None else 0):
                    todo.append((child, nxt))
        with self._lock:
            self._cache[key] = need
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return need

    def mask(self, grammar: Grammar, state: Any, budget: int) -> np.ndarray:
        """Allowed token ids (bool array) from ``state`` with ``budget`` tokens left after this one."""
        allowed = self.needs(grammar, state) <= budget
        if grammar.accepting(state):
            allowed[self.eos_ids] = True
        if not allowed.any():  # too few tokens left for any complete text: end here
            log.warning("grammar %s cannot be finished within %d tokens from state %r; ending", grammar, budget, state)
            allowed[self.eos_ids] = True
        return allowed


class TokenConstraint:
    """An mlx_lm logits processor that keeps generation inside ``grammar``.

    One per generation: it follows the tokens it is shown (the prompt first,
    then one new token per call) and masks the logits for the next one.
    """

    def __init__(self, grammar: Grammar, index: VocabIndex, max_tokens: int) -> None:
        self.grammar = grammar
        self.index = index
        self.max_tokens = max_tokens
        self.state = grammar.start()
        self._prompt_len: int | None = None
        self._generated = 0

    def advance(self, token: int) -> None:
        text = self.index.texts[token] if 0 <= token < self.index.size else None
        if text is None:
            return  # end of sequence (or a token the mask did not allow): nothing to follow
        for ch in text:
            nxt = self.grammar.step(self.state, ch)
            if nxt is None:
                log.warning("token %d (%r) left the grammar; constraint stops following", token, text)
                return
            self.state = nxt

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._prompt_len is None:
            self._prompt_len = len(tokens)
        else:
            seen = len(tokens) - self._prompt_len
            while self._generated < seen:
                self._generated += 1
                self.advance(int(tokens[self._prompt_len + self._generated - 1].item()))
        budget = self.max_tokens - self._generated - 1
        allowed = self.index.mask(self.grammar, self.state, budget)
        vocab = logits.shape[-1]
        if vocab != allowed.shape[0]:
            full = np.zeros(vocab, dtype=bool)
            k = min(vocab, allowed.shape[0])
            full[:k] = allowed[:k]
            allowed = full
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
