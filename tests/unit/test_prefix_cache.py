"""The prefix cache on one process: a hit reuses exactly the common prefix (never a cache whose tokens differ),
greedy tokens are those without the cache, the bytes stay bounded, and caches that cannot be cut are not cut."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

import exo_lab
from exo_lab.engine.generator import GenerationRequest
from exo_lab.engine.prefix_cache import PrefixCache, cacheable
from exo_lab.models import synthetic

BASE = [(i * 7919) % 5000 + 10 for i in range(150)]


def run(engine, prompt: list[int], n: int = 8) -> tuple[list[int], int]:
    """Greedy tokens and the prompt tokens the cache covered."""
    chunks = list(engine.submit(GenerationRequest(tuple(prompt), max_tokens=n, ignore_eos=True)))
    assert chunks[-1].error is None, chunks[-1].error
    return [t for c in chunks for t in c.tokens], chunks[-1].usage.cached_tokens


@pytest.fixture(scope="module")
def engines(tiny_model: Path):
    with exo_lab.Engine(tiny_model, prefix_cache_bytes=0) as off, exo_lab.Engine(tiny_model) as on:
        yield off, on


def test_hits_cover_the_common_prefix_and_change_no_token(engines):
    off, on = engines
    first, cached = run(on, BASE)
    assert cached == 0 and first == run(off, BASE)[0]
    held = BASE + first  # what the finished request's cache holds
    cases = [
        (BASE + first + [11, 12, 13], len(held)),  # extends everything it holds
        (BASE[:97] + [4321, 77] + BASE[99:], 97),  # diverges mid-prompt: cut at 97
        (BASE[:60], 59),  # a shorter prompt: cut, its last token is fed again
        ([7] + BASE[1:], 0),  # differs at the first token: nothing reused
    ]
    for prompt, want in cases:
        tokens, cached = run(on, prompt)
        assert cached == want, (len(prompt), cached, want)
        assert tokens == run(off, prompt)[0]
    assert on.prefix_cache.stats["hits"] == 3 and off.prefix_cache.stats["hits"] == 0


def test_concurrent_requests_share_a_prefix(engines):
    off, on = engines
    prompts = [BASE + [100 + i] * (i + 2) for i in range(3)]
    run(on, BASE[:120])
    gens = [on.submit(GenerationRequest(tuple(p), max_tokens=6, ignore_eos=True)) for p in prompts]
    got = [[t for c in g for t in c.tokens] for g in gens]
    assert got == [run(off, p, 6)[0] for p in prompts]
    assert all(g.usage is not None and g.usage.cached_tokens >= 120 for g in gens)


def test_the_bytes_stay_bounded_and_the_oldest_go(tiny_model: Path):
    prompts = [[(i * 131 + k * 17) % 5000 + 10 for k in range(100)] for i in range(5)]
    with exo_lab.Engine(tiny_model) as probe:
        run(probe, prompts[0])
        one = probe.prefix_cache.nbytes  # one 108-token entry
    with exo_lab.Engine(tiny_model, prefix_cache_bytes=int(one * 2.5)) as eng:
        for p in prompts:
            run(eng, p)
            assert eng.prefix_cache.nbytes <= eng.prefix_cache.max_bytes
        assert len(eng.prefix_cache) == 2 and eng.prefix_cache.stats["evicted"] == 3
        assert run(eng, prompts[0] + [5])[1] == 0  # evicted
        assert run(eng, prompts[4] + [5])[1] == 100  # kept


@pytest.mark.parametrize("preset", ["gemma3-tiny"])
def test_sliding_window_caches_are_reused_whole_once_rotated(tmp_path_factory, preset):
    path = synthetic.create(tmp_path_factory.mktemp(preset) / preset, preset)
    with exo_lab.Engine(path, prefix_cache_bytes=0) as off, exo_lab.Engine(path) as on:
        short = BASE[:10]  # under the window (16): its cache can still be cut
        assert run(on, short, 4)[1] == 0
        tokens, cached = run(on, short[:7] + [42, 43])
        assert cached == 7 and tokens == run(off, short[:7] + [42, 43])[0]
        first, _ = run(on, BASE)  # rotated: only reused whole
        longer = BASE + first + [11, 12]
        tokens, cached = run(on, longer)
        assert cached == len(BASE) + len(first) and tokens == run(off, longer)[0]
        diverged = BASE[:100] + [42] * 10  # shares 100 tokens with the rotated entry: not cut; 10 with the short one
        tokens, cached = run(on, diverged)
        assert cached == 10 and tokens == run(off, diverged)[0]


def test_cache_types_that_cannot_be_cut_are_not_kept():
    assert cacheable([KVCache(), RotatingKVCache(16)]) is None
    assert "ArraysCache" in (cacheable([KVCache(), ArraysCache(2)]) or "")
    cache = PrefixCache(1 << 20)
    cache.check([ArraysCache(2)])
    assert not cache.enabled and cache.lookup([1, 2, 3]) is None
    assert not cache.store(1, [1, 2], [KVCache()])
    with pytest.raises(ValueError):
        PrefixCache(-1)
