"""Serving from any member: an instance reached through another coordinator's API against its owner's own API.

Run: .venv/bin/python benchmarks/forwarding.py [--preset llama-1b --dtype float32] [--tokens 64] [--repeat 3]

A local cluster of one node agent; coordinator ``a`` launches the model (one process) and serves it,
coordinator ``b`` (another Cluster on the same agent) serves the cluster too and forwards every
request for the model to ``a`` (``exo_lab.api.forward``). The official openai client streams the same
greedy request from each, alternating, ``--repeat`` times; medians of time to first token and decode
tokens/s (tokens after the first over the time after it) and end-to-end tokens/s (all tokens over the whole
request) are compared: forwarded / direct. What the
forwarding costs is one more local HTTP hop per request and per streamed chunk.
"""

from __future__ import annotations

import exo_lab  # first: OpenBLAS before MLX

# isort: split
import argparse
import statistics
import time

import openai

from exo_lab.models import synthetic
from exo_lab.paths import models_dir


def stream(client: openai.OpenAI, model: str, tokens: int) -> tuple[float, float, float, str]:
    """(time to first token, decode tok/s, end-to-end tok/s, text) of one streamed greedy request."""
    t0 = time.perf_counter()
    first = None
    n = 0
    text = []
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            n += 1
            text.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    assert first is not None
    return first - t0, (n - 1) / (end - first) if n > 1 else 0.0, n / (end - t0), "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    path = models_dir() / "bench" / f"{args.preset}-{args.dtype}"
    if not path.exists():
        print(f"creating {path} ...", flush=True)
        synthetic.create(path, args.preset, dtype=args.dtype)
    a = exo_lab.local_cluster(1)
    b = exo_lab.connect([a.address_of(n.id) for n in a.nodes], cluster_key=a.cluster_key)
    try:
        single = next(
            p for p in a.preview(str(path)) if p.strategy == "single"
        )  # one process: the hop is all that differs
        inst = a.launch(str(path), plan=single, name="m")
        b.serve()
        direct = openai.OpenAI(base_url=f"{a.server.url}/v1", api_key="none")
        forwarded = openai.OpenAI(base_url=f"{b.server.url}/v1", api_key="none")
        deadline = time.monotonic() + 30
        while b.control.route("m") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        stream(direct, "m", 4)  # warm-up, both paths
        stream(forwarded, "m", 4)
        rows: dict[str, list[tuple[float, float, float]]] = {"direct": [], "forwarded": []}
        texts = set()
        for i in range(args.repeat):
            pair = (("direct", direct), ("forwarded", forwarded))
            for name, client in pair if i % 2 == 0 else pair[::-1]:  # alternate which goes first
                ttft, tps, e2e, text = stream(client, "m", args.tokens)
                rows[name].append((ttft, tps, e2e))
                texts.add(text)
        assert len(texts) == 1, "greedy replies differ between the two paths"
        med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in rows.items()}
        print(f"{args.preset} {args.dtype}, {args.tokens} tokens, {args.repeat} runs each, {inst.plan.describe()}")
        print(f"{'path':10s} {'TTFT ms':>9s} {'decode tok/s':>13s} {'end-to-end tok/s':>17s}")
        for k, (ttft, tps, e2e) in med.items():
            print(f"{k:10s} {1000 * ttft:9.1f} {tps:13.2f} {e2e:17.2f}")
        f, d = med["forwarded"], med["direct"]
        print(
            f"forwarded / direct: TTFT x{f[0] / d[0]:.3f}, decode tok/s x{f[1] / d[1]:.3f}, "
            f"end-to-end tok/s x{f[2] / d[2]:.3f}"
        )
    finally:
        b.close()
        a.close()


if __name__ == "__main__":
    main()
