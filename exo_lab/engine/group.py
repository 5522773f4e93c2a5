"""A rank's MLX distributed group, with the ring backend's socket threads at the lowest CPU priority.

MLX's ring backend starts one thread per socket when the group forms. While a send or receive is pending,
that thread polls its non-blocking socket without sleeping. Meanwhile the rank's compute thread waits for the
collective, and its main thread dispatches the next operations of the step; on a host with a core per rank
the polling threads take turns with the main thread, so the step's next operations arrive late (on a local
cluster, they take turns with the other ranks' compute). At nice 19 a polling thread runs when the core has
nothing else to do, which is when the rank waits for the message. A low priority does not make the spinning
free where CPU time is metered (a VM throttled once its cores all run flat out): a tensor pair, a larger tensor
group's decode-sized sums, and a pipeline's neighbouring one-rank stages, send over sockets of their own instead
(:mod:`exo_lab.engine.peer_link`), sleeping while they wait.

Measured on this project's 2-core machine, llama-1b in q4 over a tensor group of two one-core processes, a
decode step's eval: on loopback 38.8-39.3 -> 34.6-35.3 ms (four alternations), between two simulated hosts
40.1 -> 34.9-36.3 ms (two); served (``benchmarks/distributed.py``, two alternations) 22.1 / 22.7 -> 22.9 /
23.7 tok/s, where the rest of each step (MLX dispatching ~2500 operations from Python's thread) shares the core.
"""

from __future__ import annotations

import logging
import os
import threading

import mlx.core as mx

log = logging.getLogger(__name__)

#: the polling threads' nice value (the lowest priority)
POLLER_NICE = 19


def _native_threads() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: nothing to find
        return set()


def form_group(backend: str) -> mx.distributed.Group:
    """``mx.distributed.init(backend, strict=True)``; with ``ring``, the threads it started (not Python's) get
    :data:`POLLER_NICE`."""
    before = _native_threads()
    group = mx.distributed.init(backend=backend, strict=True)
    if backend == "ring":
        python = {t.native_id for t in threading.enumerate()}
        pollers = sorted(_native_threads() - before - python)
        for tid in pollers:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, POLLER_NICE)
            except OSError as e:  # gone, or not permitted: they keep the default priority
                log.debug("ring thread %d keeps its priority: %s", tid, e)
        log.info("ring backend: %d socket threads at nice %d", len(pollers), POLLER_NICE)
    return group
