"""TopologyWidget: the synced graph data, selection, live refresh, the ESM contract and the notebook hook."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo_lab.cluster import client as client_mod
from exo_lab.cluster.display import topology_text
from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
from exo_lab.ui import TopologyWidget
from exo_lab.ui import topology_widget as tw
from tests.helpers.display import notebook_display
from tests.helpers.paths import SPECS
from tests.helpers.polling import poll


@pytest.fixture
def widgets() -> Iterator[list[TopologyWidget]]:
    made: list[TopologyWidget] = []
    yield made
    for w in made:
        w.close()


def test_synced_dict_has_nodes_and_best_edges(widgets):
    topo = Topology.load(SPECS / "home-lab-mixed.json")
    w = TopologyWidget(topology=topo, title="home lab")
    widgets.append(w)
    data = w.topology
    assert [n["id"] for n in data["nodes"]] == ["workstation", "nuc", "mbp"]
    assert data["links"] == topo.to_json()["links"]
    edges = {(e["source"], e["target"]): e for e in data["edges"]}
    assert set(edges) == {("workstation", "nuc"), ("workstation", "mbp"), ("nuc", "mbp")}
    fast, slow = edges["workstation", "nuc"], edges["nuc", "mbp"]
    assert fast["label"] == "0.25 ms · 9.4 Gbit/s" and fast["ok"] and not fast["gone"]
    assert slow["label"] == "4.8 ms · 360 Mbit/s"
    assert edges["workstation", "mbp"]["dst_address"] == "192.168.50.20"
    assert fast["width"] > slow["width"] >= 1.5
    assert w.title == "home lab" and w.selected_node == "" and w.highlight == {}


def test_edges_pick_the_best_address_pair_and_mark_failures():
    nodes = {i: NodeInfo(i, f"n{i}", [f"10.0.0.{k}"]) for k, i in enumerate("abc")}
    nodes["c"].state = "gone"
    links = [
        LinkProfile("a", "b", "10.9.0.1", "10.9.0.2", 10.0, 12.0, 95, 94),
        LinkProfile("b", "a", "10.0.0.1", "10.0.0.0", 0.21, 0.3, 940, 950),  # measured from b: flipped
        LinkProfile("b", "c", "10.0.0.1", "10.0.0.2", 1.5, 2.0, 65000, 65000, rdma=True),
        LinkProfile("a", "c", "10.0.0.0", "10.0.0.2", error="ConnectionRefusedError"),
    ]
    edges = {(e["source"], e["target"]): e for e in tw.graph_edges(Topology(nodes, links))}
    ab = edges["a", "b"]
    assert ab["label"] == "0.21 ms · 940 Mbit/s" and ab["src_address"] == "10.0.0.0"
    assert edges["b", "c"]["label"] == "1.5 ms · 65 Gbit/s" and edges["b", "c"]["rdma"] and edges["b", "c"]["gone"]
    assert not edges["a", "c"]["ok"] and edges["a", "c"]["label"] == "unreachable"
    assert "ConnectionRefused" in edges["a", "c"]["error"]


def test_raw_topology_dict_gets_edges(widgets):
    w = TopologyWidget()
    widgets.append(w)
    assert w.topology["nodes"] == [] and w.topology["edges"] == []
    w.topology = Topology.load(SPECS / "m3-ultra-4x-tb5.json").to_json()
    assert len(w.topology["edges"]) == 6
    assert all(e["label"] == "0.05 ms · 65 Gbit/s" and e["rdma"] for e in w.topology["edges"])


def test_selected_node_observer_fires(widgets):
    w = TopologyWidget(topology=Topology.load(SPECS / "home-lab-mixed.json"))
    widgets.append(w)
    seen: list[str] = []
    w.observe(lambda change: seen.append(change["new"]), names="selected_node")
    w.set_state({"selected_node": "nuc"})  # as a click in the browser arrives
    w.selected_node = "mbp"
    assert seen == ["nuc", "mbp"]


class FakeCluster:
    """``refresh()`` + ``topology``; the nuc's free memory drops on the ``change_at``-th refresh."""

    def __init__(self, change_at: int = 3, fail: bool = False) -> None:
        self._topology = Topology.load(SPECS / "home-lab-mixed.json")
        self.change_at = change_at
        self.fail = fail
        self.refreshes = 0
        self.lock = threading.Lock()

    def refresh(self) -> FakeCluster:
        with self.lock:
            self.refreshes += 1
            if self.fail:
                raise client_mod.ClusterError("no node agent answered at 10.0.0.1:52416")
            if self.refreshes == self.change_at:
                self._topology = Topology.from_json(self._topology.to_json())
                self._topology.nodes["nuc"].profile["memory_available_bytes"] = 1 << 30
        return self

    @property
    def topology(self) -> Topology:
        with self.lock:
            return self._topology


def test_live_refresh_pushes_changes_only_and_close_stops(widgets):
    cluster = FakeCluster(change_at=3)
    w = TopologyWidget(cluster=cluster, refresh_s=0.02)
    widgets.append(w)
    pushes: list[dict] = []
    w.observe(lambda change: pushes.append(change["new"]), names="topology")
    assert w.live
    assert poll(lambda: cluster.refreshes >= 8), "the refresh thread did not run"
    assert len(pushes) == 1, "only the refresh that changed something should push"
    nuc = next(n for n in w.topology["nodes"] if n["id"] == "nuc")
    assert nuc["profile"]["memory_available_bytes"] == 1 << 30
    w.close()
    assert not w.live
    stopped_at = cluster.refreshes
    assert not poll(lambda: cluster.refreshes > stopped_at, deadline_s=0.2)


def test_refresh_failure_is_shown_and_cleared(widgets):
    cluster = FakeCluster(change_at=-1)
    w = TopologyWidget(cluster=cluster, refresh_s=0.02)
    widgets.append(w)
    cluster.fail = True
    assert poll(lambda: "no node agent answered" in w.error)
    assert w.live, "a failed refresh must not stop the thread"
    cluster.fail = False
    assert poll(lambda: w.error == "")


def test_esm_exports_render_and_the_drawing_functions():
    """One renderer: anywidget's ``render`` (notebook, Panel dashboard) and the named exports the JupyterLab panel
    bundles (extensions/jupyterlab/src/renderer.ts imports this very file)."""
    source = tw.RENDERER_JS.read_text()
    assert str(TopologyWidget._esm) == source, "_esm is loaded from the .js file"
    assert re.search(r"export\s+default\s*\{\s*render\s*\}", source) or re.search(r"export\s+function\s+render", source)
    for name in ("drawGraph", "drawLegend", "gib", "memory", "usageClass"):
        assert re.search(rf"export\s+function\s+{name}\(", source), name
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", source), "the front end must not fetch anything"
    assert tw.RENDERER_CSS.is_file()
    panel = (Path(__file__).resolve().parents[2] / "extensions" / "jupyterlab" / "src" / "renderer.ts").read_text()
    assert "from '../../../exo_lab/ui/static/topology.js'" in panel


def test_topology_mimebundle_is_a_live_widget_view(monkeypatch):
    monkeypatch.setattr(tw, "in_widget_kernel", lambda: True)
    topo = Topology.load(SPECS / "home-lab-mixed.json")
    topo._source = FakeCluster()
    data, _metadata = notebook_display(topo)
    view = data[tw.WIDGET_VIEW_MIME]
    assert view["version_major"] == 2
    assert data["text/plain"] == topology_text(topo)
    from ipywidgets.widgets.widget import _instances

    widget = _instances[view["model_id"]]
    try:
        assert isinstance(widget, TopologyWidget) and widget.live
        assert [n["id"] for n in widget.topology["nodes"]] == ["workstation", "nuc", "mbp"]
    finally:
        widget.close()
    assert not widget.live


def test_topology_mimebundle_falls_back_outside_a_kernel():
    topo = Topology.load(SPECS / "home-lab-mixed.json")
    data, _metadata = notebook_display(topo)  # outside a kernel: the tables, no widget
    assert tw.WIDGET_VIEW_MIME not in data
    assert "<table>" in data["text/html"] and data["text/html"] == topo._repr_html_()
    assert "_source" not in topo.to_json()


def test_cluster_refresh_sets_the_back_reference(monkeypatch):
    info = NodeInfo("n1", "node-1", ["127.0.0.1"], profile={"memory_total_bytes": 8 << 30})
    monkeypatch.setattr(client_mod.ClusterClient, "_read_agent", lambda self, address: (info, [], []))
    cluster = client_mod.ClusterClient(["127.0.0.1:1"], cluster_key="k" * 32)
    assert cluster.topology._source is cluster
    assert Topology.from_json(cluster.topology.to_json())._source is None
