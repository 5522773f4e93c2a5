"""MLX's ring backend threads, made to run only on an idle core: two real ranks on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from exo_lab.cluster import ring_threads
from tests.helpers.net import free_port

RANK = r"""
import json, os, sys
import exo_lab  # OpenBLAS before MLX, as a rank
import mlx.core as mx
from exo_lab.cluster.ring_threads import init_group, threads

before = threads()
group = init_group("ring")
x = mx.distributed.all_sum(mx.array([float(group.rank() + 1)] * 4), group=group)
mx.eval(x)
policies = {t: os.sched_getscheduler(t) for t in threads()}
print(json.dumps({
    "sum": x.tolist(),
    "idle": sorted(t for t, p in policies.items() if p == os.SCHED_IDLE),
    "started": sorted(threads() - before),
    "me": os.sched_getscheduler(0),
}))
"""


def _ranks(tmp_path, env: dict[str, str]) -> list[dict]:
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**os.environ, **env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux only")
def test_the_ring_backends_threads_run_only_on_an_idle_core_and_the_ranks_still_sum(tmp_path):
    for rank in _ranks(tmp_path, {}):
        assert rank["sum"] == [3.0] * 4
        assert rank["me"] == os.SCHED_OTHER  # the rank's own threads (compute, MLX's stream) are left alone
        # its socket threads and all-reduce pool (2 + 2 here); not what MLX starts later (a stream for the sum)
        assert len(rank["idle"]) >= 2 and set(rank["idle"]) < set(rank["started"])


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux only")
def test_spin_leaves_them_as_mlx_starts_them(tmp_path):
    for rank in _ranks(tmp_path, {"EXO_LAB_RING_THREADS": "spin"}):
        assert rank["sum"] == [3.0] * 4 and rank["idle"] == [] and len(rank["started"]) >= 2


def test_give_way_skips_threads_that_are_gone():
    assert ring_threads.give_way({2**31 - 1}) == 0  # no such thread: nothing raised
    assert os.getpid() in ring_threads.threads()
