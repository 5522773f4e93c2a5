"""The dashboard's cluster: the graph (drawn by exo_lab's one renderer, the topology widget's ES module, through
Panel's AnyWidgetComponent) with what each node runs, and the node table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar

import pandas as pd
import panel as pn
import param

from exo_lab.cluster.display import measured_when
from exo_lab.cluster.topology import Topology
from exo_lab.engine.backend import Backend
from exo_lab.instance import Instance
from exo_lab.ui.dashboard.frames import typed_frame
from exo_lab.ui.dashboard.theme import GIB, SERIES, card, card_title, html_pane
from exo_lab.ui.topology_widget import RENDERER_CSS, RENDERER_JS, graph_json

# inside a dashboard card: the card is the frame
EMBEDDED_CSS = ".exo-topo { border: 0; border-radius: 0; padding: 4px 0 0; }"


class ClusterGraph(pn.custom.AnyWidgetComponent):
    """The cluster graph: the same ES module and the same data (``graph_json``) as the notebook's TopologyWidget."""

    _esm = RENDERER_JS
    _stylesheets: ClassVar[list[str]] = [
        RENDERER_CSS.read_text()
    ]  # as text: Panel serves files only from the component's own folder

    topology = param.Dict(default={}, doc="Topology.to_json() plus the drawn edges (graph_json)")
    selected_node = param.String(default="", doc="the node whose profile the details box shows")
    highlight = param.Dict(default={}, doc="overlay: {'nodes': {id: {'label', 'color'}}, 'edges': [[a, b], ...]}")
    title = param.String(default="Cluster topology")
    error = param.String(default="")


def _running(instances: Sequence[tuple[str, Backend]]) -> list[tuple[str, Instance]]:
    """The cluster's instances (backends with a plan over nodes) that are not stopped or failed."""
    return [
        (name, inst)
        for name, inst in instances
        if isinstance(inst, Instance) and inst.state not in ("stopped", "failed")
    ]


def instance_shards(instances: Sequence[tuple[str, Backend]]) -> dict[str, list[str]]:
    """``{node id: ["demo · layers 0-1", ...]}``: what each node runs for the running instances."""
    out: dict[str, list[str]] = {}
    for name, inst in _running(instances):
        for r in inst.plan.ranks:
            start, end = r.layers
            where = f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"
            label = f"{name} · {where}" + (f" x{r.tensor_size}" if r.tensor_size > 1 else "")
            if label not in out.setdefault(r.node_id, []):
                out[r.node_id].append(label)
    return out


def shard_highlight(instances: Sequence[tuple[str, Backend]]) -> dict[str, Any]:
    """The graph's overlay for what runs where: nodes labelled with their shards (a colour per instance), and
    the links between consecutive pipeline stages."""
    nodes: dict[str, dict[str, str]] = {}
    edges: list[list[str]] = []
    running = _running(instances)
    for i, (_name, inst) in enumerate(running):
        color = SERIES[i % len(SERIES)]
        stages = list(dict.fromkeys(r.node_id for r in inst.plan.ranks))
        edges += [[a, b] for a, b in pairwise(stages)]
        for node_id in stages:
            nodes.setdefault(node_id, {"color": color})
    for node_id, labels in instance_shards(running).items():
        nodes[node_id]["label"] = " / ".join(labels)
    return {"nodes": nodes, "edges": edges} if nodes else {}


def node_frame(topo: Topology) -> pd.DataFrame:
    """The node table: one row per node, numbers rounded for reading."""
    rows = []
    for n in sorted(topo.nodes.values(), key=lambda n: n.name):
        p = n.profile or {}
        gf = p.get("matmul_gflops") or {}
        rows.append(
            {
                "node": n.name,
                "state": n.state,
                "chip": p.get("cpu_model") or "?",
                "cores": p.get("cpu_count") or 0,
                "memory free (GiB)": round(n.memory_available_bytes / GIB, 1),
                "memory (GiB)": round(n.memory_total_bytes / GIB, 1),
                "fp32 GFLOP/s": round(gf.get("float32_m512") or 0, 1),
                "memory GB/s": round(p.get("memory_bandwidth_gb_per_s") or 0, 1),
                "GB/s measured": measured_when(p),
                "BLAS": p.get("blas") or "",
                "address": ", ".join(n.addresses),
            }
        )
    return typed_frame(
        rows,
        {
            "node": str,
            "state": str,
            "chip": str,
            "cores": int,
            "memory free (GiB)": float,
            "memory (GiB)": float,
            "fp32 GFLOP/s": float,
            "memory GB/s": float,
            "GB/s measured": str,
            "BLAS": str,
            "address": str,
        },
    )


class ClusterView:
    """The topology card (the graph) and the nodes card (the table)."""

    def __init__(self) -> None:
        self.graph = ClusterGraph(
            title="Topology", sizing_mode="stretch_width", stylesheets=[EMBEDDED_CSS], margin=(4, 0)
        )
        self.note = html_pane()
        self.node_table = pn.widgets.Tabulator(
            node_frame(Topology()),
            show_index=False,
            disabled=True,
            sizing_mode="stretch_width",
            layout="fit_data_fill",
            theme="simple",
            selectable=False,
        )
        self.graph_card = card(self.graph, self.note, min_width=480)
        self.nodes_card = card(html_pane(card_title("Nodes")), self.node_table)
        self._key: Any = None

    def update(self, topo: Topology | None, version: int, instances: Sequence[tuple[str, Backend]]) -> None:
        """Redraw when the topology or what runs where changed."""
        if topo is None:
            self.note.object = "<div class='exo-hint'>Profiling this machine…</div>"
            return
        highlight = shard_highlight(instances)
        key = (version, json.dumps(highlight, sort_keys=True))
        if key == self._key:
            return
        self._key = key
        self.note.object = ""
        self.graph.param.update(topology=graph_json(topo), highlight=highlight)
        self.node_table.value = node_frame(topo)
