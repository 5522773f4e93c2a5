"""A rank's group (``exo_lab.engine.group``): two real processes form an MLX ring on loopback; the socket threads
the ring started run at the lowest priority, the rank's own threads keep theirs, and collectives still work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.net import free_port

pytestmark = pytest.mark.slow

RANK = """
import json, os, threading
import exo_lab
import mlx.core as mx
from exo_lab.engine.group import form_group
tasks = lambda: {int(t) for t in os.listdir("/proc/self/task")}
before = tasks()
group = form_group("ring")
started = tasks() - before - {t.native_id for t in threading.enumerate()}
total = mx.distributed.all_sum(mx.array([group.rank() + 1.0]), group=group).item()
print(json.dumps({
    "started": [os.getpriority(os.PRIO_PROCESS, t) for t in started],
    "main": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
    "sum": total,
}))
"""


def test_ring_socket_threads_yield_to_the_ranks_work(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outs = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out in outs:
        assert out["started"] and set(out["started"]) == {19}, out  # the ring's socket threads
        assert out["main"] == os.getpriority(os.PRIO_PROCESS, 0), out  # the rank's own: as started
        assert out["sum"] == 3.0
