"""A worker's threads under ``SCHED_BATCH``: on a shared core they take turns by time slice, not by every wake-up.

MLX runs a CPU step in two threads: the Python thread walks the graph and hands each operation to the
stream's thread, which computes it. On a host with one core per rank they share that core, and under the
default policy every hand-off to a stream thread that is waiting wakes it and lets it preempt the Python
thread: it computes one small operation, waits again, and the Python thread takes the core back to hand off
the next. Measured on this project's 2-core machine, llama-1b in q4 over a tensor group of two one-core
hosts: each of the two threads of a rank switched ~3,800 times a second (~300 switches a token), where under
``SCHED_BATCH`` (a woken thread waits for the running one's time slice or its wait) they switch ~330 and ~250
times; the pair decoded 27.7 -> 28.7 tok/s (three alternations, ``benchmarks/distributed.py``).

Where each thread has a core of its own no thread preempts another, and nothing changes. ``SCHED_BATCH``
keeps every thread's nice value (the ring's socket threads stay at :data:`~exo_lab.engine.group.POLLER_NICE`),
and threads started later inherit it. ``EXO_LAB_WORKER_BATCH=0`` keeps the default policy.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def batch_threads() -> int:
    """Put every thread of this process under ``SCHED_BATCH`` (threads it starts later inherit it); how many
    were (0 where the platform has no such policy)."""
    policy = getattr(os, "SCHED_BATCH", None)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return 0
    if policy is None:
        return 0
    done = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done += 1
        except OSError as e:  # gone meanwhile, or not permitted: it keeps its policy
            log.debug("thread %d keeps its scheduling policy: %s", tid, e)
    return done
