"""The notebook's cluster: ``exo_lab.discover / connect / local_cluster`` and :class:`Cluster`.

A :class:`Cluster` is a :class:`~exo_lab.cluster.client.ClusterClient` (nodes, peers, links,
signed requests to the agents) that also previews plans, launches instances and benchmarks them:
the workbench a researcher drives. It sits above placement, instances and the bench, which is
why it is not part of :mod:`exo_lab.cluster`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exo_lab import bench
from exo_lab.bench.results import BenchResult
from exo_lab.cluster.client import ClusterClient, ClusterError
from exo_lab.instance import Instance
from exo_lab.models.card import ModelCard
from exo_lab.placement.plan import Plan, Plans
from exo_lab.placement.preview import preview

__all__ = ["Cluster", "ClusterError", "connect", "discover", "local_cluster"]


class Cluster(ClusterClient):
    """Node agents seen from a coordinator (a notebook kernel or ``exo-lab up``): previews, launches, benches."""

    def preview(
        self,
        model: str | Path | ModelCard,
        context: int = 4096,
        prompt_tokens: int = 512,
        objective: str = "decode",
        batch: int = 1,
    ) -> Plans:
        """Ranked ways to run ``model`` on this cluster (see :func:`exo_lab.placement.plan`)."""
        plans = preview(self._topology, model, context, prompt_tokens, batch, objective)
        plans.cluster = self
        for p in [*plans.plans, *plans.infeasible]:
            p._cluster = self
            p.model_ref = str(model)
        return plans

    def launch(
        self,
        model: str | Path,
        plan: Plan | None = None,
        name: str | None = None,
        auto_replace: bool = True,
        wait: bool = True,
        max_batch: int = 16,
        max_queue: int = 256,
    ) -> Instance:
        """Launch ``model`` with ``plan`` (default: the best plan) and return the :class:`Instance`.

        Up to ``max_batch`` requests decode together on the ranks; ``max_queue`` more wait (beyond
        that the API answers 429).
        """
        if plan is None:
            plans = self.preview(model)
            if not plans.plans:
                raise ClusterError(f"no plan fits {model}: {plans.infeasible[:1]}")
            plan = plans.best
        inst = Instance(
            self, str(model), plan, name=name, auto_replace=auto_replace, max_batch=max_batch, max_queue=max_queue
        )
        self.instances.append(inst)
        if wait:
            inst.wait_ready()
        return inst

    def bench(
        self,
        plans: Any,
        pp: int = 512,
        tg: int = 128,
        repeat: int = 3,
        concurrency: Any = (1,),
        *,
        select: str | int = "all",
        strategies: Any = None,
        warmup: int = 1,
        calibrate: bool = False,
        progress: bool = True,
        widget: Any = None,
        launch_timeout: float = 300.0,
    ) -> BenchResult:
        """Launch each of ``plans`` in turn and measure it against its predictions (a :class:`~exo_lab.bench.BenchResult`).

        ``plans``: the result of :meth:`preview`, a list of plans, one plan, or a model (previewed for
        ``pp``); ``select``: ``"all"``, ``"best"`` or how many launchable plans, best first. Prompts are
        exactly ``pp`` tokens after the chat template and generate exactly ``tg`` tokens, ``repeat`` times
        alone and ``repeat`` times at each ``concurrency``. ``calibrate`` fits the cost model's per-node
        factors to the measurements and stores them with the node profiles. See :mod:`exo_lab.bench`.
        """
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
        )


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
