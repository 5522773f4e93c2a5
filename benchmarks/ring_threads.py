"""MLX's ring backend threads left spinning against running only on an idle core, side by side.

Run: .venv/bin/python benchmarks/ring_threads.py [--models tiny,llama-1b] [--strategies pipeline,tensor]
     [--tokens 200] [--streams 1,4] [--rounds 3] [--json OUT]

Two local clusters of two nodes on loopback (``env_ab.py``): one whose workers run with
``EXO_LAB_RING_THREADS=spin`` (the baseline: MLX's ring threads as MLX starts them, spinning on a core while
a rank waits for its peer), one with the default (``idle``: they run only on an idle core,
:mod:`exo_lab.cluster.ring_threads`). The same two-node plan (``pipeline``: the planner's best 2-stage split;
``tensor``: a pair over both nodes) on both; rounds alternate which goes first. Prints medians and idle / spin.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,llama-1b", help="comma-separated synthetic presets")
    ap.add_argument("--strategies", default="pipeline,tensor")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = compare(
        defaults.RING_THREADS,
        {"spin": "spin", "idle": None},
        args.models.split(","),
        args.strategies.split(","),
        [int(s) for s in args.streams.split(",")],
        args.tokens,
        args.rounds,
    )
    print_rows(rows, "spin", "idle")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
