"""The shortest text that completes a prefix of compact JSON.

:class:`JsonCloser` follows the bytes of JSON text written with the separators
``", "`` and ``": "`` and no other whitespace (what the grammars of
:mod:`exo_lab.engine.guided` allow) and says, for any prefix, a shortest
suffix that makes it a complete JSON value: it closes an open string (and a
half-written UTF-8 character or escape), finishes a number or literal, adds a
value after a dangling key, colon or comma, and closes the open brackets.
Optional ``prefix`` and ``suffix`` texts frame the JSON (a Hermes tool call's
``<tool_call>`` markers).

It does not validate: the llguidance matcher does that. States are small
immutable tuples, so following a token is a few steps and nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_DIGITS = frozenset(b"0123456789")
_NUM_DONE = frozenset("0ifx")  # number sub-states that form a complete number
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

#: a state: (where, mode, stack, aux); ``where`` is the byte offset in the prefix (before the JSON),
#: -1 inside the JSON, or -2-k after it with k bytes of the suffix written
State = tuple[int, str, bytes, Any]


@dataclass(frozen=True)
class JsonCloser:
    """Follows compact JSON between ``prefix`` and ``suffix``; :meth:`closing` completes any prefix of it.

    ``empty`` is the shortest whole value at the root (``{}`` where the root must be an object).
    """

    prefix: bytes = b""
    suffix: bytes = b""
    empty: bytes = b"0"

    def start(self) -> State:
        return (0, "R", b"", None) if self.prefix else (-1, "R", b"", None)

    def feed(self, state: State | None, data: bytes) -> State | None:
        """The state after ``data`` (None once the text left what this closer understands)."""
        for byte in data:
            if state is None:
                return None
            state = self.step(state, byte)
        return state

    def step(self, state: State, byte: int) -> State | None:
        where, mode, stack, aux = state
        if where >= 0:  # in the prefix
            if byte != self.prefix[where]:
                return None
            return (where + 1, mode, stack, aux) if where + 1 < len(self.prefix) else (-1, mode, stack, aux)
        if where <= -2:  # in the suffix
            k = -2 - where
            return (where - 1, mode, stack, aux) if k < len(self.suffix) and self.suffix[k] == byte else None
        nxt = _json_step(mode, stack, aux, byte)
        if (
            nxt is None
            and self.suffix[:1] == bytes([byte])
            and not stack
            and mode != "R"
            and not _json_closing(mode, stack, aux, self.empty)
        ):  # the JSON is complete: the suffix begins
            return (-3, mode, stack, aux)
        return None if nxt is None else (-1, *nxt)

    def closing(self, state: State) -> bytes:
        """A shortest text that completes ``state`` (consistent: after any prefix of it, the rest of it)."""
        where, mode, stack, aux = state
        if where >= 0:
            return self.prefix[where:] + self.empty + self.suffix
        if where <= -2:
            return self.suffix[-2 - where :]
        return _json_closing(mode, stack, aux, self.empty) + self.suffix

    def done(self, state: State) -> bool:
        """Whether ``state`` is a complete text (prefix, one JSON value, suffix)."""
        return not self.closing(state)


def _json_step(mode: str, stack: bytes, aux: Any, b: int) -> tuple[str, bytes, Any] | None:
    ch = chr(b)
    if mode in ("S", "SK"):
        return _in_string(mode, stack, aux, b)
    if mode == "N":
        return _in_number(stack, aux, b)
    if mode == "L":
        if b != aux[0]:
            return None
        return ("L", stack, aux[1:]) if len(aux) > 1 else ("A", stack, None)
    if mode in ("V", "K") and aux:  # the blank after ':' or ','
        return (mode, stack, False) if ch == " " else None
    if mode in ("R", "V"):
        return _value(stack, b)
    if mode == "VA":
        return ("A", stack[:-1], None) if ch == "]" else _value(stack, b)
    if mode == "KO":
        if ch == "}":
            return ("A", stack[:-1], None)
        return ("SK", stack, ("", 0, 0)) if ch == '"' else None
    if mode == "K":
        return ("SK", stack, ("", 0, 0)) if ch == '"' else None
    if mode == "C":
        return ("V", stack, True) if ch == ":" else None
    if mode == "A":
        if not stack:
            return None
        top = stack[-1:]
        if ch == ",":
            return ("K", stack, True) if top == b"o" else ("V", stack, True)
        if (ch == "}" and top == b"o") or (ch == "]" and top == b"a"):
            return ("A", stack[:-1], None)
        return None
    raise ValueError(f"unknown JSON closer mode {mode!r}")


def _value(stack: bytes, b: int) -> tuple[str, bytes, Any] | None:
    ch = chr(b)
    if ch == "{":
        return ("KO", stack + b"o", None)
    if ch == "[":
        return ("VA", stack + b"a", None)
    if ch == '"':
        return ("S", stack, ("", 0, 0))
    if ch == "-":
        return ("N", stack, "-")
    if ch == "0":
        return ("N", stack, "0")
    if b in _DIGITS:
        return ("N", stack, "i")
    rest = _LITERALS.get(b)
    return ("L", stack, rest) if rest else None


def _in_string(mode: str, stack: bytes, aux: tuple[str, int, int], b: int) -> tuple[str, bytes, Any] | None:
    esc, need, _ = aux
    if need:  # inside a multi-byte UTF-8 character
        return (mode, stack, ("", need - 1, 0)) if 0x80 <= b <= 0xBF else None
    if esc == "":
        if b == 0x22:  # '"'
            return ("A", stack, None) if mode == "S" else ("C", stack, None)
        if b == 0x5C:  # backslash
            return (mode, stack, ("\\", 0, 0))
        if b < 0x20:
            return None
        if b >= 0xC0:
            return (mode, stack, ("", 1 if b < 0xE0 else 2 if b < 0xF0 else 3, b))
        return (mode, stack, ("", 0, 0))
    if esc == "\\":
        if chr(b) in '"\\/bfnrt':
            return (mode, stack, ("", 0, 0))
        return (mode, stack, ("u4", 0, 0)) if chr(b) == "u" else None
    if chr(b) not in "0123456789abcdefABCDEF":
        return None
    left = int(esc[1:]) - 1
    return (mode, stack, (f"u{left}" if left else "", 0, 0))


def _in_number(stack: bytes, sub: str, b: int) -> tuple[str, bytes, Any] | None:
    ch = chr(b)
    if b in _DIGITS:
        nxt = {"-": "0" if ch == "0" else "i", "i": "i", ".": "f", "f": "f", "e": "x", "es": "x", "x": "x"}.get(sub)
        return ("N", stack, nxt) if nxt is not None else None
    if ch == "." and sub in ("0", "i"):
        return ("N", stack, ".")
    if ch in "eE" and sub in ("0", "i", "f"):
        return ("N", stack, "e")
    if ch in "+-" and sub == "e":
        return ("N", stack, "es")
    if sub in _NUM_DONE:
        return _json_step("A", stack, None, b)
    return None


def _json_closing(mode: str, stack: bytes, aux: Any, empty: bytes) -> bytes:
    closers = bytes(0x7D if c == 0x6F else 0x5D for c in reversed(stack))  # 'o' -> '}', 'a' -> ']'
    if mode == "R":
        return empty
    if mode in ("A", "VA", "KO"):
        return closers
    if mode == "V":
        return (b" " if aux else b"") + b"0" + closers
    if mode == "K":
        return (b" " if aux else b"") + b'"": 0' + closers
    if mode == "C":
        return b": 0" + closers
    if mode in ("S", "SK"):
        esc, need, lead = aux
        if need:
            first = {0xE0: 0xA0, 0xF0: 0x90}.get(lead, 0x80)
            pending = bytes([first]) + b"\x80" * (need - 1)
        elif esc == "\\":
            pending = b"n"
        elif esc:
            pending = b"0" * int(esc[1:])
        else:
            pending = b""
        return pending + (b'"' if mode == "S" else b'": 0') + closers
    if mode == "N":
        return (b"" if aux in _NUM_DONE else b"0") + closers
    if mode == "L":
        return aux + closers
    raise ValueError(f"unknown JSON closer mode {mode!r}")
