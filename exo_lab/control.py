"""Instances as cluster state, controllable from every surface: :class:`Control`.

A :class:`Control` is what a coordinator (``exo-lab up``, a notebook kernel: whoever holds an
:class:`exo_lab.Cluster` and serves it, :meth:`exo_lab.Cluster.serve`) puts behind its API server
and its dashboard. It previews plans for a model on the cluster (with exo's
filters), launches a plan as an :class:`~exo_lab.Instance` it owns and serves, lists and stops
any instance of the cluster (its own directly; another coordinator's through that coordinator's
API, else on the agents), tells the API where a model it does not serve itself is served, and
streams the cluster's changes (:class:`~exo_lab.cluster.watch.ClusterWatch`).

Errors are :class:`~exo_lab.api.errors.ApiError` (status, message, parameter), which the API
renders in the caller's family and the dashboards show as text.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from exo_lab.api.errors import ApiError, bad_request
from exo_lab.api.registry import ModelRegistry
from exo_lab.cluster import instances as cluster_instances
from exo_lab.cluster.client import ClusterError
from exo_lab.cluster.watch import ClusterWatch, Subscriber
from exo_lab.instance import Instance, LaunchError
from exo_lab.models import ModelNotFoundError
from exo_lab.placement.plan import Plan, Plans, strategies_for

if TYPE_CHECKING:
    from exo_lab.workbench import Cluster

log = logging.getLogger(__name__)

OBJECTIVES = ("decode", "ttft")


def _strategies(sharding: str | None) -> set[str] | None:
    try:
        return strategies_for(sharding)
    except ValueError as exc:
        raise bad_request(str(exc), "sharding") from None


class Control:
    """Preview, launch, list and stop the instances of ``cluster``; serve ours on ``registry``."""

    def __init__(self, cluster: Cluster, registry: ModelRegistry, watch_interval_s: float = 1.0) -> None:
        self.cluster = cluster
        self.registry = registry
        self.watch = ClusterWatch(cluster, watch_interval_s)
        self._lock = threading.Lock()
        self._launching: dict[str, str] = {}  # served name -> model, while an instance is being started

    def start(self) -> Control:
        """Start watching the cluster (events, housekeeping of our stopped instances)."""
        self.watch.subscribe(self._on_event)
        self.watch.start()
        return self

    def close(self) -> None:
        self.watch.stop()

    # plans
    def previews(
        self,
        model: str,
        *,
        sharding: str | None = None,
        min_nodes: int | None = None,
        node_ids: list[str] | None = None,
        objective: str = "decode",
        context: int = 4096,
        prompt_tokens: int = 512,
        batch: int = 1,
        download: bool = False,
    ) -> Plans:
        """Ranked plans for ``model`` on the cluster, those that pass the filters only.

        Only for a model this coordinator serves or one available on this machine (a model directory, the store, a
        what-if model, a synthetic preset): a preview fetches and builds nothing, and answers one 404 for
        anything else, a path that does not exist or one that is not a model alike (``download=True``: a hub
        model is downloaded, as a launch does)."""
        if objective not in OBJECTIVES:
            raise bad_request("'objective' must be 'decode' or 'ttft'.", "objective")
        strategies = _strategies(sharding)
        if node_ids:
            known = {n.id for n in self.cluster.topology.nodes.values()} | {n.name for n in self.cluster.nodes}
            unknown = [n for n in node_ids if n not in known]
            if unknown:
                raise bad_request(f"unknown node(s) in 'node_ids': {', '.join(unknown)}.", "node_ids")
        self.cluster.refresh()
        ref = self._model_ref(model)
        try:
            plans = self.cluster.preview(ref, context, prompt_tokens, objective, batch, download=download)
        except ModelNotFoundError as exc:
            raise ApiError(404, str(exc), param="model_id", code="model_not_found") from exc
        return plans.filtered(strategies, min_nodes, node_ids)

    def _model_ref(self, model: str) -> str:
        """A served name stands for the model it serves; anything else is a model reference."""
        for inst in self.cluster.instances:
            if inst.name == model:
                return inst.model
        return model

    # instances
    def launch(
        self,
        model: str,
        plan: int | dict[str, Any] | Plan | None = None,
        *,
        name: str | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        **filters: Any,
    ) -> Instance:
        """Launch ``model`` with ``plan`` (an index into :meth:`previews` with ``filters``, a plan's JSON,
        or None for the best) and serve it under ``name``; returns at once (the instance loads on)."""
        if isinstance(plan, dict):
            try:
                chosen = Plan.from_json(plan)
            except (KeyError, TypeError, ValueError) as exc:
                raise bad_request(f"'plan' is not a plan from /instance/previews: {exc}", "plan") from exc
        elif isinstance(plan, Plan):
            chosen = plan
        else:
            plans = self.previews(model, download=True, **filters)  # launching a hub model downloads it
            index = 0 if plan is None else plan
            if not plans.plans:
                why = "; ".join(sorted({p.reason or "" for p in plans.infeasible})[:3]) or "no plan passes the filters"
                raise ApiError(409, f"no plan fits {model}: {why}", param="model_id", code="no_plan")
            if not 0 <= index < len(plans.plans):
                raise bad_request(f"'plan' must be an index from 0 to {len(plans.plans) - 1}.", "plan")
            chosen = plans.plans[index]
        if not chosen.feasible:
            raise ApiError(409, f"the plan is infeasible: {chosen.reason}", param="plan", code="infeasible_plan")
        served = name or model
        with self._lock:
            if served in self.registry.names() or served in self._launching:
                raise ApiError(
                    409,
                    f"this node already serves an instance named {served!r}; pass another name.",
                    param="name",
                    code="name_taken",
                )
            self._launching[served] = model
        try:
            inst = self.cluster.launch(
                self._model_ref(model), plan=chosen, name=served, wait=False, max_batch=max_batch, max_queue=max_queue
            )
        except ModelNotFoundError as exc:
            raise ApiError(404, str(exc), param="model_id", code="model_not_found") from exc
        except (LaunchError, ClusterError) as exc:
            raise ApiError(409, str(exc), param="plan", code="launch_failed") from exc
        finally:
            with self._lock:
                self._launching.pop(served, None)
        self.watch.poll()  # the launch is an event now, not a second later
        return inst

    def adopt(self, inst: Instance, name: str | None = None) -> None:
        """Serve ``inst`` (launched by this coordinator) on the API under ``name`` (default: its name)."""
        self.registry.add(inst, name or inst.name)

    def instances(self) -> list[dict[str, Any]]:
        """Every instance of the cluster, wherever it was launched."""
        return [i.to_json() for i in cluster_instances.gather(self.cluster)]

    def instance(self, instance_id: str) -> dict[str, Any]:
        try:
            return cluster_instances.find(self.cluster, instance_id).to_json()
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0]), code="instance_not_found") from exc

    def delete(self, instance_id: str) -> dict[str, Any]:
        """Stop an instance of the cluster: ours directly, another coordinator's through it (or its agents)."""
        ours = next((i for i in self.cluster.instances if instance_id in (i.id, i.launch_id)), None)
        if ours is not None:
            self._forget(ours)
            ours.delete()
            how = "owner"
        else:
            try:
                found = cluster_instances.find(self.cluster, instance_id)
            except KeyError as exc:
                raise ApiError(404, str(exc.args[0]), code="instance_not_found") from exc
            how = cluster_instances.stop(self.cluster, found)
        self.watch.poll()
        return {"id": instance_id, "deleted": True, "via": how}

    def _forget(self, inst: Instance) -> None:
        if inst in self.cluster.instances:
            self.cluster.instances.remove(inst)
        for served, backend in self.registry.items():
            if backend is inst:
                self.registry.remove(served)

    def state(self) -> dict[str, Any]:
        """Nodes, links, instances and models on disk."""
        return cluster_instances.state(self.cluster)

    # serving
    def route(self, model: str) -> str | None:
        """The API URL of another coordinator serving ``model`` (a ready instance first), or None."""
        owner = self.route_owner(model)
        return owner["api"] if owner else None

    def route_owner(self, model: str) -> dict[str, Any] | None:
        """The owner (``{"api", "coordinator", "label"}``) of another coordinator's instance serving ``model``
        (a ready instance first), or None."""
        own = getattr(self.cluster, "api_url", None)
        candidates = [
            i
            for i in self.watch.last["instances"].values()
            if i["name"] == model and i["owner"].get("api") and i["owner"].get("api") != own
        ]
        if not candidates:
            candidates = [
                i.to_json()
                for i in cluster_instances.gather(self.cluster)
                if i.name == model and i.api and i.api != own
            ]
        order = {"ready": 0, "loading": 1, "launching": 1, "replacing": 2}
        candidates = [i for i in candidates if i["state"] in order]
        if not candidates:
            return None
        return dict(min(candidates, key=lambda i: order[i["state"]])["owner"])

    def models(self) -> list[dict[str, Any]]:
        """Instances of the cluster served by other coordinators (for ``/v1/models``), one per name."""
        own = set(self.registry.names())
        out: dict[str, dict[str, Any]] = {}
        for i in self.watch.last["instances"].values():
            if i["name"] not in own and i["state"] not in ("failed", "stopped") and i["owner"].get("api"):
                out.setdefault(i["name"], i)
        return list(out.values())

    def subscribe(self, callback: Subscriber):
        """Call ``callback(event)`` on every change of the cluster (see :class:`ClusterWatch`)."""
        return self.watch.subscribe(callback)

    def _on_event(self, event: dict[str, Any]) -> None:
        """Housekeeping: our instances that stopped on their own (deleted elsewhere) leave the registry."""
        if event["type"] in ("instance_deleted", "instance_failed"):
            for inst in list(self.cluster.instances):
                if inst.state == "stopped":
                    self._forget(inst)

    def wait_for(self, predicate, timeout: float = 60.0) -> dict[str, Any]:
        """Block until ``predicate(snapshot)`` holds for a watch snapshot; returns it (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.watch.last
            if predicate(snap):
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach the state waited for")
            with self.watch.changed:
                self.watch.changed.wait(0.5)
