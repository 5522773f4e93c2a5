"""JupyterLab in headless Chromium: the exo_lab side panel finds a running local cluster by itself.

A real ``jupyter lab`` (the server extension enabled by the installed config, the side panel
built by ``make labextension``) runs against a private runtime dir. The panel's graph is drawn by
exo_lab's one renderer (exo_lab/ui/static/topology.js, bundled into the extension). The panel first shows its
empty state; a ``local_cluster(2)`` started afterwards appears without a reload, with its two
nodes, the link between them, then an instance and the dashboard button. With ``exo-lab up`` as
the coordinator, the panel previews a model, launches a plan, shows it load and serve, and stops
it. Screenshots go to ``test-artifacts/jupyterlab-*.png``.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import exo_lab
from exo_lab.cluster.topology import Topology
from exo_lab.ui.topology_widget import graph_json
from tests.helpers.drawn_graph import assert_drawn, drawn_graph
from tests.helpers.net import free_port, wait_http
from tests.helpers.paths import ARTIFACTS, SPECS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
    ),
]


LABEXTENSION = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "exo-lab" / "package.json"
BUILT = Path(exo_lab.__file__).parent / "labextension"  # this checkout's build (make labextension)
PANEL = "#exo-lab-panel"
NOTIFICATION_SETTINGS = {"fetchNews": "false", "checkForUpdates": False}


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Coordinators of this test register here (the Jupyter server reads the same env var)."""
    path = tmp_path_factory.mktemp("exo-lab-run")
    old = os.environ.get("EXO_LAB_RUNTIME_DIR")
    os.environ["EXO_LAB_RUNTIME_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EXO_LAB_RUNTIME_DIR", None)
    else:
        os.environ["EXO_LAB_RUNTIME_DIR"] = old


class Lab:
    def __init__(self, tmp: Path) -> None:
        if (BUILT / "package.json").is_file():  # the build of the code under test, ahead of what the venv links
            (tmp / "data" / "labextensions").mkdir(parents=True)
            (tmp / "data" / "labextensions" / "exo-lab").symlink_to(BUILT)
        elif not LABEXTENSION.is_file():
            message = f"the JupyterLab extension is not installed at {LABEXTENSION.parent}: run `make labextension`"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(json.dumps(NOTIFICATION_SETTINGS))
        (tmp / "root").mkdir()
        self.runtime = tmp / "jrun"
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_RUNTIME_DIR": str(self.runtime),
            "JUPYTER_DATA_DIR": str(tmp / "data"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "JUPYTER_PREFER_ENV_PATH": "0",
        }  # the private data dir (this checkout's build) ahead of the venv's
        self.log = open(tmp / "jupyter-lab.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                f"--port={self.port}",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={tmp / 'root'}",
                f"--LabApp.user_settings_dir={tmp / 'settings'}",
                f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
                "--LabApp.expose_app_in_browser=True",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_http(f"{self.url}/api/status?token={self.token}", deadline_s=90, proc=self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def api(self, route: str, token: bool = True) -> requests.Response:
        return requests.get(
            f"{self.url}/exo-lab/api/{route}",
            params={"token": self.token} if token else {},
            allow_redirects=False,
            timeout=30,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def lab(runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    server = Lab(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()


class Dashboard:
    """A stand-in for the Panel dashboard: a page on loopback."""

    def __init__(self) -> None:
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"<!doctype html><title>exo_lab dashboard</title><h1>exo_lab dashboard</h1>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dashboard"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class UpMember:
    """``exo-lab up --no-model`` in a subprocess: a node agent and a coordinator serving its API, registered
    where the Jupyter server looks (this process's environment, EXO_LAB_RUNTIME_DIR included)."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.agent_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agent = f"http://127.0.0.1:{self.agent_port}"
        self.log = open(tmp / "exo-lab-up.log", "w+")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "exo_lab.cli", "up", "--no-model", "--port", str(self.port)]
        argv += ["--dashboard-port", "0", "--no-dashboard", "--node-name", "lab-node", "--no-mdns"]
        argv += ["--agent-host", "127.0.0.1", "--agent-port", str(self.agent_port), "--probe-port", "0"]
        argv += ["--state-dir", str(tmp / "state")]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait(self) -> None:
        """Until its API answers (it has connected to its agent and registered)."""
        wait_http(f"{self.url}/health", deadline_s=120, proc=self.proc)

    def coordinator_id(self) -> str:
        from exo_lab.cluster.coordinators import coordinators

        [info] = [c for c in coordinators() if c.pid == self.proc.pid]
        return info.id

    def agent_instances(self) -> dict:
        return requests.get(f"{self.agent}/instances", timeout=10).json()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"jupyterlab-{name}.png"))


def write_spec_coordinator(runtime_dir: Path) -> str:
    """A coordinator without agents whose snapshot is the 4x M3 Ultra what-if cluster."""
    from exo_lab.cluster.coordinators import CoordinatorInfo, _process_started

    topo = Topology.load(SPECS / "m3-ultra-4x-tb5.json")
    info = CoordinatorInfo(
        id=f"{os.getpid()}-spec",
        pid=os.getpid(),
        process_started=_process_started(os.getpid()),
        kind="python",
        label="4x Mac Studio (what-if)",
        agents=[],
        local_topology=topo.to_json(),
    )
    (runtime_dir / "coordinators" / f"{info.id}.json").write_text(json.dumps(info.to_json()))
    return info.id


def test_side_panel_lists_the_nodes_of_a_running_local_cluster(
    lab: Lab, browser, runtime_dir: Path, tiny_model: Path
) -> None:
    # the routes answer only with Jupyter's credentials
    assert lab.api("topology", token=False).status_code == 403
    empty = lab.api("topology")
    assert empty.status_code == 200 and empty.json()["coordinator"] is None

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    cluster = dashboard = None
    try:
        page.goto(f"{lab.url}/lab?token={lab.token}")
        tab = page.locator(f".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='{PANEL[1:]}']")
        tab.wait_for(timeout=60_000)
        tab.click()
        page.locator(f"{PANEL} .exo-lab-empty-title").wait_for(timeout=20_000)
        page.locator(".jp-Launcher").first.wait_for(timeout=20_000)
        assert "exo_lab.local_cluster(2)" in page.locator(f"{PANEL} .exo-lab-empty").inner_text()
        shot(page, "panel-empty")

        cluster = exo_lab.local_cluster(2)
        names = sorted(n.name for n in cluster.nodes)
        assert names == ["local-0", "local-1"]
        rows = page.locator(f"{PANEL} .exo-lab-node-row")
        page.wait_for_function(f"document.querySelectorAll('{PANEL} .exo-lab-node-row').length === 2", timeout=20_000)
        assert sorted(rows.locator(".exo-lab-node-name").all_inner_texts()) == names
        assert "2 of 2 nodes alive" in page.locator(f"{PANEL} .exo-lab-subtitle").inner_text()
        assert page.locator(f"{PANEL} .exo-lab-dashboard-button").is_disabled()
        topo = lab.api("topology").json()
        assert sorted(n["name"] for n in topo["topology"]["nodes"]) == names
        # the renderer drew both nodes and the link, labelled with its measured latency and bandwidth
        assert_drawn(drawn_graph(page, PANEL), topo["topology"])
        shot(page, "panel")

        # an instance shows up with its state; the dashboard button opens the dashboard
        instance = cluster.launch(str(tiny_model), name="tiny")
        dashboard = Dashboard()
        cluster.registration.update(dashboard_url=dashboard.url)
        ready = page.locator(f"{PANEL} .exo-lab-instance .exo-lab-badge", has_text="ready")
        ready.wait_for(timeout=20_000)
        assert "tiny" in page.locator(f"{PANEL} .exo-lab-instance").inner_text()
        button = page.locator(f"{PANEL} .exo-lab-dashboard-button")
        page.wait_for_function(f"!document.querySelector('{PANEL} .exo-lab-dashboard-button').disabled", timeout=10_000)
        page.locator(f"{PANEL} .exo-lab-node-row", has_text="local-1").click()  # select a node: details open
        page.locator(f"{PANEL} .exo-svg .exo-node.selected").wait_for(timeout=5_000)
        assert drawn_graph(page, PANEL)["selected"] == [n.id for n in cluster.nodes if n.name == "local-1"]
        shot(page, "instance")
        with page.context.expect_page() as opened:
            button.click()
        tab2 = opened.value
        tab2.wait_for_load_state()
        assert tab2.url == dashboard.url
        assert "exo_lab dashboard" in tab2.title()
        tab2.close()

        # with a second coordinator the panel offers a choice; a bigger cluster is drawn too
        spec = write_spec_coordinator(runtime_dir)
        select = page.locator(f"{PANEL} .exo-lab-select")
        select.wait_for(timeout=10_000)
        select.select_option(spec)
        page.wait_for_function(f"document.querySelectorAll('{PANEL} .exo-lab-node-row').length === 4", timeout=10_000)
        assert_drawn(drawn_graph(page, PANEL), graph_json(Topology.load(SPECS / "m3-ultra-4x-tb5.json")))
        shot(page, "panel-4-nodes")
        select.select_option(cluster.registration.info.id)
        page.wait_for_function(f"document.querySelectorAll('{PANEL} .exo-lab-node-row').length === 2", timeout=10_000)
        (runtime_dir / "coordinators" / f"{spec}.json").unlink()

        # it follows the JupyterLab theme
        page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
        page.wait_for_selector("body[data-jp-theme-light='false']", state="attached", timeout=10_000)
        page.wait_for_timeout(500)  # the theme's CSS variables settle
        bg = page.evaluate(f"getComputedStyle(document.querySelector('{PANEL}')).backgroundColor")
        assert bg != "rgb(255, 255, 255)"
        shot(page, "panel-dark")

        instance.delete()
        cluster.close()
        page.locator(f"{PANEL} .exo-lab-empty-title").wait_for(timeout=20_000)
        assert errors == []
    except Exception:
        shot(page, "failure")  # what the page showed, to debug a failed run
        print(lab.output())
        raise
    finally:
        page.close()
        if dashboard is not None:
            dashboard.close()
        if cluster is not None:
            cluster.close()


def test_a_notebook_kernel_is_a_coordinator(lab: Lab, browser, runtime_dir: Path) -> None:
    """The cluster a notebook's kernel starts shows up under the notebook's name."""
    from jupyter_client import BlockingKernelClient

    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "start",
                "metadata": {},
                "outputs": [],
                "source": "import exo_lab\ncluster = exo_lab.local_cluster(2)",
            }
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    resp = requests.put(
        f"{lab.url}/api/contents/cluster.ipynb",
        params={"token": lab.token},
        timeout=30,
        json={"type": "notebook", "format": "json", "content": notebook},
    )
    assert resp.status_code in (200, 201), resp.text
    # the kernel is started with the session, so the notebook opens attached to it (no kernel dialog)
    resp = requests.post(
        f"{lab.url}/api/sessions",
        params={"token": lab.token},
        timeout=60,
        json={"path": "cluster.ipynb", "name": "cluster.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    assert resp.status_code == 201, resp.text
    session = resp.json()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{lab.url}/lab/tree/cluster.ipynb?token={lab.token}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
        ran = page.evaluate("""async () => {
            const panel = window.jupyterapp.shell.currentWidget;
            await panel.context.ready;
            await panel.sessionContext.ready;
            return await window.jupyterapp.commands.execute('notebook:run-all-cells');
        }""")
        assert ran is True
        tab = page.locator(f".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='{PANEL[1:]}']")
        if "lm-mod-current" not in (tab.get_attribute("class") or ""):
            tab.click()
        name = page.locator(f"{PANEL} .exo-lab-coordinator-name", has_text="cluster.ipynb (kernel)")
        name.wait_for(timeout=30_000)
        page.wait_for_function(f"document.querySelectorAll('{PANEL} .exo-lab-node-row').length === 2", timeout=20_000)
        [info] = lab.api("coordinators").json()["coordinators"]
        assert (info["kind"], info["kernel_id"]) == ("kernel", session["kernel"]["id"])
        shot(page, "notebook-kernel")
        assert errors == []
    except Exception:
        shot(page, "failure")  # what the page showed, to debug a failed run
        print(lab.output())
        raise
    finally:
        page.close()
        # close the kernel's cluster (its agents are the kernel's children), then the kernel
        client = BlockingKernelClient()
        client.load_connection_file(lab.runtime / f"kernel-{session['kernel']['id']}.json")
        client.start_channels()
        try:
            client.execute_interactive("if 'cluster' in globals(): cluster.close()", timeout=60)
        finally:
            client.stop_channels()
            requests.delete(f"{lab.url}/api/sessions/{session['id']}", params={"token": lab.token}, timeout=30)
    assert lab.api("coordinators").json()["coordinators"] == []


def test_launch_a_plan_from_the_panel_see_it_load_and_serve_then_stop_it(
    lab: Lab, browser, runtime_dir: Path, tmp_path: Path
) -> None:
    """The panel's Launch and Stop buttons drive the cluster of ``exo-lab up`` (through its API)."""
    import openai

    member = UpMember(tmp_path)  # starts while JupyterLab loads in the page
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{lab.url}/lab?reset&token={lab.token}")  # reset: not the notebook the test before left open
        tab = page.locator(f".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='{PANEL[1:]}']")
        tab.wait_for(timeout=60_000)
        member.wait()
        coordinator = member.coordinator_id()
        if "lm-mod-current" not in (tab.get_attribute("class") or ""):
            tab.click()
        if page.locator(f"{PANEL} .exo-lab-select").count():  # another coordinator is registered too
            page.locator(f"{PANEL} .exo-lab-select").select_option(coordinator)
        page.locator(f"{PANEL} .exo-lab-node-row", has_text="lab-node").wait_for(timeout=30_000)

        # the filters apply: at least 2 nodes on a one-node cluster leaves no plan, and says so
        page.locator(f"{PANEL} .exo-lab-model-input").fill("demo")
        page.locator(f"{PANEL} .exo-lab-min-nodes-input").fill("2")
        page.locator(f"{PANEL} .exo-lab-preview-button").click()
        page.locator(f"{PANEL} .exo-lab-launch-error", has_text="No plan fits demo").wait_for(timeout=30_000)
        assert page.locator(f"{PANEL} .exo-lab-plan-card").count() == 0

        # preview the demo model, single-node plans: ranked plans, the best selected, with its Launch button
        page.locator(f"{PANEL} .exo-lab-min-nodes-input").fill("1")
        page.locator(f"{PANEL} .exo-lab-sharding-select").select_option("single")
        page.locator(f"{PANEL} .exo-lab-preview-button").click()
        page.locator(f"{PANEL} .exo-lab-plan-card.selected .exo-lab-launch-button").wait_for(timeout=30_000)
        assert "lab-node" in page.locator(f"{PANEL} .exo-lab-plan-card.selected").inner_text()
        shot(page, "previews")
        assert member.agent_instances()["instances"] == []

        page.locator(f"{PANEL} .exo-lab-launch-button").click()
        card = page.locator(f"{PANEL} .exo-lab-instance")
        card.first.wait_for(timeout=30_000)
        iid = card.first.get_attribute("data-instance-id")
        assert iid, "the instance card names its instance"
        mine = f"{PANEL} .exo-lab-instance[data-instance-id='{iid}']"
        assert "Launched" in page.locator(f"{PANEL} .exo-lab-launch-status").inner_text()
        # it loads, with its progress, then serves
        page.locator(f"{mine} .exo-lab-progress").wait_for(timeout=30_000)
        shot(page, "loading")
        assert iid in {i["id"] for i in member.agent_instances()["instances"]}, "the agent holds its ranks"
        page.locator(f"{mine}[data-state='ready']").wait_for(timeout=90_000)
        assert page.locator(f"{mine} .exo-lab-progress").count() == 0
        assert "exo-lab up" in page.locator(f"{mine} .exo-lab-owner").inner_text()
        assert "demo" in page.locator(f"{mine} .exo-lab-instance-name").inner_text()
        shot(page, "launched")
        client = openai.OpenAI(base_url=f"{member.url}/v1", api_key="unused", timeout=60)
        reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens > 0

        # stop it: the card goes, the agent frees its reservation, the API no longer serves it
        page.locator(f"{mine} .exo-lab-stop-button").click()
        page.locator(mine).wait_for(state="detached", timeout=30_000)
        assert page.locator(f"{PANEL} .exo-lab-instances-list").inner_text().startswith("None running")
        held = member.agent_instances()
        assert held["reserved_bytes"] == 0, held
        assert all(i["state"] == "stopped" for i in held["instances"] if i["id"] == iid), held
        assert "demo" not in [m.id for m in client.models.list().data]
        shot(page, "stopped")
        assert errors == []
    except Exception:
        shot(page, "failure")
        print(lab.output())
        print(member.output())
        raise
    finally:
        page.close()
        member.stop()
