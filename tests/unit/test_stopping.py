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
    """The output ends where a stop string starts and contains none whole; without one, it is all the text.

    Which stop wins can depend on the split when stops overlap (stops "b" and "abb" in "ab" + "b": "b" is
    complete first, so the stream stops after "a"); with one stop string the output is the same for any split.
    """
    text = "".join(pieces)
    hits = [s for s in stops if s in text]
    shown, stopped, matched = run(pieces, stops)
    out = "".join(shown)
    assert stopped == bool(hits)
    if not hits:
        assert out == text
    else:
        assert matched in stops and text.startswith(out + matched)
        assert not any(s in out for s in stops)
        if len(stops) == 1:
            assert out == text[: text.find(stops[0])]


def test_stop_across_token_boundaries():
    shown, stopped, matched = run(["Hello <", "|en", "d|> more"], ["<|end|>"])
    assert shown == ["Hello ", "", ""] and stopped and matched == "<|end|>"


def test_partial_match_released_when_it_diverges():
    shown, stopped, _ = run(["ab", "cX"], ["abcd"])
    assert shown == ["", "abcX", ""] and not stopped


def test_no_stops_passes_through():
    assert run(["a", "b"], []) == (["a", "b", ""], False, None)
