"""Two local clusters that differ in one environment variable of their agents (and so of their workers), the same
plans launched on both, decode measured in alternating rounds: what ``lookahead.py`` runs.

Each round measures greedy decode tok/s (EOS ignored) of one stream, and aggregate tok/s of N concurrent streams
(tokens over the time from the first token of any to the last of all), through ``Instance.generate``; which side
goes first alternates. Models are synthetic presets in fp32, made once under ``<models dir>/bench/`` (shared with
``distributed.py``; ``tiny`` is the demo model's shape).
"""

from __future__ import annotations

import exo_lab  # first: OpenBLAS before MLX

# isort: split
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from distributed import in_format, model_path

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


def start(variable: str, value: str | None) -> Any:
    """A local cluster of two nodes whose agents (and workers) run with ``variable=value`` (None: unset)."""
    before = os.environ.pop(variable, None)
    if value is not None:
        os.environ[variable] = value
    try:
        return exo_lab.local_cluster(2)
    finally:
        os.environ.pop(variable, None)
        if before is not None:
            os.environ[variable] = before


def pick(cluster: Any, path: Path, strategy: str) -> Any:
    """The planner's best plan of ``strategy`` (``single``: one node; else both)."""
    plans = cluster.preview(str(path), context=2048, prompt_tokens=len(PROMPT))
    return next(p for p in plans if p.strategy == strategy and p.num_nodes == (1 if strategy == "single" else 2))


def compare(
    variable: str,
    sides: dict[str, str | None],
    models: list[str],
    strategies: list[str],
    streams: list[int],
    tokens: int,
    rounds: int,
    extra: Callable[[Path, str, int], float | None] | None = None,
    dtype: str = "fp32",
) -> list[dict[str, Any]]:
    """Rows of median tok/s per side (``sides``: name -> value of ``variable``, the first the baseline) for each
    model, strategy and stream count; ``extra(path, strategy, streams)`` adds a reference figure to each row.
    ``dtype``: what every rank computes in (``q8``/``q4``: converted from the fp32 checkpoint at load)."""
    clusters = {name: start(variable, value) for name, value in sides.items()}
    base_name, new_name = list(sides)
    rows: list[dict[str, Any]] = []
    try:
        for name in models:
            path = model_path(name, "fp32")
            for strategy in strategies:
                plan = pick(clusters[new_name], path, strategy)
                insts = {
                    k: c.launch(str(path), plan=in_format(pick(c, path, strategy), dtype)) for k, c in clusters.items()
                }
                try:
                    for inst in insts.values():  # warm up
                        decode_tps(inst, 1, 8)
                    got: dict[tuple[str, int], list[float]] = {}
                    for r in range(rounds):
                        order = list(insts) if r % 2 == 0 else list(reversed(insts))
                        for n in streams:
                            for k in order:
                                got.setdefault((k, n), []).append(decode_tps(insts[k], n, tokens))
                        print(f"  {name} {strategy} round {r + 1}/{rounds} done", file=sys.stderr)
                finally:
                    for inst in insts.values():
                        inst.delete()
                for n in streams:
                    base, new = (statistics.median(got[(k, n)]) for k in (base_name, new_name))
                    rows.append(
                        {
                            "model": name,
                            "plan": plan.describe(),
                            "strategy": strategy,
                            "streams": n,
                            f"{base_name}_tps": base,
                            f"{new_name}_tps": new,
                            "ratio": new / base,
                            f"{new_name}_runs": got[(new_name, n)],
                            f"{base_name}_runs": got[(base_name, n)],
                            "reference_tps": extra(path, strategy, n) if extra else None,
                        }
                    )
    finally:
        for c in clusters.values():
            c.close()
    return rows


def print_rows(rows: list[dict[str, Any]], base_name: str, new_name: str, reference: str = "") -> None:
    """The rows as a table: each side's tok/s and new / baseline (and the reference column, when named)."""
    ratio = f"{new_name}/{base_name}"
    head = f"{'model':16} {'plan':9} {'streams':>7} {base_name + ' tok/s':>15} {new_name + ' tok/s':>15} {ratio:>15}"
    print(head + (f" {reference:>8}" if reference else ""))
    for row in rows:
        line = (
            f"{row['model']:16} {row['strategy']:9} {row['streams']:>7} {row[base_name + '_tps']:>15.1f} "
            f"{row[new_name + '_tps']:>15.1f} {row['ratio']:>14.2f}x"
        )
        if reference:
            line += f" {row['reference_tps']:>8.1f}" if row["reference_tps"] else f" {'-':>8}"
        print(line)
