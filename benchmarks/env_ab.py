"""Two local clusters that differ in one environment variable of their agents (and so of their workers), the same
plans launched on both, decode measured in alternating rounds: what ``lookahead.py`` runs. With ``hosts=True``
each cluster is two simulated one-core hosts instead (``distributed.py``'s, on a plain LAN; root).

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

from exo_lab.sim.cluster import SimCluster

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


class SimSide:
    """A cluster of two simulated one-core hosts (``a`` on core 0, ``b`` on core 1, a plain LAN): ``close``
    ends it, as a local cluster's does."""

    def __init__(self, name: str) -> None:
        hosts = [{"name": "a", "cores": [0]}, {"name": "b", "cores": [1]}]
        self.sim = SimCluster({"name": name, "hosts": hosts, "lan": {}}).up(wait=120)
        try:
            self.cluster = self.sim.cluster()
            self.cluster.wait_for(2, links=True, timeout=180)
        except BaseException:
            self.sim.down()
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    def close(self) -> None:
        try:
            self.cluster.close()
        finally:
            self.sim.down()


def start(variable: str, value: str | None, hosts: str | None = None) -> Any:
    """A local cluster of two nodes whose agents (and workers) run with ``variable=value`` (None: unset); with
    ``hosts`` (a sim name), two simulated one-core hosts (:class:`SimSide`)."""
    before = os.environ.pop(variable, None)
    if value is not None:
        os.environ[variable] = value
    try:
        return SimSide(hosts) if hosts else exo_lab.local_cluster(2)
    finally:
        os.environ.pop(variable, None)
        if before is not None:
            os.environ[variable] = before


def pick(cluster: Any, path: Path, strategy: str) -> Any:
    """The planner's best plan of ``strategy`` (``single``: one node; else both; a pipeline's proportional split,
    as ``distributed.py`` takes it, where one is offered)."""
    plans = cluster.preview(str(path), context=2048, prompt_tokens=len(PROMPT))
    cands = [p for p in plans if p.strategy == strategy and p.num_nodes == (1 if strategy == "single" else 2)]
    return next((p for p in cands if p.split != "fastest"), cands[0])


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
    hosts: bool = False,
    together: bool = False,
) -> list[dict[str, Any]]:
    """Rows of median tok/s per side (``sides``: name -> value of ``variable``, the first the baseline) for each
    model, strategy and stream count; ``extra(path, strategy, streams)`` adds a reference figure to each row.
    ``dtype``: what every rank computes in (``q8``/``q4``: converted from the fp32 checkpoint at load).
    ``hosts``: each side on two simulated one-core hosts (:class:`SimSide`) instead of a local cluster.
    ``together``: every strategy's plan launched at once and measured in each round (else one after another)."""
    clusters = {}
    try:
        for i, (name, value) in enumerate(sides.items()):
            clusters[name] = start(variable, value, f"ab-{i}" if hosts else None)
    except BaseException:
        for c in clusters.values():
            c.close()
        raise
    base_name, new_name = list(sides)
    rows: list[dict[str, Any]] = []
    try:
        for name in models:
            path = model_path(name, "fp32")
            for batch in [strategies] if together else [[s] for s in strategies]:
                plans = {s: pick(clusters[new_name], path, s) for s in batch}
                insts: dict[tuple[str, str], Any] = {}
                got: dict[tuple[str, str, int], list[float]] = {}
                try:
                    for s in batch:
                        for k, c in clusters.items():
                            insts[s, k] = c.launch(str(path), plan=in_format(pick(c, path, s), dtype), name=f"ab-{s}")
                    for inst in insts.values():  # warm up
                        decode_tps(inst, 1, 8)
                    for r in range(rounds):
                        order = list(clusters) if r % 2 == 0 else list(reversed(clusters))
                        for s in batch:
                            for n in streams:
                                for k in order:
                                    got.setdefault((s, k, n), []).append(decode_tps(insts[s, k], n, tokens))
                        print(f"  {name} {'+'.join(batch)} round {r + 1}/{rounds} done", file=sys.stderr)
                finally:
                    for inst in insts.values():
                        inst.delete()
                for s in batch:
                    for n in streams:
                        base, new = (statistics.median(got[(s, k, n)]) for k in (base_name, new_name))
                        rows.append(
                            {
                                "model": name,
                                "plan": plans[s].describe(),
                                "strategy": s,
                                "streams": n,
                                f"{base_name}_tps": base,
                                f"{new_name}_tps": new,
                                "ratio": new / base,
                                f"{new_name}_runs": got[(s, new_name, n)],
                                f"{base_name}_runs": got[(s, base_name, n)],
                                "reference_tps": extra(path, s, n) if extra else None,
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
