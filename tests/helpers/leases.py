"""Node agents and shard workers for the lease tests: agents as plain processes, launches by hand.

:func:`start_agent` runs one ``exo-lab node`` on loopback with a state dir of the caller's choosing
(so that it can be killed and started again on it); :func:`launch_one_rank` prepares and starts a
one-rank instance through the agent's HTTP API with no coordinator behind it; :func:`worker_processes`
finds an instance's worker processes by their command line, whoever started them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from exo_lab.cluster.http import SignedClient
from exo_lab.cluster.local import agent_command, agent_env, free_port


def start_agent(
    state_dir: Path, key: str, port: int | None = None, name: str = "lease-node"
) -> tuple[subprocess.Popen, str]:
    """An agent on ``127.0.0.1:port`` (a free port by default) that answers already; (process, address).

    It exits with this process; its log is ``<state_dir>/../<name>.log``.
    """
    port = port or free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir.parent / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            agent_command(port, state_dir, name, parent_pid=os.getpid()),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=agent_env(key),
        )
    address = f"127.0.0.1:{port}"
    client = SignedClient(address, key, timeout=2)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}: see {state_dir.parent / f'{name}.log'}")
        try:
            client.json("GET", "/node")
            return proc, address
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def launch_one_rank(
    client: SignedClient, iid: str, model_dir: Path, lease_s: float = 10.0, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Prepare and start instance ``iid``: one rank holding all of ``model_dir``'s layers; the agent's answer."""
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    prepared = client.json(
        "POST",
        f"/instances/{iid}/prepare",
        {
            "ranks": [{"rank": 0, "address": "127.0.0.1"}],
            "reserve_bytes": 1 << 20,
            "owner": owner or {"coordinator": "test", "label": "a lease test", "api": None},
            "info": {"model": str(model_dir), "name": iid},
            "lease_s": lease_s,
        },
    )
    ring = prepared["ranks"]["0"]["ring"]
    common = {
        "instance_id": iid,
        "model_name": model_dir.name,
        "model_path": str(model_dir),
        "num_layers": layers,
        "stages": [[0]],
        "backend": "ring",
        "max_batch": 2,
        "eos_token_ids": [],
    }
    body = {"hostfile": [[ring]], "common": common, "ranks": {"0": {"layers": [0, layers], "dtype": None}}}
    return client.json("POST", f"/instances/{iid}/start", body)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that still runs (a zombie waiting for its parent does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_processes(iid: str) -> list[psutil.Process]:
    """The live shard workers of instance ``iid`` on this machine (found by their command line)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "exo_lab.engine.worker" in cmdline and any(f"/instances/{iid}/" in a for a in cmdline) and alive(proc.pid):
            out.append(proc)
    return out


def instance_pids(client: SignedClient, iid: str) -> list[int]:
    """The worker pids the agent reports for ``iid``."""
    return [r["pid"] for r in client.json("GET", f"/instances/{iid}")["ranks"] if r.get("pid")]
