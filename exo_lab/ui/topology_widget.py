"""A live graph of a cluster's topology: an anywidget drawn in SVG, no external libraries.

The synced ``topology`` dict is :meth:`Topology.to_json` plus an ``edges`` list
computed here (best link per node pair, its label and stroke width), so the
front end only draws. Given a ``cluster``, a background thread refreshes it
every ``refresh_s`` seconds and pushes the new dict when it changed.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any, Protocol

import anywidget
import traitlets

from exo_lab.cluster.display import topology_text
from exo_lab.cluster.topology import LinkProfile, Topology

log = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
# exo_lab's one cluster-graph renderer (an anywidget ES module) and its styles: this widget, the dashboard's
# graph (Panel's AnyWidgetComponent) and the JupyterLab side panel (which bundles it) all draw with it
RENDERER_JS = _STATIC / "topology.js"
RENDERER_CSS = _STATIC / "topology.css"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


class TopologySource(Protocol):
    """What the live refresh needs from a cluster (``exo_lab.Cluster`` is one)."""

    def refresh(self) -> Any: ...

    @property
    def topology(self) -> Topology: ...


def format_rtt(ms: float | None) -> str:
    if ms is None:
        return "? ms"
    return f"{ms:.2f} ms" if ms < 1 else f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def format_bandwidth(mbit_per_s: float) -> str:
    if mbit_per_s >= 1000:
        gbit = mbit_per_s / 1000
        return f"{gbit:.1f} Gbit/s" if gbit < 10 else f"{gbit:.0f} Gbit/s"
    return f"{mbit_per_s:.0f} Mbit/s"


def edge_width(mbit_per_s: float) -> float:
    """Stroke width in px, log scale: 10 Mbit/s -> 1.5, 100 Gbit/s -> 9."""
    if mbit_per_s <= 0:
        return 1.5
    t = min(max((math.log10(mbit_per_s) - 1) / 4, 0.0), 1.0)
    return round(1.5 + 7.5 * t, 2)


def _edge(topo: Topology, a: str, b: str, link: LinkProfile) -> dict[str, Any]:
    bw = link.bandwidth_mbit_per_s
    label = f"{format_rtt(link.rtt_ms_median)} · {format_bandwidth(bw)}"
    return {
        "source": a,
        "target": b,
        "ok": True,
        "label": label,
        "width": edge_width(bw),
        "rtt_ms": link.rtt_ms_median,
        "rtt_ms_p95": link.rtt_ms_p95,
        "bandwidth_mbit_per_s": bw,
        "src_address": link.src_address,
        "dst_address": link.dst_address,
        "rdma": link.rdma,
        "gone": topo.nodes[a].state != "alive" or topo.nodes[b].state != "alive",
    }


def graph_edges(topo: Topology) -> list[dict[str, Any]]:
    """One edge per connected node pair, from its best link; pairs with only failed probes are ``ok: False``."""
    ids = list(topo.nodes)
    edges = []
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            link = topo.best_link(a, b)
            if link is not None:
                edges.append(_edge(topo, a, b, link))
                continue
            failed = [x for x in topo.links_between(a, b) if x.error]
            if failed:
                edges.append(
                    {
                        "source": a,
                        "target": b,
                        "ok": False,
                        "label": "unreachable",
                        "width": 1.5,
                        "error": failed[0].error,
                        "src_address": failed[0].src_address,
                        "dst_address": failed[0].dst_address,
                        "rdma": False,
                        "gone": topo.nodes[a].state != "alive" or topo.nodes[b].state != "alive",
                    }
                )
    return edges


def graph_json(topo: Topology | dict[str, Any]) -> dict[str, Any]:
    """``Topology.to_json()`` plus the precomputed ``edges`` the front end draws."""
    if isinstance(topo, dict):
        topo = Topology.from_json(topo)
    return {**topo.to_json(), "edges": graph_edges(topo)}


class TopologyWidget(anywidget.AnyWidget):
    """Nodes sized by memory, links labelled with latency and bandwidth; click a node for its profile.

    ``highlight`` overlays a plan: ``{"nodes": {id: {"label": "layers 0-7", "color": "#e91e63"}},
    "edges": [[a, b], ...]}``.
    """

    _esm = RENDERER_JS
    _css = RENDERER_CSS

    topology = traitlets.Dict().tag(sync=True)
    selected_node = traitlets.Unicode("").tag(sync=True)
    highlight = traitlets.Dict().tag(sync=True)
    title = traitlets.Unicode("Cluster topology").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(
        self,
        topology: Topology | dict[str, Any] | None = None,
        cluster: TopologySource | None = None,
        refresh_s: float = 2.0,
        **kwargs: Any,
    ) -> None:
        if topology is None and cluster is not None:
            topology = cluster.topology
        super().__init__(topology=graph_json(topology if topology is not None else Topology()), **kwargs)
        self.refresh_s = refresh_s
        self._cluster = cluster
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if cluster is not None:
            self._thread = threading.Thread(target=self._refresh_loop, name="exo-lab-topology-refresh", daemon=True)
            self._thread.start()

    @traitlets.validate("topology")
    def _add_edges(self, proposal: dict[str, Any]) -> dict[str, Any]:
        value = proposal["value"]
        return value if "edges" in value or not value else graph_json(value)

    @traitlets.observe("comm")
    def _stop_on_comm_close(self, change: dict[str, Any]) -> None:
        if change["new"] is not None:
            change["new"].on_close(lambda _msg: self._stop_refresh())

    @property
    def live(self) -> bool:
        """Whether the background refresh is running."""
        return self._thread is not None and self._thread.is_alive()

    def _refresh_loop(self) -> None:
        cluster = self._cluster
        assert cluster is not None
        while not self._stop.wait(self.refresh_s):
            try:
                cluster.refresh()
                data = graph_json(cluster.topology)
            except Exception as exc:
                log.warning("topology refresh failed: %s", exc)
                self.error = f"refresh failed: {exc}"
                continue
            self.error = ""
            if data != self.topology:
                self.topology = data

    def _stop_refresh(self) -> None:
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 2 * self.refresh_s))

    def close(self) -> None:
        """Stop the live refresh and close the widget."""
        self._stop_refresh()
        super().close()


def in_widget_kernel() -> bool:
    """Whether we run in a Jupyter kernel, where a widget can be shown (not a terminal or a script)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def topology_mimebundle(topo: Topology, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The live graph for ``Topology._repr_mimebundle_``; None outside a kernel (tables are the fallback)."""
    if not in_widget_kernel():
        return None
    bundle = TopologyWidget(topology=topo, cluster=getattr(topo, "_source", None))._repr_mimebundle_(**kwargs)
    if bundle is None:
        return None
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    return {**data, "text/plain": topology_text(topo)}, metadata
