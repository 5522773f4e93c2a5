"""MLX's ring backend spins while it waits: its threads made to run only on a core nobody else wants.

MLX's ring backend (``mx.distributed``, ``backend="ring"``) gives each of a rank's sockets a thread that,
while a send or a receive is pending, calls the non-blocking ``send``/``recv`` in a loop, and runs its
all-reduces on a small pool of threads of its own. So a rank that waits for its peer keeps a core busy
doing nothing. Where there are fewer cores than threads that want one (two ranks on two cores with the
coordinator beside them, a one-core host) that spin takes the core from the very work it waits for: the
other rank's compute, or this rank's own compute thread, which must wait for the scheduler to take the
core back from the spinner before it can go on with the data that just arrived.

:func:`init_group` starts the group and puts each thread the ring backend started under Linux's
``SCHED_IDLE`` policy: it runs when its core has nothing else to run, which is exactly when its rank
waits for the peer, and gives the core up at once to anything that wakes. ``EXO_LAB_RING_THREADS=spin``
leaves them as MLX makes them (the baseline of ``benchmarks/ring_threads.py``). Elsewhere than Linux
(no ``/proc``, no ``SCHED_IDLE``) nothing changes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from exo_lab import defaults

log = logging.getLogger(__name__)


def threads() -> set[int]:
    """The ids of this process's threads (empty where ``/proc`` is not there)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def give_way(tids: set[int]) -> int:
    """Put each of ``tids`` (threads of this process) under ``SCHED_IDLE``; how many it could."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return 0
    done = 0
    for tid in sorted(tids):
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done += 1
        except OSError:  # the thread has ended, or the policy is refused here
            pass
    return done


def init_group(backend: str = "ring", strict: bool = True) -> Any:
    """``mx.distributed.init(backend=backend, strict=strict)``; the ring backend's threads give way (see above)
    unless ``EXO_LAB_RING_THREADS`` says ``spin``."""
    import mlx.core as mx

    mx.eval(mx.zeros((1,)))  # MLX's own threads (the CPU stream's) exist before the snapshot: never touched
    before = threads()
    group = mx.distributed.init(backend=backend, strict=strict)
    if backend == "ring" and defaults.ring_threads() == "idle":
        started = threads() - before
        log.info("ring backend: %d of its %d threads run only on an idle core", give_way(started), len(started))
    return group
