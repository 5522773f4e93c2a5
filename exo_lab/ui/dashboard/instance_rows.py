"""The dashboard's instances, one row each: the cluster's (as :meth:`exo_lab.control.Control.instances` lists
them, wherever they were launched) merged with the models served in this process (which add request stats
and can be chatted with).

A row's state, progress and plan come from the backend served here when there is one (it knows first), else
from the cluster's record; an instance that is being stopped from this dashboard shows ``stopping…``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_lab.cluster.topology import Topology
from exo_lab.engine.backend import Backend
from exo_lab.placement.plan import Plan
from exo_lab.ui import instance_monitor as im

#: states in which an instance is still coming up (its progress bar shows)
LOADING = ("launching", "loading", "replacing")


@dataclass
class InstanceRow:
    """One instance as the dashboard shows it."""

    id: str  # "" for a model served in this process that is no instance of the cluster (an Engine)
    name: str
    model: str
    state: str
    loaded: tuple[int, int]  # layers loaded, layers in total (0, 0: unknown)
    owner: str  # who launched it and serves it
    nodes: list[str]  # node names
    plan: str  # the plan's description
    error: str = ""
    backend: Backend | None = None  # served here: chat-able, with request stats
    stoppable: bool = False
    reserved_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        """What the table shows of it (the table redraws when this changes)."""
        return (self.id, self.name, self.state, self.loaded, self.owner, tuple(self.nodes), self.plan, self.error)


def _plan_description(plan: Mapping[str, Any]) -> str:
    if not plan:
        return ""
    if plan.get("description"):
        return str(plan["description"])
    try:
        return Plan.from_json(dict(plan)).describe()
    except (KeyError, TypeError, ValueError):
        return str(plan.get("strategy", ""))


def _node_names(ids: Sequence[str], topology: Topology | None) -> list[str]:
    nodes = topology.nodes if topology is not None else {}
    return [nodes[n].name if n in nodes else n for n in ids]


def _local_row(name: str, backend: Backend, can_stop: bool) -> InstanceRow:
    summary = im.instance_summary(backend)
    progress = im.loading_progress(backend)
    plan = summary["plan"]
    inst = im.as_instance(backend)
    iid = str(getattr(inst, "id", "") or "") if inst is not None else ""
    return InstanceRow(
        id=iid,
        name=name,
        model=summary["model"],
        state=summary["state"],
        loaded=(progress["done"], progress["total"]) if progress["ranks"] else (0, 0),
        owner="here",
        nodes=list(plan["nodes"]) if plan else ["this process"],
        plan=plan["description"] if plan else "one process (this machine)",
        error=summary["error"],
        backend=backend,
        stoppable=can_stop and bool(iid),
    )


def merge_rows(
    served: Sequence[tuple[str, Backend]],
    cluster: Sequence[Mapping[str, Any]],
    topology: Topology | None = None,
    stops: Mapping[str, str] | None = None,
    can_stop: bool = False,
) -> list[InstanceRow]:
    """Rows for the models ``served`` here (``(name, backend)``) and the ``cluster``'s instances (dicts as
    ``Control.instances()`` gives them), each instance once; ``stops``: id -> how stopping it goes."""
    stops = stops or {}
    rows = [_local_row(name, backend, can_stop) for name, backend in served]
    by_id = {r.id: r for r in rows if r.id}
    for d in cluster:
        iid = str(d.get("id", ""))
        owner = d.get("owner") or {}
        label = str(owner.get("label") or "")
        row = by_id.get(iid)
        if row is not None:  # served here: the backend's own state is the freshest; the agents add the owner
            row.owner = f"{label} (here)" if label else row.owner
            row.reserved_bytes = dict(d.get("reserved_bytes") or {})
            continue
        done, total = (list(d.get("loaded") or [0, 0]) + [0, 0])[:2]
        rows.append(
            InstanceRow(
                id=iid,
                name=str(d.get("name") or d.get("model") or iid),
                model=str(d.get("model") or ""),
                state=str(d.get("state") or "launching"),
                loaded=(int(done), int(total)),
                owner=label or (str(owner.get("api")) if owner.get("api") else "unknown"),
                nodes=_node_names(list(d.get("nodes") or []), topology),
                plan=_plan_description(d.get("plan") or {}),
                error=str(d.get("error") or ""),
                stoppable=can_stop and bool(iid),
                reserved_bytes=dict(d.get("reserved_bytes") or {}),
            )
        )
    for row in rows:
        how = stops.get(row.id) if row.id else None
        if how is not None and not how.startswith("stop failed"):
            row.state, row.stoppable = how, False  # "stopping…" or "stopped"
    return rows
