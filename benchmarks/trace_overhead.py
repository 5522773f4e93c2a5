"""What tracing costs: decode time with tracing on against off (alternating), and the hooks' cost when off.

Run: .venv/bin/python benchmarks/trace_overhead.py [--preset llama-1b --dtype float32] [--tokens 64] [--repeat 3]

Two measurements, side by side in one run:

1. **off**: a hook while tracing is off is a call returning a shared no-op context (or an attribute read);
   its cost (timed over a million calls) times the hooks a decode step passes (counted from a traced step)
   against the decode step's time: the share of decode time tracing costs when off (none measurable means
   far below run-to-run noise).
2. **on / off**: the same greedy request (``--tokens`` generated, EOS ignored) alternately traced and not,
   ``--repeat`` times each, on one process (an Engine), and on a pipeline and a tensor group over
   ``--nodes`` local node agents (every rank traced; boundaries, and a tensor group's in-layer all-reduces,
   evaluated separately while tracing); medians of decode tokens/s
   (the engine's own figure) are compared: traced / untraced decode time (the target: under 1.05).
"""

from __future__ import annotations

import exo_lab  # first: OpenBLAS before MLX

# isort: split
import argparse
import statistics
import time
from typing import Any

from exo_lab.engine.trace import TRACER
from exo_lab.models import synthetic
from exo_lab.paths import models_dir


def hook_ns(calls: int = 1_000_000) -> float:
    """Nanoseconds one hook costs while tracing is off (a span and a ready, averaged)."""
    assert not TRACER.on
    value = object()
    t = time.perf_counter_ns()
    for _ in range(calls // 2):
        with TRACER.span("compute"):
            pass
        TRACER.ready("recv", value)
    return (time.perf_counter_ns() - t) / calls


def decode_tps(backend: Any, prompt: list[int], tokens: int, trace: bool) -> tuple[float, Any]:
    gen = backend.generate(prompt, max_tokens=tokens, ignore_eos=True, trace=trace)
    for _ in gen:
        pass
    assert gen.usage is not None and gen.usage.completion_tokens == tokens, gen.usage
    return gen.usage.generation_tps, gen.trace if trace else None


def compare(name: str, backend: Any, prompt: list[int], tokens: int, repeat: int) -> dict[str, Any]:
    decode_tps(backend, prompt, 4, False)  # warm-up, both ways
    decode_tps(backend, prompt, 4, True)
    rows: dict[bool, list[float]] = {False: [], True: []}
    last = None
    for i in range(repeat):
        for traced in (False, True) if i % 2 == 0 else (True, False):  # alternate which goes first
            tps, tr = decode_tps(backend, prompt, tokens, traced)
            rows[traced].append(tps)
            last = tr or last
    off, on = statistics.median(rows[False]), statistics.median(rows[True])
    steps = last.decode_steps() if last is not None else []
    per_step = len([s for s in last.spans if s.step in steps]) / max(1, len(steps)) if last is not None else 0.0
    return {"name": name, "off_tps": off, "on_tps": on, "spans_per_step": per_step, "trace": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2, help="local node agents for the pipeline (0: skip it)")
    args = ap.parse_args()

    path = models_dir() / "bench" / f"{args.preset}-{args.dtype}"
    if not path.exists():
        print(f"creating {path} ...", flush=True)
        synthetic.create(path, args.preset, dtype=args.dtype)
    prompt = list(range(10, 42))
    ns = hook_ns()
    results = []
    with exo_lab.Engine(path) as engine:
        results.append(compare("one process", engine, prompt, args.tokens, args.repeat))
    if args.nodes > 1:
        cluster = exo_lab.local_cluster(args.nodes)
        try:
            for strategy in ("pipeline", "tensor"):
                plan = next(
                    (p for p in cluster.preview(str(path)) if p.strategy == strategy and p.num_nodes == args.nodes),
                    None,
                )
                if plan is None:
                    continue
                inst = cluster.launch(str(path), plan=plan, name=f"traced-{strategy}")
                try:
                    results.append(compare(f"{strategy}-{args.nodes}", inst, prompt, args.tokens, args.repeat))
                except (AssertionError, RuntimeError) as exc:  # say so, and go on with what was measured
                    print(f"{strategy}-{args.nodes} failed: {exc!r} (instance {inst.state}: {inst.error})")
                finally:
                    inst.delete()
        finally:
            cluster.close()
    print(f"{args.preset} {args.dtype}, {args.tokens} tokens, {args.repeat} runs each way, alternating")
    print(f"a hook while tracing is off: {ns:.0f} ns")
    print(
        f"{'backend':14s} {'off tok/s':>10s} {'on tok/s':>10s} {'on/off decode time':>19s} {'off: hooks/decode':>18s}"
    )
    for r in results:
        step_ns = 1e9 / r["off_tps"] if r["off_tps"] else float("inf")
        off_share = r["spans_per_step"] * ns / step_ns  # spans per step (every rank) ~ hooks passed per step
        print(
            f"{r['name']:14s} {r['off_tps']:10.2f} {r['on_tps']:10.2f} {r['off_tps'] / r['on_tps']:19.3f} "
            f"{off_share:18.2e}"
        )
    for r in results:
        if r["trace"] is not None:
            print(f"\n{r['name']}: {r['trace']!r}\n{r['trace'].table()}")


if __name__ == "__main__":
    main()
