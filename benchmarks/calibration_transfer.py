"""Does a calibration fitted on a small model still predict a large one? The fit before and after fixed costs.

Run: .venv/bin/python benchmarks/calibration_transfer.py [--small demo] [--large llama-1b] [--json OUT]

Two local nodes (loopback, this process coordinating; their profiles' calibrations are left as they are).
The small model (default ``demo``, 5 MB) is benched on every plan (``--pp`` 64 and 512 tokens, ``--tg``, one
and four streams, like ``exo-lab bench demo --local 2 --plans all --calibrate``), then fitted twice on the same
measurements:

- **before** (the baseline): the fit as it was, rate factors and the per-message overhead only, every factor
  free (``decode_efficiency``, ``prefill_efficiency``, ``row_efficiency``, ``hop_overhead_s``);
- **now**: :func:`exo_lab.bench.calibrate.fit_calibration` (each step's and each request's fixed cost besides,
  factors held where the measurements do not depend on them).

Then the large model (default the ``llama-1b`` synthetic preset in fp32, made once under
``<models dir>/bench/``) is benched on the best one-node plan, and predicted with no calibration and with
each fitted one. Prints each fit's constants and error on the small model, and the large model's
measured / predicted decode tok/s and TTFT under each.
"""

from __future__ import annotations

import exo_lab  # first: OpenBLAS before MLX

# isort: split
import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from exo_lab.bench import calibrate
from exo_lab.bench.results import BenchResult
from exo_lab.cluster.topology import Topology
from exo_lab.models.card import ModelCard
from exo_lab.placement.plan import Plan
from exo_lab.placement.predict import predict

sys.path.insert(0, str(Path(__file__).parent))
from distributed import model_path

os.environ.setdefault("TQDM_DISABLE", "1")
BASELINE = {  # the fit before fixed costs: four parameters, every factor free, factors first
    "PARAMETERS": calibrate.PARAMETERS[:4],
    "ORDERS": ((0, 1, 2, 3),),
    "PRIOR": 0.0,
    "OVERHEAD_PRIOR": 0.0,
    "SENSITIVITY": 0.0,
    "CACHE_RESIDENT_BYTES": 0,
}


def fit(result: BenchResult, baseline: bool) -> calibrate.Calibration:
    """``result`` fitted now, or as the baseline fit did."""
    with mock.patch.multiple(calibrate, **BASELINE) if baseline else contextlib.nullcontext():
        cal = calibrate.fit_calibration(result)
    assert cal is not None, "no plan of the small model ran"
    return cal


def calibrated(topology: Topology, cal: calibrate.Calibration | None) -> Topology:
    """``topology`` whose nodes carry ``cal``'s constants as their calibration (None: none at all)."""
    topo = copy.deepcopy(topology)
    for node_id, node in topo.nodes.items():
        node.profile.pop("calibration", None)
        if cal is not None and node_id in cal.constants:
            node.profile["calibration"] = {k: v for k, v in cal.constants[node_id].items() if k != "group"}
    return topo


def median(point: dict[str, Any], metric: str) -> float:
    return float((point.get(metric) or {}).get("median") or 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", default="demo")
    ap.add_argument("--large", default="llama-1b", help="a synthetic preset (fp32) or a model directory")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--large-pp", type=int, default=128)
    ap.add_argument("--large-tg", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    large = args.large if Path(args.large).is_dir() else str(model_path(args.large, "fp32"))

    cluster = exo_lab.local_cluster(2)
    try:
        small = cluster.bench(
            args.small, pp=[64, 512], tg=args.tg, repeat=2, concurrency=(1, 4), progress=False, launch_timeout=600
        )
        before, now = fit(small, baseline=True), fit(small, baseline=False)
        print(f"{args.small}: {len(small.ok)} plans, prediction error (MAPE, decode tok/s and TTFT)")
        for name, cal in (("before", before), ("now", now)):
            const = {k: round(v, 6) for k, v in next(iter(cal.constants.values())).items() if k != "group"}
            print(f"  {name:6s} uncalibrated {cal.before['mape']:.1f}% -> fitted {cal.after['mape']:.1f}%  {const}")
        big = cluster.bench(
            large, pp=args.large_pp, tg=args.large_tg, repeat=2, select="best", strategies=["single"], progress=False
        )
        (pb,) = big.ok
        plan, card = Plan.from_json(pb.plan), ModelCard.from_json(big.card)
        topology = Topology.from_json(big.topology)
        measured = {m: median(pb.measured, m) for m in ("decode_tps", "ttft_s")}
        print(
            f"{Path(large).name}, {pb.description}: measured decode {measured['decode_tps']:.2f} tok/s, "
            f"TTFT {measured['ttft_s']:.2f} s; measured / predicted with the calibration fitted on {args.small}:"
        )
        rows = {}
        for name, cal in (("none", None), ("before", before), ("now", now)):
            pred = predict(calibrated(topology, cal), card, plan, args.large_pp, args.large_tg)
            assert pred is not None
            rows[name] = {m: measured[m] / pred[m] for m in measured}
            print(f"  {name:6s} decode {rows[name]['decode_tps']:6.2f}x   TTFT {rows[name]['ttft_s']:6.2f}x")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "small": {
                            "model": args.small,
                            "before": before.constants,
                            "now": now.constants,
                            "mape": {
                                "before": before.after["mape"],
                                "now": now.after["mape"],
                                "uncalibrated": now.before["mape"],
                            },
                        },
                        "large": {"model": large, "measured": measured, "measured_over_predicted": rows},
                    },
                    indent=1,
                )
            )
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
