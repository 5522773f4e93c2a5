"""The topology widget's front end in headless Chromium: nodes drawn, a click selects, screenshots saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exo_lab.cluster.topology import Topology
from exo_lab.ui.topology_widget import graph_json
from tests.helpers.drawn_graph import assert_drawn, drawn_graph
from tests.helpers.paths import ARTIFACTS, SPECS
from tests.helpers.topology_harness import write_harness

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
    ),
]


# A pipeline plan over the four Ultras, to show the highlight overlay.
ULTRA_PLAN = {
    "nodes": {f"ultra-{i}": {"label": f"layers {16 * i}-{16 * i + 15}"} for i in range(4)},
    "edges": [["ultra-0", "ultra-1"], ["ultra-1", "ultra-2"], ["ultra-2", "ultra-3"]],
}
CASES = {
    "home-lab-mixed": dict(spec="home-lab-mixed.json", title="Home lab (what-if)", highlight=None, dark=False),
    "m3-ultra-4x": dict(
        spec="m3-ultra-4x-tb5.json", title="4x Mac Studio M3 Ultra, Thunderbolt 5", highlight=ULTRA_PLAN, dark=False
    ),
    "m3-ultra-4x-dark": dict(
        spec="m3-ultra-4x-tb5.json", title="4x Mac Studio M3 Ultra, Thunderbolt 5", highlight=None, dark=True
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_render_click_and_screenshot(browser, tmp_path: Path, case: str) -> None:
    c = CASES[case]
    topo = Topology.load(SPECS / c["spec"])
    page_file = write_harness(
        tmp_path / "harness.html", topo, title=c["title"], highlight=c["highlight"], dark=c["dark"]
    )
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(page_file.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        assert page.locator(".exo-node").count() == len(topo.nodes)
        assert page.locator(".exo-edge").count() == len(topo.nodes) * (len(topo.nodes) - 1) // 2
        assert_drawn(drawn_graph(page), graph_json(topo))  # what the dashboard and the JupyterLab panel draw too
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"topology-{case}.png"), full_page=True)

        node = list(topo.nodes.values())[-1]
        page.locator(f".exo-node[data-node-id='{node.id}']").click()
        assert page.evaluate("window.fakeModel.get('selected_node')") == node.id
        assert page.evaluate("window.fakeModel.saved") >= 1
        details = page.locator(".exo-details")
        assert node.name in details.inner_text()
        assert "Matmul GFLOP/s".upper() in details.inner_text().upper()
        assert drawn_graph(page)["selected"] == [node.id]
        page.screenshot(path=str(ARTIFACTS / f"topology-{case}-selected.png"), full_page=True)

        page.locator(f".exo-node[data-node-id='{node.id}']").click()  # a second click deselects
        assert page.evaluate("window.fakeModel.get('selected_node')") == ""
        assert errors == []
    finally:
        page.close()
