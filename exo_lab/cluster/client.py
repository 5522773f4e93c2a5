"""The coordinator's view of a cluster: ``exo_lab.discover / connect / local_cluster``.

A :class:`Cluster` talks to node agents over HTTP (signed with the cluster
key when it has one; unsigned reads work on loopback). Connecting to one
agent is enough: the peers it knows are added on :meth:`Cluster.refresh`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from exo_lab.cluster.auth import ENV_KEY, fingerprint, sign_headers
from exo_lab.cluster.coordinators import register as register_coordinator
from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A node could not be reached or refused a request."""


def _normalise(address: str) -> str:
    address = address.removeprefix("http://").rstrip("/")
    return address if ":" in address else f"{address}:52416"


class Cluster:
    """Node agents seen from a coordinator (a notebook kernel or ``exo-lab up``)."""

    def __init__(self, addresses: list[str], cluster_key: str | None = None, *, follow_peers: bool = True,
                 register: bool = True, _processes: list | None = None, _tmpdir: str | None = None) -> None:
        self.follow_peers = follow_peers
        self.cluster_key = cluster_key or os.environ.get(ENV_KEY) or _default_key()
        self._addresses: dict[str, str | None] = {_normalise(a): None for a in addresses}  # address -> node id
        self._processes = _processes or []
        self._tmpdir = _tmpdir
        self._topology = Topology()
        self._contacts: dict[str, str] = {}  # node id -> "host:port"
        self._peers: dict[str, list[dict[str, Any]]] = {}  # node id -> its peer table
        self._lock = threading.RLock()
        self.instances: list = []
        self.refresh()
        # announce this coordinator to the Jupyter server extension (see exo_lab.cluster.coordinators)
        self.registration = register_coordinator(self) if register else None

    # HTTP
    def request(self, address: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        """A JSON request to the agent at ``address``, signed when the cluster key is known."""
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"}
        if self.cluster_key:
            headers.update(sign_headers(self.cluster_key, method, path, data))
        req = urllib.request.Request(f"http://{address}{path}", data=data if method != "GET" else None,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            hint = " (pass cluster_key= or set EXO_LAB_CLUSTER_KEY)" if exc.code == 401 else ""
            raise ClusterError(f"{method} {address}{path}: HTTP {exc.code} {detail}{hint}") from exc
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{method} {address}{path}: {exc}") from exc

    # state
    def refresh(self) -> "Cluster":
        """Re-read every node, its peers and its links (thread-safe: widgets refresh in the background)."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> "Cluster":
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
        for node_id, contact in self._contacts.items():
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
            info = NodeInfo.from_json(self.request(address, "GET", "/node", timeout=5))
            peers = self.request(address, "GET", "/node/peers", timeout=5)["peers"]
            links = [LinkProfile.from_json(x) for x in self.request(address, "GET", "/node/links", timeout=5)["links"]]
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
            list(pool.map(lambda a: self.request(a, "POST", "/node/links/probe", {}, timeout=120),
                          [self._contacts[n.id] for n in self.nodes if n.state == "alive"]))
        self.refresh()
        return self._topology

    def preview(self, model, context: int = 4096, prompt_tokens: int = 512, objective: str = "decode",
                batch: int = 1):
        """Ranked ways to run ``model`` on this cluster (see :func:`exo_lab.placement.plan`)."""
        from exo_lab.placement.preview import preview

        plans = preview(self._topology, model, context, prompt_tokens, batch, objective)
        plans.cluster = self
        for p in [*plans.plans, *plans.infeasible]:
            p._cluster = self
            p.model_ref = str(model)
        return plans

    def launch(self, model, plan=None, name: str | None = None, auto_replace: bool = True, wait: bool = True,
               max_batch: int = 16, max_queue: int = 256):
        """Launch ``model`` with ``plan`` (default: the best plan) and return the :class:`Instance`.

        Up to ``max_batch`` requests decode together on the ranks; ``max_queue`` more wait (beyond
        that the API answers 429).
        """
        from exo_lab.instance import Instance

        if plan is None:
            plans = self.preview(model)
            if not plans.plans:
                raise ClusterError(f"no plan fits {model}: {plans.infeasible[:1]}")
            plan = plans.best
        inst = Instance(self, str(model), plan, name=name, auto_replace=auto_replace, max_batch=max_batch,
                        max_queue=max_queue)
        self.instances.append(inst)
        if wait:
            inst.wait_ready()
        return inst

    def bench(self, plans, pp: int = 512, tg: int = 128, repeat: int = 3, concurrency=(1,), *,
              select: str | int = "all", strategies=None, warmup: int = 1, calibrate: bool = False,
              progress: bool = True, widget=None, launch_timeout: float = 300.0):
        """Launch each of ``plans`` in turn and measure it against its predictions (a :class:`~exo_lab.bench.BenchResult`).

        ``plans``: the result of :meth:`preview`, a list of plans, one plan, or a model (previewed for
        ``pp``); ``select``: ``"all"``, ``"best"`` or how many launchable plans, best first. Prompts are
        exactly ``pp`` tokens after the chat template and generate exactly ``tg`` tokens, ``repeat`` times
        alone and ``repeat`` times at each ``concurrency``. ``calibrate`` fits the cost model's per-node
        factors to the measurements and stores them with the node profiles. See :mod:`exo_lab.bench`.
        """
        from exo_lab.bench import run

        return run(self, plans, pp=pp, tg=tg, repeat=repeat, concurrency=concurrency, select=select,
                   strategies=strategies, warmup=warmup, calibrate=calibrate, progress=progress, widget=widget,
                   launch_timeout=launch_timeout)

    def wait_for(self, nodes: int, links: bool = True, timeout: float = 60.0) -> "Cluster":
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
        if getattr(self, "registration", None) is not None:
            self.registration.close()
        for inst in list(self.instances):
            try:
                inst.delete()
            except Exception as exc:  # noqa: BLE001 - nodes may already be gone
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

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        from exo_lab.cluster.display import nodes_text

        return nodes_text(self._topology)

    def _repr_html_(self) -> str:
        from exo_lab.cluster.display import nodes_html

        return nodes_html(self._topology)


def _default_key() -> str | None:
    from exo_lab.cluster.agent import default_state_dir

    path = default_state_dir() / "cluster.key"
    return path.read_text().strip() if path.exists() else None


def connect(addresses: list[str], cluster_key: str | None = None, follow_peers: bool = True) -> Cluster:
    """A cluster from agent addresses (``host:port``); with ``follow_peers``, their peers are found too."""
    return Cluster(addresses, cluster_key, follow_peers=follow_peers)


def discover(timeout: float = 3.0, cluster_key: str | None = None, follow_peers: bool = True) -> Cluster:
    """Find agents on the local network by mDNS (those with our key's fingerprint)."""
    import socket

    from zeroconf import DNSQuestionType, IPVersion, ServiceBrowser, Zeroconf

    from exo_lab.cluster.discovery import SERVICE_TYPE

    key = cluster_key or os.environ.get(ENV_KEY) or _default_key()
    fp = fingerprint(key) if key else None
    names: set[str] = set()
    zc = Zeroconf(ip_version=IPVersion.V4Only)

    class Listener:
        def add_service(self, zc_: Zeroconf, type_: str, name: str) -> None:
            names.add(name)

        update_service = add_service

        def remove_service(self, zc_: Zeroconf, type_: str, name: str) -> None:
            names.discard(name)

    # multicast questions (QM): answers reach this process even when an agent on the same
    # host holds the mDNS port, which would swallow unicast (QU) answers
    browser = ServiceBrowser(zc, SERVICE_TYPE, Listener(), question_type=DNSQuestionType.QM)
    time.sleep(timeout)
    browser.cancel()
    found: dict[str, str] = {}
    for name in sorted(names):  # resolve after browsing, so a slow answer does not hide the others
        info = zc.get_service_info(SERVICE_TYPE, name, 3000, question_type=DNSQuestionType.QM)
        if info is None:
            continue
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        if fp and props.get("fp") != fp:
            continue
        reachable = _first_reachable(info.parsed_addresses(IPVersion.V4Only), info.port)
        if reachable:
            found[props.get("id", name)] = reachable
    zc.close()
    if not found:
        raise ClusterError(
            f"no exo_lab node answered mDNS within {timeout} s on {socket.gethostname()}: start one with "
            "'exo-lab node', or use exo_lab.connect(['host:port'])"
        )
    return Cluster(sorted(found.values()), key, follow_peers=follow_peers)


def _first_reachable(addresses: list[str], port: int, timeout: float = 0.5) -> str | None:
    """The first ``address:port`` that accepts a TCP connection (a node may list addresses we cannot route to)."""
    import socket

    for address in addresses:
        try:
            with socket.create_connection((address, port), timeout=timeout):
                return f"{address}:{port}"
        except OSError:
            continue
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_cluster(n: int = 2, cluster_key: str | None = None, probe_interval_s: float = 60.0,
                  timeout: float = 90.0, separate_stores: bool = False) -> Cluster:
    """Start ``n`` node agents as processes on loopback (no root needed) and connect to them.

    ``separate_stores`` gives each node a model store of its own (``<tmp>/node-i/models``), as
    separate machines have, so launches fetch shards from peers.
    """
    import secrets

    from exo_lab import _blas

    if n < 1:
        raise ValueError("a cluster needs at least one node")
    key = cluster_key or secrets.token_hex(32)
    tmp = tempfile.mkdtemp(prefix="exo-lab-local-")
    ports = [_free_port() for _ in range(n)]
    env = _blas.child_env()
    procs = []
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "exo_lab.cli", "node", "--host", "127.0.0.1", "--port", str(port),
               "--probe-port", "0", "--name", f"local-{i}", "--state-dir", str(Path(tmp) / f"node-{i}"),
               f"--cluster-key={key}", "--no-mdns", "--probe-interval", str(probe_interval_s),
               "--exit-with-parent", str(os.getpid())]
        for j, other in enumerate(ports):
            if j != i:
                cmd += ["--peer", f"127.0.0.1:{other}"]
        log_file = open(Path(tmp) / f"node-{i}.log", "wb")
        node_env = dict(env)
        if separate_stores:
            node_env["EXO_LAB_MODELS_DIR"] = str(Path(tmp) / f"node-{i}" / "models")
        procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=node_env))
    deadline = time.monotonic() + timeout
    addresses = [f"127.0.0.1:{p}" for p in ports]
    while True:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            logs = (Path(tmp) / f"node-{procs.index(dead[0])}.log").read_text(errors="replace")[-2000:]
            for p in procs:
                p.kill()
            raise ClusterError(f"a local node exited with {dead[0].returncode}:\n{logs}")
        try:
            cluster = Cluster(addresses, key, _processes=procs, _tmpdir=tmp)
            break
        except ClusterError:
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise
            time.sleep(0.2)
    cluster.stores = [Path(tmp) / f"node-{i}" / "models" for i in range(n)] if separate_stores else []
    return cluster.wait_for(n, links=n > 1, timeout=max(1.0, deadline - time.monotonic()))
