"""The node agent (``exo-lab node``): one per machine.

It reports its profile, finds peers (mDNS and manual ``--peer``), checks they
are alive, measures every link to them, and runs the shard workers of the
instances coordinators launch on it (:mod:`exo_lab.cluster.workers`).
Links are measured when a peer appears, on request, and again once a measurement is
``probe_interval_s`` old, but not while this node or the peer serves requests: a probe's
transfers would take the link and the CPU from the instance's collectives, and disturb what it
measures. A serving node starts no scheduled probe and answers probes with "busy" (a probe
under way stops at its next exchange); the link keeps its last measurement and is measured
again once both nodes have been quiet for :data:`exo_lab.cluster.workers.SERVING_QUIET_S`.
HTTP API (tornado, JSON):

- ``GET /node``: id, name, addresses, ports, profile (memory read live);
- ``GET /node/links``: latest measurement of every link to every peer;
- ``GET /node/peers``: peers with their state (``alive`` / ``gone``);
- ``GET /node/memory``: this process's RSS and the size of every table it keeps (all bounded: see
  :meth:`NodeAgent.tables`);
- ``POST /node/hello``: the peer handshake (signed; the answer proves the key);
- ``POST /node/links/probe``: measure all links now (signed);
- ``POST /node/peers``: ``{"address": "host:port"}`` adds a manual peer (signed);
- ``POST /node/calibration``: ``{"calibration": {...}}`` stores the cost model's fitted
  constants with this node's cached profile, reported from then on in ``/node`` (signed);
- ``GET /models``: the models in this node's store; ``GET /models/{name}``: its files (signed);
  ``GET /models/{name}/files/{file}``: byte ranges (signed); ``POST /models/{name}/checksums`` (signed);
- ``GET /instances``: this node's instances (ranks, pids, reservations, owner, info, lease, last
  status) and ``reserved_bytes``; ``GET /instances/{id}``: one (with its ranks' log tails once failed);
- ``POST /instances/{id}/prepare``: ``{"ranks": [{"rank", "address"}], "reserve_bytes", "owner":
  {"coordinator", "label", "api"}, "info": {...}, "lease_s": 10}`` reserves memory and ports, and
  starts the instance's lease (signed);
- ``POST /instances/{id}/start``: ``{"hostfile", "common", "ranks", "sources"?}`` spawns the workers (signed);
- ``POST /instances/{id}/lease``: ``{"status": {...}, "owner"?: {...}}`` renews the lease and keeps the
  status; 404 when the instance is unknown (deleted, or its lease ran out) (signed);
- ``DELETE /instances/{id}``: stop its workers, free its reservation (signed).

The agent's memory stays flat over days: every table it keeps is bounded (nonces by their window and a cap,
manual peers by :data:`MAX_MANUAL_PEERS`, peers gone for :data:`FORGET_GONE_S` are forgotten with their links,
instances by their leases), and every :data:`HOUSEKEEPING_S` it prunes them and gives the allocator's free
pages back to the system (:mod:`exo_lab.cluster.memory`).

An instance whose lease is not renewed within ``lease_s`` is stopped and its memory freed: a
coordinator that dies leaves nothing behind. Workers exit when their agent dies, and an agent
started on a state dir first kills the workers a previous one left there.

Read-only endpoints answer unsigned requests only from loopback; everything
else needs the cluster key's signature (see :mod:`exo_lab.cluster.auth`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tornado.web
from filelock import FileLock
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer

from exo_lab import __version__, defaults, paths
from exo_lab.cluster.auth import (
    HEADER_NONCE,
    HEADER_RESPONSE_SIG,
    HEADER_SIG,
    Verifier,
    fingerprint,
    header_problem,
    load_or_create_key,
    response_is_authentic,
    sign_headers,
)
from exo_lab.cluster.discovery import Advert, Discovery
from exo_lab.cluster.fetch import is_plain_name, range_checksums
from exo_lab.cluster.links import ProbeDeferred, ProbeServer, probe_link
from exo_lab.cluster.machine import memory_now
from exo_lab.cluster.memory import release_free_memory
from exo_lab.cluster.serving import MIB, GuardedHTTPServer
from exo_lab.cluster.signed_handler import SignedHandler
from exo_lab.cluster.topology import LinkProfile, NodeInfo
from exo_lab.cluster.workers import (
    DEFAULT_LEASE_S,
    ReservationError,
    WorkerManager,
    check_lease_s,
    check_owner,
    check_reserve_bytes,
)
from exo_lab.models.store import is_model_dir
from exo_lab.paths import models_dir

log = logging.getLogger(__name__)

DEFAULT_NODE_PORT = defaults.AGENT_PORT


def default_state_dir() -> Path:
    """Where a node agent keeps its id, key and profile (:func:`exo_lab.paths.node_state_dir`)."""
    return paths.node_state_dir()


def load_or_create_id(state_dir: Path) -> str:
    """The node's stable id, made once and kept in the state dir."""
    path = state_dir / "node_id"
    paths.private_dir(state_dir)  # it holds the cluster key and the instances' rank configs
    if path.exists():
        return path.read_text().strip()
    node_id = uuid.uuid4().hex[:12]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    tmp.replace(path)
    return node_id


def local_addresses(host: str) -> list[str]:
    """IPv4 addresses peers can reach this node on."""
    if host not in ("0.0.0.0", ""):
        return [host]
    out = []
    stats = psutil.net_if_stats()
    for ifname, addrs in sorted(psutil.net_if_addrs().items()):
        if ifname in stats and not stats[ifname].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                out.append(a.address)
    return out or ["127.0.0.1"]


def proof(key: str, challenge: str, node_id: str) -> str:
    """What a node answers to a hello's challenge to show it holds the key."""
    return hmac.new(key.encode(), f"hello\n{challenge}\n{node_id}".encode(), hashlib.sha256).hexdigest()


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


#: manual peer addresses kept at most (``--peer`` and ``POST /node/peers``; each is contacted every liveness round)
MAX_MANUAL_PEERS = 64
#: seconds after which a peer that is gone is forgotten, with its links
FORGET_GONE_S = 3600.0
#: seconds between two rounds of housekeeping (pruning tables, returning free memory to the system)
HOUSEKEEPING_S = 60.0
#: seconds between two looks for links due to be measured again
PROBE_CHECK_S = 2.0


@dataclass
class Peer:
    """A peer agent as this node tracks it."""

    info: NodeInfo
    source: str
    last_seen: float = 0.0
    joined_at: float = 0.0
    contact: str | None = None  # "host:port" that answered last

    def to_json(self) -> dict[str, Any]:
        return {**self.info.to_json(), "source": self.source, "last_seen": self.last_seen, "contact": self.contact}


@dataclass
class AgentConfig:
    """How to run a node agent."""

    name: str = field(default_factory=socket.gethostname)
    host: str = "0.0.0.0"
    port: int = DEFAULT_NODE_PORT
    probe_port: int | None = None  # default: port + 1
    state_dir: Path = field(default_factory=default_state_dir)
    cluster_key: str | None = None
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    probe_interval_s: float = 60.0
    liveness_interval_s: float = 1.5
    gone_after_s: float = 6.0
    probe_samples: int = 50
    probe_bytes: int = 4 << 20
    #: measure links on schedule and answer probes even while this node serves requests
    probe_while_serving: bool = False
    refresh_profile: bool = False
    parent_pid: int | None = None  # exit when this process is gone (agents of a local cluster)


class NodeAgent:
    """A running node agent on the current event loop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.key = load_or_create_key(config.state_dir, config.cluster_key)
        self.id = load_or_create_id(config.state_dir)
        self.verifier = Verifier(self.key, node_id=self.id)
        self.fingerprint = fingerprint(self.key)
        self.addresses = local_addresses(config.host)
        self.port = config.port
        self.probe_port = config.probe_port if config.probe_port is not None else config.port + 1
        self.profile: dict[str, Any] = {}
        self.peers: dict[str, Peer] = {}
        self.manual: dict[str, str | None] = {a: None for a in config.peers}  # address -> node id
        self.links: dict[tuple[str, str], LinkProfile] = {}
        self.started_at = time.time()
        self._http: HTTPServer | None = None
        #: whether an instance on this node serves requests (set on the event loop, read by probe threads)
        self.serving = False
        self._probe_server = ProbeServer(self.verifier, busy=lambda: self.serving)
        self._discovery: Discovery | None = None
        self._tasks: list[asyncio.Task] = []
        self._probe_lock = asyncio.Lock()
        self._cancel_probes = threading.Event()
        self._probed_at: dict[str, float] = {}  # peer id -> time.time() of its last complete probe
        self._client = AsyncHTTPClient(force_instance=True)
        self.stopped = asyncio.Event()
        self.workers = WorkerManager(config.state_dir, self.key, config.host)
        self.workers.clean_leftovers()

    # lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        profile = await loop.run_in_executor(None, self._measure_profile)
        self.profile = profile.to_json()
        # peers send small JSON bodies: 1 MiB is plenty (tornado's Configurable.__new__ makes this Any)
        http: HTTPServer = GuardedHTTPServer(self._app(), max_body_bytes=MIB, per_address=64)
        self._http = http
        http.listen(self.port, self.config.host)
        self.port = next(iter(http._sockets.values())).getsockname()[1]
        self.probe_port = await self._probe_server.start(self.config.host, self.probe_port)
        if self.config.mdns:
            self._discovery = Discovery(
                self.id,
                self.config.name,
                self.addresses,
                self.port,
                self.probe_port,
                self.fingerprint,
                self._on_advert,
                self._on_lost,
            )
            try:
                await self._discovery.start()
            except OSError as exc:
                log.warning("mDNS unavailable (%s); use --peer host:port", exc)
                self._discovery = None
        self._tasks = [
            asyncio.ensure_future(self._liveness_loop()),
            asyncio.ensure_future(self._probe_loop()),
            asyncio.ensure_future(self._worker_loop()),
        ]
        log.info(
            "node %s (%s) on %s:%d, probes on %d, addresses %s",
            self.id,
            self.config.name,
            self.config.host,
            self.port,
            self.probe_port,
            self.addresses,
        )

    def _measure_profile(self):
        """The cached device profile; one agent of a host measures, the others wait for it."""
        from exo_lab.cluster.profile import load_or_measure  # MLX: only to measure, once per machine

        paths.cache_dir().mkdir(parents=True, exist_ok=True)
        with FileLock(str(paths.cache_dir() / "profiles.lock")):
            return load_or_measure(refresh=self.config.refresh_profile)

    async def _worker_loop(self) -> None:
        """Notice workers that died; stop the instances whose lease ran out (in a thread: it waits for exits);
        every :data:`HOUSEKEEPING_S`, :meth:`housekeeping`."""
        loop = asyncio.get_running_loop()
        housekept = time.monotonic()
        while True:
            try:
                self.workers.poll()
                self.note_serving()
                for inst in self.workers.expire():
                    loop.run_in_executor(None, self.workers.terminate, inst)
                if time.monotonic() - housekept >= HOUSEKEEPING_S:
                    housekept = time.monotonic()
                    self.housekeeping()
            except Exception:  # keep watching; report why now
                log.exception("watching the workers failed")
            await asyncio.sleep(0.5)

    def housekeeping(self) -> None:
        """Forget peers gone for :data:`FORGET_GONE_S` and links to peers or addresses no longer known, drop
        spent nonces, and give the allocator's free pages back to the system."""
        now = time.time()
        for pid, peer in list(self.peers.items()):
            if peer.info.state == "gone" and now - peer.last_seen > FORGET_GONE_S:
                log.info("forgetting peer %s (%s): gone for %.0f s", pid, peer.info.name, now - peer.last_seen)
                del self.peers[pid]
        for pid, address in list(self.links):
            peer = self.peers.get(pid)
            if peer is None or address not in peer.info.addresses:
                del self.links[(pid, address)]
        self.verifier.prune()
        release_free_memory()

    def tables(self) -> dict[str, int]:
        """How many entries each table of this agent holds (``GET /node/memory``)."""
        return {
            "nonces": self.verifier.remembered,
            "peers": len(self.peers),
            "manual_peers": len(self.manual),
            "links": len(self.links),
            "instances": len(self.workers.instances),
        }

    def add_manual(self, address: str) -> bool:
        """Remember ``address`` as a manual peer; False when :data:`MAX_MANUAL_PEERS` are kept already."""
        if address not in self.manual and len(self.manual) >= MAX_MANUAL_PEERS:
            return False
        self.manual.setdefault(address, None)
        return True

    async def stop(self) -> None:
        self._cancel_probes.set()
        for t in self._tasks:
            t.cancel()
        self.workers.stop_all()
        if self._discovery is not None:
            await self._discovery.stop()
        if self._http is not None:
            self._http.stop()
        await self._probe_server.stop()
        self._client.close()
        self.stopped.set()

    # views
    def node_info(self) -> NodeInfo:
        total, available = memory_now()
        profile = {**self.profile, "memory_total_bytes": total, "memory_available_bytes": available}
        return NodeInfo(
            self.id,
            self.config.name,
            self.addresses,
            self.port,
            self.probe_port,
            "alive",
            profile,
            __version__,
            sorted(_local_models()),
        )

    def links_json(self) -> list[dict[str, Any]]:
        return [link.to_json() for _, link in sorted(self.links.items())]

    # peers
    async def _fetch_node(self, address: str, expected_id: str | None = None) -> NodeInfo:
        """Mutually authenticated hello: the peer checks our signature (made for ``expected_id`` when we know
        whom we call), we check its signed answer and its proof."""
        path = "/node/hello"
        challenge = secrets.token_hex(16)
        body = json.dumps({"id": self.id, "challenge": challenge}).encode()
        headers = sign_headers(self.key, "POST", path, body, target=expected_id, source=self.id)
        req = HTTPRequest(
            f"http://{address}{path}",
            method="POST",
            body=body,
            headers=headers,
            request_timeout=2.0,
            connect_timeout=2.0,
        )
        resp = await self._client.fetch(req)
        if not response_is_authentic(
            self.key, headers[HEADER_NONCE], resp.code, resp.body, resp.headers.get(HEADER_RESPONSE_SIG)
        ):
            raise ValueError(f"{address} answered the hello without a valid signature")
        data = json.loads(resp.body)
        info = NodeInfo.from_json(data["node"])
        if not hmac.compare_digest(data.get("proof", ""), proof(self.key, challenge, info.id)):
            raise ValueError(f"{address} could not prove it holds the cluster key")
        return info

    async def _contact(self, addresses: list[str], source: str, expected_id: str | None = None) -> Peer | None:
        for address in addresses:
            try:
                info = await self._fetch_node(address, expected_id)
            except HTTPClientError as exc:
                body = exc.response.body if exc.response is not None else b""
                if exc.code == 401 and b"signed for another node" in (body or b""):
                    log.debug("%s is no longer node %s", address, expected_id)  # another node answers there now
                elif exc.code == 401:
                    log.warning("peer %s refused our signature: it has another cluster key; not joining", address)
                continue
            except (TimeoutError, OSError, ValueError):
                continue
            if info.id == self.id or (expected_id and info.id != expected_id):
                continue
            now = time.time()
            peer = self.peers.get(info.id)
            if peer is None or peer.info.state == "gone":
                log.info(
                    "peer %s (%s) %s via %s", info.id, info.name, "joined" if peer is None else "re-joined", address
                )
                peer = Peer(info, source, now, now, address)
                self.peers[info.id] = peer
                asyncio.ensure_future(self.probe_peer(info.id))
            else:
                peer.info = info
            peer.last_seen = now
            peer.contact = address
            return peer
        return None

    async def _on_advert(self, advert: Advert) -> None:
        addrs = [f"{a}:{advert.port}" for a in advert.addresses]
        known = self.peers.get(advert.id)
        if known is not None and known.contact:
            addrs.insert(0, known.contact)
        await self._contact(addrs, "mdns", advert.id)

    async def _on_lost(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if (
            peer
            and peer.info.state == "alive"
            and not await self._contact(self._peer_addrs(peer), peer.source, peer_id)
        ):
            self._mark_gone(peer)

    def _peer_addrs(self, peer: Peer) -> list[str]:
        addrs = [peer.contact] if peer.contact else []
        addrs += [f"{a}:{peer.info.port}" for a in peer.info.addresses if f"{a}:{peer.info.port}" != peer.contact]
        return addrs

    def _mark_gone(self, peer: Peer) -> None:
        if peer.info.state != "gone":
            log.info("peer %s (%s) is gone", peer.info.id, peer.info.name)
        peer.info.state = "gone"

    async def _liveness_loop(self) -> None:
        while True:
            if self.config.parent_pid and not psutil.pid_exists(self.config.parent_pid):
                log.warning("the process that started this node (%d) is gone; stopping", self.config.parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
            checks = [self._check_manual(a) for a in self.manual]
            checks += [self._check_peer(p) for p in list(self.peers.values())]
            await asyncio.gather(*checks, return_exceptions=True)
            await asyncio.sleep(self.config.liveness_interval_s)

    async def _check_manual(self, address: str) -> None:
        peer = await self._contact([address], "manual", None)
        if peer is not None:
            self.manual[address] = peer.info.id

    async def _check_peer(self, peer: Peer) -> None:
        if peer.info.id in self.manual.values() and peer.source == "manual":
            pass  # _check_manual covers it
        elif await self._contact(self._peer_addrs(peer), peer.source, peer.info.id):
            return
        if time.time() - peer.last_seen > self.config.gone_after_s:
            self._mark_gone(peer)

    # links
    def note_serving(self) -> None:
        """Update :attr:`serving` from the instances' last renewals."""
        instances = self.workers.instances.values()
        self.serving = not self.config.probe_while_serving and any(i.serving for i in instances)

    async def probe_peer(self, peer_id: str, scheduled: bool = False) -> list[LinkProfile]:
        """Measure every address of one peer (one probe at a time per agent); its links as they stand after.

        A probe the peer defers (it serves requests) keeps the links' last measurements, and so does a
        ``scheduled`` one that this node's serving stops, or finds due no more once it holds the lock."""
        peer = self.peers.get(peer_id)
        if peer is None or peer.info.state != "alive" or not peer.info.probe_port:
            return []
        probe_port = peer.info.probe_port
        loop = asyncio.get_running_loop()
        defer = (lambda: self.serving) if scheduled else None
        measured = []
        async with self._probe_lock:
            if scheduled and peer_id not in self.probes_due():
                return self._links_of(peer_id)
            try:
                for address in peer.info.addresses:
                    link = await loop.run_in_executor(
                        None,
                        lambda a=address: probe_link(
                            self.key,
                            self.id,
                            peer_id,
                            a,
                            probe_port,
                            self.config.probe_samples,
                            self.config.probe_bytes,
                            cancel=self._cancel_probes,
                            defer=defer,
                        ),
                    )
                    measured.append(link)
            except ProbeDeferred as why:
                log.info("link probe to %s deferred: %s", peer.info.name, why)
                return self._links_of(peer_id)
            for link in measured:
                self.links[(peer_id, link.dst_address)] = link
            self._probed_at[peer_id] = time.time()
        return measured

    def _links_of(self, peer_id: str) -> list[LinkProfile]:
        return [link for (pid, _), link in self.links.items() if pid == peer_id]

    async def probe_all(self) -> list[LinkProfile]:
        out = []
        for peer_id in [p.info.id for p in self.peers.values() if p.info.state == "alive"]:
            out += await self.probe_peer(peer_id)
        return out

    def probes_due(self) -> list[str]:
        """Live peers whose links were measured ``probe_interval_s`` ago or more (or never); none while this
        node serves requests."""
        if self.serving:
            return []
        now = time.time()
        return [
            pid
            for pid, peer in self.peers.items()
            if peer.info.state == "alive" and now - self._probed_at.get(pid, 0.0) >= self.config.probe_interval_s
        ]

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.probe_interval_s, PROBE_CHECK_S))
            try:
                for peer_id in self.probes_due():
                    await self.probe_peer(peer_id, scheduled=True)
            except Exception:  # keep probing later; report why now
                log.exception("link probe round failed")

    # HTTP
    def _app(self) -> tornado.web.Application:
        kw = {"agent": self}
        return tornado.web.Application(
            [
                (r"/node", NodeHandler, kw),
                (r"/node/hello", HelloHandler, kw),
                (r"/node/links", LinksHandler, kw),
                (r"/node/memory", MemoryHandler, kw),
                (r"/node/links/probe", ProbeHandler, kw),
                (r"/node/peers", PeersHandler, kw),
                (r"/node/calibration", CalibrationHandler, kw),
                (r"/models", ModelsHandler, kw),
                (r"/models/([^/]+)", ModelFilesHandler, kw),
                (r"/models/([^/]+)/checksums", ChecksumsHandler, kw),
                (r"/models/([^/]+)/files/(.+)", ModelFileHandler, {"path": str(models_dir()), "agent": self}),
                (r"/instances", InstancesHandler, kw),
                (r"/instances/([0-9a-zA-Z_-]+)", InstanceHandler, kw),
                (r"/instances/([0-9a-zA-Z_-]+)/(prepare|start)", InstanceActionHandler, kw),
                (r"/instances/([0-9a-zA-Z_-]+)/lease", LeaseHandler, kw),
            ],
            default_handler_class=AgentNotFound,
            default_handler_args=kw,
        )


@tornado.web.stream_request_body
class AgentHandler(SignedHandler):
    """JSON responses, signature checks; answers to accepted signed requests are signed.

    The body streams in (``data_received``) only after :meth:`prepare` has seen signature headers that
    may be good: an unsigned or stale request is refused before a byte of its body is read.
    """

    def initialize(self, agent: NodeAgent) -> None:
        self.agent = agent

    def prepare(self) -> None:
        self.request.body = b""
        if self.request.method == "GET" and is_loopback(self.request.remote_ip or ""):
            return  # unsigned reads from this machine (a handler that needs a signature checks it fully)
        problem = header_problem(dict(self.request.headers), self.agent.verifier.window_s)
        if problem is not None:
            self.send({"error": f"unauthorised: {problem}"}, 401)

    def data_received(self, chunk: bytes) -> None:
        self.request.body += chunk

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def send(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def authorised(self, read_only: bool) -> bool:
        """True if the request may proceed: an unsigned read from loopback, or a request whose signature is
        accepted (on loopback too: a signed request is judged by its signature, and its answer is signed);
        otherwise a 401 has been sent."""
        if read_only and is_loopback(self.request.remote_ip or "") and HEADER_SIG not in self.request.headers:
            return True
        problem = self.signature_problem(self.agent.verifier)
        if problem is None:
            return True
        self.send({"error": f"unauthorised: {problem}"}, 401)
        return False

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(json.dumps({"error": self._reason}))


class AgentNotFound(AgentHandler):
    def prepare(self) -> None:
        self.request.body = b""
        self.send({"error": f"unknown path {self.request.path}"}, 404)


class NodeHandler(AgentHandler):
    def get(self) -> None:
        if self.authorised(read_only=True):
            self.send(self.agent.node_info().to_json())


class HelloHandler(AgentHandler):
    """``POST /node/hello``: peer-to-peer handshake; always signed, answered with a proof."""

    def post(self) -> None:
        if not self.authorised(read_only=False):
            return
        try:
            challenge = str(json.loads(self.request.body)["challenge"])
        except (ValueError, KeyError, TypeError):
            self.send({"error": 'send {"id": ..., "challenge": ...}'}, 400)
            return
        info = self.agent.node_info()
        self.send({"node": info.to_json(), "proof": proof(self.agent.key, challenge, info.id)})


class MemoryHandler(AgentHandler):
    """``GET /node/memory``: this process's RSS and the size of each table the agent keeps."""

    def get(self) -> None:
        if self.authorised(read_only=True):
            rss = psutil.Process().memory_info().rss
            self.send({"node": self.agent.id, "rss_bytes": rss, "tables": self.agent.tables()})


class LinksHandler(AgentHandler):
    def get(self) -> None:
        if self.authorised(read_only=True):
            self.send({"node": self.agent.id, "links": self.agent.links_json()})


class ProbeHandler(AgentHandler):
    async def post(self) -> None:
        if self.authorised(read_only=False):
            links = await self.agent.probe_all()
            self.send({"node": self.agent.id, "links": [link.to_json() for link in links]})


class PeersHandler(AgentHandler):
    def get(self) -> None:
        if self.authorised(read_only=True):
            self.send({"node": self.agent.id, "peers": [p.to_json() for p in self.agent.peers.values()]})

    async def post(self) -> None:
        if not self.authorised(read_only=False):
            return
        try:
            address = json.loads(self.request.body)["address"]
            host, port = address.rsplit(":", 1)
            int(port)
        except (ValueError, KeyError, TypeError):
            self.send({"error": 'send {"address": "host:port"}'}, 400)
            return
        if not self.agent.add_manual(address):
            self.send({"error": f"this node keeps {MAX_MANUAL_PEERS} manual peers already"}, 409)
            return
        peer = await self.agent._contact([address], "manual")
        self.send({"added": address, "peer": peer.info.id if peer else None})


def _local_models() -> dict[str, Path]:
    root = models_dir()
    return {p.name: p for p in sorted(root.iterdir()) if is_model_dir(p)} if root.is_dir() else {}


class ModelsHandler(AgentHandler):
    """``GET /models``: the models in this node's store (what peers can fetch from it)."""

    def get(self) -> None:
        if self.authorised(read_only=True):
            self.send({"node": self.agent.id, "models": sorted(_local_models())})


class ModelFilesHandler(AgentHandler):
    """``GET /models/{name}``: the model's files and sizes (signed: peers only)."""

    def get(self, name: str) -> None:
        if not self.authorised(read_only=False):
            return
        path = _local_models().get(name)
        if path is None:
            self.send({"error": f"no model {name} on this node"}, 404)
            return
        self.send(
            {
                "name": name,
                "files": {
                    p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and is_plain_name(p.name)
                },
            }
        )


class ChecksumsHandler(AgentHandler):
    """``POST /models/{name}/checksums``: SHA-256 of byte ranges ``{"ranges": [[file, start, end], ...]}``."""

    def post(self, name: str) -> None:
        if not self.authorised(read_only=False):
            return
        path = _local_models().get(name)
        if path is None:
            self.send({"error": f"no model {name} on this node"}, 404)
            return
        try:
            ranges = [(str(f), int(a), int(b)) for f, a, b in json.loads(self.request.body)["ranges"]]
            self.send({"sha256": range_checksums(path, ranges)})
        except (ValueError, KeyError, TypeError, OSError) as exc:
            self.send({"error": f"bad request: {exc}"}, 400)


class ModelFileHandler(SignedHandler, tornado.web.StaticFileHandler):
    """``GET /models/{name}/files/{file}`` with HTTP range requests (signed: peers only).

    The answer is signed over the bytes it sends: they are read once to hash them, then again to send them."""

    def initialize(self, path: str, agent: NodeAgent) -> None:  # type: ignore[override]
        super().initialize(path)
        self.agent = agent

    def get_content(  # type: ignore[override]
        self, abspath: str, start: int | None = None, end: int | None = None
    ) -> Generator[bytes, None, None]:
        digest = hashlib.sha256()
        for chunk in tornado.web.StaticFileHandler.get_content(abspath, start, end):
            digest.update(chunk)
        self.sign_answer(None, body_sha256=digest.hexdigest())
        yield from tornado.web.StaticFileHandler.get_content(abspath, start, end)

    def prepare(self) -> None:
        problem = self.signature_problem(self.agent.verifier)
        if problem:
            self.set_status(401)
            self.finish(json.dumps({"error": f"unauthorised: {problem}"}))

    async def get(self, name: str, file: str, include_body: bool = True) -> None:  # type: ignore[override]
        if not (is_plain_name(name) and is_plain_name(file)) or not is_model_dir(Path(self.root) / name):
            raise tornado.web.HTTPError(404)  # plain names, complete models only: never a partial fetch
        await super().get(f"{name}/{file}", include_body)


class CalibrationHandler(AgentHandler):
    """``POST /node/calibration``: keep fitted cost-model constants with the profile (see :mod:`exo_lab.bench`)."""

    def post(self) -> None:
        from exo_lab.cluster.profile import save_calibration  # MLX: the profile module measures with it

        if not self.authorised(read_only=False):
            return
        try:
            calibration = json.loads(self.request.body)["calibration"]
            if not isinstance(calibration, dict):
                raise TypeError("calibration must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            self.send({"error": f'send {{"calibration": {{...}}}}: {exc}'}, 400)
            return
        path = save_calibration(calibration, self.agent.profile.get("cache_key") or None)
        self.agent.profile = {**self.agent.profile, "calibration": calibration}
        self.send({"node": self.agent.id, "calibration": calibration, "stored": str(path) if path else None})


class InstancesHandler(AgentHandler):
    """``GET /instances``: this node's instances, their workers and reservations."""

    def get(self) -> None:
        if self.authorised(read_only=True):
            w = self.agent.workers
            self.send(
                {
                    "node": self.agent.id,
                    "reserved_bytes": w.reserved_bytes,
                    "instances": [i.to_json() for i in w.instances.values()],
                }
            )


class InstanceHandler(AgentHandler):
    """``GET``/``DELETE /instances/{id}``."""

    def get(self, iid: str) -> None:
        if not self.authorised(read_only=True):
            return
        inst = self.agent.workers.instances.get(iid)
        if inst is None:
            self.send({"error": f"no instance {iid} on this node"}, 404)
            return
        data = inst.to_json()
        if inst.state == "failed":
            data["logs"] = {r.rank: self.agent.workers.log_tail(iid, r.rank) for r in inst.ranks.values()}
        self.send(data)

    async def delete(self, iid: str) -> None:
        if not self.authorised(read_only=False):
            return
        workers = self.agent.workers
        inst = workers.detach(iid)  # the reservation is free at once; the workers take a moment to exit
        if inst is not None:
            log.info("instance %s of %s: deleted by a request", iid, inst.owner_label)
            await asyncio.get_running_loop().run_in_executor(None, workers.terminate, inst)
        self.send({"stopped": inst is not None})


class InstanceActionHandler(AgentHandler):
    """``POST /instances/{id}/prepare`` and ``/start`` (signed)."""

    def post(self, iid: str, action: str) -> None:
        if not self.authorised(read_only=False):
            return
        try:
            body = json.loads(self.request.body)
            if not isinstance(body, dict):
                raise TypeError("the body must be a JSON object")
            if action == "prepare":
                _, available = memory_now()
                info = body.get("info") or {}
                if not isinstance(info, dict):
                    raise TypeError("info must be an object")
                lease_s = check_lease_s(body.get("lease_s", DEFAULT_LEASE_S))
                ports = self.agent.workers.prepare(
                    iid,
                    body["ranks"],
                    check_reserve_bytes(body["reserve_bytes"]),
                    available,
                    owner=check_owner(body.get("owner")),
                    info=info,
                    lease_s=lease_s,
                )
                self.send({"node": self.agent.id, "ranks": ports, "lease_s": lease_s})
            else:
                common = dict(body["common"])
                name = common.pop("model_name")
                path = common.pop("model_path", None)
                local = _local_models().get(name)
                if local is not None:
                    common["model_dir"] = str(local)
                elif body.get("sources"):  # the worker fetches its shard's tensors from a peer
                    common["model_dir"] = str(models_dir() / name)
                    common["fetch"] = {"name": name, "sources": body["sources"]}
                elif path and Path(path).is_dir():
                    common["model_dir"] = path
                else:
                    raise LookupError(f"node {self.agent.config.name} has no copy of {name} and no peer has one")
                self.send(self.agent.workers.start(iid, body["hostfile"], common, body["ranks"]))
        except ReservationError as exc:
            self.send({"error": str(exc)}, 409)
        except (KeyError, ValueError, TypeError) as exc:
            self.send({"error": f"bad request: {exc}"}, 400)
        except LookupError as exc:
            self.send({"error": str(exc)}, 404)


class LeaseHandler(AgentHandler):
    """``POST /instances/{id}/lease``: ``{"status": {...}, "owner"?: {...}}`` renews the instance's lease (signed)."""

    def post(self, iid: str) -> None:
        if not self.authorised(read_only=False):
            return
        try:
            body = json.loads(self.request.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            status = body.get("status")
            if status is not None and not isinstance(status, dict):
                raise ValueError("status must be an object")
            owner = check_owner(body.get("owner"))
        except ValueError as exc:
            self.send({"error": f'bad request: {exc}; send {{"status": {{...}}}}'}, 400)
            return
        try:
            inst = self.agent.workers.renew(iid, status, owner)
        except KeyError:
            self.send({"error": f"no instance {iid} on this node (deleted, or its lease ran out)"}, 404)
            return
        self.agent.note_serving()
        self.send({"renewed": True, "lease_s": inst.lease_s, "state": inst.state})


def run_agent(config: AgentConfig) -> int:
    """Run an agent until SIGTERM/SIGINT; returns the exit code."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = NodeAgent(config)
        await agent.start()
        print(f"exo_lab node {agent.id} ({config.name}) listening on {config.host}:{agent.port}", flush=True)
        await stop.wait()
        try:
            await asyncio.wait_for(agent.stop(), 5.0)
        except TimeoutError:
            log.warning("shutdown took over 5 s; exiting anyway")

    asyncio.run(main())
    # Workers are stopped and mDNS said goodbye; do not wait for probe or profile threads
    # blocked in socket timeouts (asyncio.run would join its executor for minutes).
    logging.shutdown()
    os._exit(0)
