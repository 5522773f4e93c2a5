"""Reasoning told apart from the answer as text streams in arbitrary pieces (think tags, harmony channels)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_lab.api.reasoning import HARMONY, ReasoningFormat, ReasoningSplitter, prompt_opens_reasoning, reasoning_format

TAGS = ReasoningFormat("tags")


def split(fmt, text, cuts, opened=False):
    """``text`` fed in pieces cut at ``cuts``: the reasoning and the answer."""
    s = ReasoningSplitter(fmt, opened)
    bounds = [0, *sorted(set(c % (len(text) + 1) for c in cuts)), len(text)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        out += s.feed(text[a:b])
    out += s.finish()
    return "".join(t for k, t in out if k == "reasoning"), "".join(t for k, t in out if k == "answer")


CASES = [
    (TAGS, "<think>\nhmm, 2+2</think>\n\nIt is 4.", False, ("hmm, 2+2", "It is 4.")),
    (TAGS, "  <think>a</think>b", False, ("a", "b")),
    (TAGS, "no thinking <think> here", False, ("", "no thinking <think> here")),
    (TAGS, "opened by the template</think>answer", True, ("opened by the template", "answer")),
    (TAGS, "cut short by max_tokens", True, ("cut short by max_tokens", "")),
    (TAGS, "<thin", False, ("", "<thin")),  # ends before the tag completes: it was text
    (
        HARMONY,
        "<|channel|>analysis<|message|>think more<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>",
        False,
        ("think more", "Done."),
    ),
    (HARMONY, "plain text, no channels", False, ("", "plain text, no channels")),
]


@pytest.mark.parametrize(("fmt", "text", "opened", "want"), CASES)
def test_whole(fmt, text, opened, want):
    assert split(fmt, text, [], opened) == want


@given(st.lists(st.integers(0, 200), max_size=8), st.sampled_from(CASES))
@settings(max_examples=200, deadline=None)
def test_any_piece_boundaries_give_the_same_split(cuts, case):
    fmt, text, opened, want = case
    assert split(fmt, text, cuts, opened) == want


def test_the_prompt_opens_reasoning_when_it_ends_inside_a_block():
    assert prompt_opens_reasoning(TAGS, "<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning(TAGS, "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning(TAGS, "<|im_start|>assistant\n")


def test_the_format_comes_from_the_tokenizer():
    class Tok:
        def __init__(self, template, **attrs):
            self.chat_template = template
            self.__dict__.update(attrs)

    assert reasoning_format(Tok("{{ '<|start|>assistant<|channel|>final<|message|>' }}")) == HARMONY
    assert reasoning_format(Tok("plain", has_thinking=True, think_start="<seed:think>", think_end="</seed:think>")) == (
        ReasoningFormat("tags", "<seed:think>", "</seed:think>")
    )
    assert reasoning_format(Tok("{{ '<think>' }}{{ '</think>' }}")) == TAGS
    assert reasoning_format(Tok("{{ messages }}")) is None and reasoning_format(None) is None
