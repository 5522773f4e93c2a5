"""Continuous batching: aggregate tokens/s of N concurrent streams against one stream, through the API.

Run: .venv/bin/python benchmarks/concurrency.py [--preset llama-1b --dtype float32] [--streams 8] [--tokens 32]
     [--instance pipeline|tensor]

One exo_lab server (the engine batches concurrent requests); the official
openai client streams from it. With ``--instance``, the server serves a
distributed instance instead: a local cluster of 2 node agents, the model
split over both (separate MLX ranks in lock step, batched the same way). Baseline: one stream at a time. Each
configuration is measured ``--repeat`` times, alternating, and the median
aggregate tokens/s is compared. Target (issue [api]): 8 streams >= 3x one stream.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai

import exo_lab


def stream_once(client: openai.OpenAI, model: str, tokens: int, i: int) -> int:
    n = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write about topic number {i}."}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return n


def aggregate_tps(client: openai.OpenAI, model: str, streams: int, tokens: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        done = sum(pool.map(lambda i: stream_once(client, model, tokens, i), range(streams)))
    return done / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--instance",
        choices=["pipeline", "tensor"],
        default=None,
        help="serve a 2-rank distributed instance with this split instead of one process",
    )
    args = ap.parse_args()

    from exo_lab.models.store import cache_name
    from exo_lab.models.synthetic import create
    from exo_lab.paths import models_dir

    path = (
        models_dir()
        / "bench"
        / cache_name(f"{args.preset}-{ {'float32': 'fp32', 'bfloat16': 'bf16'}.get(args.dtype, args.dtype) }")
    )
    if not (path / "config.json").exists():
        print(f"creating {path} ...", flush=True)
        create(path, args.preset, dtype=args.dtype, overwrite=True)
    cluster = None
    if args.instance:
        cluster = exo_lab.local_cluster(2)
        plans = cluster.preview(path, context=2048, prompt_tokens=64)
        plan = next(p for p in plans if p.strategy == args.instance and p.num_nodes == 2)
        print(f"launching {plan.describe()} ...", flush=True)
        engine = cluster.launch(path, plan=plan, name="bench")
    else:
        engine = exo_lab.Engine(path, name="bench")
    server = exo_lab.serve(engine, port=0)
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0, timeout=600)
    try:
        stream_once(client, "bench", 4, 0)  # warm-up
        one, many = [], []
        for r in range(args.repeat):
            one.append(aggregate_tps(client, "bench", 1, args.tokens))
            many.append(aggregate_tps(client, "bench", args.streams, args.tokens))
            print(
                f"repeat {r + 1}: 1 stream {one[-1]:.2f} tok/s, {args.streams} streams {many[-1]:.2f} tok/s", flush=True
            )
        a, b = statistics.median(one), statistics.median(many)
        ratio = b / a
        verdict = "ok" if ratio >= 3 else "BELOW TARGET"
        where = f"distributed instance ({engine.plan.describe()})" if cluster else "one process"
        print(
            f"\nmodel {args.preset} {args.dtype} on {where}, {args.tokens} tokens per stream, median of {args.repeat}"
        )
        print(f"aggregate tok/s: 1 stream {a:.2f}, {args.streams} concurrent streams {b:.2f}")
        print(f"ratio {args.streams} streams / 1 stream = {ratio:.2f}x  [target >= 3x: {verdict}]")
    finally:
        server.stop()
        engine.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
