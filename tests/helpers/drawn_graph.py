"""What exo_lab's cluster-graph renderer (exo_lab/ui/static/topology.js) drew on a page, read from its SVG.

The notebook widget, the Panel dashboard and the JupyterLab side panel all draw with that one ES module, so
browser tests in the three places check the same thing: one ``g.exo-node`` per node, one labelled edge per
connected pair (``data-source``/``data-target``, the measured latency · bandwidth label, on one line or two),
the same parts per node.
"""

from __future__ import annotations

from typing import Any

# Finds the first renderer SVG under ``scope`` (a CSS selector, or the whole page), through shadow roots too
# (Panel renders into them), and reads it.
_READ = """
(scope) => {
  const found = [];
  const walk = (root) => {
    root.querySelectorAll("svg.exo-svg").forEach((e) => found.push(e));
    root.querySelectorAll("*").forEach((e) => { if (e.shadowRoot) walk(e.shadowRoot); });
  };
  walk(scope ? document.querySelector(scope) || document.createElement("div") : document);
  const svg = found.find((s) => s.querySelector("g.exo-node"));
  if (!svg) return null;
  const nodes = [...svg.querySelectorAll("g.exo-nodes > g.exo-node")];
  return {
    nodes: nodes.map((g) => g.getAttribute("data-node-id")).sort(),
    names: nodes.map((g) => g.getAttribute("data-node-name")).sort(),
    edges: [...svg.querySelectorAll("g.exo-edge-labels > g")].map((g) =>
      [g.getAttribute("data-source"), g.getAttribute("data-target"),
       [...g.querySelectorAll("text")].map((t) => t.textContent).join(" · ")]).sort(),  // one line or two
    lines: svg.querySelectorAll("g.exo-edges > g.exo-edge > line.exo-edge-line").length,
    node_parts: [...nodes[0].children].map((c) => `${c.tagName}.${(c.getAttribute("class") || "").split(" ")[0]}`),
    pills: [...svg.querySelectorAll(".exo-node-pill text")].map((t) => t.textContent).sort(),
    selected: [...svg.querySelectorAll("g.exo-node.selected")].map((g) => g.getAttribute("data-node-id")),
  };
}
"""

# The parts the renderer draws for a node with a known memory size, in order.
NODE_PARTS = [
    "circle.exo-node-halo",
    "circle.exo-mem-track",
    "circle.exo-mem-used",
    "circle.exo-node-body",
    "text.exo-node-mem",
    "text.exo-node-unit",
    "g.exo-node-label",
    "title.",
]


def drawn_graph(page: Any, scope: str | None = None) -> dict[str, Any] | None:
    """The renderer's drawing on ``page`` (a Playwright page), or None when there is none (yet)."""
    return page.evaluate(_READ, scope)


def expected_graph(graph: dict[str, Any]) -> dict[str, Any]:
    """What the renderer draws for ``graph`` (``exo_lab.ui.topology_widget.graph_json``): nodes and labelled edges."""
    return {
        "nodes": sorted(n["id"] for n in graph["nodes"]),
        "names": sorted(n["name"] for n in graph["nodes"]),
        "edges": sorted([e["source"], e["target"], e["label"]] for e in graph["edges"]),
        "lines": len(graph["edges"]),
        "node_parts": NODE_PARTS,
    }


def assert_drawn(drawn: dict[str, Any] | None, graph: dict[str, Any]) -> None:
    """``drawn`` is the renderer's drawing of ``graph``."""
    assert drawn is not None, "no cluster graph drawn by exo_lab's renderer on the page"
    got = {k: drawn[k] for k in ("nodes", "names", "edges", "lines", "node_parts")}
    assert got == expected_graph(graph)
