"""The plan comparison front end in headless Chromium: rows drawn, a click or a key selects, the graph follows.

The page runs ``plan_comparison.js`` and ``topology.js`` (as ``tests/topology_harness.py`` does) with fake
anywidget models; what Python does on a selection (``PlanComparison._show``) is replayed from highlights
recorded from a real :class:`PlanComparison`, so the page shows what a notebook would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exo_lab.cluster.topology import Topology
from exo_lab.models.card import card_from_config
from exo_lab.placement import plan
from exo_lab.ui import PlanComparison
from exo_lab.ui.plan_comparison import _STATIC as PLAN_STATIC
from exo_lab.ui.plan_comparison import NO_LAUNCH
from exo_lab.ui.topology_widget import _STATIC as TOPO_STATIC
from tests.helpers.cards import LLAMA_8B, LLAMA_70B
from tests.helpers.paths import ARTIFACTS, SPECS
from tests.helpers.topology_harness import DARK

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
    ),
]


TABLE_KEYS = ("rows", "infeasible", "summary", "selected", "limit", "measured", "launch")
TOPO_KEYS = ("topology", "selected_node", "highlight", "title", "error")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>exo_lab plan comparison</title>
<style>
  body {{ margin: 0; padding: 20px; background: {page_bg}; }}
  #root {{ width: {width}px; display: flex; flex-direction: column; }}
  {css}
</style></head>
<body><div id="root" style="{theme}"><div id="table"></div><div id="topology"></div></div>
<script type="module">
const sources = {sources};
const tableState = {table};
const topoState = {topology};
const shows = {shows};
class FakeModel {{
  constructor(s) {{ this.state = s; this.handlers = {{}}; this.saved = 0; this.sent = []; }}
  get(key) {{ return this.state[key]; }}
  set(key, value) {{
    this.state[key] = value;
    for (const fn of this.handlers["change:" + key] || []) fn();
  }}
  on(event, fn) {{ (this.handlers[event] ||= []).push(fn); }}
  off(event, fn) {{ this.handlers[event] = (this.handlers[event] || []).filter((f) => f !== fn); }}
  save_changes() {{ this.saved += 1; }}
  send(msg) {{ this.sent.push(msg); }}
}}
async function load(source) {{
  const url = URL.createObjectURL(new Blob([source], {{ type: "text/javascript" }}));
  const mod = await import(url);
  return (mod.default && mod.default.render) || mod.render;
}}
window.fakeModel = new FakeModel(tableState);
window.topoModel = new FakeModel(topoState);
// What PlanComparison does in the kernel when `selected` changes.
window.fakeModel.on("change:selected", () => {{
  const show = shows[window.fakeModel.get("selected")];
  window.topoModel.set("highlight", show.highlight);
  window.topoModel.set("title", show.title);
}});
(await load(sources.table))({{ model: window.fakeModel, el: document.getElementById("table") }});
(await load(sources.topology))({{ model: window.topoModel, el: document.getElementById("topology") }});
document.body.dataset.ready = "1";
</script></body></html>
"""


def _js(value: Any) -> str:
    return json.dumps(value).replace("</", "<\\/")


def write_page(path: Path, w: PlanComparison, *, dark: bool = False, width: int = 1040) -> Path:
    """The page for ``w``: its synced state, and the graph's highlight and title for every row it shows."""
    table = {k: v for k, v in w.table.get_state().items() if k in TABLE_KEYS}
    start = w.selected
    shows = {}
    for i in range(len(w.table.rows)):
        w.selected = i
        shows[i] = {"highlight": w.topology_widget.highlight, "title": w.topology_widget.title}
    w.selected = start
    topo = {k: v for k, v in w.topology_widget.get_state().items() if k in TOPO_KEYS}
    theme = "; ".join(f"{k}: {v}" for k, v in DARK.items()) if dark else ""
    css = (PLAN_STATIC / "plan_comparison.css").read_text() + (TOPO_STATIC / "topology.css").read_text()
    sources = {
        "table": (PLAN_STATIC / "plan_comparison.js").read_text(),
        "topology": (TOPO_STATIC / "topology.js").read_text(),
    }
    path.write_text(
        _PAGE.format(
            page_bg=DARK["--jp-layout-color1"] if dark else "#ffffff",
            width=width,
            theme=theme,
            css=css,
            sources=_js(sources),
            table=_js(table),
            topology=_js(topo),
            shows=_js(shows),
        )
    )
    return path


@pytest.fixture
def page(browser) -> Iterator:
    page = browser.new_page(viewport={"width": 1080, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert errors == []


def open_page(page, w: PlanComparison, tmp_path: Path, **kwargs: Any) -> None:
    page.goto(write_page(tmp_path / "plans.html", w, **kwargs).as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def hi_labels(page) -> dict[str, str]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.exo-node.hi')].map(
        (g) => [g.dataset.nodeId, g.querySelector('.exo-node-pill text').textContent]))""")


def test_click_selects_and_redraws_the_highlight(page, tmp_path: Path) -> None:
    topo = Topology.load(SPECS / "home-lab-mixed.json")
    plans = plan(topo, card_from_config(LLAMA_8B, "llama-3.1-8b-shaped"))
    w = PlanComparison(plans, topo)
    try:
        open_page(page, w, tmp_path)
        rows = page.locator(".exo-plan-row")
        assert rows.count() == len(w.table.rows) == 10
        assert rows.nth(0).get_attribute("aria-selected") == "true"
        assert "single" in rows.nth(0).inner_text() and "34.2" in rows.nth(0).inner_text()
        assert hi_labels(page) == {"mbp": "stage 0 · layers 0-31"}
        assert page.locator(".exo-launch-btn").is_disabled()
        assert page.locator(".exo-launch").get_attribute("title") == NO_LAUNCH
        shot(page, "plan-comparison")

        rows.nth(2).click()
        assert page.evaluate("window.fakeModel.get('selected')") == 2
        assert page.evaluate("window.fakeModel.saved") >= 1
        assert rows.nth(2).get_attribute("aria-selected") == "true"
        assert rows.nth(0).get_attribute("aria-selected") == "false"
        assert hi_labels(page) == {"workstation": "stage 0 · layer 0 · x2", "mbp": "stage 1 · layers 1-31"}
        assert page.locator(".exo-edge.hi").count() == 1
        assert page.locator(".exo-title", has_text="Plan #2 on the cluster").count() == 1
        assert "Plan #2" in page.locator(".exo-plan-detail").inner_text()
        shot(page, "plan-comparison-selected")

        page.keyboard.press("ArrowDown")  # the clicked row has the focus: the keys move the selection
        assert page.evaluate("window.fakeModel.get('selected')") == 3
        assert page.evaluate("document.activeElement.dataset.index") == "3"
        page.keyboard.press("Home")
        assert page.evaluate("window.fakeModel.get('selected')") == 0
        assert hi_labels(page) == {"mbp": "stage 0 · layers 0-31"}
    finally:
        w.close()


def test_measured_infeasible_and_launch_dark(page, tmp_path: Path) -> None:
    topo = Topology.load(SPECS / "home-lab-mixed.json")
    plans = plan(topo, card_from_config(LLAMA_70B, "llama-3.1-70b-shaped"))

    def launch() -> None:
        raise RuntimeError("macbook-pro-m4-max: only 96.0 GB free now, the plan needs 103.0 GB")

    first = 0
    plans[first].launch = launch  # type: ignore[method-assign]  (a stand-in for a cluster launch)
    plans[first]._cluster = object()
    w = PlanComparison(plans, topo, limit=5)
    try:
        p0, p1 = plans[0], plans[1]
        w.measured = {
            0: {
                "decode_tps": p0.decode_tps * 1.02,
                "ttft_s": p0.ttft_s * 1.03,  # within 10%: grey
                "prefill_tps": p0.prefill_tps * 0.98,
            },
            1: {"decode_tps": p1.decode_tps * 1.3, "ttft_s": p1.ttft_s * 1.3},
        }  # faster decode, slower TTFT
        thread = w.launch(first)
        assert thread is not None
        thread.join(5)
        assert w.table.launch["state"] == "error"
        open_page(page, w, tmp_path, dark=True)
        assert page.locator(".exo-plan-row").count() == 5
        assert page.locator(".exo-plan-row .exo-meas").count() == 5
        assert page.locator(".exo-plan-row .exo-meas.better").count() == 1
        assert page.locator(".exo-plan-row .exo-meas.worse").count() == 1
        assert "1.02×" in page.locator(".exo-plan-row").nth(0).locator(".c-decode").inner_text()
        assert "only 96.0 GB free" in page.locator(".exo-launch-status.error").inner_text()
        page.locator(".exo-infeasible summary").click()
        assert page.locator(".exo-infeasible li").count() == len(plans.infeasible)
        shot(page, "plan-comparison-measured-dark")

        assert page.locator(".exo-launch-btn").is_enabled()
        page.locator(".exo-launch-btn").click()
        assert page.evaluate("window.fakeModel.sent") == [{"event": "launch", "index": 0}]
        page.locator("text=Show all").click()
        assert page.evaluate("window.fakeModel.get('limit')") == len(plans)
    finally:
        w.close()


@pytest.mark.parametrize("width", [640])
def test_narrow(page, tmp_path: Path, width: int) -> None:
    topo = Topology.load(SPECS / "m3-ultra-4x-tb5.json")
    plans = plan(
        topo,
        card_from_config(
            {
                **LLAMA_70B,
                "num_hidden_layers": 126,
                "hidden_size": 16384,
                "intermediate_size": 53248,
                "num_attention_heads": 128,
            },
            "llama-405b-shaped",
        ),
    )
    w = PlanComparison(plans, topo, limit=4)
    try:
        open_page(page, w, tmp_path, width=width)
        assert page.locator(".exo-plan-row").count() == 4
        overflow = page.evaluate(
            "(() => { const t = document.querySelector('.exo-plans'); return t.scrollWidth - t.clientWidth; })()"
        )
        assert overflow <= 0, "the table must fit a narrow output area"
        page.locator(".exo-plan-row").nth(1).focus()
        page.keyboard.press("Enter")
        assert page.evaluate("window.fakeModel.get('selected')") == 1
        assert set(hi_labels(page)) == set(plans[1].nodes)
        shot(page, "plan-comparison-narrow")
    finally:
        w.close()
