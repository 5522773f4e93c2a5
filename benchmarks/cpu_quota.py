"""Is this machine's CPU time metered? Spin on one core, then on every core, and report the gaps.

Run: .venv/bin/python benchmarks/cpu_quota.py [--seconds 20]

A process that spins on a core it has to itself sees no gap of 10 ms or more, unless something stops the core:
a hypervisor throttling its VM, or a cgroup's CPU quota. On this project's VM, one spinning core sees none, and
every core spinning sees gaps of exactly 100 ms (1-3.5% of the time), which is why a pipeline's stage must
sleep, not spin, while it waits for another (``benchmarks/README.md``, ``exo_lab/engine/peer_link.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def spin(core: int, seconds: float, out: mp.Queue) -> None:
    """Spin on ``core`` for ``seconds``; put ``(core, [gap seconds, ...])`` for every gap of 10 ms or more."""
    os.sched_setaffinity(0, {core})
    end = time.perf_counter() + seconds
    last, gaps = time.perf_counter(), []
    while last < end:
        now = time.perf_counter()
        if now - last >= 0.01:
            gaps.append(now - last)
        last = now
    out.put((core, gaps))


def run(cores: list[int], seconds: float) -> None:
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=spin, args=(c, seconds, out)) for c in cores]
    for p in procs:
        p.start()
    results = sorted(out.get() for _ in procs)
    for p in procs:
        p.join()
    for core, gaps in results:
        lost = sum(gaps)
        shown = ", ".join(f"{g * 1e3:.0f}" for g in gaps[:12]) + (" ..." if len(gaps) > 12 else "")
        print(
            f"  core {core}: {len(gaps)} gaps >= 10 ms, {lost:.2f} s of {seconds:.0f} s lost ({lost / seconds:.1%})"
            + (f": {shown} ms" if gaps else "")
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    print(f"one core spinning ({cores[0]}):")
    run(cores[:1], args.seconds)
    print(f"every core spinning ({', '.join(map(str, cores))}):")
    run(cores, args.seconds)


if __name__ == "__main__":
    main()
