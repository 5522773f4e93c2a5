"""``batch_threads`` (``exo_lab.engine.thread_policy``): every thread of a worker, those running and those it
starts later, under ``SCHED_BATCH``, each keeping its nice value. Run in a child process: the policy is the
process's for good."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from exo_lab import defaults

CHILD = """
import json, os, threading
import mlx.core as mx
from exo_lab.engine.thread_policy import batch_threads
mx.eval(mx.ones(4) + 1)  # MLX's stream thread is running
stop = threading.Event()
before = threading.Thread(target=stop.wait)
before.start()
os.setpriority(os.PRIO_PROCESS, before.native_id, 19)  # as the ring's socket threads (engine/group.py)
count = batch_threads()
after = threading.Thread(target=stop.wait)
after.start()
policies = {t: os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
print(json.dumps({"count": count, "threads": len(policies), "policies": sorted(set(policies.values())),
                  "after": policies[str(after.native_id)], "nice": os.getpriority(os.PRIO_PROCESS, before.native_id)}))
stop.set()
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH") or not os.path.isdir("/proc/self/task"), reason="Linux only")
def test_every_thread_and_every_later_one_is_batch_and_keeps_its_nice_value():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["count"] >= 3  # Python's thread, MLX's stream thread, the one started before
    assert got["policies"] == [os.SCHED_BATCH] and got["after"] == os.SCHED_BATCH
    assert got["nice"] == 19


def test_the_variable_turns_it_off():
    assert defaults.worker_batch({}) and defaults.worker_batch({defaults.WORKER_BATCH: "1"})
    assert not defaults.worker_batch({defaults.WORKER_BATCH: "0"})
