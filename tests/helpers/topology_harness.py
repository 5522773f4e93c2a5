"""A standalone page that runs the topology widget's ESM with a fake anywidget model (browser tests, screenshots).

The page imports ``exo_lab/ui/static/topology.js`` through a blob URL (a file:// page may not import modules
by path) and calls its ``render({model, el})``. ``window.fakeModel`` records what the view sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exo_lab.cluster.topology import Topology
from exo_lab.ui.topology_widget import RENDERER_CSS, RENDERER_JS, graph_json

# JupyterLab's dark theme variables, to check that the widget follows the theme.
DARK = {
    "--jp-ui-font-color1": "rgba(255,255,255,0.87)",
    "--jp-ui-font-color2": "rgba(255,255,255,0.54)",
    "--jp-ui-font-color3": "rgba(255,255,255,0.38)",
    "--jp-layout-color1": "#111111",
    "--jp-layout-color2": "#212121",
    "--jp-layout-color3": "#424242",
    "--jp-border-color2": "#424242",
    "--jp-brand-color1": "#42a5f5",
}

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>exo_lab topology widget</title>
<style>
  body {{ margin: 0; padding: 20px; background: {page_bg}; }}
  #root {{ width: {width}px; }}
  {css}
</style></head>
<body><div id="root" style="{theme}"></div>
<script type="module">
const source = {esm};
const state = {state};
class FakeModel {{
  constructor(s) {{ this.state = s; this.handlers = {{}}; this.saved = 0; }}
  get(key) {{ return this.state[key]; }}
  set(key, value) {{
    this.state[key] = value;
    for (const fn of this.handlers["change:" + key] || []) fn();
  }}
  on(event, fn) {{ (this.handlers[event] ||= []).push(fn); }}
  off(event, fn) {{ this.handlers[event] = (this.handlers[event] || []).filter((f) => f !== fn); }}
  save_changes() {{ this.saved += 1; }}
}}
window.fakeModel = new FakeModel(state);
const url = URL.createObjectURL(new Blob([source], {{ type: "text/javascript" }}));
const mod = await import(url);
const render = (mod.default && mod.default.render) || mod.render;
window.cleanup = render({{ model: window.fakeModel, el: document.getElementById("root") }});
document.body.dataset.ready = "1";
</script></body></html>
"""


def write_harness(
    path: Path,
    topology: Topology,
    *,
    title: str = "Cluster topology",
    selected: str = "",
    highlight: dict[str, Any] | None = None,
    dark: bool = False,
    width: int = 940,
) -> Path:
    """Write the page to ``path`` and return it."""
    state = {
        "topology": graph_json(topology),
        "selected_node": selected,
        "highlight": highlight or {},
        "title": title,
        "error": "",
    }
    theme = "; ".join(f"{k}: {v}" for k, v in DARK.items()) if dark else ""
    page = _PAGE.format(
        page_bg=DARK["--jp-layout-color1"] if dark else "#ffffff",
        width=width,
        theme=theme,
        css=RENDERER_CSS.read_text(),
        esm=json.dumps(RENDERER_JS.read_text()).replace("</", "<\\/"),
        state=json.dumps(state).replace("</", "<\\/"),
    )
    path.write_text(page)
    return path
