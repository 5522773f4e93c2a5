"""Changes of the cluster's state as events: nodes joining and going, instances loading, ready, failed, deleted.

A :class:`ClusterWatch` polls the agents (topology and instances) on a thread of its own and
compares each snapshot with the last one; every difference becomes an event, a JSON-ready dict
with a ``type``, sent to every subscriber (``GET /events``, the dashboards). Subscribers get the
whole state first, as a ``state`` event, so they never miss what happened before they came.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from exo_lab.cluster import instances as cluster_instances
from exo_lab.cluster.client import ClusterClient, ClusterError

log = logging.getLogger(__name__)

Event = dict[str, Any]
Subscriber = Callable[[Event], object]


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[Event]:
    """Events that turn snapshot ``before`` into ``after`` (each from :meth:`ClusterWatch.snapshot`)."""
    out: list[Event] = []
    old_nodes, new_nodes = before.get("nodes", {}), after.get("nodes", {})
    for node, n in new_nodes.items():
        was = old_nodes.get(node)
        if n["state"] == "alive" and (was is None or was["state"] != "alive"):
            out.append({"type": "node_joined", "node": n})
        elif n["state"] != "alive" and was is not None and was["state"] == "alive":
            out.append({"type": "node_gone", "node": n})
    out += [{"type": "node_gone", "node": n} for node, n in old_nodes.items() if node not in new_nodes]
    old, new = before.get("instances", {}), after.get("instances", {})
    for iid, inst in new.items():
        was = old.get(iid)
        if was is None:
            out.append({"type": "instance_created", "instance": inst})
        if inst["state"] in ("ready", "failed") and (was is None or was["state"] != inst["state"]):
            out.append({"type": f"instance_{inst['state']}", "instance": inst})
        elif inst["state"] in ("launching", "loading", "replacing") and (
            was is None or (was["state"], was["loaded"]) != (inst["state"], inst["loaded"])
        ):
            out.append({"type": "instance_loading", "instance": inst})
    out += [{"type": "instance_deleted", "instance": inst} for iid, inst in old.items() if iid not in new]
    return out


class ClusterWatch:
    """Polls ``client``'s cluster every ``interval_s`` and tells subscribers what changed."""

    def __init__(self, client: ClusterClient, interval_s: float = 1.0) -> None:
        self.client = client
        self.interval_s = interval_s
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._last: dict[str, Any] = {"nodes": {}, "instances": {}}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changed = threading.Condition()  # notified after every poll (for callers that wait for a state)

    def snapshot(self) -> dict[str, Any]:
        """The state now: nodes and instances by id, as JSON."""
        self.client.refresh()
        nodes = {
            n.id: {"id": n.id, "name": n.name, "state": n.state, "addresses": n.addresses}
            for n in self.client.topology.nodes.values()
        }
        insts = {i.id: i.to_json() for i in cluster_instances.gather(self.client)}
        return {"nodes": nodes, "instances": insts}

    @property
    def last(self) -> dict[str, Any]:
        """The latest snapshot (polled at most ``interval_s`` ago while the watch runs)."""
        with self._lock:
            return self._last

    def start(self) -> ClusterWatch:
        if self._thread is None:
            self.poll()
            self._thread = threading.Thread(target=self._loop, name="exo-lab-cluster-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every change (first with a ``state`` event); returns the unsubscriber."""
        with self._lock:
            self._subscribers.append(callback)
            first = {"type": "state", "time": time.time(), **self._public(self._last)}
        callback(first)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    @staticmethod
    def _public(snap: dict[str, Any]) -> dict[str, Any]:
        return {"nodes": list(snap["nodes"].values()), "instances": list(snap["instances"].values())}

    def poll(self) -> list[Event]:
        """Take a snapshot now and send the events it implies."""
        try:
            snap = self.snapshot()
        except ClusterError as exc:
            log.debug("cluster watch: %s", exc)
            return []
        with self._lock:
            events = diff(self._last, snap)
            self._last = snap
            subscribers = list(self._subscribers)
        now = time.time()
        for event in events:
            event["time"] = now
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:  # one broken subscriber must not stop the others
                    log.exception("cluster watch subscriber failed")
        with self.changed:
            self.changed.notify_all()
        return events

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
