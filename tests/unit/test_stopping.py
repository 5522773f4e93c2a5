from hypothesis import given, settings
from hypothesis import strategies as st

from exo_lab.engine.stopping import StopMatcher

alphabet = st.sampled_from("abc<|>")


def run(pieces, stops):
    m = StopMatcher(stops)
    shown = []
    stopped = False
    for p in pieces:
        out, stopped = m.feed(p)
        shown.append(out)
        if stopped:
            break
    if not stopped:
        shown.append(m.flush())
    return shown, stopped, m.matched


@given(
    st.lists(st.text(alphabet, max_size=5), max_size=12),
    st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
)
@settings(max_examples=400, deadline=None)
def test_output_is_text_before_first_stop_whatever_the_split(pieces, stops):
    text = "".join(pieces)
    hits = [(text.find(s), s) for s in stops if s in text]
    expected = text[: min(hits)[0]] if hits else text
    shown, stopped, _ = run(pieces, stops)
    assert "".join(shown) == expected
    assert stopped == bool(hits)
    # a stream never shows part of a stop string: every prefix shown is a prefix of the answer
    acc = ""
    for piece in shown:
        acc += piece
        assert expected.startswith(acc)


def test_stop_across_token_boundaries():
    shown, stopped, matched = run(["Hello <", "|en", "d|> more"], ["<|end|>"])
    assert shown == ["Hello ", "", ""] and stopped and matched == "<|end|>"


def test_partial_match_released_when_it_diverges():
    shown, stopped, _ = run(["ab", "cX"], ["abcd"])
    assert shown == ["", "abcX", ""] and not stopped


def test_no_stops_passes_through():
    assert run(["a", "b"], []) == (["a", "b", ""], False, None)
