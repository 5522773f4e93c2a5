"""The dashboard in headless Chromium: the cluster graph drawn by exo_lab's one renderer (the topology widget's
ES module, through Panel's AnyWidgetComponent), a streamed chat reply, ``exo-lab up`` serving API and dashboard
together (an instance launched over HTTP shows up and is stopped from the page), and a plan launched from the
page: its load progress, its shards on the graph, a chat with it, and Stop, which frees its memory on the
agents. Screenshots saved."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

import exo_lab
import exo_lab.ui.instance_monitor as im
from exo_lab.api.registry import ModelRegistry
from exo_lab.cluster.topology import Topology
from exo_lab.ui.dashboard import DashboardSource, serve_dashboard
from exo_lab.ui.topology_widget import graph_json
from tests.helpers.drawn_graph import assert_drawn, drawn_graph
from tests.helpers.net import free_port
from tests.helpers.paths import ARTIFACTS, SPECS
from tests.helpers.polling import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
    ),
]


VIEWPORT = {"width": 1400, "height": 1000}

# Page-side helpers: Panel renders into shadow roots, so look through all of them; record every text the
# newest assistant bubble shows (a MutationObserver sees each streamed update the server pushes).
HELPERS = """
() => {
  window.exoDeep = (sel) => {
    const out = [];
    const walk = (root) => {
      root.querySelectorAll(sel).forEach((e) => out.push(e));
      root.querySelectorAll("*").forEach((e) => { if (e.shadowRoot) walk(e.shadowRoot); });
    };
    walk(document);
    return out;
  };
  window.exoModelData = (name, column) => {
    for (const doc of window.Bokeh.documents) {
      const m = doc.get_model_by_name(name);
      if (m) return Array.from(m.data[column]);
    }
    return null;
  };
  window.exoReplies = [];
  const chat = window.exoDeep(".exo-chat")[0];
  const root = chat.getRootNode();
  new MutationObserver(() => {
    const bubbles = window.exoDeep(".exo-msg.assistant .exo-bubble");
    const last = bubbles[bubbles.length - 1];
    if (!last) return;
    const streaming = last.parentElement.classList.contains("streaming");
    const prev = window.exoReplies[window.exoReplies.length - 1];
    if (!prev || prev.text !== last.textContent || prev.streaming !== streaming)
      window.exoReplies.push({ text: last.textContent, streaming });
  }).observe(root, { childList: true, subtree: true, characterData: true });
  // every distinct look of each instance row (state, progress, owner), sampled faster than the page ticks
  window.exoRowLog = [];
  setInterval(() => {
    for (const row of window.exoDeep(".tabulator-row")) {
      const get = (f) => {
        const c = row.querySelector(`.tabulator-cell[tabulator-field='${f}']`);
        return c ? c.textContent.trim() : null;
      };
      const id = get("id");
      if (!id) continue;
      const entry = { id, name: get("name"), state: get("state"), loaded: get("loaded"), owner: get("owner"),
                      bar: !!row.querySelector(".exo-bar") };
      const last = window.exoRowLog.filter((e) => e.id === id).pop();
      if (!last || JSON.stringify(last) !== JSON.stringify(entry)) window.exoRowLog.push(entry);
    }
  }, 100);
}
"""


def watched_page(browser, url: str):
    """A new page (in a context of its own: no cookies) that records its errors and requests beyond ``url``."""
    page = browser.new_page(viewport=VIEWPORT)
    page.errors = []
    page.external = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on(
        "request",
        lambda r: (
            page.external.append(r.url) if r.url.startswith(("http:", "https:")) and not r.url.startswith(url) else None
        ),
    )  # works offline
    return page


def open_dashboard(browser, url: str, nodes: int, page=None):
    """Open the page (or wait on ``page``, already going there) until the renderer has drawn ``nodes`` nodes."""
    if page is None:
        page = watched_page(browser, url)
        page.goto(url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=30_000)
    page.wait_for_selector(".exo-chat", timeout=30_000)
    page.evaluate(HELPERS)
    wait_for(lambda: len((drawn_graph(page) or {}).get("nodes", [])) == nodes, 30, f"the graph shows {nodes} nodes")
    return page


def chat(page, text: str, deadline_s: float = 60.0) -> tuple[str, list[dict]]:
    """Send ``text`` from the page; the final reply and what the page showed while it streamed."""
    box = page.locator("input[placeholder='Message the model…']")
    box.fill(text)
    box.press("Enter")
    wait_for(lambda: page.evaluate("() => window.exoReplies.some((r) => r.streaming)"), 20, "a reply starts streaming")
    seen = wait_for(
        lambda: (lambda r: r if r and not r[-1]["streaming"] else None)(page.evaluate("() => window.exoReplies")),
        deadline_s,
        "the reply finishes",
    )
    page.evaluate("() => { window.exoReplies = []; }")
    return seen[-1]["text"], seen


def requests_shown(page, name: str) -> str:
    """The instances table's request count for ``name``."""
    row = page.locator(".tabulator-row").filter(
        has=page.locator(".tabulator-cell[tabulator-field='name']", has_text=name)
    )
    return row.locator(".tabulator-cell[tabulator-field='requests']").first.inner_text().strip()


def instance_row(page, instance_id: str):
    """The instances table's row of the instance ``instance_id``."""
    return page.locator(".tabulator-row").filter(
        has=page.locator(".tabulator-cell[tabulator-field='id']", has_text=instance_id)
    )


def row_log(page, instance_id: str) -> list[dict]:
    """How the page showed the instance's row over time (state, loaded, owner, whether a progress bar)."""
    return page.evaluate("(id) => window.exoRowLog.filter((e) => e.id === id)", instance_id)


def agent_holds(address: str) -> dict:
    """An agent's ``GET /instances`` (unsigned reads from loopback): its instances and reserved bytes."""
    with urllib.request.urlopen(f"http://{address}/instances", timeout=10) as resp:
        return json.load(resp)


def stop_from_the_page(page, instance_id: str, reserved_after: dict[str, int]) -> None:
    """Press the instance's Stop button; its row goes, and no agent holds a worker or memory for it: each agent
    (address -> bytes) holds what ``reserved_after`` says (the reservations of the other instances)."""
    instance_row(page, instance_id).get_by_role("button", name="Stop").click()
    wait_for(lambda: instance_row(page, instance_id).count() == 0, 30, "the stopped instance leaves the table")
    for address, reserved in reserved_after.items():
        held = agent_holds(address)
        assert held["reserved_bytes"] == reserved, held
        assert instance_id not in [i["id"] for i in held["instances"]], held


def assert_streamed(seen: list[dict], final: str) -> None:
    partial = [r["text"] for r in seen if r["streaming"] and r["text"]]
    assert partial, f"no partial reply was shown before the end: {seen}"
    assert all(final.startswith(p) for p in partial) and len(partial[0]) < len(final), seen


def test_what_if_cluster_graph_and_a_streamed_chat(browser, engine) -> None:
    topo = Topology.load(SPECS / "m3-ultra-4x-tb5.json")
    registry = ModelRegistry()
    registry.add(engine, "tiny")
    source = DashboardSource(topology=topo, registry=registry, api_url="http://127.0.0.1:52415")
    server = serve_dashboard(source, port=0)
    page = None
    try:
        page = open_dashboard(browser, server.url, nodes=4)
        (session,) = list(source.sessions)  # server side: the graph component holds graph_json
        assert session.cluster.graph.topology == graph_json(topo)
        drawn = drawn_graph(page)  # the page: the renderer drew every node and every labelled link
        assert_drawn(drawn, graph_json(topo))
        assert {label for _, _, label in drawn["edges"]} == {"0.05 ms · 65 Gbit/s"}
        assert "4 nodes" in page.locator(".exo-page-header").inner_text()
        page.locator(".exo-node[data-node-id='ultra-2']").click()  # the widget's selection reaches Python
        wait_for(lambda: session.cluster.graph.selected_node == "ultra-2", 10, "the click selects the node in Python")
        assert drawn_graph(page)["selected"] == ["ultra-2"]
        assert "m3-ultra-2" in page.locator(".exo-details").inner_text()

        page.get_by_label("max tokens").fill("120")  # a longer reply streams for longer
        page.get_by_label("max tokens").press("Enter")
        wait_for(lambda: session.chat.max_tokens.value == 120, 10, "max tokens reaches Python")
        final, seen = chat(page, "Tell me about clusters.")
        expected = engine.chat(
            [{"role": "user", "content": "Tell me about clusters."}], max_tokens=120, temperature=0
        ).text()
        assert final == expected
        assert_streamed(seen, final)
        assert session.chat.updates >= 3
        assert "120 tokens" in page.locator(".exo-usage").inner_text()
        wait_for(
            lambda: requests_shown(page, "tiny") == str(engine.requests_completed),
            10,
            "the instances table counts the request",
        )
        charted = len([r for r in im.request_rows(engine) if r["completion_tokens"] > 1 and r["generation_tps"] > 0])
        wait_for(
            lambda: len(page.evaluate("() => exoModelData('exo-tps-points', 'tps')")) == charted,
            10,
            "the tokens/s chart has a point per recent request",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-what-if-chat.png"), full_page=True)
        assert page.errors == [] and page.external == []
    finally:
        if page is not None:
            page.close()
        server.stop()


def test_off_loopback_the_page_needs_its_token(browser, engine) -> None:
    """On all addresses: without the token the browser gets the sign-in form (401) and no websocket; a wrong
    token is refused; the right one typed in (or the printed URL) opens the page, whose chat works."""
    registry = ModelRegistry()
    registry.add(engine, "tiny")
    source = DashboardSource(topology=Topology.load(SPECS / "m3-ultra-4x-tb5.json"), registry=registry)
    server = serve_dashboard(source, port=0, host="0.0.0.0")
    page = other = None
    try:
        page = watched_page(browser, server.url)
        response = page.goto(server.url)
        assert response is not None and response.status == 401 and "/login" in page.url
        assert page.evaluate("() => typeof window.Bokeh") == "undefined"  # nothing of the app was served
        socket = page.evaluate(
            """(url) => new Promise((done) => {
                 const ws = new WebSocket(url, ["bokeh", "none"]);
                 ws.onopen = () => done("open");
                 ws.onerror = () => done("refused");
               })""",
            server.url.replace("http:", "ws:") + "/ws",
        )
        assert socket == "refused"
        page.fill("input[name=token]", "not-the-token")
        with page.expect_navigation():
            page.press("input[name=token]", "Enter")
        assert "not this dashboard's token" in page.content()
        page.fill("input[name=token]", server.token)
        page.press("input[name=token]", "Enter")
        open_dashboard(browser, server.url, nodes=4, page=page)
        final, seen = chat(page, "Hello from another machine.")
        assert_streamed(seen, final)
        assert page.errors == [] and page.external == []

        other = watched_page(browser, server.url)  # another browser (no cookie): the printed URL signs it in
        other.goto(server.login_url)
        open_dashboard(browser, server.url, nodes=4, page=other)
        assert "token" not in other.url
    finally:
        for p in (page, other):
            if p is not None:
                p.close()
        server.stop()


def test_exo_lab_up_serves_the_api_and_the_dashboard(browser, tiny_model, tmp_path) -> None:
    """A cluster member: its model chatted with from the page and the API, counted on the page; an instance
    launched over HTTP shows up (owner, progress, ready), can be chatted with, and Stop on the page stops it."""
    port, agent_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EXO_LAB_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "up",
            "--model",
            str(tiny_model),
            "--name",
            "tiny",
            "--port",
            str(port),
            "--dashboard-port",
            "0",
            "--agent-port",
            str(agent_port),
            "--probe-port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
            "--no-mdns",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    page = None
    try:
        lines: list[str] = []
        start = time.monotonic()
        while True:
            line = proc.stdout.readline()
            assert line, f"exo-lab up exited ({proc.wait_for()}):\n{''.join(lines)}"
            lines.append(line)
            match = re.match(r"exo_lab dashboard: (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
            assert time.monotonic() - start < 90, "".join(lines)
        assert f"http://127.0.0.1:{port}" in "".join(lines)
        page = open_dashboard(browser, url, nodes=1)
        assert "cluster dashboard" in page.locator(".exo-page-header").inner_text()
        assert drawn_graph(page)["edges"] == []  # one node, no links
        final, seen = chat(page, "Hello from the dashboard.")  # 64 tokens by default
        assert_streamed(seen, final)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        reply = client.chat.completions.create(
            model="tiny", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "and from the API"}]
        )
        assert reply.choices[0].message.content
        wait_for(lambda: requests_shown(page, "tiny") == "2", 10, "the dashboard counts the API request too")
        wait_for(
            lambda: len(page.evaluate("() => exoModelData('exo-tps-points', 'tps')")) == 2,
            10,
            "the tokens/s chart has both requests",
        )

        agent = f"127.0.0.1:{agent_port}"
        before = agent_holds(agent)["reserved_bytes"]
        assert before > 0  # the member's own model
        body = json.dumps({"model_id": str(tiny_model), "name": "tiny-http"}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/instance", body, {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as resp:  # returns at once; the instance loads on
            assert resp.status == 201
            iid = json.load(resp)["id"]
        row = instance_row(page, iid)
        wait_for(lambda: row.count() == 1, 15, "the instance launched over HTTP shows up on the page")
        wait_for(lambda: "ready" in row.inner_text(), 90, "the page shows it ready")
        shown = row_log(page, iid)
        assert shown[-1]["name"] == "tiny-http" and "here" in shown[-1]["owner"], shown  # served by this member
        assert all(e["state"] in ("launching", "loading", "ready") for e in shown), shown
        wait_for(
            lambda: "tiny-http" in page.evaluate("() => Array.from(exoDeep('select')[0].options, (o) => o.value)"),
            10,
            "the chat offers it",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-up.png"), full_page=True)
        assert agent_holds(agent)["reserved_bytes"] > before
        stop_from_the_page(page, iid, {agent: before})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/instances", timeout=30) as resp:
            assert iid not in [i["id"] for i in json.load(resp)["instances"]]  # gone for the API too
        assert requests_shown(page, "tiny") == "2"  # the member's own model serves on
        assert page.errors == [] and page.external == []
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_launch_a_plan_from_the_page_chat_with_it_and_stop_it(browser, tiny_model) -> None:
    """``exo-lab dashboard --local 2``'s set-up: the source serves the cluster and launches and stops through its
    control. The page shows the launch loading (a progress bar), ready, its shards; it chats; Stop frees it."""
    cluster = exo_lab.local_cluster(2)
    source = DashboardSource(cluster=cluster, refresh_s=1.0)
    assert source.control is cluster.control is not None and source.api_url == cluster.api_url
    server = serve_dashboard(source, port=0)
    page = None
    try:
        page = open_dashboard(browser, server.url, nodes=2)
        (session,) = list(source.sessions)
        assert_drawn(drawn_graph(page), graph_json(cluster.topology))
        assert len(drawn_graph(page)["edges"]) == 1
        model_box = page.locator("input[placeholder^='a model name']")
        model_box.fill(str(tiny_model))
        sharding = page.locator("select").filter(has=page.locator("option", has_text="pipeline + tensor"))
        sharding.select_option(label="pipeline")  # the filter: pipelines only
        page.get_by_role("button", name="Preview").click()
        wanted = "pipeline: local-0[0:2] -> local-1[2:4]"
        row = page.locator(".tabulator-row").filter(has_text=wanted).first
        row.wait_for(timeout=30_000)
        plans = session.plans
        assert {p.strategy for p in plans.plans.plans} == {"pipeline"}, plans.plans.plans
        row.click()
        wait_for(
            lambda: [plans.plans.plans[i].describe() for i in plans.table.selection] == [wanted],
            10,
            "the row click selects the plan in Python",
        )
        assert model_box.input_value() == str(tiny_model)  # not replaced by a suggestion
        wait_for(
            lambda: (
                f"Plan #{plans.table.selection[0]}: "
                in page.locator(".exo-note").filter(has_text="feasible plan").inner_text()
            ),
            10,
            "the page describes the selected plan",
        )
        page.get_by_role("button", name="Launch selected plan").click()
        inst = wait_for(lambda: cluster.instances[0] if cluster.instances else None, 30, "the instance is created")
        assert inst in [b for _, b in source.control.registry.items()]  # launched through the control: on its API
        wait_for(lambda: inst.state == "ready", 90, "the instance loads")
        wait_for(
            lambda: [e["state"] for e in row_log(page, inst.id)][-1:] == ["ready"], 15, "the page shows it ready"
        )  # the row log samples every 100 ms: wait on it, not on the row
        shown = row_log(page, inst.id)
        loading = [e for e in shown if e["state"] in ("launching", "loading")]
        assert loading and all(e["bar"] and re.fullmatch(r"\d+/\d+ layers", e["loaded"]) for e in loading), shown
        assert [e["state"] for e in shown][-1] == "ready" and shown[-1]["loaded"] == "4/4 layers", shown
        assert inst.name == tiny_model.name  # named after the model, not its path
        wait_for(
            lambda: drawn_graph(page)["pills"] == ["tiny · layers 0-1", "tiny · layers 2-3"],
            15,
            "the graph shows the shards",
        )
        wait_for(
            lambda: page.evaluate("() => { const s = exoDeep('select')[0]; return s && s.value; }"),
            15,
            "the chat offers the instance",
        )
        final, seen = chat(page, "Which node holds layer 3?")
        tokens = inst.chat(
            [{"role": "user", "content": "Which node holds layer 3?"}], max_tokens=64, temperature=0
        ).text()
        assert final == tokens  # the instance answered, greedy and exact
        wait_for(
            lambda: "ready" in page.locator(".tabulator-row").filter(has_text=inst.name).first.inner_text(),
            10,
            "the instances table shows it ready",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-cluster-launched.png"), full_page=True)
        agents = [cluster.address_of(n.id) for n in cluster.topology.alive()]
        assert sum(agent_holds(a)["reserved_bytes"] for a in agents) > 0
        stop_from_the_page(page, inst.id, dict.fromkeys(agents, 0))
        assert inst.state == "stopped" and cluster.instances == [] and source.control.registry.names() == []
        wait_for(lambda: drawn_graph(page)["pills"] == [], 15, "the graph shows no shards")
        assert page.errors == [] and page.external == []
    finally:
        if page is not None:
            page.close()
        server.stop()
        cluster.close()


def bench_document() -> dict:
    """An ``exo_lab.bench/1`` document for three plans (built from the bench module's own classes)."""
    bench = pytest.importorskip("exo_lab.bench")
    from exo_lab.bench.results import ConcurrencyPoint, PlanBench, stat

    plans = []
    for i, (desc, strategy, pred, meas) in enumerate(
        [
            ("single: local-0[0:4]", "single", 820.0, 540.0),
            ("pipeline: local-0[0:2] -> local-1[2:4]", "pipeline", 420.0, 260.0),
            ("tensor: local-0+local-1 x2[0:4]", "tensor", 800.0, 310.0),
        ]
    ):
        predicted = {"decode_tps": pred, "prefill_tps": 30 * pred, "ttft_s": 2.0 / pred}
        measured = {
            "decode_tps": stat([meas * f for f in (0.97, 1.0, 1.02)]),
            "prefill_tps": stat([25 * meas]),
            "ttft_s": stat([2.4 / meas]),
        }
        conc = [
            ConcurrencyPoint(c, stat([meas * min(c, 3) ** 0.5]), stat([0.01 * c]), stat([1.0]), pred) for c in (1, 4, 8)
        ]
        plans.append(
            PlanBench(
                i,
                desc,
                strategy,
                "ok",
                {"description": desc},
                predicted=predicted,
                measured=measured,
                ratios={"decode_tps": meas / pred},
                concurrency=conc,
            )
        )
    return bench.BenchResult("tiny", "tiny", 64, 32, 3, 1, [1, 4, 8], plans).to_json()


def test_bench_results_are_charted(browser, tmp_path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_document()))
    source = DashboardSource(topology=Topology.load(SPECS / "home-lab-mixed.json"), bench=path)
    server = serve_dashboard(source, port=0)
    page = None
    try:
        page = open_dashboard(browser, server.url, nodes=3)
        names = page.evaluate("() => Bokeh.documents.flatMap((d) => [...d.all_models].map((m) => m.name))")
        assert {"exo-bench-decode-bars", "exo-bench-scatter", "exo-bench-concurrency"} <= set(names)
        assert "3 plans measured for tiny" in page.locator(".exo-note").filter(has_text="measured").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-bench.png"), full_page=True)
        assert page.errors == [] and page.external == []
    finally:
        if page is not None:
            page.close()
        server.stop()
