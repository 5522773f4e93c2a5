"""The notebook's cluster: ``exo_lab.discover / connect / local_cluster`` and :class:`Cluster`.

A :class:`Cluster` is a :class:`~exo_lab.cluster.client.ClusterClient` (nodes, peers, links,
signed requests to the agents) that also previews plans, launches instances and benchmarks them:
the workbench a researcher drives. It sits above placement, instances and the bench, which is
why it is not part of :mod:`exo_lab.cluster`.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from exo_lab import bench, defaults
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server, is_loopback
from exo_lab.bench.results import BenchResult
from exo_lab.cluster import instances as cluster_instances
from exo_lab.cluster.client import ClusterClient, ClusterError
from exo_lab.cluster.http import split_address
from exo_lab.cluster.instances import ClusterInstance
from exo_lab.control import Control
from exo_lab.instance import Instance
from exo_lab.models.card import ModelCard
from exo_lab.placement.plan import Plan, Plans
from exo_lab.placement.preview import preview

__all__ = ["Cluster", "ClusterError", "connect", "discover", "local_cluster"]


class Cluster(ClusterClient):
    """Node agents seen from a coordinator (a notebook kernel or ``exo-lab up``): previews, launches, benches.

    A coordinator that launches also serves (:meth:`serve`): its API answers for its instances and for
    every other instance of the cluster, and lets any member list, launch and stop instances.
    """

    server: Server | None = None
    control: Control | None = None

    def serve(
        self, host: str | None = None, port: int = 0, api_key: str | None = None, watch_interval_s: float = 1.0
    ) -> Server:
        """Serve this coordinator's instances and the cluster's control routes (idempotent; returns the Server).

        ``host`` defaults to loopback when every agent is on this machine, else to all addresses (then
        API clients need ``api_key``, made up when not given: ``cluster.server.api_key``; other members sign
        with the cluster key). ``port`` 0 picks a free one.
        """
        if self.server is not None and self.server.running:
            return self.server
        contacts = [split_address(a)[0] for a in self._contacts.values()]
        local = all(_is_loopback_address(h) for h in contacts)
        host = host or ("127.0.0.1" if local else "0.0.0.0")
        if api_key is None and not is_loopback(host):
            api_key = defaults.api_key()
            if api_key is None:
                api_key = secrets.token_hex(24)  # clients read it from cluster.server.api_key; members sign instead
        registry = ModelRegistry()
        self.control = Control(self, registry, watch_interval_s)
        self.server = Server(registry, host, port, self, api_key, control=self.control).start()
        advertised = self.server.url
        if host in ("0.0.0.0", "", "::"):
            advertised = f"http://{_address_towards(contacts[0] if contacts else '127.0.0.1')}:{self.server.port}"
        self.api_url = advertised
        for inst in self.instances:
            self.control.adopt(inst)
        if self.registration is not None:  # the JupyterLab panel reaches this API
            self.registration.update(api_url=advertised)
        self.control.start()
        return self.server

    def list_instances(self) -> list[ClusterInstance]:
        """Every instance of the cluster, wherever it was launched (a notebook, a dashboard, HTTP, ``exo-lab up``)."""
        return cluster_instances.gather(self)

    def delete_instance(self, instance_id: str) -> str:
        """Stop any instance of the cluster by id: ours directly, another coordinator's through it (or its nodes).

        Returns how it was stopped (``"owner"`` or ``"agents"``); KeyError when there is no such instance.
        """
        ours = next((i for i in self.instances if instance_id in (i.id, i.launch_id)), None)
        if ours is not None:
            ours.delete()
            return "owner"
        return cluster_instances.stop(self, cluster_instances.find(self, instance_id))

    def close(self) -> None:
        """Stop serving, delete this coordinator's instances, stop the agents it started (local clusters)."""
        if self.control is not None:
            self.control.close()
        super().close()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def preview(
        self,
        model: str | Path | ModelCard,
        context: int = 4096,
        prompt_tokens: int = 512,
        objective: str = "decode",
        batch: int = 1,
        download: bool = True,
        lossy: bool = False,
    ) -> Plans:
        """Ranked ways to run ``model`` on this cluster (see :func:`exo_lab.placement.plan`).

        ``download=False`` plans only for models on this machine, fetching and building nothing
        (:func:`exo_lab.models.local.local_card`). ``lossy=True`` lets nodes compute in weight
        formats that change the generated tokens (q8, q4, downcasts) where they decode faster
        (measured, :mod:`exo_lab.models.formats`); by default the weights stay exact."""
        plans = preview(self._topology, model, context, prompt_tokens, batch, objective, download, lossy=lossy)
        plans.cluster = self
        for p in [*plans.plans, *plans.infeasible]:
            p._cluster = self
            p.model_ref = str(model)
            self._reachable_ranks(p)
        return plans

    def _reachable_ranks(self, plan: Plan) -> None:
        """Move ranks the planner put on loopback to the address this coordinator reaches their node on.

        The coordinator talks to every rank's control port at the rank's address. A plan on one
        node puts its rank on 127.0.0.1, which only a coordinator on that node reaches; when this
        cluster reaches the node's agent at one of the node's own addresses (another machine, a
        simulated host), the rank listens there instead.
        """
        ranks = []
        for r in plan.ranks:
            contact = self._contacts.get(r.node_id, "")
            host = contact.rsplit(":", 1)[0]
            node = self._topology.nodes.get(r.node_id)
            if _is_loopback_address(r.address) and node and host in node.addresses and not _is_loopback_address(host):
                r = replace(r, address=host)
            ranks.append(r)
        plan.ranks = ranks

    def launch(
        self,
        model: str | Path,
        plan: Plan | None = None,
        name: str | None = None,
        auto_replace: bool = True,
        wait: bool = True,
        max_batch: int = 16,
        max_queue: int = 256,
        prefix_cache_bytes: int | None = None,
        lossy: bool = False,
    ) -> Instance:
        """Launch ``model`` with ``plan`` (default: the best plan) and return the :class:`Instance`.

        Up to ``max_batch`` requests decode together on the ranks; ``max_queue`` more wait (beyond
        that the API answers 429). ``prefix_cache_bytes`` bounds the KV caches the ranks keep of
        finished requests for reuse (split over the ranks by layers; default 1 GiB, 0: none). ``lossy``: the best
        plan may use quantized formats (see :meth:`preview`).
        """
        if plan is None:
            plans = self.preview(model, lossy=lossy)
            if not plans.plans:
                raise ClusterError(f"no plan fits {model}: {plans.infeasible[:1]}")
            plan = plans.best
        self.serve()  # the instance is served cluster-wide: any member's API forwards to this one
        extra = {} if prefix_cache_bytes is None else {"prefix_cache_bytes": prefix_cache_bytes}
        inst = Instance(
            self,
            str(model),
            plan,
            name=name,
            auto_replace=auto_replace,
            max_batch=max_batch,
            max_queue=max_queue,
            **extra,
        )
        self.instances.append(inst)
        assert self.control is not None
        self.control.adopt(inst)
        if wait:
            inst.wait_ready()
        return inst

    def bench(
        self,
        plans: Any = None,
        pp: Any = 512,
        tg: Any = 128,
        repeat: int = 3,
        concurrency: Any = (1,),
        *,
        instance: Any = None,
        select: str | int = "all",
        strategies: Any = None,
        warmup: int = 1,
        calibrate: bool = False,
        progress: bool = True,
        widget: Any = None,
        launch_timeout: float = 300.0,
        trace: bool = False,
    ) -> BenchResult:
        """Launch each of ``plans`` in turn and measure it against its predictions (a :class:`~exo_lab.bench.BenchResult`).

        ``plans``: the result of :meth:`preview`, a list of plans, one plan, or a model (previewed for
        ``pp``); ``select``: ``"all"``, ``"best"`` or how many launchable plans, best first. Prompts are
        exactly ``pp`` tokens after the chat template and generate exactly ``tg`` tokens, ``repeat`` times
        alone and ``repeat`` times at each ``concurrency``; ``pp``, ``tg`` and ``concurrency`` take lists,
        and every combination runs. ``calibrate`` fits the cost model's per-node factors to the measurements
        and stores them with the node profiles. ``instance`` (an :class:`Instance` or the id of any instance
        of the cluster) measures what already runs instead of launching; ``trace``
        traces one more request per plan on every rank (``result.plans[i].trace``). See :mod:`exo_lab.bench`.
        """
        if instance is not None:
            if plans is not None:
                raise bench.BenchError("give plans to launch or an instance already running, not both")
            return bench.bench_instance(self, instance, pp, tg, concurrency, repeat, warmup=warmup, progress=progress)
        if plans is None:
            raise bench.BenchError("give plans (or a model) to launch, or instance= to measure one already running")
        return bench.run(
            self,
            plans,
            pp=pp,
            tg=tg,
            repeat=repeat,
            concurrency=concurrency,
            select=select,
            strategies=strategies,
            warmup=warmup,
            calibrate=calibrate,
            progress=progress,
            widget=widget,
            launch_timeout=launch_timeout,
            trace=trace,
        )


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (what a peer there can reach us on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # UDP: no packet is sent
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def connect(addresses: list[str], cluster_key: str | None = None, follow_peers: bool = True) -> Cluster:
    """A cluster from agent addresses (``host:port``); with ``follow_peers``, their peers are found too."""
    return Cluster.connect(addresses, cluster_key, follow_peers)


def discover(timeout: float = 3.0, cluster_key: str | None = None, follow_peers: bool = True) -> Cluster:
    """Find agents on the local network by mDNS (those with our key's fingerprint)."""
    return Cluster.discover(timeout, cluster_key, follow_peers)


def local_cluster(
    n: int = 2,
    cluster_key: str | None = None,
    probe_interval_s: float = 60.0,
    timeout: float = 90.0,
    separate_stores: bool = False,
) -> Cluster:
    """Start ``n`` node agents as processes on loopback (no root needed) and connect to them.

    ``separate_stores`` gives each node a model store of its own (``<tmp>/node-i/models``), as
    separate machines have, so launches fetch shards from peers.
    """
    return Cluster.start_local(n, cluster_key, probe_interval_s, timeout, separate_stores)
