"""The Panel dashboard without a browser: the graph (the topology widget's renderer), tables, chat, previews,
bench charts, the CLI."""

from __future__ import annotations

import asyncio
import html
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import panel as pn
import pytest

from exo_lab.api.registry import ModelRegistry
from exo_lab.cli import build_parser
from exo_lab.cluster.topology import Topology
from exo_lab.ui import dashboard as db
from exo_lab.ui import topology_widget as tw
from exo_lab.ui.dashboard import bench_view as bv
from exo_lab.ui.dashboard import cluster_view as cv
from exo_lab.ui.dashboard import instances_view as iv
from exo_lab.ui.dashboard import panel_app
from exo_lab.ui.dashboard.instance_rows import merge_rows
from exo_lab.ui.dashboard.theme import SERIES
from tests.helpers.monitor_harness import FakeInstance, busy_history, pipeline_plan
from tests.helpers.net import free_port
from tests.helpers.paths import SPECS


@pytest.fixture
def ultra() -> Topology:
    return Topology.load(SPECS / "m3-ultra-4x-tb5.json")


def test_the_graph_is_the_topology_widgets_renderer_fed_with_the_same_data(ultra):
    """The dashboard draws the cluster with the notebook widget's ES module and CSS, from ``graph_json``."""
    view = cv.ClusterView()
    view.update(ultra, 1, [])
    graph = view.graph
    assert isinstance(graph, pn.custom.AnyWidgetComponent)
    assert graph._esm == tw.RENDERER_JS and graph._stylesheets == [tw.RENDERER_CSS.read_text()]
    assert str(tw.TopologyWidget._esm) == tw.RENDERER_JS.read_text()  # the notebook widget's module, the same file
    assert graph.topology == tw.graph_json(ultra) == tw.TopologyWidget(topology=ultra).topology
    assert {e["label"] for e in graph.topology["edges"]} == {"0.05 ms · 65 Gbit/s"} and graph.highlight == {}
    assert list(view.node_table.value["node"]) == ["m3-ultra-0", "m3-ultra-1", "m3-ultra-2", "m3-ultra-3"]
    view.update(None, 2, [])
    assert "Profiling" in view.note.object


def test_instance_shards_and_frames():
    inst = FakeInstance(pipeline_plan())
    inst.load(1.0)
    inst.state = "ready"
    busy_history(inst, n=3)
    shards = cv.instance_shards([("llama", inst)])
    assert shards == {"workstation": ["llama · layer 0"], "mbp": ["llama · layers 1-31"]}
    highlight = cv.shard_highlight([("llama", inst)])
    assert highlight["nodes"] == {
        "workstation": {"color": SERIES[0], "label": "llama · layer 0"},
        "mbp": {"color": SERIES[0], "label": "llama · layers 1-31"},
    }
    assert highlight["edges"] == [["workstation", "mbp"]]  # the link between the pipeline's stages
    inst.state = "stopped"
    assert cv.shard_highlight([("llama", inst)]) == {}
    inst.state = "ready"
    frame = iv.instance_frame(merge_rows([("llama", inst)], []))
    assert frame.loc[0, "state"] == "ready" and frame.loc[0, "loaded"] == "32/32 layers"
    assert frame.loc[0, "owner"] == "here" and frame.loc[0, "nodes"] == "workstation, macbook-pro-m4-max"
    assert frame.loc[0, "requests"] == 3
    assert frame.loc[0, "decode tok/s"] == round(inst.usage_history[-1][1].generation_tps, 1)
    series = iv.tps_series([("llama", inst)])
    assert series["lines"]["name"] == ["llama"] and len(series["points"]["t"]) == 3
    assert str(iv.instance_frame([]).dtypes["decode tok/s"]) == "float64"  # empty tables keep number columns


def test_instance_rows_merge_the_clusters_instances_with_those_served_here(ultra):
    """Each instance once: ours with the backend's state and stats (the agents add the owner), another
    coordinator's from its record (progress, owner, node names), one the agents know only by id; Stop on each."""
    ours = FakeInstance(pipeline_plan(), name="llama")
    ours.id = "abc123"
    ours.load(0.5)
    cluster = [
        {"id": "abc123", "name": "", "model": "", "owner": {"label": "exo-lab up on ws"}, "nodes": ["workstation"],
         "state": "loading", "loaded": [0, 0], "error": None, "reserved_bytes": {"workstation": 5}, "plan": {}},
        {"id": "def456", "name": "qwen", "model": "Qwen/Qwen3-0.6B", "owner": {"label": "notebook on mbp",
         "api": "http://10.0.0.2:52415"}, "nodes": ["ultra-0", "ultra-1"], "state": "loading", "loaded": [3, 28],
         "error": None, "reserved_bytes": {}, "plan": {"description": "pipeline: a[0:14] -> b[14:28]"}},
        {"id": "0987fe", "name": "", "model": "", "owner": {}, "nodes": ["ultra-2"], "state": "failed",
         "loaded": [0, 0], "error": "a worker on node ultra-2 exited", "reserved_bytes": {}, "plan": {}},
    ]  # fmt: skip
    rows = merge_rows([("llama", ours)], cluster, ultra, stops={"0987fe": "stop failed: boom"}, can_stop=True)
    assert [r.id for r in rows] == ["abc123", "def456", "0987fe"]
    mine, theirs, bare = rows
    assert (mine.name, mine.state, mine.owner, mine.backend) == ("llama", "loading", "exo-lab up on ws (here)", ours)
    assert mine.loaded == ours.loaded and mine.loaded[0] > 0 and mine.reserved_bytes == {"workstation": 5}
    assert (theirs.name, theirs.loaded, theirs.owner, theirs.backend) == ("qwen", (3, 28), "notebook on mbp", None)
    assert theirs.nodes == ["m3-ultra-0", "m3-ultra-1"] and theirs.plan == "pipeline: a[0:14] -> b[14:28]"
    assert (bare.name, bare.state, bare.owner, bare.nodes) == ("0987fe", "failed", "unknown", ["m3-ultra-2"])
    assert all(r.stoppable for r in rows)
    frame = iv.instance_frame(rows)
    assert "exo-bar" in frame.loc[1, "loaded"] and "3/28 layers" in frame.loc[1, "loaded"]
    assert frame.loc[2, "loaded"] == "" and ">Stop</button>" in frame.loc[2, "stop"]
    assert frame.loc[1, "requests"] == 0 and str(frame.dtypes["decode tok/s"]) == "float64"
    stopping = merge_rows([], cluster[1:2], ultra, stops={"def456": "stopping…"}, can_stop=True)
    assert stopping[0].state == "stopping…" and not stopping[0].stoppable
    assert iv.instance_frame(stopping).loc[0, "stop"] == ""
    assert not merge_rows([], cluster[1:2], ultra)[0].stoppable  # without a control nothing can be stopped
    view = iv.InstancesView()
    view.update(rows, {}, True, {"0987fe": "stop failed: boom"})
    assert "0987fe: stop failed: boom" in view.note.object and "failed: a worker on node ultra-2" in view.note.object


def bench_doc() -> dict:
    return {
        "schema": "exo_lab.bench/0-test",
        "model": "tiny",
        "pp": 64,
        "tg": 32,
        "plans": [
            {
                "description": "single: a[0:4]",
                "status": "ok",
                "predicted": {"decode_tps": 100.0, "ttft_s": 0.05, "prefill_tps": 900.0},
                "measured": {
                    "decode_tps": {"median": 80.0},
                    "ttft_s": {"median": 0.06},
                    "prefill_tps": {"median": 700},
                },
            },
            {
                "description": "pipeline: a[0:2] -> b[2:4]",
                "status": "skipped",
                "predicted": {"decode_tps": 90.0},
                "measured": {},
            },
            {
                "description": "pipeline: b[0:2] -> a[2:4]",
                "status": "ok",
                "predicted": {"decode_tps": 90.0, "ttft_s": 0.1},
                "measured": {"decode_tps": {"median": 60.0}, "ttft_s": {"median": 0.12}},
            },
        ],
    }


def test_bench_rows_read_measured_and_predicted():
    rows = bv.bench_rows(bench_doc())
    assert [r["label"] for r in rows] == ["single: a[0:4]", "pipeline: b[0:2] -> a[2:4]"]
    assert rows[0]["measured_decode_tps"] == 80.0 and rows[0]["predicted_decode_tps"] == 100.0
    assert rows[1]["measured_ttft_s"] == 0.12 and rows[1]["measured_prefill_tps"] is None
    flat = bv.bench_rows([{"name": "x", "decode_tps": 5.0, "predicted_decode_tps": 6.0}])
    assert flat[0]["measured_decode_tps"] == 5.0 and flat[0]["predicted_decode_tps"] == 6.0
    with pytest.raises(ValueError, match="list of results"):
        bv.bench_rows({"hello": 1})
    with pytest.raises(ValueError, match="no measured"):
        bv.bench_rows([{"name": "x"}])
    figs = bv.bench_figures(rows)
    assert [f.name for f in figs] == ["exo-bench-decode_tps", "exo-bench-ttft_s"]


def test_a_session_shows_the_topology_tables_and_bench(ultra, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_doc()))
    src = db.DashboardSource(topology=ultra, bench=path)
    dash = db.Dashboard(src)
    assert [n["id"] for n in dash.cluster.graph.topology["nodes"]] == ["ultra-0", "ultra-1", "ultra-2", "ultra-3"]
    assert len(dash.cluster.graph.topology["edges"]) == 6
    assert list(dash.cluster.node_table.value["node"]) == ["m3-ultra-0", "m3-ultra-1", "m3-ultra-2", "m3-ultra-3"]
    assert "<b>4</b> nodes" in dash.header.object and "what-if cluster" in dash.header.object
    assert dash in src.sessions
    assert len(dash.bench.area.objects) == 2 and "2 plans measured" in dash.bench.area.objects[0].object
    assert not dash.plans.launch_button.visible  # nothing to launch on without a live cluster


def test_chat_streams_a_reply_from_a_served_engine(engine, ultra):
    registry = ModelRegistry()
    registry.add(engine, "tiny")
    dash = db.Dashboard(db.DashboardSource(topology=ultra, registry=registry, api_url="http://127.0.0.1:1"))
    chat = dash.chat
    assert chat.model.options == ["tiny"] and chat.model.value == "tiny"
    chat.max_tokens.value = 40
    chat.input.value_input = "Hello there"
    before = engine.requests_completed
    asyncio.run(chat._on_send())
    user, reply = chat.messages
    assert user == {"role": "user", "content": "Hello there"}
    expected = engine.chat([{"role": "user", "content": "Hello there"}], max_tokens=40, temperature=0).text()
    assert reply["content"] == expected and not reply.get("error") and not reply["streaming"]
    assert reply["usage"].startswith("40 tokens")
    assert html.escape(expected) in chat.transcript.object
    dash.tick()
    frame = dash.instances.table.value
    assert frame.loc[0, "name"] == "tiny" and frame.loc[0, "requests"] == engine.requests_completed > before
    assert "API <a href='http://127.0.0.1:1/v1/models'" in dash.header.object


def test_preview_ranks_plans_for_a_model(tiny_model, ultra):
    plans = db.Dashboard(db.DashboardSource(topology=ultra)).plans
    plans.model.value_input = str(tiny_model)
    asyncio.run(plans._on_preview())
    frame = plans.table.value
    assert plans.table.visible and len(frame) == len(plans.plans.plans) > 4
    assert frame.loc[0, "plan"].startswith("single:") and "feasible plans" in plans.note.object
    plans.model.value_input = "no-such-model-anywhere"
    asyncio.run(plans._on_preview())
    assert "exo-error" in plans.note.object and not plans.table.visible


def test_cli_parses_dashboard_and_up_options():
    parser = build_parser()
    args = parser.parse_args(["dashboard", "--local", "2", "--port", "0"])
    assert args.local == 2 and args.port == 0 and args.host == "127.0.0.1"
    args = parser.parse_args(["dashboard", "--connect", "10.0.0.1:52416", "10.0.0.2:52416", "--bench", "b.json"])
    assert args.connect == ["10.0.0.1:52416", "10.0.0.2:52416"] and args.bench == "b.json"
    assert parser.parse_args(["dashboard"]).port == db.DEFAULT_PORT
    args = parser.parse_args(["up"])
    assert args.dashboard_port == db.DEFAULT_PORT and not args.no_dashboard
    assert args.dashboard_host == "127.0.0.1"  # even with --host 0.0.0.0: the dashboard stays on loopback
    assert parser.parse_args(["up", "--host", "0.0.0.0"]).dashboard_host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parser.parse_args(["dashboard", "--local", "2", "--connect", "h:1"])


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, http.client.HTTPResponse, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read().decode(errors="replace")
    conn.close()
    return resp.status, resp, body


async def bokeh_socket(port: int, headers: dict, session_token: str = "none") -> str:
    """Open the page's websocket as Bokeh does; the server's first message (its ACK)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    origin = {"Origin": f"http://127.0.0.1:{port}"}
    request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={**origin, **headers})
    conn = await websocket_connect(request, subprotocols=["bokeh", session_token])
    try:
        return str(await asyncio.wait_for(conn.read_message(), 30))
    finally:
        conn.close()


def test_off_loopback_the_page_and_its_websocket_need_the_token(ultra):
    """On all addresses the dashboard needs its token: without it the page goes to the sign-in form (401) and the
    websocket (every action: launch, stop, chat) and the rest of the app answer 403; the printed URL sets a
    cookie (HttpOnly, not the token) that opens both. On loopback nothing is asked."""
    from tornado.httpclient import HTTPClientError

    server = db.serve_dashboard(db.DashboardSource(topology=ultra), port=0, host="0.0.0.0")
    port, token = server.port, server.token
    try:
        assert token and server.token_generated and server.login_url == f"{server.url}/login?token={token}"
        status, resp, _ = get(port, "/")
        assert status == 302 and resp.getheader("Location", "").startswith("./login?next=")
        for path in ("/login", "/login?token=wrong", "/login?next=//evil.example"):
            status, _, page = get(port, path)
            assert status == 401 and "needs its token" in page and "evil.example" not in page, path
        for path in ("/autoload.js?bokeh-autoload-element=x", "/metadata", "/?token=wrong&x=1"):
            assert get(port, path)[0] in (302, 403), path
        assert get(port, "/metadata")[0] == 403
        for headers in ({}, {"Cookie": f"exo_lab_dashboard_{port}=forged"}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(HTTPClientError) as refused:
                asyncio.run(bokeh_socket(port, headers))
            assert refused.value.code == 403

        status, resp, _ = get(port, f"/login?token={token}&next=/")
        assert status == 302 and resp.getheader("Location") == "/"
        cookie = resp.getheader("Set-Cookie", "")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and token not in cookie
        session = {"Cookie": cookie.split(";")[0]}
        status, _, page = get(port, "/", session)
        assert status == 200 and "exo_lab dashboard" in page
        session_token = re.search(r'"token":\s*"([^"]+)"', page).group(1)
        assert '"msgtype":"ACK"' in asyncio.run(bokeh_socket(port, session, session_token)).replace(" ", "")
        assert get(port, "/", {"Authorization": f"Bearer {token}"})[0] == 200  # scripts
    finally:
        server.stop()

    local = db.serve_dashboard(db.DashboardSource(topology=ultra), port=0)
    try:
        assert local.token is None and local.login_url == local.url
        assert get(local.port, "/")[0] == 200
    finally:
        local.stop()


@pytest.mark.slow
def test_panel_serve_runs_the_module(tmp_path):
    """``panel serve exo_lab/ui/dashboard/panel_app.py`` serves the page (this machine, no cluster)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "panel",
            "serve",
            str(Path(panel_app.__file__)),
            "--port",
            str(port),
            "--address",
            "127.0.0.1",
            "--allow-websocket-origin",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # listening yet? (a GET would build a whole session per try)
            assert proc.poll() is None, proc.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "panel serve did not listen within 60 s"
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/panel_app", timeout=60) as resp:
            page = resp.read().decode()
        assert resp.status == 200 and "exo_lab dashboard" in page, page[:500]
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.slow
def test_exo_lab_dashboard_serves_a_what_if_spec_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "dashboard",
            "--topology",
            str(SPECS / "home-lab-mixed.json"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines: list[str] = []
        while not (
            match := re.match(
                r"exo_lab dashboard for a what-if cluster: (http://127\.0\.0\.1:\d+)$",
                lines[-1].strip() if lines else "",
            )
        ):
            line = proc.stdout.readline()
            assert line and len(lines) < 20, "".join(lines)
            lines.append(line)
        with urllib.request.urlopen(match.group(1), timeout=60) as resp:
            assert resp.status == 200 and "exo_lab dashboard" in resp.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "periodic callback" not in out and "WebSocket" not in out  # Panel's INFO logs stay quiet
