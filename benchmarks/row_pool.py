"""A decode product's weight rows over a machine's cores: chunks claimed as they come (``RowPool``) against
OpenMP's fixed halves, or against the pool's earlier chunks of 128 KB, side by side.

Run: .venv/bin/python benchmarks/row_pool.py [--models llama-1b] [--dtype q4] [--strategies single,tensor]
     [--tokens 128] [--streams 1,4] [--rounds 4] [--baseline openmp|small-chunks] [--json OUT]

Two local clusters of two nodes on loopback (``env_ab.py``): one whose agents (and so workers) run with
``EXO_LAB_ROW_POOL=0`` (the baseline: each thread of the kernel's OpenMP team computes a fixed share of a decode
product's rows, and the calling thread waits at the end for the others'), one with the default
(``exo_lab/native/weight_matmul.cpp``'s ``RowPool``: the calling thread starts at once and takes chunks of rows as
the helper threads do, so a helper that wakes late, or whose core the host takes, holds no fixed share). The same
plan is launched on both (``single``: one node, the kernel's threads on every core; ``tensor``: both nodes, two
ranks sharing the cores), every rank computing in ``--dtype`` (q4 and q8 take the integer kernel the pool
splits); rounds alternate which goes first. ``--baseline small-chunks`` sets ``EXO_LAB_POOL_CHUNKS=0`` instead: the
pool's chunks of 128 KB whatever the product (each a restart of a thread's streams of weights from memory) against
its default of three chunks to a thread's even share. Prints the medians of greedy decode tok/s of one stream and the
aggregate of N streams through ``Instance.generate``, and pool / baseline.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import json
import sys
from pathlib import Path

from exo_lab import defaults

sys.path.insert(0, str(Path(__file__).parent))
from env_ab import compare, print_rows

#: baseline name: (the variable its agents set, its value)
BASELINES = {"openmp": (defaults.ROW_POOL, "0"), "small-chunks": (defaults.POOL_CHUNKS, "0")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-1b", help="comma-separated synthetic presets")
    ap.add_argument("--dtype", default="q4", choices=["q4", "q8"], help="what every rank computes in")
    ap.add_argument("--strategies", default="single", help="comma-separated: single, tensor")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    ap.add_argument("--streams", default="1,4", help="comma-separated concurrent stream counts")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--baseline", default="openmp", choices=list(BASELINES), help="what the pool is set against")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    variable, value = BASELINES[args.baseline]
    rows = compare(
        variable,
        {args.baseline: value, "pool": None},
        models=args.models.split(","),
        strategies=args.strategies.split(","),
        streams=[int(n) for n in args.streams.split(",")],
        tokens=args.tokens,
        rounds=args.rounds,
        dtype=args.dtype,
    )
    print_rows(rows, args.baseline, "pool")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
