"""The coordinator's view of the node agents: their nodes, peers and links, read over HTTP.

A :class:`ClusterClient` talks to node agents with a :class:`~exo_lab.cluster.http.SignedClient`
(signed with the cluster key when it has one; unsigned reads work on loopback). Connecting to
one agent is enough: the peers it knows are added on :meth:`ClusterClient.refresh`. The
workbench :class:`exo_lab.Cluster` (previews, launches, benches) builds on it; the Jupyter
server extension uses it directly.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from exo_lab import defaults, paths
from exo_lab.cluster import display, local
from exo_lab.cluster.auth import check_key, fingerprint
from exo_lab.cluster.coordinators import register as register_coordinator
from exo_lab.cluster.discovery import browse
from exo_lab.cluster.http import RequestError, SignedClient
from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A node could not be reached or refused a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  #: the HTTP status the node answered, None when there was no answer


def _normalise(address: str) -> str:
    address = address.removeprefix("http://").rstrip("/")
    return address if ":" in address else f"{address}:{defaults.AGENT_PORT}"


class ClusterClient:
    """Node agents seen from a coordinator (a notebook kernel, ``exo-lab up``, the Jupyter server)."""

    stores: list[Path]  # set only by :meth:`local`: each node's model store (empty unless ``separate_stores``)

    def __init__(
        self,
        addresses: list[str],
        cluster_key: str | None = None,
        *,
        follow_peers: bool = True,
        register: bool = True,
        _processes: list | None = None,
        _tmpdir: str | None = None,
    ) -> None:
        self.follow_peers = follow_peers
        key = cluster_key or defaults.cluster_key() or _default_key()
        self.cluster_key = check_key(key) if key is not None else None
        self._addresses: dict[str, str | None] = {_normalise(a): None for a in addresses}  # address -> node id
        self._processes = _processes or []
        self._tmpdir = _tmpdir
        self._topology = Topology()
        self._contacts: dict[str, str] = {}  # node id -> "host:port"
        self._peers: dict[str, list[dict[str, Any]]] = {}  # node id -> its peer table
        self._lock = threading.RLock()
        self.instances: list = []  # what this coordinator launched (the workbench Cluster adds them)
        #: the URL of the API serving this coordinator's instances, set by whoever serves it (told to the agents)
        self.api_url: str | None = None
        self._owner_id = uuid.uuid4().hex[:12]  # who launched an instance, when this coordinator is not registered
        self.refresh()
        # announce this coordinator to the Jupyter server extension (see exo_lab.cluster.coordinators)
        self.registration = register_coordinator(self) if register else None

    # HTTP
    def request(
        self,
        address: str,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 30.0,
        *,
        node: str | None = None,
        bind: bool = True,
    ) -> Any:
        """A JSON request to the agent at ``address``, signed when the cluster key is known, and for the node
        ``node`` (default, with ``bind``: the node a refresh last read there), which refuses it otherwise."""
        if node is None and bind:
            node = self._node_at(address)
        try:
            return SignedClient(address, self.cluster_key, timeout, node=node).json(method, path, body)
        except RequestError as exc:
            hint = f" (pass cluster_key= or set {defaults.CLUSTER_KEY})" if exc.status == 401 else ""
            raise ClusterError(f"{exc}{hint}", exc.status) from exc
        except ValueError as exc:  # not host:port
            raise ClusterError(f"{method} {address}{path}: {exc}") from exc

    def _node_at(self, address: str) -> str | None:
        """The id of the node last read at ``address`` (None: not read yet)."""
        address = _normalise(address)  # no lock: refresh holds it while its threads make requests
        return self._addresses.get(address) or next((n for n, a in list(self._contacts.items()) if a == address), None)

    def owner(self) -> dict[str, Any]:
        """Who this coordinator is, as the agents keep it with each instance it launches.

        ``{"coordinator": <registration id, or a uuid>, "label": <registration label, or "python pid N">,
        "api": api_url}``.
        """
        registration = getattr(self, "registration", None)
        if registration is not None:
            return {"coordinator": registration.info.id, "label": registration.info.label, "api": self.api_url}
        return {"coordinator": self._owner_id, "label": f"python pid {os.getpid()}", "api": self.api_url}

    # state
    def refresh(self) -> Self:
        """Re-read every node, its peers and its links (thread-safe: widgets refresh in the background)."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> Self:
        nodes: dict[str, NodeInfo] = {}
        links: list[LinkProfile] = []
        pending = list(self._addresses)
        seen: set[str] = set()
        with ThreadPoolExecutor(8) as pool:
            while pending:
                batch = [a for a in pending if a not in seen]
                seen.update(batch)
                peers_seen: list[dict[str, Any]] = []
                for address, result in zip(batch, pool.map(self._read_agent, batch)):
                    if isinstance(result, ClusterError):
                        log.debug("%s", result)
                        continue
                    info, peers, node_links = result
                    self._peers[info.id] = peers
                    self._addresses[address] = info.id
                    self._contacts[info.id] = address
                    nodes[info.id] = info
                    links += node_links
                    peers_seen += peers
                # follow peers only after the whole batch, and only to nodes never reached before:
                # a node we already know keeps the address we reach it on (a relay, a tunnel, ...)
                pending = []
                for p in peers_seen:
                    if p["id"] in nodes or p["id"] in self._contacts:
                        if p["id"] not in nodes and p.get("state") == "gone":
                            nodes.setdefault(p["id"], NodeInfo.from_json({**p, "state": "gone"}))
                        continue
                    if self.follow_peers and p.get("contact") and p.get("state") == "alive":
                        pending.append(p["contact"])
        for node_id, _contact in self._contacts.items():
            if node_id not in nodes:
                old = self._topology.nodes.get(node_id)
                if old is not None:
                    old.state = "gone"
                    nodes[node_id] = old
        if not nodes:
            raise ClusterError(f"no node agent answered at {', '.join(self._addresses) or '(no addresses)'}")
        self._topology = Topology(nodes, links)
        self._topology._source = self  # so that displaying it in a notebook shows the live graph
        return self

    def _read_agent(self, address: str):
        try:
            # who is at this address is what this read finds out: /node is not bound to the node seen before
            info = NodeInfo.from_json(self.request(address, "GET", "/node", timeout=5, bind=False))
            peers = self.request(address, "GET", "/node/peers", timeout=5, node=info.id)["peers"]
            got = self.request(address, "GET", "/node/links", timeout=5, node=info.id)
            links = [LinkProfile.from_json(x) for x in got["links"]]
            return info, peers, links
        except ClusterError as exc:
            return exc

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def nodes(self) -> list[NodeInfo]:
        return sorted(self._topology.nodes.values(), key=lambda n: n.name)

    def node(self, name_or_id: str) -> NodeInfo:
        for n in self._topology.nodes.values():
            if name_or_id in (n.id, n.name):
                return n
        raise KeyError(f"no node {name_or_id!r}; nodes: {', '.join(n.name for n in self.nodes)}")

    def address_of(self, node_id: str) -> str:
        return self._contacts[node_id]

    def probe_links(self) -> Topology:
        """Ask every live node to measure its links now, then refresh."""
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda a: self.request(a, "POST", "/node/links/probe", {}, timeout=120),
                    [self._contacts[n.id] for n in self.nodes if n.state == "alive"],
                )
            )
        self.refresh()
        return self._topology

    def wait_for(self, nodes: int, links: bool = True, timeout: float = 60.0) -> Self:
        """Poll until ``nodes`` nodes are alive, each sees the others, and (optionally) has measured its links."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            alive = [n.id for n in self._topology.alive()]
            ok = len(alive) >= nodes and all(
                len([p for p in self._peers.get(a, []) if p.get("state") == "alive"]) >= nodes - 1 for a in alive
            )
            if ok and links:
                measured = {(link.src, link.dst) for link in self._topology.links if link.ok}
                ok = all((a, b) in measured for a in alive for b in alive if a != b)
            if ok:
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster has {len(alive)}/{nodes} nodes alive after {timeout:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        """Delete this coordinator's instances; stop the agents it started (local clusters)."""
        registration = getattr(self, "registration", None)  # absent when __init__ failed before it
        if registration is not None:
            registration.close()
        for inst in list(self.instances):
            try:
                inst.delete()
            except Exception as exc:
                log.debug("deleting %s: %s", inst, exc)
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._processes.clear()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return display.nodes_text(self._topology)

    def _repr_html_(self) -> str:
        return display.nodes_html(self._topology)

    # ways to make one
    @classmethod
    def connect(cls, addresses: list[str], cluster_key: str | None = None, follow_peers: bool = True) -> Self:
        """A cluster from agent addresses (``host:port``); with ``follow_peers``, their peers are found too."""
        return cls(addresses, cluster_key, follow_peers=follow_peers)

    @classmethod
    def discover(cls, timeout: float = 3.0, cluster_key: str | None = None, follow_peers: bool = True) -> Self:
        """Find agents on the local network by mDNS (those with our key's fingerprint)."""
        key = cluster_key or defaults.cluster_key() or _default_key()
        key = check_key(key) if key else None
        found = browse(timeout, fingerprint(key) if key else None)
        if not found:
            raise ClusterError(
                f"no exo_lab node answered mDNS within {timeout} s on {socket.gethostname()}: start one with "
                "'exo-lab node', or use exo_lab.connect(['host:port'])"
            )
        return cls(found, key, follow_peers=follow_peers)

    @classmethod
    def start_local(
        cls,
        n: int = 2,
        cluster_key: str | None = None,
        probe_interval_s: float = 60.0,
        timeout: float = 90.0,
        separate_stores: bool = False,
    ) -> Self:
        """Start ``n`` node agents as processes on loopback (no root needed) and connect to them.

        ``separate_stores`` gives each node a model store of its own (``<tmp>/node-i/models``), as
        separate machines have, so launches fetch shards from peers.
        """
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        key = check_key(cluster_key) if cluster_key else secrets.token_hex(32)
        agents = local.start_agents(n, key, probe_interval_s, separate_stores)
        deadline = time.monotonic() + timeout
        while True:
            problem = agents.exited()
            if problem:
                agents.kill()
                raise ClusterError(problem)
            try:
                cluster = cls(agents.addresses, key, _processes=agents.processes, _tmpdir=str(agents.tmpdir))
                break
            except ClusterError:
                if time.monotonic() > deadline:
                    agents.kill()
                    raise
                time.sleep(0.2)
        cluster.stores = agents.stores
        return cluster.wait_for(n, links=n > 1, timeout=max(1.0, deadline - time.monotonic()))


def _default_key() -> str | None:
    path = paths.node_state_dir() / "cluster.key"
    return path.read_text().strip() if path.exists() else None
