"""What-if study: a shipped model config on the M3 Ultra specs, plans with memory per node, tok/s and TTFT.

    .venv/bin/python benchmarks/whatif_moe.py                                   # DeepSeek-V3 4-bit
    .venv/bin/python benchmarks/whatif_moe.py --model deepseek-v3@8bit --decode-efficiency 0.53

``--decode-efficiency`` / ``--prefill-efficiency`` put a calibration on every node (what
``exo-lab bench --calibrate`` would fit); 0.53 and 0.64 make one node match the published
single-M3-Ultra figures for DeepSeek-V3/R1 at 4 bits (~18 tok/s decode, ~170 tok/s prefill).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import exo_lab
from exo_lab.cluster.topology import Topology
from exo_lab.placement.preview import preview

SPECS = Path(exo_lab.__file__).parent / "sim" / "specs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek-v3@4bit")
    ap.add_argument("--specs", nargs="+", default=["m3-ultra-2x-tb5", "m3-ultra-4x-tb5"])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-efficiency", type=float)
    ap.add_argument("--prefill-efficiency", type=float)
    ap.add_argument("--rows", type=int, default=6)
    args = ap.parse_args()
    calibration = {
        k: v
        for k, v in (("decode_efficiency", args.decode_efficiency), ("prefill_efficiency", args.prefill_efficiency))
        if v is not None
    }
    for spec in args.specs:
        topology = Topology.load(SPECS / f"{spec}.json")
        if calibration:
            topology = copy.deepcopy(topology)
            for n in topology.nodes.values():
                n.profile["calibration"] = calibration
        plans = preview(topology, args.model, context=args.context, prompt_tokens=args.prompt_tokens)
        print(f"== {args.model} on {spec} (calibration {calibration or 'none'})")
        seen = set()
        for p in plans:
            key = (p.strategy, p.num_nodes, len(p.ranks), p.split)
            if key in seen:
                continue
            seen.add(key)
            mem = ", ".join(f"{p.node_names[n]} {v / 1e9:.0f} GB" for n, v in p.memory_bytes.items())
            print(f"  {p.describe()}")
            print(
                f"      {p.decode_tps:5.1f} tok/s  TTFT {p.ttft_s:5.2f} s  prefill {p.prefill_tps:5.0f} tok/s  [{mem}]"
            )
            if len(seen) >= args.rows:
                break
        for reason in sorted({p.reason for p in plans.infeasible if p.reason}):
            print(f"  infeasible: {reason}")


if __name__ == "__main__":
    main()
