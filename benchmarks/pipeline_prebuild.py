"""A pipeline's stages building each decode step before its input comes, against building it once it is there.

Run (root, iproute2): .venv/bin/python benchmarks/pipeline_prebuild.py [--model llama-1b] [--dtype q4]
     [--tokens 64] [--streams 1,8] [--rounds 6] [--json OUT]

Two clusters of two simulated one-core hosts (``distributed.py``'s, on a plain LAN; ``env_ab.py``), one whose
agents (and so workers) run with ``EXO_LAB_LOOKAHEAD=0`` (the baseline: a stage builds a step's graph once its
input is there), one with the default (``exo_lab/engine/pipeline.py``: a later stage builds it on the hidden
states it is about to receive, the first stage on the tick's shared tokens). The planner's pipeline-2 plan and
its one-node plan are launched on both and kept up (an idle instance takes no core), every rank computing in
``--dtype``; each round measures all four, alternating which side goes first. The one node has one core and no core to spare, so it never steps ahead: both sides run it alike, and it
is the one process that issue 15's pipeline ratios are taken against. Prints medians of greedy decode tok/s
(one stream; the aggregate of N streams), prebuilt / baseline, and each pipeline against the one process.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import json
import statistics
import sys
from pathlib import Path

from exo_lab import defaults

sys.path.insert(0, str(Path(__file__).parent))
from env_ab import compare, print_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", help="a synthetic preset")
    ap.add_argument("--dtype", default="q4", choices=["fp32", "q8", "q4"], help="what every rank computes in")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--streams", default="1,8", help="comma-separated concurrent stream counts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = compare(
        defaults.LOOKAHEAD,
        {"baseline": "0", "prebuilt": None},
        models=[args.model],
        strategies=["single", "pipeline"],
        streams=[int(n) for n in args.streams.split(",")],
        tokens=args.tokens,
        rounds=args.rounds,
        dtype=args.dtype,
        hosts=True,
        together=True,
    )
    print_rows(rows, "baseline", "prebuilt")
    for row in rows:
        if row["strategy"] != "pipeline":
            continue
        one = next(r for r in rows if r["strategy"] == "single" and r["streams"] == row["streams"])
        single = statistics.median(one["baseline_runs"] + one["prebuilt_runs"])
        print(
            f"pipeline-2, {row['streams']} stream(s), against the one process ({single:.2f} tok/s): "
            f"baseline {row['baseline_tps'] / single:.3f}x, prebuilt {row['prebuilt_tps'] / single:.3f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
