"""Where a token's time goes on two one-core simulated hosts: traced pipeline-2 and tensor-2 of one model.

Run (root, iproute2): .venv/bin/python benchmarks/trace_breakdown.py [--preset llama-1b] [--dtype fp32]
     [--link unshaped] [--strategies pipeline,tensor] [--tokens 24] [--out DIR]
     (``--dtype q8``/``q4``: the fp32 checkpoint, every rank converting it at load)

The same cluster as ``benchmarks/distributed.py`` (hosts ``a`` on core 0 and ``b`` on core 1, each running a
node agent; ``--link`` as there). For each of the planner's pipeline-2 and tensor-2 plans over ``a`` and ``b``:
launch, warm up, decode ``--tokens`` greedy tokens untraced (tok/s), then the same request traced, and print
the trace's breakdown per token (measured compute / link / all-reduce / idle beside the cost model's
prediction for the plan) and traced / untraced decode time. The tensor plan is traced twice: as served
(in-layer all-reduces inside compute) and with ``detail`` (each all-reduce evaluated apart, so it is measured
on its own; slower). ``--out`` keeps each trace as Chrome/Perfetto JSON.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from distributed import DTYPES, FORMATS, in_format, model_path, one_stream, pick, prompt_of, spec_for

from exo_lab.placement.predict import Predictor
from exo_lab.placement.preview import model_card
from exo_lab.sim.cluster import SimCluster

os.environ.setdefault("TQDM_DISABLE", "1")


def traced(inst: Any, prompt: list[int], tokens: int, detail: bool) -> tuple[Any, float]:
    """The trace of one greedy request and its decode tok/s."""
    with inst.trace(label=f"{tokens} tokens", detail=detail) as rec:
        tps = one_stream(inst, prompt, tokens)[1]
    return rec.trace, tps


def run(cluster: Any, path: Path, plan: Any, args: argparse.Namespace) -> None:
    print(f"\n== {plan.describe()}", flush=True)
    inst = cluster.launch(path, plan=plan, name="trace")
    try:
        prompt = prompt_of(32, 0)
        one_stream(inst, prompt_of(8, 0), 2)  # warm-up
        plain = one_stream(inst, prompt, args.tokens)[1]
        for detail in (False, True) if plan.strategy == "tensor" else (False,):
            trace, tps = traced(inst, prompt, args.tokens, detail)
            label = " (detail: all-reduces apart)" if detail else ""
            print(
                f"decode {plain:.2f} tok/s untraced, {tps:.2f} traced{label}: traced / untraced time "
                f"{plain / tps:.3f}; clocks within +-{trace.uncertainty_ns / 1e3:.0f} us",
                flush=True,
            )
            print(trace.table(), flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                print(f"  saved {trace.save(args.out / f'{plan.strategy}{"-detail" if detail else ""}.json')}")
    finally:
        inst.delete()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES) + list(FORMATS))
    ap.add_argument("--link", default="unshaped")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--strategies", default="pipeline,tensor")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    path = model_path(args.preset, args.dtype)
    with SimCluster(spec_for(args.link)).up(wait=120) as sim:
        cluster = sim.cluster()
        try:
            cluster.wait_for(2, links=True, timeout=180)
            plans = cluster.preview(path, context=512, prompt_tokens=32)
            card = model_card(str(path))
            for strategy in args.strategies.split(","):
                plan = in_format(
                    pick(plans, strategy, 2), args.dtype, Predictor(cluster.topology, card, 32, args.tokens)
                )
                if plan is None:
                    print(f"no {strategy} plan over a and b")
                    continue
                run(cluster, path, plan, args)
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
