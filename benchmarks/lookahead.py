"""Decoding a step ahead (one-stage instances) against reading each step's tokens first, side by side.

Run: .venv/bin/python benchmarks/lookahead.py [--models tiny,qwen3-moe-tiny,llama-1b] [--strategies single,tensor]
     [--tokens 200] [--streams 1,4] [--rounds 3] [--json OUT]

Two local clusters of two nodes on loopback: one whose agents (and so workers) run with
``EXO_LAB_LOOKAHEAD=0`` (the baseline: every step's tokens read before the next step is built), one with
``--ahead`` (``auto``, the default: a step ahead where every rank has a core to spare, so here one rank but not
a tensor pair on the same two cores; ``always``: a step ahead whatever the cores; :mod:`exo_lab.engine.lookahead`). For each synthetic preset (fp32, made once under
``<models dir>/bench/``, shared with ``distributed.py``; ``tiny`` is the demo model's shape) and one-stage plan (``single``: one
node; ``tensor``: both nodes) the same plan is launched on both; rounds alternate which goes first. Each
round measures greedy decode tok/s (EOS ignored) of one stream, and aggregate tok/s of N concurrent streams
(tokens over the time from the first token of any to the last of all), through ``Instance.generate``. For a
single node it also runs ``mlx_lm.stream_generate`` in this process on the same model (what ``mlx_lm`` gets
with its own ``async_eval`` lookahead, one process, no serving). Prints medians and ahead / baseline.
"""

from __future__ import annotations

import exo_lab  # first: OpenBLAS before MLX

# isort: split
import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from exo_lab import defaults

sys.path.insert(0, str(Path(__file__).parent))
from distributed import model_path

os.environ.setdefault("TQDM_DISABLE", "1")
PROMPT = [(i * 7919) % 5000 + 10 for i in range(64)]


def decode_tps(inst: Any, streams: int, tokens: int) -> float:
    """Aggregate greedy decode tok/s of ``streams`` concurrent requests (one: that stream's own rate)."""
    stamps: list[list[float]] = [[] for _ in range(streams)]

    def run(i: int) -> None:
        prompt = PROMPT[i:] + PROMPT[:i]  # distinct prompts
        for _ in inst.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True):
            stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if streams == 1:
        return (len(stamps[0]) - 1) / (stamps[0][-1] - stamps[0][0])
    start, end = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    return (sum(len(s) for s in stamps) - streams) / (end - start)


def mlx_lm_tps(path: Path, tokens: int) -> float:
    """``mlx_lm.stream_generate`` in this process, greedy: tok/s between its first and last token."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(path))[:2]
    stamps = [
        time.perf_counter() for _ in stream_generate(model, tok, PROMPT, max_tokens=tokens, sampler=make_sampler(0.0))
    ]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def start(lookahead: str) -> Any:
    """A local cluster of two nodes whose workers run with ``EXO_LAB_LOOKAHEAD=lookahead``."""
    os.environ[defaults.LOOKAHEAD] = lookahead
    try:
        return exo_lab.local_cluster(2)
    finally:
        os.environ.pop(defaults.LOOKAHEAD, None)


def pick(cluster: Any, path: Path, strategy: str) -> Any:
    plans = cluster.preview(str(path), context=2048, prompt_tokens=len(PROMPT))
    return next(p for p in plans if p.strategy == strategy and p.num_nodes == (1 if strategy == "single" else 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,qwen3-moe-tiny,llama-1b", help="comma-separated synthetic presets")
    ap.add_argument("--strategies", default="single,tensor")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ahead", default="auto", choices=["auto", "always"], help="EXO_LAB_LOOKAHEAD of the ahead side")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    clusters = {"baseline": start("0"), "ahead": start(args.ahead)}
    rows: list[dict[str, Any]] = []
    try:
        for name in args.models.split(","):
            path = model_path(name, "fp32")
            for strategy in args.strategies.split(","):
                plan = pick(clusters["ahead"], path, strategy)
                insts = {k: c.launch(str(path), plan=pick(c, path, strategy)) for k, c in clusters.items()}
                try:
                    for inst in insts.values():  # warm up
                        decode_tps(inst, 1, 8)
                    got: dict[tuple[str, int], list[float]] = {}
                    for r in range(args.rounds):
                        order = list(insts) if r % 2 == 0 else list(reversed(insts))
                        for n in streams:
                            for k in order:
                                got.setdefault((k, n), []).append(decode_tps(insts[k], n, args.tokens))
                        print(f"  {name} {strategy} round {r + 1}/{args.rounds} done", file=sys.stderr)
                finally:
                    for inst in insts.values():
                        inst.delete()
                ref = mlx_lm_tps(path, args.tokens) if strategy == "single" else None
                for n in streams:
                    base, ahead = (statistics.median(got[(k, n)]) for k in ("baseline", "ahead"))
                    rows.append(
                        {
                            "model": name,
                            "plan": plan.describe(),
                            "strategy": strategy,
                            "streams": n,
                            "baseline_tps": base,
                            "ahead_tps": ahead,
                            "ratio": ahead / base,
                            "ahead_runs": got[("ahead", n)],
                            "baseline_runs": got[("baseline", n)],
                            "mlx_lm_tps": ref if n == 1 else None,
                        }
                    )
    finally:
        for c in clusters.values():
            c.close()
    print(
        f"{'model':8} {'plan':8} {'streams':>7} {'baseline tok/s':>15} {'ahead tok/s':>12} {'ahead/baseline':>15} {'mlx_lm':>8}"
    )
    for row in rows:
        ref = f"{row['mlx_lm_tps']:.1f}" if row["mlx_lm_tps"] else "-"
        print(
            f"{row['model']:8} {row['strategy']:8} {row['streams']:>7} {row['baseline_tps']:>15.1f} "
            f"{row['ahead_tps']:>12.1f} {row['ratio']:>14.2f}x {ref:>8}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
