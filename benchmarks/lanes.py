#!/usr/bin/env python
"""q4 rows in lane order against MLX's order: decode and prompt tok/s of one model, one process, side by side.

Run: .venv/bin/python benchmarks/lanes.py [--preset llama-1b] [--pp 256] [--tg 64] [--rounds 3] [--json OUT]
     .venv/bin/python benchmarks/lanes.py --served [--streams 1,2,4] [--strategies single] [--tokens 64]

One synthetic model (fp32 on disk, shared with ``weight_formats.py``) is loaded in q4 the way a shard worker
loads it (``load_shard``) with ``EXO_LAB_LANES=0`` (the baseline: the codes in MLX's order, each group of a row
scaled by its own conversion, broadcast and fma) and with the default (where exo_lab's AVX2 kernel has it,
``exo_lab.models.qmatmul.use_lanes`` lays each block of 8 groups of a row out a group a 32-bit lane, so the
kernel scales 8 groups' exact integer sums at once). Each round loads and times both, alternating which goes
first: a ``--pp``-token prompt in one call, then ``--tg`` greedy tokens as the one-process instance decodes
(``weight_formats.mlx_run``: a step ahead where it would, else in lock step). Both must give the same first
token. Prints the medians and lanes / baseline.

``--served``: two local clusters of two nodes on loopback instead (``env_ab.py``), one whose agents (and so
workers) run with ``EXO_LAB_LANES=0``; the same plan (``--strategies``) launched on both in q4, greedy decode tok/s
of one stream and the aggregate of N concurrent streams (``--streams``: 2-4 streams decode 2-4 rows of x a pass),
rounds alternating which goes first.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from exo_lab import defaults
from exo_lab.models import qmatmul
from exo_lab.paths import models_dir

sys.path.insert(0, str(Path(__file__).parent))
from env_ab import compare, print_rows
from weight_formats import ensure_model, mlx_run

#: the two sides: their name and the value of EXO_LAB_LANES (None: unset, the default)
SIDES = (("mlx-order", "0"), ("lanes", None))


def run_side(path: Path, config: dict[str, Any], value: str | None, pp: int, tg: int) -> dict[str, float]:
    """One load and timing of ``path`` in q4 with EXO_LAB_LANES set to ``value``."""
    if value is None:
        os.environ.pop(defaults.LANES, None)
    else:
        os.environ[defaults.LANES] = value
    try:
        run = mlx_run(path, config, "q4", pp, tg)
    finally:
        os.environ.pop(defaults.LANES, None)
    return {"decode": run.decode_tps, "prefill": run.prefill_tps, "first": float(run.first_token)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-1b", help="synthetic preset (fp32 on disk)")
    ap.add_argument("--pp", type=int, default=256, help="prompt tokens (one call)")
    ap.add_argument("--tg", type=int, default=64, help="greedy tokens decoded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the runs here")
    ap.add_argument("--served", action="store_true", help="served decode on two local clusters instead")
    ap.add_argument("--streams", default="1,2,4", help="--served: comma-separated concurrent stream counts")
    ap.add_argument("--strategies", default="single", help="--served: comma-separated: single, tensor, pipeline")
    ap.add_argument("--tokens", type=int, default=64, help="--served: tokens per stream")
    args = ap.parse_args()
    if qmatmul.lane_groups() == 0:
        print("no lane kernel here (exo_lab's AVX2 kernel only; or EXO_LAB_LANES=0): nothing to compare")
        return 1
    if args.served:
        rows = compare(
            defaults.LANES,
            dict(SIDES),
            models=[args.preset],
            strategies=args.strategies.split(","),
            streams=[int(n) for n in args.streams.split(",")],
            tokens=args.tokens,
            rounds=args.rounds,
            dtype="q4",
        )
        print_rows(rows, SIDES[0][0], SIDES[1][0])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    path = ensure_model(models_dir() / "bench", args.preset)
    config = json.loads((path / "config.json").read_text())
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in SIDES}
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for name, value in order:
            got = run_side(path, config, value, args.pp, args.tg)
            runs[name].append(got)
            print(f"round {r + 1} {name:>9s}: decode {got['decode']:6.2f} tok/s, prompt {got['prefill']:6.1f} tok/s")
    firsts = {run["first"] for side in runs.values() for run in side}
    if len(firsts) != 1:
        raise RuntimeError(f"the two orders gave other first tokens: {sorted(firsts)}")
    med = {
        name: {k: statistics.median(run[k] for run in side) for k in ("decode", "prefill")}
        for name, side in runs.items()
    }
    base, new = med["mlx-order"], med["lanes"]
    print(f"\n{'':>9s} {'decode tok/s':>12s} {'prompt tok/s':>12s}   ({args.preset} q4, {args.pp}-token prompt)")
    for name in ("mlx-order", "lanes"):
        print(f"{name:>9s} {med[name]['decode']:12.2f} {med[name]['prefill']:12.1f}")
    print(f"{'ratio':>9s} {new['decode'] / base['decode']:11.2f}x {new['prefill'] / base['prefill']:11.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
