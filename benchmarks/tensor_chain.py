"""Four ranks on two nodes, their messages along a chain of their own sockets against MLX's ring, side by side.

Run: .venv/bin/python benchmarks/tensor_chain.py [--models tiny-mha] [--layouts tensor-4,pairs] [--tokens 32]
     [--streams 1] [--rounds 4] [--json OUT]

Two local clusters of two nodes on loopback (``env_ab.py``): one whose agents (and so workers) run with
``EXO_LAB_PEER_LINK=0`` (the baseline: every all-reduce and the logits' gather go round MLX's ring, whose socket
threads spin while they wait), one with the default (``exo_lab/engine/peer_link.py``'s ``ChainLinks``: sums of
up to ``defaults.CHAIN_MAX_BYTES`` along a chain of sockets, each rank sleeping in ``poll()`` while it waits).
Each launches the model as one tensor group of four ranks, two on each node (``tensor-4``: fp32, each rank's
``tensor_index`` its rank), or as the planner's pipeline of two tensor pairs (``pairs``: hidden states between
the stages and each step's shared vector over the same links, ``Layout.chain``), so four ranks share this
machine's cores; rounds alternate which goes first. Prints the medians of
greedy decode tok/s of one stream (or the aggregate of N) through ``Instance.generate``, and chain / ring.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from distributed import model_path
from env_ab import decode_tps, start

from exo_lab.placement.plan import Plan, RankSpec

RANKS = 4


def tensor_plan(cluster: Any, path: Path) -> Plan:
    """The model as one tensor group of :data:`RANKS` ranks, half of them on each of the cluster's two nodes."""
    base = cluster.preview(str(path), context=2048, prompt_tokens=64).best
    nodes = cluster.nodes[:2]
    layers = (0, json.loads((path / "config.json").read_text())["num_hidden_layers"])
    ranks = [RankSpec(i, n.id, n.name, 0, layers, i, RANKS, "127.0.0.1", "float32") for i, n in enumerate(nodes * 2)]
    return Plan(
        model=base.model,
        strategy="tensor",
        ranks=ranks,
        memory_bytes={n.id: 0 for n in nodes},
        memory_capacity_bytes={n.id: n.memory_total_bytes for n in nodes},
        model_dtype="float32",
        node_names={n.id: n.name for n in nodes},
    )


def pairs_plan(cluster: Any, path: Path) -> Plan:
    """The planner's pipeline of two tensor pairs over the cluster's two nodes."""
    plans = cluster.preview(str(path), context=2048, prompt_tokens=64)
    return next(p for p in plans if p.strategy == "pipeline-tensor" and all(r.tensor_size == 2 for r in p.ranks))


LAYOUTS = {"tensor-4": tensor_plan, "pairs": pairs_plan}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-mha", help="comma-separated synthetic presets (KV heads a multiple of 4)")
    ap.add_argument("--layouts", default="tensor-4", help="comma-separated: tensor-4, pairs (a pipeline of two pairs)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    ap.add_argument("--streams", type=int, default=1, help="concurrent streams")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    sides = {"ring": "0", "chain": None}
    clusters = {name: start("EXO_LAB_PEER_LINK", value) for name, value in sides.items()}
    rows = []
    try:
        for name, layout in [(m, x) for m in args.models.split(",") for x in args.layouts.split(",")]:
            path = model_path(name, "fp32")
            with ThreadPoolExecutor(len(clusters)) as pool:  # both launch at once
                launching = {
                    k: pool.submit(c.launch, str(path), plan=LAYOUTS[layout](c, path), name=f"chain-{k}")
                    for k, c in clusters.items()
                }
                insts = {k: f.result() for k, f in launching.items()}
            try:
                for inst in insts.values():
                    decode_tps(inst, 1, 4)  # warm up
                got: dict[str, list[float]] = {k: [] for k in insts}
                for r in range(args.rounds):
                    for k in list(insts) if r % 2 == 0 else list(reversed(insts)):
                        got[k].append(decode_tps(insts[k], args.streams, args.tokens))
                    print(f"  {name} {layout} round {r + 1}/{args.rounds} done", file=sys.stderr)
            finally:
                for inst in insts.values():
                    inst.delete()
            ring, chain = statistics.median(got["ring"]), statistics.median(got["chain"])
            rows.append(
                {
                    "model": name,
                    "layout": layout,
                    "streams": args.streams,
                    "ring_tps": ring,
                    "chain_tps": chain,
                    "ratio": chain / ring,
                    "runs": got,
                }
            )
    finally:
        for c in clusters.values():
            c.close()
    print(
        f"{'model':12} {'layout':9} {'streams':>7} {'ring tok/s':>11} {'chain tok/s':>12} {'chain/ring':>11}  (two nodes)"
    )
    for row in rows:
        print(
            f"{row['model']:12} {row['layout']:9} {row['streams']:>7} {row['ring_tps']:>11.2f} "
            f"{row['chain_tps']:>12.2f} {row['ratio']:>10.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
