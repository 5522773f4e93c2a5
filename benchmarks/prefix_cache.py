#!/usr/bin/env python
"""Prefix cache benchmark: time to first token per turn of a conversation, with the cache and without.

A chat of ``--turns`` turns with a long system prompt (``--system`` tokens) runs on one
:class:`exo_lab.Engine`; every turn resends the whole conversation (as chat UIs and agents do).
Each turn is asked twice, once with the engine's prefix cache and once with an empty one (swapped in
for that request), in alternating order, so both see the same machine state. It prints per turn the
prompt, the tokens the cache covered, both TTFTs (the engine's own, admission to first token) and
their ratio, then the geometric mean of the ratios from turn 2 (target: >= 5x on the llama-1b
preset). Both sides must produce the same greedy tokens; the script fails otherwise.

    .venv/bin/python benchmarks/prefix_cache.py                   # llama-1b, 10 turns, 2k-token system prompt
    .venv/bin/python benchmarks/prefix_cache.py --short           # tiny preset, 4 turns, 512 tokens: a smoke run
    .venv/bin/python benchmarks/prefix_cache.py --dtype float32   # llama-1b in float32 (bf16 is slow on CPUs)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import exo_lab  # first: it preloads OpenBLAS before mlx is imported

# isort: split

from exo_lab.engine.generator import GenerationRequest
from exo_lab.engine.prefix_cache import PrefixCache
from exo_lab.engine.sampling import SamplingParams
from exo_lab.models import resolve, synthetic
from exo_lab.paths import models_dir

TARGET = 5.0
TEXT = (
    "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
    "Scientists measure the speed of light, engineers build bridges, and poets count syllables. "
    "Every morning the baker opens the shop at six and sells bread, cakes and coffee to the town. "
)


def system_prompt(tokenizer: Any, n: int) -> str:
    """Text of about ``n`` tokens."""
    reps = 1
    while len(tokenizer.encode(TEXT * reps)) < n:
        reps *= 2
    ids = tokenizer.encode(TEXT * reps)[:n]
    return tokenizer.decode(ids)


def ask(eng: exo_lab.Engine, prompt: list[int], reply_tokens: int, cache: PrefixCache) -> tuple[list[int], Any]:
    """One request with ``cache`` as the engine's prefix cache (the engine is idle between requests)."""
    eng.prefix_cache = cache
    req = GenerationRequest(tuple(prompt), max_tokens=reply_tokens, sampling=SamplingParams(), ignore_eos=True)
    chunks = list(eng.submit(req))
    if chunks[-1].error:
        raise RuntimeError(chunks[-1].error)
    return [t for c in chunks for t in c.tokens], chunks[-1].usage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:llama-1b", help="model (default: %(default)s)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system", type=int, default=2048, help="system prompt tokens (default: %(default)s)")
    ap.add_argument("--reply", type=int, default=16, help="tokens per reply (default: %(default)s)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="a synthetic preset in this dtype")
    ap.add_argument("--short", action="store_true", help="tiny preset, 4 turns, 512-token system prompt")
    ap.add_argument("--json", help="write the per-turn numbers here")
    args = ap.parse_args(argv)
    if args.short:
        args.model, args.turns, args.system = "synthetic:tiny", 4, 512
    if args.dtype and args.model.startswith("synthetic:"):  # kept beside the other benchmarks' variants
        preset = args.model.split(":", 1)[1]
        path = models_dir() / "bench" / f"{preset}-{args.dtype}"
        if not (path / "config.json").is_file():
            synthetic.create(path, preset, dtype=args.dtype)
    else:
        path = resolve(args.model)
    eng = exo_lab.Engine(path, max_batch=1)
    cached_cache, empty = eng.prefix_cache, PrefixCache(0)
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(eng.tokenizer, args.system)}]
    ask(eng, eng.chat_tokens([{"role": "user", "content": "warm up"}]), 2, empty)  # untimed
    rows = []
    print(
        f"{args.model}{'-' + args.dtype if args.dtype else ''}: {args.turns} turns, {args.system}-token system prompt, {args.reply}-token replies"
    )
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT off':>9} {'TTFT on':>9} {'ratio':>7}")
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: what happens next in the story?"})
        prompt = eng.chat_tokens(messages)
        order = [(cached_cache, "on"), (empty, "off")]
        if turn % 2:
            order.reverse()
        got = {name: ask(eng, prompt, args.reply, cache) for cache, name in order}
        (on_tokens, on), (off_tokens, off) = got["on"], got["off"]
        if on_tokens != off_tokens:
            print(f"turn {turn + 1}: the cache changed the tokens", file=sys.stderr)
            return 1
        ratio = off.ttft_s / on.ttft_s if on.ttft_s else float("inf")
        rows.append(
            {"turn": turn + 1, "prompt": on.prompt_tokens, "cached": on.cached_tokens, "ttft_off_s": off.ttft_s}
            | {"ttft_on_s": on.ttft_s, "ratio": ratio}
        )
        print(
            f"{turn + 1:>4} {on.prompt_tokens:>7} {on.cached_tokens:>7} {off.ttft_s * 1e3:>7.1f}ms"
            f" {on.ttft_s * 1e3:>7.1f}ms {ratio:>6.1f}x",
            flush=True,
        )
        messages.append({"role": "assistant", "content": eng.tokenizer.decode(on_tokens)})
    eng.close()
    later = [r["ratio"] for r in rows[1:]]
    if later:
        mean = math.exp(sum(math.log(r) for r in later) / len(later))
        verdict = "meets" if min(later) >= TARGET else "misses"
        print(f"TTFT off/on from turn 2: geometric mean {mean:.1f}x, min {min(later):.1f}x ({verdict} >= {TARGET:g}x)")
    print(f"prefix cache: {cached_cache.summary()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "system": args.system, "turns": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
