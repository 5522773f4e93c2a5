"""``/exo-lab/api/*``: the cluster of a registered coordinator, as JSON, behind Jupyter's auth.

- ``GET coordinators``: the coordinators running on this machine (kernels, ``exo-lab up``), newest first.
- ``GET topology``: nodes, links and the drawn edges (what the topology widget draws).
- ``GET instances``: the instances of the coordinator's cluster, wherever they were launched (read from the
  node agents, :func:`exo_lab.cluster.instances.gather`), with state, load progress, owner and nodes.
- ``POST instances`` ``{"model_id", "plan": index | plan JSON, "name", ...preview filters}``: launch, through
  the coordinator's API (``POST {api_url}/instance``, signed with the cluster key); 409 when it serves none.
- ``DELETE instances/<id>``: stop an instance of the cluster (through its owner's API, else its agents).
- ``GET previews?model_id=...[&sharding=&min_nodes=&node_ids=]``: ranked placement plans for a model on the
  cluster (the filters as on the API's ``/instance/previews``), only for a model available on this machine
  (nothing is downloaded or built to preview; a launch downloads).
- ``GET dashboard-url``: where the Panel dashboard is served, if anywhere.

Every route takes ``?coordinator=<id>`` (default: the newest). The server reads the agents
itself (so the view is live even when the coordinator is busy), caching each topology read for a
moment so that several open panels cost the agents one read. Launches go to the coordinator, which
owns what it launches; an instance can be stopped from here whoever launched it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from exo_lab import defaults
from exo_lab.cluster import instances as cluster_instances
from exo_lab.cluster.client import ClusterClient, ClusterError
from exo_lab.cluster.coordinators import CoordinatorInfo, coordinators
from exo_lab.cluster.http import SignedClient
from exo_lab.cluster.topology import Topology
from exo_lab.jupyter.instances import INSTANCE_ID, forward, launch_body, merge_instances, owner_of
from exo_lab.models import ModelNotFoundError
from exo_lab.placement.plan import strategies_for
from exo_lab.placement.preview import preview
from exo_lab.ui.topology_widget import graph_json

log = logging.getLogger(__name__)

NO_CLUSTER_HINT = (
    "No exo_lab cluster is running on this machine. Start one in a notebook with "
    "`cluster = exo_lab.local_cluster(2)` (or `exo_lab.discover()`), or run `exo-lab up`."
)
DASHBOARD_HINT = "Start the dashboard with `exo-lab dashboard` (or `exo-lab up`)."
NO_API_HINT = (
    "coordinator {label} serves no API, so it cannot launch from here: run `cluster.serve()` in its "
    "notebook (or launch from the notebook: `cluster.launch(model)`)."
)
LAUNCH_TIMEOUT_S = 60.0


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (browsers reject ``NaN``/``Infinity`` in JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def coordinator_summary(info: CoordinatorInfo) -> dict[str, Any]:
    """A coordinator as the browser sees it: no key, no instance details."""
    d = info.public_json()
    d.pop("instances", None)
    d["agent_count"] = len(info.agents)
    d["instance_count"] = len(info.instances)
    return d


@dataclass
class _View:
    info: CoordinatorInfo
    cluster: Any = None
    read_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ClusterViews:
    """This server's live copies of the registered coordinators' clusters."""

    def __init__(self, directory: Path | None = None, max_age_s: float = 1.5) -> None:
        self.directory = directory
        self.max_age_s = max_age_s
        self._views: dict[str, _View] = {}
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="exo-lab-jupyter")

    def coordinators(self) -> list[CoordinatorInfo]:
        found = coordinators(self.directory)
        for gone in set(self._views) - {c.id for c in found}:
            self._views.pop(gone)
        return found

    def pick(self, wanted: str | None) -> tuple[CoordinatorInfo | None, list[CoordinatorInfo]]:
        """The coordinator asked for (or the newest) and all of them; raises 404 for an unknown id."""
        found = self.coordinators()
        if wanted:
            match = next((c for c in found if c.id == wanted), None)
            if match is None:
                raise tornado.web.HTTPError(
                    404, f"no running coordinator {wanted!r}; running: {', '.join(c.id for c in found) or 'none'}"
                )
            return match, found
        return (found[0] if found else None), found

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def cluster(self, info: CoordinatorInfo) -> Any:
        """A :class:`~exo_lab.cluster.client.ClusterClient` on ``info``'s agents, read at most ``max_age_s`` ago."""
        view = self._views.get(info.id)
        if view is None or (view.info.agents, view.info.cluster_key) != (info.agents, info.cluster_key):
            view = self._views[info.id] = _View(info)
        view.info = info
        async with view.lock:
            if view.cluster is not None and time.monotonic() - view.read_at < self.max_age_s:
                return view.cluster
            if not info.agents:
                raise tornado.web.HTTPError(502, f"coordinator {info.label} has no node agents yet")
            try:
                if view.cluster is None:
                    view.cluster = await self.run(
                        lambda: ClusterClient(
                            info.agents, info.cluster_key, follow_peers=info.follow_peers, register=False
                        )
                    )
                else:
                    await self.run(view.cluster.refresh)
            except ClusterError as exc:
                raise tornado.web.HTTPError(502, f"the cluster of {info.label} does not answer: {exc}") from exc
            view.read_at = time.monotonic()
            return view.cluster

    async def topology(self, info: CoordinatorInfo) -> Any:
        """The live :class:`~exo_lab.Topology` of ``info``'s cluster (the snapshot of one without agents)."""
        if not info.agents and info.local_topology is not None:
            return Topology.from_json(info.local_topology)
        return (await self.cluster(info)).topology

    async def gathered(self, info: CoordinatorInfo) -> tuple[list[cluster_instances.ClusterInstance], Any]:
        """Every instance on the live nodes of ``info``'s cluster, read now, and the client that read them."""
        cluster = await self.cluster(info)
        view = self._views.get(info.id)
        lock = view.lock if view is not None else asyncio.Lock()
        async with lock:  # not while a refresh rewrites the topology
            found = await self.run(cluster_instances.gather, cluster)
        return found, cluster

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ExoLabHandler(APIHandler):
    """Authenticated JSON handlers of the exo_lab routes."""

    auth_resource = "exo_lab"

    def initialize(self, views: ClusterViews) -> None:
        self.views = views

    def send(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(_finite(data)))

    def picked(self) -> tuple[CoordinatorInfo | None, list[CoordinatorInfo]]:
        return self.views.pick(self.get_query_argument("coordinator", None))


class CoordinatorsHandler(ExoLabHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        found = self.views.coordinators()
        self.send({"coordinators": [coordinator_summary(c) for c in found], "hint": None if found else NO_CLUSTER_HINT})


class TopologyHandler(ExoLabHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        info, found = self.picked()
        if info is None:
            self.send(
                {
                    "coordinator": None,
                    "coordinators": [],
                    "topology": {"nodes": [], "links": [], "edges": []},
                    "hint": NO_CLUSTER_HINT,
                }
            )
            return
        topology = await self.views.topology(info)
        self.send(
            {
                "coordinator": coordinator_summary(info),
                "coordinators": [coordinator_summary(c) for c in found],
                "topology": graph_json(topology),
                "hint": None,
            }
        )


class InstancesHandler(ExoLabHandler):
    """``GET``: the cluster's instances; ``POST``: launch one through the coordinator's API."""

    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        info, found = self.picked()
        if info is None:
            self.send({"coordinator": None, "instances": [], "hint": NO_CLUSTER_HINT})
            return
        if info.agents:
            gathered, cluster = await self.views.gathered(info)
            merged = merge_instances(gathered, info, found, {n.id: n.name for n in cluster.nodes})
        else:  # a coordinator without agents (exo-lab serve): what it serves
            merged = merge_instances([], info, found, {})
        self.send({"coordinator": coordinator_summary(info), "instances": merged, "hint": None})

    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        body = launch_body(self.request.body)
        info, _ = self.picked()
        if info is None:
            raise tornado.web.HTTPError(409, NO_CLUSTER_HINT)
        if not info.api_url:
            raise tornado.web.HTTPError(409, NO_API_HINT.format(label=info.label))
        api = SignedClient(info.api_url, info.cluster_key, timeout=LAUNCH_TIMEOUT_S, node=info.id)
        raw = await self.views.run(forward, api, "POST", "/instance", json.dumps(body).encode(), (200, 201), info.label)
        self.send({**json.loads(raw or b"{}"), "coordinator": info.id}, 201)


class InstanceHandler(ExoLabHandler):
    """``DELETE instances/<id>``: stop an instance of the cluster, whoever launched it."""

    @tornado.web.authenticated
    @authorized
    async def delete(self, instance_id: str) -> None:
        if not INSTANCE_ID.match(instance_id):
            raise tornado.web.HTTPError(
                400, f"{instance_id[:80]!r} is not an instance id (letters, digits, '-' and '_', at most 64)"
            )
        info, found = self.picked()
        if info is None:
            raise tornado.web.HTTPError(409, NO_CLUSTER_HINT)
        owners = {i.get("id"): c for c in found for i in c.instances if i.get("id")}
        if not info.agents:
            raise tornado.web.HTTPError(
                409, f"coordinator {info.label} has no node agents: stop what it serves where it runs"
            )
        gathered, cluster = await self.views.gathered(info)
        inst = next((i for i in gathered if i.id == instance_id), None)
        owner = owners.get(instance_id)
        if inst is None:
            if owner is None or not owner.api_url:  # not on the agents, and no owner that could stop it
                known = ", ".join(i.id for i in gathered if i.state != "stopped") or "none"
                raise tornado.web.HTTPError(404, f"no instance {instance_id!r} in the cluster; instances: {known}")
            api = SignedClient(owner.api_url, owner.cluster_key, timeout=30, node=owner.id)
            await self.views.run(forward, api, "DELETE", f"/instance/{instance_id}", None, (200,), owner.label)
            self.send({"id": instance_id, "stopped_by": "owner"})
            return
        if not inst.api and owner is not None and owner.api_url:  # the agents do not know the owner (yet)
            inst.owner = {**inst.owner, **owner_of(owner)}
        how = await self.views.run(cluster_instances.stop, cluster, inst)
        self.send({"id": instance_id, "stopped_by": how})


class PreviewsHandler(ExoLabHandler):
    def _int(self, name: str, default: int, minimum: int = 1) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise tornado.web.HTTPError(400, f"'{name}' must be an integer, got {raw!r}") from None
        if value < minimum:
            raise tornado.web.HTTPError(400, f"'{name}' must be at least {minimum}")
        return value

    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        model = self.get_query_argument("model_id", None)
        if not model:
            raise tornado.web.HTTPError(400, "missing query parameter 'model_id' (a model name, path or hub id)")
        context = self._int("context", 4096)
        prompt = self._int("prompt_tokens", min(512, context))
        batch = self._int("batch", 1)
        objective = self.get_query_argument("objective", "decode")
        if objective not in ("decode", "ttft"):
            raise tornado.web.HTTPError(400, "'objective' must be 'decode' or 'ttft'")
        if prompt > context:
            raise tornado.web.HTTPError(400, "'prompt_tokens' must not exceed 'context'")
        try:
            strategies = strategies_for(self.get_query_argument("sharding", None))
        except ValueError as exc:
            raise tornado.web.HTTPError(400, str(exc)) from None
        min_nodes = self._int("min_nodes", 1)
        node_ids = [n for n in self.get_query_argument("node_ids", "").split(",") if n.strip()] or None
        info, _ = self.picked()
        if info is None:
            raise tornado.web.HTTPError(409, NO_CLUSTER_HINT)
        topology = await self.views.topology(info)
        try:
            plans = await self.views.run(preview, topology, model, context, prompt, batch, objective, False)
        except ModelNotFoundError as exc:
            raise tornado.web.HTTPError(404, str(exc)) from exc
        plans = plans.filtered(strategies, min_nodes, node_ids)
        self.send({"coordinator": coordinator_summary(info), **plans.to_json()})


class DashboardUrlHandler(ExoLabHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        info, found = self.picked()
        if defaults.dashboard_url():
            self.send({"url": defaults.dashboard_url(), "source": "environment", "coordinator": None, "hint": None})
            return
        with_url = [c for c in ([info] if info else []) + found if c.dashboard_url]
        if with_url:
            self.send(
                {"url": with_url[0].dashboard_url, "source": "coordinator", "coordinator": with_url[0].id, "hint": None}
            )
            return
        self.send({"url": None, "source": None, "coordinator": None, "hint": DASHBOARD_HINT})


ROUTES = {
    "coordinators": CoordinatorsHandler,
    "topology": TopologyHandler,
    "instances": InstancesHandler,
    "instances/(.*)": InstanceHandler,
    "previews": PreviewsHandler,
    "dashboard-url": DashboardUrlHandler,
}


def setup_handlers(web_app: Any, directory: Path | None = None) -> ClusterViews:
    """Add the ``/exo-lab/api/*`` routes to a Jupyter server's tornado application."""
    views = ClusterViews(directory)
    base = web_app.settings.get("base_url", "/")
    web_app.add_handlers(
        ".*$",
        [(url_path_join(base, "exo-lab", "api", name), handler, {"views": views}) for name, handler in ROUTES.items()],
    )
    web_app.settings["exo_lab_views"] = views
    return views
