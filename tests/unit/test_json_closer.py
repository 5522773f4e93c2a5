"""The JSON closer: from every prefix of compact JSON, its closing completes it, consistently."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_lab.engine.json_closer import JsonCloser

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def compact(value, ascii_only: bool) -> bytes:
    """JSON as the grammars write it: ", " and ": " and no other whitespace."""
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=ascii_only).encode()


@given(json_values, st.booleans())
@settings(max_examples=200, deadline=None)
def test_every_prefix_closes_to_json_and_the_closing_is_consistent(value, ascii_only):
    closer = JsonCloser()
    text = compact(value, ascii_only)
    state = closer.start()
    for i in range(len(text) + 1):
        closing = closer.closing(state)
        json.loads((text[:i] + closing).decode())  # bytes: a half-written UTF-8 character is finished too
        s = state
        for k, b in enumerate(closing):  # after any part of the closing, the closing is the rest of it
            s = closer.step(s, b)
            assert s is not None and closer.closing(s) == closing[k + 1 :]
        if i < len(text):
            state = closer.step(state, text[i])
            assert state is not None, text[: i + 1]
    assert closer.done(state)


@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4))
@settings(max_examples=100, deadline=None)
def test_framed_objects_close_inside_their_markers(value):
    closer = JsonCloser(b"<tool_call>\n", b"\n</tool_call>", b"{}")
    text = b"<tool_call>\n" + compact(value, False) + b"\n</tool_call>"
    state = closer.start()
    for i in range(len(text)):
        done = text[:i] + closer.closing(state)
        assert done.startswith(b"<tool_call>\n{") and done.endswith(b"}\n</tool_call>")
        assert isinstance(json.loads(done[len(b"<tool_call>\n") : -len(b"\n</tool_call>")]), dict)
        state = closer.step(state, text[i])
    assert closer.done(state)


@pytest.mark.parametrize(
    "prefix,closing",
    [
        (b"", b"{}"),
        (b"{", b"}"),
        (b'{"a', b'": 0}'),
        (b'{"a"', b": 0}"),
        (b'{"a":', b" 0}"),
        (b'{"a": [1, ', b"0]}"),
        (b'{"a": 1,', b' "": 0}'),
        (b'{"a": tr', b"ue}"),
        (b'{"a": -', b"0}"),
        (b'{"a": 1e', b"0}"),
        (b'{"a": "x\\', b'n"}'),
        (b'{"a": "\\u0', b'000"}'),
        (b'{"a": "\xe2', b'\x80\x80"}'),
        (b'{"a": "\xe0', b'\xa0\x80"}'),
        (b'{"a": "\xf0\x9f', b'\x80\x80"}'),
    ],
)
def test_shortest_closings(prefix, closing):
    closer = JsonCloser(empty=b"{}")
    assert closer.closing(closer.feed(closer.start(), prefix)) == closing


def test_text_outside_compact_json_is_not_followed():
    closer = JsonCloser()
    assert closer.feed(closer.start(), b'{"a" : 1}') is None
    assert JsonCloser(b"<x>").feed(JsonCloser(b"<x>").start(), b"<y>") is None
