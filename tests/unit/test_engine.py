import threading
import time

import pytest

from exo_lab.engine.backend import Backend
from exo_lab.engine.generator import GenerationRequest

CHAT = [{"role": "user", "content": "Write a function."}]


def test_greedy_is_deterministic_and_prompt_dependent(engine):
    a = engine.chat(CHAT, max_tokens=24, temperature=0).text()
    assert a == engine.chat(CHAT, max_tokens=24, temperature=0).text()
    assert a != engine.chat([{"role": "user", "content": "Something else"}], max_tokens=24, temperature=0).text()


def test_seeded_sampling_repeats(engine):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.9, top_k=100)
    assert engine.chat(CHAT, seed=5, **kw).text() == engine.chat(CHAT, seed=5, **kw).text()
    assert engine.chat(CHAT, seed=5, **kw).text() != engine.chat(CHAT, seed=6, **kw).text()


def test_max_tokens_and_usage(engine):
    prompt = engine.chat_tokens(CHAT)
    gen = engine.chat(CHAT, max_tokens=7, temperature=0)
    chunks = list(gen)
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.tokens) for c in chunks) == 7
    assert gen.usage.completion_tokens == 7 and gen.usage.prompt_tokens == len(prompt)
    assert gen.usage.total_tokens == 7 + len(prompt)
    assert gen.usage.ttft_s > 0 and gen.usage.generation_tps > 0


def test_stop_sequence_cuts_output_and_never_leaks(engine):
    full = engine.generate("def main():", max_tokens=40, temperature=0).text()
    stop = full[15:19]
    gen = engine.generate("def main():", max_tokens=40, temperature=0, stop=[stop])
    shown = ""
    for chunk in gen:
        shown += chunk.text
        assert stop not in shown
        assert full.startswith(shown)
    assert shown == full[: full.index(stop)]
    assert gen.finish_reason == "stop"
    assert chunk.stop_sequence == stop


def test_eos_ends_generation_without_showing_it(engine, monkeypatch):
    chunks = list(engine.generate("def main():", max_tokens=10, temperature=0))
    tokens = [t for c in chunks for t in c.tokens]
    # declare the third greedy token an end-of-sequence token
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {tokens[2]})
    gen = engine.generate("def main():", max_tokens=10, temperature=0)
    got = list(gen)
    assert gen.finish_reason == "stop"
    assert [t for c in got for t in c.tokens] == tokens[:2]
    assert gen.usage.completion_tokens == 3
    ignored = engine.generate("def main():", max_tokens=10, temperature=0, ignore_eos=True)
    ignored.text()
    assert ignored.finish_reason == "length" and ignored.usage.completion_tokens == 10


def test_cancel_from_another_thread_within_one_token(engine):
    gen = engine.generate("x", max_tokens=100_000, temperature=0, ignore_eos=True)
    it = iter(gen)
    next(it)
    time.sleep(0.2)  # the engine runs ahead of this reader: its chunks wait unread
    t = threading.Thread(target=gen.cancel)
    t.start()
    t.join()
    rest = list(it)
    assert [c.finish_reason for c in rest] == ["cancelled"]  # the unread chunks dropped, then the end
    assert gen.usage.completion_tokens > 2  # every token made is counted
    # the engine is free for the next request
    assert engine.generate("y", max_tokens=3, temperature=0).text()


def test_cancel_before_start(engine):
    blocker = engine.generate("x", max_tokens=200, temperature=0, ignore_eos=True)
    queued = engine.generate("y", max_tokens=5, temperature=0)
    queued.cancel()
    assert list(queued)[-1].finish_reason == "cancelled"
    blocker.cancel()
    blocker.text()


def test_concurrent_requests_all_complete(engine):
    results = {}

    def run(i):
        results[i] = engine.chat([{"role": "user", "content": f"request {i}"}], max_tokens=10, temperature=0).text()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and all(results.values())
    assert results[3] == engine.chat([{"role": "user", "content": "request 3"}], max_tokens=10, temperature=0).text()


async def _collect(gen):
    return "".join([c.text async for c in gen])


def test_async_iteration_does_not_block_the_loop(engine):
    import asyncio

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.ensure_future(ticker())
        text = await _collect(engine.generate("hello", max_tokens=30, temperature=0))
        t.cancel()
        return text, ticks

    text, ticks = asyncio.run(main())
    assert text == engine.generate("hello", max_tokens=30, temperature=0).text()
    assert ticks > 1


def test_bad_requests(engine):
    with pytest.raises(ValueError):
        GenerationRequest((), max_tokens=3)
    with pytest.raises(ValueError):
        GenerationRequest((1, 2), max_tokens=0)
    with pytest.raises(ValueError, match="invalid role"):
        engine.chat_tokens([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content part"):
        engine.chat_tokens([{"role": "user", "content": [{"type": "image_url"}]}])


def test_chat_accepts_text_parts(engine):
    a = engine.chat_tokens(
        [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    )
    assert a == engine.chat_tokens([{"role": "user", "content": "Hi there"}])


def test_timing_is_reported(engine):
    t = time.perf_counter()
    gen = engine.generate("abc", max_tokens=5, temperature=0)
    gen.text()
    assert 0 < gen.usage.total_s <= time.perf_counter() - t


def test_engine_is_a_backend_with_the_typed_surface(engine):
    assert isinstance(engine, Backend) and engine.state == "ready" and engine.error is None
    assert (
        engine.context_length and engine.features == {"logprobs", "grammar", "embeddings"} and engine.path is not None
    )
    done = engine.requests_completed
    pieces = list(engine.stream("Hello", max_tokens=4, ignore_eos=True))
    assert all(isinstance(p, str) for p in pieces)
    assert engine.requests_completed == done + 1 and engine.usage_history[-1][1].completion_tokens == 4
    assert engine.pending == 0 and engine.stats["decode_steps"] >= 4
