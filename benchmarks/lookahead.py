"""Decoding a step ahead (one-stage instances) against reading each step's tokens first, side by side.

Run: .venv/bin/python benchmarks/lookahead.py [--models tiny,qwen3-moe-tiny,llama-1b] [--strategies single,tensor]
     [--tokens 200] [--streams 1,4] [--rounds 3] [--ahead auto] [--dtype fp32|q8|q4] [--json OUT]

Two local clusters of two nodes on loopback: one whose agents (and so workers) run with
``EXO_LAB_LOOKAHEAD=0`` (the baseline: every step's tokens read before the next step is built), one with
``--ahead`` (``auto``, the default: a step ahead where every rank has a core to spare, so here one rank but not
a tensor pair on the same two cores; ``always``: a step ahead whatever the cores; :mod:`exo_lab.engine.lookahead`). For each synthetic preset (fp32, made once under
``<models dir>/bench/``, shared with ``distributed.py``; ``tiny`` is the demo model's shape) and one-stage plan (``single``: one
node; ``tensor``: both nodes) the same plan is launched on both; rounds alternate which goes first. Each
round measures greedy decode tok/s (EOS ignored) of one stream, and aggregate tok/s of N concurrent streams
(tokens over the time from the first token of any to the last of all), through ``Instance.generate``. For a
single node it also runs ``mlx_lm.stream_generate`` in this process on the same model (what ``mlx_lm`` gets
with its own ``async_eval`` lookahead, one process, no serving). Prints medians and ahead / baseline.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import json
import sys
import time
from pathlib import Path

from exo_lab import defaults

sys.path.insert(0, str(Path(__file__).parent))
from env_ab import PROMPT, compare, print_rows


def mlx_lm_tps(path: Path, tokens: int) -> float:
    """``mlx_lm.stream_generate`` in this process, greedy: tok/s between its first and last token."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(path))[:2]
    stamps = [
        time.perf_counter() for _ in stream_generate(model, tok, PROMPT, max_tokens=tokens, sampler=make_sampler(0.0))
    ]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,qwen3-moe-tiny,llama-1b", help="comma-separated synthetic presets")
    ap.add_argument("--strategies", default="single,tensor")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ahead", default="auto", choices=["auto", "always"], help="EXO_LAB_LOOKAHEAD of the ahead side")
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "q8", "q4"],
        help="what the ranks compute in (q8/q4: converted at load)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    def mlx_lm(path: Path, strategy: str, streams: int) -> float | None:
        one = strategy == "single" and streams == 1 and args.dtype == "fp32"  # mlx_lm: the checkpoint as stored
        return mlx_lm_tps(path, args.tokens) if one else None

    rows = compare(
        defaults.LOOKAHEAD,
        {"baseline": "0", "ahead": args.ahead},
        args.models.split(","),
        args.strategies.split(","),
        [int(s) for s in args.streams.split(",")],
        args.tokens,
        args.rounds,
        extra=mlx_lm,
        dtype=args.dtype,
    )
    print_rows(rows, "baseline", "ahead", reference="mlx_lm")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
