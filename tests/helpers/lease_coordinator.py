"""A coordinator to be killed: launch the demo model as a 2-node pipeline on given agents, print, wait.

``python lease_coordinator.py KEY ADDRESS ADDRESS``: prints one JSON line ``{"id", "pids", "owner"}``
once the instance is ready (``pids``: node id -> worker pids), then waits for ever.
"""

from __future__ import annotations

import json
import sys
import threading

import exo_lab  # noqa: F401  (first: it sets up BLAS before MLX loads)
from exo_lab.workbench import Cluster


def main(key: str, addresses: list[str]) -> None:
    cluster = Cluster(addresses, key, register=False)
    cluster.wait_for(len(addresses), links=False, timeout=60)
    plans = cluster.preview("demo", context=2048, prompt_tokens=64)
    plan = next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)
    inst = cluster.launch("demo", plan=plan)
    print(json.dumps({"id": inst.id, "pids": inst.pids(), "owner": cluster.owner()}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
