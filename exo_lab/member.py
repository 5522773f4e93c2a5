"""One machine's share of the cluster, as ``exo-lab up`` runs it: node agent, API and dashboard.

A :class:`Member` starts this machine's node agent (a child process that exits with this one),
connects to it as a coordinator (:class:`exo_lab.Cluster`, following the peers the agent finds by
mDNS or ``--peer``), serves the API with a :class:`~exo_lab.control.Control` (instances over HTTP,
models served elsewhere in the cluster forwarded there), and optionally launches a model on the
best plan. Machines that run ``exo-lab up`` with the same cluster key form one cluster, driven
from any of them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_lab import _blas, defaults, paths
from exo_lab.api.errors import ApiError
from exo_lab.api.server import Server, is_loopback
from exo_lab.cluster.auth import load_or_create_key
from exo_lab.cluster.client import ClusterError
from exo_lab.control import Control
from exo_lab.workbench import Cluster

log = logging.getLogger(__name__)

#: ``model`` value that launches the demo model on a lone machine and nothing when peers are there
AUTO = "auto"
PEER_WAIT_S = 3.0  # how long a new member looks for peers before deciding it is alone


@dataclass
class MemberConfig:
    """How to run a member (the options of ``exo-lab up``)."""

    model: str | None = AUTO
    name: str | None = None  # the served model's id
    node_name: str = field(default_factory=socket.gethostname)
    host: str = "127.0.0.1"  # the API's (and dashboard's) address
    port: int = defaults.API_PORT
    api_key: str | None = None
    agent_host: str = "0.0.0.0"
    agent_port: int = defaults.AGENT_PORT
    probe_port: int | None = None
    state_dir: Path | None = None
    cluster_key: str | None = None
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    max_batch: int = 16
    max_queue: int = 256
    verbose: bool = False


class Member:
    """Node agent + coordinator + API (+ dashboard, started by the caller) of one machine."""

    def __init__(self, config: MemberConfig) -> None:
        self.config = config
        self.agent: subprocess.Popen | None = None
        self.cluster: Cluster | None = None
        self.server: Server | None = None
        self.control: Control | None = None
        self.launched: threading.Thread | None = None
        self.launch_error: str | None = None

    # lifecycle
    def start(self) -> Member:
        """Start the agent, connect to it, serve the API; returns once the API listens."""
        c = self.config
        state_dir = c.state_dir or paths.node_state_dir()
        key = load_or_create_key(state_dir, c.cluster_key or defaults.cluster_key())
        self.agent = self._spawn_agent(state_dir, key)
        try:
            self.cluster = self._connect(key)
            api_key = c.api_key or defaults.api_key()
            if api_key is None and not is_loopback(c.host):
                raise ValueError(f"the API on {c.host} is reachable from other machines: pass --api-key")
            self.server = self.cluster.serve(c.host, c.port, api_key)
            self.control = self.cluster.control
            self.cluster.api_url = self.api_url()  # this node's own address when bound to all
            if self.cluster.registration is not None:  # the JupyterLab panel finds this API
                self.cluster.registration.update(api_url=self.cluster.api_url, kind="exo-lab up")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_agent(self, state_dir: Path, key: str) -> subprocess.Popen:
        c = self.config
        argv = [sys.executable, "-m", "exo_lab.cli", "node", "--name", c.node_name, "--host", c.agent_host]
        argv += ["--port", str(c.agent_port), "--state-dir", str(state_dir), "--exit-with-parent", str(os.getpid())]
        if c.probe_port is not None:
            argv += ["--probe-port", str(c.probe_port)]
        for peer in c.peers:
            argv += ["--peer", peer]
        if not c.mdns:
            argv.append("--no-mdns")
        env = _blas.child_env()
        env[defaults.CLUSTER_KEY] = key  # not on the command line, where every local user could read it
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)

    def _connect(self, key: str, timeout: float = 120.0) -> Cluster:
        """The coordinator's view, once the agent answers (it measures this machine on its first start)."""
        address = f"127.0.0.1:{self.config.agent_port}"
        deadline = time.monotonic() + timeout
        while True:
            assert self.agent is not None
            if self.agent.poll() is not None:
                raise ClusterError(f"the node agent exited with code {self.agent.returncode} (see its messages above)")
            try:
                return Cluster.connect([address], key)
            except ClusterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def api_url(self) -> str:
        """How other members reach this API: its address, or this node's first address when bound to all."""
        assert self.server is not None and self.cluster is not None
        if self.config.host not in ("0.0.0.0", "", "::"):
            return self.server.url
        me = self.agent_node()
        host = me.addresses[0] if me is not None and me.addresses else "127.0.0.1"
        return f"http://{host}:{self.server.port}"

    def agent_node(self) -> Any:
        assert self.cluster is not None
        address = f"127.0.0.1:{self.config.agent_port}"
        node_id = next((n for a, n in self.cluster._addresses.items() if a == address), None)
        return self.cluster.topology.nodes.get(node_id) if node_id else None

    def stop(self) -> None:
        """Stop our instances, the API and the agent."""
        if self.cluster is not None:
            self.cluster.close()  # stops the API and deletes the instances this member launched
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()

    # the model
    def launch_model(self, on_done: Any = None) -> None:
        """Launch the configured model (``auto``: the demo model, when no peer shows up) on a thread."""

        def run() -> None:
            try:
                model = self._model_to_launch()
                if model is None:
                    return
                assert self.control is not None
                print(f"launching {model} on the best plan ...", flush=True)
                inst = self.control.launch(model, name=self.config.name)
                inst.wait_ready(progress=False, timeout=600)
                print(f"{inst.name} is ready: {inst.plan.describe()}", flush=True)
            except (ApiError, ClusterError, RuntimeError, TimeoutError, OSError) as exc:
                self.launch_error = str(exc)
                print(f"exo-lab: could not launch the model: {exc}", file=sys.stderr, flush=True)
            finally:
                if on_done is not None:
                    on_done()

        self.launched = threading.Thread(target=run, name="exo-lab-up-launch", daemon=True)
        self.launched.start()

    def _model_to_launch(self) -> str | None:
        model = self.config.model
        assert self.cluster is not None and self.control is not None
        if model is None:
            return None
        if model == AUTO:
            deadline = time.monotonic() + PEER_WAIT_S
            while time.monotonic() < deadline and len(self.cluster.topology.alive()) < 2:
                time.sleep(0.3)
                self.cluster.refresh()
            if len(self.cluster.topology.alive()) > 1:
                print("other members are up: launch a model from any of them (POST /instance)", flush=True)
                return None
            model = "demo"
        served = self.config.name or model
        existing = [i for i in self.control.instances() if i["name"] == served and i["state"] != "failed"]
        if existing:
            print(f"{served} is already served by {existing[0]['owner'].get('label')}", flush=True)
            return None
        return model
