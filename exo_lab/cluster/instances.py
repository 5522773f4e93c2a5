"""The cluster's instances as any member sees them: gathered from the node agents, stopped by id.

Every node agent keeps, for each instance with ranks on it, who owns it (the coordinator, its
label and the URL of the API that serves it), what it runs, and the status the owner last
reported with its lease (see :mod:`exo_lab.cluster.workers`). Reading ``/instances`` from every
live agent and merging by id gives the cluster's instances, wherever they were launched; this
is what ``GET /instances``, ``exo-lab instances`` and the dashboards show. Needs no MLX.

An instance keeps its public id across re-placements (its owner sends it as ``info.id``); the agents key
each placement by its own id (the *launch id*: the public id, then ``<id>-r1``, ``<id>-r2``, ...), which
:attr:`ClusterInstance.launch_ids` keeps per node for stopping it there.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from exo_lab.cluster.client import ClusterClient, ClusterError
from exo_lab.cluster.http import RequestError, SignedClient

log = logging.getLogger(__name__)

#: how an agent's own view of its workers maps to an instance state when the owner reported none yet
_AGENT_STATES = {"prepared": "launching", "running": "loading", "failed": "failed", "stopped": "stopped"}


@dataclass
class ClusterInstance:
    """One instance of the cluster, merged from the agents that hold its ranks."""

    id: str
    model: str
    name: str
    owner: dict[str, Any]  # {"coordinator", "label", "api"}
    nodes: list[str]
    state: str
    loaded: tuple[int, int] = (0, 0)
    error: str | None = None
    reserved_bytes: dict[str, int] = field(default_factory=dict)  # node id -> bytes
    pids: dict[str, list[int]] = field(default_factory=dict)  # node id -> live worker pids
    plan: dict[str, Any] = field(default_factory=dict)
    #: node id -> the ids the node's agent knows this instance by (its placements' launch ids: one, but for a
    #: moment during a re-placement)
    launch_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def api(self) -> str | None:
        """The URL of the API that serves it (its owner's), if it serves one."""
        return self.owner.get("api") or None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "name": self.name,
            "owner": self.owner,
            "nodes": self.nodes,
            "state": self.state,
            "loaded": list(self.loaded),
            "error": self.error,
            "reserved_bytes": self.reserved_bytes,
            "pids": self.pids,
            "plan": self.plan,
            "launch_ids": self.launch_ids,
        }


def _merge(per_node: dict[str, list[dict[str, Any]]]) -> list[ClusterInstance]:
    out: dict[str, ClusterInstance] = {}
    for node, items in sorted(per_node.items()):
        for d in items:
            info = d.get("info") or {}
            status = d.get("status") or {}
            public = str(info.get("id") or d["id"])  # older owners send no public id: the agents' is the id
            inst = out.get(public)
            if inst is None:
                inst = out[public] = ClusterInstance(
                    id=public,
                    model=str(info.get("model", "")),
                    name=str(info.get("name") or info.get("model", "")),
                    owner=dict(d.get("owner") or {}),
                    nodes=list(info.get("nodes") or []),
                    state=str(status.get("state") or _AGENT_STATES.get(d.get("state", ""), "launching")),
                    loaded=tuple(status.get("loaded") or (0, 0)),  # type: ignore[arg-type]
                    error=status.get("error"),
                    plan=dict(info.get("plan") or {}),
                )
            if d.get("state") == "failed" and inst.state not in ("failed", "replacing", "stopped"):
                inst.state = "failed"  # a worker died: the agent knows before the owner reports it
                inst.error = inst.error or f"a worker on node {node} exited"
            inst.launch_ids.setdefault(node, []).append(d["id"])
            inst.reserved_bytes[node] = int(d.get("reserved_bytes", 0))
            inst.pids[node] = [r["pid"] for r in d.get("ranks", []) if r.get("pid") and r.get("alive")]
            if node not in inst.nodes:
                inst.nodes.append(node)
    return sorted(out.values(), key=lambda i: (i.name, i.id))


def gather(client: ClusterClient) -> list[ClusterInstance]:
    """Every instance with ranks on a live node of ``client``'s cluster."""
    nodes = [n.id for n in client.topology.alive()]

    def read(node: str) -> list[dict[str, Any]]:
        try:
            return client.request(client.address_of(node), "GET", "/instances", timeout=5)["instances"]
        except (ClusterError, KeyError) as exc:
            log.debug("instances of %s: %s", node, exc)
            return []

    with ThreadPoolExecutor(8) as pool:
        merged = _merge(dict(zip(nodes, pool.map(read, nodes))))
    listed = {i.id for i in merged}
    own = [v for v in _own(client) if v.id not in listed and v.state not in ("stopped",)]
    return sorted(merged + own, key=lambda i: (i.name, i.id))


def _own(client: ClusterClient) -> list[ClusterInstance]:
    """This coordinator's own instances as it sees them (``Instance.cluster_view``): one being re-placed, or one
    that failed to be, is on no agent (its workers are stopped) but still there, under its public id."""
    out = []
    for inst in list(client.instances):
        view = getattr(inst, "cluster_view", None)
        if callable(view):
            try:
                out.append(view())
            except Exception as exc:  # a view is a courtesy: never fail the listing for it
                log.debug("the view of %r: %s", inst, exc)
    return out


def find(client: ClusterClient, instance_id: str) -> ClusterInstance:
    """The instance ``instance_id`` (KeyError naming those that exist when there is none)."""
    found = gather(client)
    for inst in found:
        if instance_id == inst.id or any(instance_id in ids for ids in inst.launch_ids.values()):
            return inst
    raise KeyError(f"no instance {instance_id!r} in the cluster; instances: {', '.join(i.id for i in found) or 'none'}")


def stop(client: ClusterClient, inst: ClusterInstance) -> str:
    """Stop ``inst``: through its owner's API (which ends its requests cleanly), else on its agents.

    Deleting on the agents is enough on its own: the owner's next lease renewal is refused, so
    it stops too. Returns how it was stopped (``"owner"`` or ``"agents"``).
    """
    if inst.api:
        try:
            owner = inst.owner.get("coordinator") or None  # the request is signed for that coordinator only
            SignedClient(inst.api, client.cluster_key, timeout=30, node=owner).json("DELETE", f"/instance/{inst.id}")
            return "owner"
        except RequestError as exc:
            log.info("the owner of %s did not stop it (%s); stopping it on its nodes", inst.id, exc)
    for node in inst.nodes:
        for iid in inst.launch_ids.get(node) or [inst.id]:
            try:
                client.request(client.address_of(node), "DELETE", f"/instances/{iid}", timeout=30)
            except (ClusterError, KeyError) as exc:
                log.debug("deleting %s on %s: %s", iid, node, exc)
    return "agents"


def models_on_disk(client: ClusterClient) -> dict[str, list[str]]:
    """The models in each live node's store (what it can load without fetching)."""
    return {n.id: list(n.models) for n in client.topology.alive()}


def state(client: ClusterClient) -> dict[str, Any]:
    """``GET /state``: nodes, links, instances and models on disk, as JSON."""
    topo = client.topology.to_json()
    return {
        "nodes": topo.get("nodes", []),
        "links": topo.get("links", []),
        "instances": [i.to_json() for i in gather(client)],
        "models": models_on_disk(client),
    }
