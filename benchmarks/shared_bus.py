"""Do this machine's cores share what a decode needs? One core's decode products alone, then every core's at once.

Run: .venv/bin/python benchmarks/shared_bus.py [--formats q4,q8,float32] [--layers 8] [--seconds 8] [--rows 1]
     [--cached KB]

Each process, pinned to its own core, builds ``--layers`` Llama-3.2-1B-shaped layers (q, k, v, o, gate, up,
down; random weights, more bytes than the caches hold) in a weight format, computed as a rank computes them
(:mod:`exo_lab.models.qmatmul` for q8/q4, :mod:`exo_lab.models.halfmatmul` for bf16w/fp16w, ``x @ W.T``
otherwise), and times ``--rows`` decode rows (1: one stream, read-bound; 8: eight streams, where a kernel computes
more) through all of them for ``--seconds``: first on one core alone, then on every core at once. It prints the median time of each, the weight bytes read per second, and what that bounds:
a decode split over these cores (the simulated hosts of ``distributed.py``, one per core, on one machine) runs
its products at most ``cores * alone / together`` times as fast as one core. Separate machines do not share a
bus; simulated hosts on one machine do. Virtual CPUs may also share a physical core's execution units (the
hypervisor's hyperthreads), which slows compute-bound products (``--rows 8``) more than read-bound ones;
``--cached 256`` runs one projection that stays in each core's cache, so only execution units are shared: on
separate physical cores it is not slower together, on one core's two hyperthreads about twice as slow.
"""

from __future__ import annotations

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)

# isort: split
import argparse
import multiprocessing as mp
import os
import queue
import statistics
import time
from collections.abc import Callable
from typing import Any

from exo_lab.models.formats import FORMATS

#: (output rows, input columns) of a Llama-3.2-1B layer's projections: q, k, v, o, gate, up, down
LAYER = ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))
#: how many times a step runs the cached projection of ``--cached`` (a step of a few milliseconds)
CACHED_CALLS = 64


def decode_products(fmt_name: str, layers: int, rows: int = 1, cached_kb: int = 0) -> tuple[Callable[[], None], int]:
    """A function running ``rows`` decode rows through ``layers`` layers' products in ``fmt_name``, and their
    bytes. ``cached_kb``: instead, one projection of about that many KB of weights (2048 columns), which stays in
    the core's cache, run ``CACHED_CALLS`` times: the products' compute alone, no memory read."""
    import mlx.core as mx

    from exo_lab.models import formats, halfmatmul, qmatmul

    fmt = formats.FORMATS[fmt_name]

    def product(x: mx.array, w: mx.array) -> tuple[Callable[[], mx.array], list[mx.array]]:
        """One projection as a rank computes it in ``fmt``, and the weight arrays it reads."""
        if fmt.bits:
            wq, scales, biases = mx.quantize(w, group_size=formats.GROUP_SIZE, bits=fmt.bits)
            bits = fmt.bits
            return (lambda: qmatmul.matmul(x, wq, scales, biases, formats.GROUP_SIZE, bits)), [wq, scales, biases]
        if fmt.widened:
            held = w.astype(getattr(mx, fmt.held))
            return (lambda: halfmatmul.matmul(x, held)), [held]
        xs, ws = x.astype(getattr(mx, fmt.name)), w.astype(getattr(mx, fmt.name))
        return (lambda: xs @ ws.T), [ws]

    fns, weights = [], []
    if cached_kb:
        k = 2048
        n = max(8, int(cached_kb * 1024 / (k * fmt.bytes_per_weight())) // 8 * 8)
        w = mx.random.uniform(-1.0, 1.0, (n, k), key=mx.random.key(n))
        fn, arrays = product(mx.random.uniform(-1.0, 1.0, (rows, k), key=mx.random.key(k)), w)
        mx.eval(*arrays)

        def again() -> None:
            mx.eval([fn() for _ in range(CACHED_CALLS)])

        return again, sum(a.nbytes for a in arrays) * CACHED_CALLS
    for i in range(layers):
        for n, k in LAYER:
            w = mx.random.uniform(-1.0, 1.0, (n, k), key=mx.random.key(i * 7 + n + k))
            fn, arrays = product(mx.random.uniform(-1.0, 1.0, (rows, k), key=mx.random.key(k)), w)
            mx.eval(*arrays)
            fns.append(fn)
            weights += arrays

    def run() -> None:
        mx.eval([fn() for fn in fns])

    return run, sum(a.nbytes for a in weights)


def timed(core: int, fmt: str, layers: int, rows: int, seconds: float, start: Any, out: Any, cached_kb: int) -> None:
    """On ``core``: build the products, wait for the others, time decode steps of ``rows`` rows for ``seconds``."""
    os.sched_setaffinity(0, {core})
    run, nbytes = decode_products(fmt, layers, rows, cached_kb)
    run()
    start.wait()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    out.put((core, statistics.median(times), nbytes))


def measure(
    cores: list[int], fmt: str, layers: int, seconds: float, rows: int = 1, cached_kb: int = 0
) -> list[tuple[int, float, int]]:
    """``(core, median seconds of one decode step of ``rows`` rows, weight bytes)`` of one process per core, all
    at once (``cached_kb``: :func:`decode_products`'s)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(cores)), ctx.Queue()
    procs = [ctx.Process(target=timed, args=(c, fmt, layers, rows, seconds, start, out, cached_kb)) for c in cores]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):  # one failed: the others wait at the barrier
                for p in procs:
                    p.kill()
                raise RuntimeError(f"measuring {fmt} failed (exit codes {[p.exitcode for p in procs]})") from None
    for p in procs:
        p.join()
    return sorted(results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4,q8,float32", help=f"comma-separated, of: {', '.join(FORMATS)}")
    ap.add_argument("--layers", type=int, default=8, help="layers of products (8: q4 reads ~270 MB a row)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds of each run")
    ap.add_argument("--rows", type=int, default=1, help="rows of x a step (1: one stream; 8: eight streams)")
    ap.add_argument(
        "--cached",
        type=int,
        default=0,
        metavar="KB",
        help="one projection of about KB of weights that stays in each core's cache, instead of --layers: the "
        "products' compute alone (0: off; try 256)",
    )
    args = ap.parse_args()
    if args.rows < 1:
        ap.error("--rows must be at least 1")
    unknown = [f for f in args.formats.split(",") if f not in FORMATS]
    if unknown:
        ap.error(f"unknown formats {unknown}: choose from {', '.join(FORMATS)}")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("one core: nothing to share")
        return 0
    what = (
        f"one {args.cached} KB projection in cache, {CACHED_CALLS} times"
        if args.cached
        else f"{args.layers} Llama-3.2-1B layers' products"
    )
    print(f"{what}, {args.rows} decode row(s); median of {args.seconds:.0f} s; cores {cores}")
    print(
        f"{'format':8} {'alone ms':>9} {'GB/s':>6} {'together ms':>12} {'GB/s (sum)':>11} {'slower':>7} {'split bound':>12}"
    )
    for fmt in args.formats.split(","):
        (_, alone, nbytes), *_ = measure(cores[:1], fmt, args.layers, args.seconds, args.rows, args.cached)
        together = measure(cores, fmt, args.layers, args.seconds, args.rows, args.cached)
        slowest = max(t for _, t, _ in together)
        total = sum(n / t for _, t, n in together)
        print(
            f"{fmt:8} {alone * 1e3:9.2f} {nbytes / alone / 1e9:6.1f} "
            f"{' / '.join(f'{t * 1e3:.2f}' for _, t, _ in together):>12} {total / 1e9:11.1f} "
            f"{slowest / alone:6.2f}x {len(cores) * alone / slowest:11.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
