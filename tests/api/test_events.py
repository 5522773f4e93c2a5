"""The typed event stream under every API family: order, tool calls parsed once, errors, collect."""

from __future__ import annotations

import asyncio
import json

from exo_lab.api.events import Final, TextDelta, ToolCallEvent, ToolParsing, collect, events
from exo_lab.api.tools import ToolFormat
from exo_lab.engine.generation import Chunk, Generation, GenerationRequest, TokenLogprob, Usage

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class CountingFormat:
    """The Hermes format, counting how often a call's text is parsed."""

    def __init__(self) -> None:
        self.parsed = 0
        self.format = ToolFormat("<tool_call>", "</tool_call>", self._parse, True)

    def _parse(self, text, tools=None):
        self.parsed += 1
        return json.loads(text.strip())


def generation(*chunks: Chunk) -> Generation:
    gen = Generation(GenerationRequest((1, 2, 3)))
    for chunk in chunks:
        gen._push(chunk)
    return gen


def run(gen: Generation, tools: ToolParsing | None = None) -> list:
    async def go():
        return [e async for e in events(gen, tools)]

    return asyncio.run(go())


def pieces(text: str, n: int = 4) -> list[Chunk]:
    return [Chunk(text[i : i + n], (i,)) for i in range(0, len(text), n)]


def test_text_then_calls_then_one_final():
    fmt = CountingFormat()
    script = "Let me check. " + CALL + " Done."
    out = run(
        generation(*pieces(script), Chunk("", finish_reason="stop", usage=Usage(3, 20))), ToolParsing(fmt.format, TOOLS)
    )
    kinds = [type(e).__name__ for e in out]
    assert kinds.count("Final") == 1 and kinds[-1] == "Final"
    first_call = kinds.index("ToolCallEvent")
    shown = "".join(e.text for e in out if isinstance(e, TextDelta))
    assert shown == "Let me check.  Done."  # the call's text is never shown
    assert "".join(e.text for e in out[:first_call] if isinstance(e, TextDelta)) == "Let me check. "
    (call,) = [e for e in out if isinstance(e, ToolCallEvent)]
    assert call.index == 0 and call.call.name == "get_weather" and call.call.input() == {"city": "Paris"}
    final = out[-1]
    assert final.finish_reason == "stop" and final.tool_calls == 1 and final.usage.prompt_tokens == 3
    assert final.tokens == tuple(range(0, len(script), 4))
    assert fmt.parsed == 1


def test_collect_gathers_the_same_stream_and_parses_calls_once():
    fmt = CountingFormat()
    script = CALL + CALL.replace("Paris", "Oslo")
    gen = generation(*pieces(script, 7), Chunk("", finish_reason="stop", usage=Usage(3, 9)))
    out = asyncio.run(collect(events(gen, ToolParsing(fmt.format, TOOLS))))
    assert out.text == "" and [c.input()["city"] for c in out.tool_calls] == ["Paris", "Oslo"]
    assert out.final.tool_calls == 2 and out.final.error is None
    assert fmt.parsed == 2  # once per call, not once per family or per pass


def test_a_call_in_the_final_chunk_comes_before_final():
    fmt = CountingFormat()
    out = run(
        generation(Chunk("ok "), Chunk(CALL, finish_reason="length", usage=Usage(3, 2))), ToolParsing(fmt.format, TOOLS)
    )
    assert [type(e) for e in out] == [TextDelta, ToolCallEvent, Final]
    assert out[-1].truncated


def test_without_tools_calls_are_text_and_logprobs_ride_along():
    lp = TokenLogprob(7, "x", -0.5)
    out = run(
        generation(
            Chunk(CALL, (7,), logprobs=(lp,)),
            Chunk("", (8,), logprobs=(lp,)),
            Chunk("", finish_reason="stop", usage=Usage()),
        )
    )
    assert [type(e) for e in out] == [TextDelta, TextDelta, Final]
    assert out[0].text == CALL and out[1].text == "" and out[1].logprobs == (lp,)
    assert out[-1].tokens == (7, 8)


def test_an_error_ends_the_stream():
    out = run(generation(Chunk("hello", (5,)), Chunk("lost", finish_reason="error", error="rank 1 vanished")))
    assert [type(e) for e in out] == [TextDelta, Final]
    assert out[-1].error == "rank 1 vanished" and out[-1].finish_reason == "error"
    collected = asyncio.run(collect(events(generation(Chunk("", finish_reason="error", error="boom")))))
    assert collected.final.error == "boom" and collected.text == ""
