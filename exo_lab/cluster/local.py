"""Node agents as processes on loopback (``exo_lab.local_cluster``): no root, no network needed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from exo_lab import _blas, defaults
from exo_lab.cluster.ports import free_port


@dataclass
class LocalAgents:
    """``n`` agent processes, their addresses, and the directory holding their state and logs."""

    processes: list[subprocess.Popen]
    addresses: list[str]
    tmpdir: Path
    stores: list[Path] = field(default_factory=list)  # each node's model store (with separate stores)

    def exited(self) -> str | None:
        """What went wrong when an agent has exited already (the end of its log), else None."""
        dead = [p for p in self.processes if p.poll() is not None]
        if not dead:
            return None
        i = self.processes.index(dead[0])
        logs = (self.tmpdir / f"node-{i}.log").read_text(errors="replace")[-2000:]
        return f"a local node exited with {dead[0].returncode}:\n{logs}"

    def kill(self) -> None:
        for p in self.processes:
            p.kill()


def agent_command(
    port: int,
    state_dir: Path,
    name: str,
    peers: list[str] | None = None,
    probe_interval_s: float = 60.0,
    parent_pid: int | None = None,
) -> list[str]:
    """The command line of one loopback agent (``exo-lab node``) with its own state dir and no mDNS.

    It holds no key: a command line is visible to every user of the machine; start it with
    :func:`agent_env`'s environment.
    """
    cmd = [
        sys.executable,
        "-m",
        "exo_lab.cli",
        "node",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--probe-port",
        "0",
        "--name",
        name,
        "--state-dir",
        str(state_dir),
        "--no-mdns",
        "--probe-interval",
        str(probe_interval_s),
    ]
    if parent_pid is not None:
        cmd += ["--exit-with-parent", str(parent_pid)]
    for peer in peers or []:
        cmd += ["--peer", peer]
    return cmd


def agent_env(key: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an agent process: ``env`` (default: :func:`exo_lab._blas.child_env`) with the cluster key."""
    out = dict(env if env is not None else _blas.child_env())
    out[defaults.CLUSTER_KEY] = key
    return out


def start_agents(n: int, key: str, probe_interval_s: float = 60.0, separate_stores: bool = False) -> LocalAgents:
    """Start ``n`` agents on loopback ports, each knowing the others (they exit with this process)."""
    tmp = Path(tempfile.mkdtemp(prefix="exo-lab-local-"))
    ports = [free_port() for _ in range(n)]
    env = agent_env(key)
    procs = []
    for i, port in enumerate(ports):
        peers = [f"127.0.0.1:{other}" for j, other in enumerate(ports) if j != i]
        cmd = agent_command(port, tmp / f"node-{i}", f"local-{i}", peers, probe_interval_s, os.getpid())
        log_file = open(tmp / f"node-{i}.log", "wb")  # noqa: SIM115 - the child writes it for its whole life
        node_env = dict(env)
        if separate_stores:
            node_env[defaults.MODELS_DIR] = str(tmp / f"node-{i}" / "models")
        procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=node_env))
    stores = [tmp / f"node-{i}" / "models" for i in range(n)] if separate_stores else []
    return LocalAgents(procs, [f"127.0.0.1:{p}" for p in ports], tmp, stores)
