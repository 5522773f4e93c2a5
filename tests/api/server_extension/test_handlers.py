"""The Jupyter server extension's routes (``/exo-lab/api/*``), against fake node agents on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.httpserver import HTTPServer

from exo_lab.cluster import coordinators

REPO = Path(__file__).resolve().parents[3]
KEY = "f" * 64


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"exo_lab.jupyter": True}}}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EXO_LAB_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("EXO_LAB_DASHBOARD_URL", raising=False)
    return tmp_path / "run" / "coordinators"


class FakeAgent:
    """Just enough of a node agent (``GET /node``, ``/node/peers``, ``/node/links``, ``/instances``)."""

    def __init__(self, node_id: str, name: str, instances: list[dict[str, Any]]) -> None:
        self.requests: list[tuple[str, bool]] = []
        agent = self

        class Handler(tornado.web.RequestHandler):
            def get(self) -> None:
                agent.requests.append((self.request.path, "X-Exo-Lab-Signature" in self.request.headers))
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(agent.answer(self.request.path)))

        self.node = {
            "id": node_id,
            "name": name,
            "addresses": ["127.0.0.1"],
            "port": 0,
            "state": "alive",
            "profile": {
                "memory_total_bytes": 16 * 2**30,
                "memory_available_bytes": 12 * 2**30,
                "cpu_model": "Fake CPU",
                "cpu_count": 4,
                "mlx_devices": ["cpu"],
            },
        }
        self.instances = instances
        self.server = HTTPServer(tornado.web.Application([(r"/.*", Handler)]))
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.node["port"] = self.port
        self.address = f"127.0.0.1:{self.port}"

    def answer(self, path: str) -> dict[str, Any]:
        return {
            "/node": self.node,
            "/node/peers": {"node": self.node["id"], "peers": []},
            "/node/links": {"node": self.node["id"], "links": []},
            "/instances": {"node": self.node["id"], "reserved_bytes": 0, "instances": self.instances},
        }[path]


def write_coordinator(registry: Path, agents: list[str], **fields: Any) -> coordinators.CoordinatorInfo:
    """A registration as a live coordinator (this test process) writes it."""
    info = coordinators.CoordinatorInfo(
        id=fields.pop("id", f"{os.getpid()}-1"),
        pid=os.getpid(),
        process_started=coordinators._process_started(os.getpid()),
        kind="kernel",
        label="kernel 1234abcd",
        agents=agents,
        follow_peers=False,
        **{"cluster_key": KEY, **fields},
    )
    registry.mkdir(parents=True, exist_ok=True)
    (registry / f"{info.id}.json").write_text(json.dumps(info.to_json()))
    return info


async def get(jp_fetch, route: str, **params: str) -> dict[str, Any]:
    resp = await jp_fetch("exo-lab", "api", route, params=params, method="GET")
    assert resp.headers["Content-Type"].startswith("application/json")
    return json.loads(resp.body)


async def test_no_coordinator_is_a_normal_state(jp_fetch, registry: Path) -> None:
    topo = await get(jp_fetch, "topology")
    assert topo["coordinator"] is None
    assert topo["topology"]["nodes"] == []
    assert "local_cluster" in topo["hint"]
    assert (await get(jp_fetch, "coordinators"))["coordinators"] == []
    assert (await get(jp_fetch, "instances"))["instances"] == []
    dash = await get(jp_fetch, "dashboard-url")
    assert dash["url"] is None and "exo-lab dashboard" in dash["hint"]
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("exo-lab", "api", "previews", params={"model_id": "demo"}, method="GET")
    assert err.value.code == 409


async def test_topology_and_instances_of_a_registered_cluster(jp_fetch, registry: Path) -> None:
    ready = {
        "id": "inst1",
        "name": "tiny",
        "model": "/m/tiny",
        "state": "ready",
        "loaded_layers": 8,
        "total_layers": 8,
        "node_names": ["fake-0", "fake-1"],
        "description": "pipeline: fake-0 -> fake-1",
    }
    a = FakeAgent(
        "n0",
        "fake-0",
        [{"id": "inst1", "state": "running", "reserved_bytes": 5, "ranks": [{"rank": 0, "alive": True}]}],
    )
    b = FakeAgent(
        "n1",
        "fake-1",
        [
            {"id": "inst1", "state": "running", "reserved_bytes": 5, "ranks": [{"rank": 1, "alive": False}]},
            {"id": "orphan", "state": "running", "reserved_bytes": 1, "ranks": [{"rank": 0, "alive": True}]},
        ],
    )
    info = write_coordinator(
        registry, [a.address, b.address], instances=[ready], dashboard_url="http://127.0.0.1:5006/"
    )

    coords = (await get(jp_fetch, "coordinators"))["coordinators"]
    assert [c["id"] for c in coords] == [info.id]
    assert "cluster_key" not in coords[0] and "instances" not in coords[0]
    assert coords[0]["agent_count"] == 2

    topo = await get(jp_fetch, "topology")
    assert topo["coordinator"]["id"] == info.id
    assert sorted(n["name"] for n in topo["topology"]["nodes"]) == ["fake-0", "fake-1"]
    assert "edges" in topo["topology"]
    assert "cluster_key" not in json.dumps(topo)
    assert all(signed for _, signed in a.requests), "reads of agents are signed with the coordinator's key"

    inst = await get(jp_fetch, "instances", coordinator=info.id)
    [mine] = inst["instances"]
    assert mine["state"] == "ready"
    assert sorted((n["node_name"], n["ranks_alive"]) for n in mine["on_nodes"]) == [("fake-0", 1), ("fake-1", 0)]
    assert [o["id"] for o in inst["other_instances"]] == ["orphan"]

    assert (await get(jp_fetch, "dashboard-url"))["url"] == "http://127.0.0.1:5006/"

    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("exo-lab", "api", "topology", params={"coordinator": "nope"}, method="GET")
    assert err.value.code == 404

    a.server.stop()
    b.server.stop()


async def test_reads_are_cached_for_a_moment(jp_fetch, registry: Path) -> None:
    a = FakeAgent("n0", "fake-0", [])
    write_coordinator(registry, [a.address])
    for _ in range(3):
        await get(jp_fetch, "topology")
    assert [p for p, _ in a.requests].count("/node") == 1
    a.server.stop()


async def test_an_unreachable_cluster_is_a_502_with_the_reason(jp_fetch, registry: Path) -> None:
    from tests.helpers.net import free_port

    write_coordinator(registry, [f"127.0.0.1:{free_port()}"])
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("exo-lab", "api", "topology", method="GET")
    assert err.value.code == 502
    assert "does not answer" in json.loads(err.value.response.body)["message"]


async def test_previews(jp_fetch, registry: Path, tiny_model: Path) -> None:
    a = FakeAgent("n0", "fake-0", [])
    b = FakeAgent("n1", "fake-1", [])
    write_coordinator(registry, [a.address, b.address])
    plans = await get(jp_fetch, "previews", model_id=str(tiny_model), context="1024")
    assert plans["plans"], plans
    assert all(p["context"] == 1024 for p in plans["plans"])
    assert {r["node_id"] for p in plans["plans"] for r in p["ranks"]} <= {"n0", "n1"}

    for params, code in [
        ({}, 400),
        ({"model_id": str(tiny_model), "context": "x"}, 400),
        ({"model_id": str(tiny_model), "objective": "fast"}, 400),
        ({"model_id": "no-such-model-anywhere"}, 404),
    ]:
        with pytest.raises(HTTPClientError) as err:
            await jp_fetch("exo-lab", "api", "previews", params=params, method="GET")
        assert err.value.code == code, (params, err.value)
    a.server.stop()
    b.server.stop()


async def test_routes_need_jupyters_auth(jp_fetch, jp_http_port: int, jp_base_url: str, registry: Path) -> None:
    client = AsyncHTTPClient()
    for route in ["coordinators", "topology", "instances", "previews?model_id=demo", "dashboard-url"]:
        url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}exo-lab/api/{route}"
        with pytest.raises(HTTPClientError) as err:
            await client.fetch(url, follow_redirects=False)
        assert err.value.code == 403, route
    assert (await jp_fetch("exo-lab", "api", "coordinators", method="GET")).code == 200


def test_enabled_by_the_installed_config() -> None:
    """The package installs the config that enables the extension (shared-data in pyproject.toml)."""
    import sys

    config = REPO / "jupyter-config" / "jupyter_server_config.d" / "exo_lab.json"
    assert json.loads(config.read_text()) == {"ServerApp": {"jpserver_extensions": {"exo_lab.jupyter": True}}}
    installed = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "exo_lab.json"
    assert installed.is_file(), "pip install -e . installs it; reinstall if it is missing"
    assert json.loads(installed.read_text()) == json.loads(config.read_text())


async def test_a_coordinator_without_agents_shows_its_own_snapshot(jp_fetch, registry: Path, tiny_model: Path) -> None:
    """``exo-lab up``: one process serving a model, no node agents."""
    node = {
        "id": "local",
        "name": "this-host",
        "addresses": ["127.0.0.1"],
        "port": 52415,
        "state": "alive",
        "profile": {"memory_total_bytes": 8 * 2**30, "memory_available_bytes": 6 * 2**30, "cpu_count": 2},
    }
    served = {
        "id": "api-demo",
        "name": "demo",
        "model": "demo",
        "state": "ready",
        "strategy": "single",
        "nodes": ["local"],
        "node_names": ["this-host"],
    }
    write_coordinator(
        registry,
        [],
        local_topology={"nodes": [node], "links": []},
        instances=[served],
        api_url="http://127.0.0.1:52415",
        cluster_key=None,
    )
    topo = await get(jp_fetch, "topology")
    assert [n["name"] for n in topo["topology"]["nodes"]] == ["this-host"]
    assert topo["coordinator"]["api_url"] == "http://127.0.0.1:52415"
    inst = await get(jp_fetch, "instances")
    assert [(i["name"], i["state"], i["on_nodes"]) for i in inst["instances"]] == [("demo", "ready", [])]
    plans = await get(jp_fetch, "previews", model_id=str(tiny_model))
    assert plans["plans"]
