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
from exo_lab.cluster.auth import Verifier
from exo_lab.cluster.signed_handler import SignedHandler

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
    """Just enough of a node agent (``GET /node``, ``/node/peers``, ``/node/links``, ``/instances``;
    ``DELETE /instances/<id>``)."""

    def __init__(self, node_id: str, name: str, instances: list[dict[str, Any]]) -> None:
        self.requests: list[tuple[str, bool]] = []
        agent = self
        verifier = Verifier(KEY)

        class Handler(SignedHandler):
            def prepare(self) -> None:
                if "X-Exo-Lab-Signature" in self.request.headers:
                    self.signature_problem(verifier)  # accepted: the answer is signed, as an agent's is

            def get(self) -> None:
                agent.requests.append((self.request.path, "X-Exo-Lab-Signature" in self.request.headers))
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(agent.answer(self.request.path)))

            def delete(self) -> None:
                agent.requests.append((f"DELETE {self.request.path}", "X-Exo-Lab-Signature" in self.request.headers))
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps({"stopped": True}))

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


class FakeApi:
    """A coordinator's API (``POST /instance``, ``DELETE /instance/<id>``) that checks the cluster key's signature
    and answers ``status`` with ``reply``, signed."""

    def __init__(self, status: int = 201, reply: dict[str, Any] | None = None) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.status = status
        self.reply = reply if reply is not None else {"id": "new1", "name": "demo", "model": "demo", "state": "loading"}
        verifier = Verifier(KEY)
        api = self

        class Handler(SignedHandler):  # signs its answers, as the real API does
            def answer(self) -> None:
                r = self.request
                problem = self.signature_problem(verifier)
                if problem is not None:
                    self.set_status(401)
                    self.finish(json.dumps({"error": {"message": problem}}))
                    return
                api.requests.append((r.method or "", r.path, json.loads(r.body) if r.body else None))
                self.set_status(api.status)
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(api.reply))

            post = delete = answer

        self.server = HTTPServer(tornado.web.Application([(r"/.*", Handler)]))
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"


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
        [{"id": "inst1", "state": "running", "reserved_bytes": 5, "ranks": [{"rank": 0, "alive": True, "pid": 11}]}],
    )
    leased = {  # what an agent reports once the owner holds a lease: who owns it, what it runs, its status
        "id": "other",
        "state": "running",
        "reserved_bytes": 2,
        "ranks": [{"rank": 0, "alive": True, "pid": 4242}],
        "info": {"model": "/m/big", "name": "big", "nodes": ["n1"]},
        "owner": {"coordinator": "elsewhere", "label": "exo-lab up (pid 1)", "api": "http://127.0.0.1:1"},
        "status": {"state": "loading", "loaded": [3, 8]},
    }
    b = FakeAgent(
        "n1",
        "fake-1",
        [
            {"id": "inst1", "state": "running", "reserved_bytes": 5, "ranks": [{"rank": 1, "alive": False}]},
            {"id": "orphan", "state": "running", "reserved_bytes": 1, "ranks": [{"rank": 0, "alive": True}]},
            {"id": "gone", "state": "stopped", "reserved_bytes": 1, "ranks": []},
            leased,
        ],
    )
    pending = {"id": "pending", "name": "next", "model": "/m/next", "state": "launching"}  # on no agent yet
    info = write_coordinator(
        registry, [a.address, b.address], instances=[ready, pending], dashboard_url="http://127.0.0.1:5006/"
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

    # every instance of the cluster, wherever it was launched; the stopped one is left out
    listed = {i["id"]: i for i in (await get(jp_fetch, "instances", coordinator=info.id))["instances"]}
    assert sorted(listed) == ["inst1", "orphan", "other", "pending"]
    mine = listed["inst1"]  # the registration fills in what the agents do not report
    assert (mine["state"], mine["name"], mine["loaded"], mine["mine"]) == ("ready", "tiny", [8, 8], True)
    assert mine["owner"] == {"coordinator": info.id, "label": "kernel 1234abcd", "api": None}
    assert (sorted(mine["node_names"]), mine["ranks_alive"]) == (["fake-0", "fake-1"], 1)
    assert mine["description"] == "pipeline: fake-0 -> fake-1"
    other = listed["other"]  # launched by another coordinator: the agents' lease says by whom
    assert (other["state"], other["name"], other["loaded"], other["mine"]) == ("loading", "big", [3, 8], False)
    assert (other["owner"]["label"], other["node_names"], other["ranks_alive"]) == ("exo-lab up (pid 1)", ["fake-1"], 1)
    assert (listed["orphan"]["state"], listed["orphan"]["owner"], listed["orphan"]["mine"]) == ("loading", {}, False)
    assert (listed["pending"]["state"], listed["pending"]["name"], listed["pending"]["mine"]) == (
        "launching",
        "next",
        True,
    )

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


async def test_previews(jp_fetch, registry: Path, tiny_model: Path, models_cache: Path) -> None:
    a = FakeAgent("n0", "fake-0", [])
    b = FakeAgent("n1", "fake-1", [])
    write_coordinator(registry, [a.address, b.address])
    plans = await get(jp_fetch, "previews", model_id=str(tiny_model), context="1024")
    assert plans["plans"], plans
    assert all(p["context"] == 1024 for p in plans["plans"])
    assert {r["node_id"] for p in plans["plans"] for r in p["ranks"]} <= {"n0", "n1"}
    # the API's filters (feasible plans and infeasible ones alike): one kind; at least two nodes; only node n0
    single = await get(jp_fetch, "previews", model_id=str(tiny_model), sharding="single")
    assert single["plans"] and {p["strategy"] for p in single["plans"] + single["infeasible"]} == {"single"}
    two = await get(jp_fetch, "previews", model_id=str(tiny_model), min_nodes="2")
    two_all = two["plans"] + two["infeasible"]  # the fake agents have no measured link: multi-node plans infeasible
    assert two_all and all(len({r["node_id"] for r in p["ranks"]}) >= 2 for p in two_all), two
    only = await get(jp_fetch, "previews", model_id=str(tiny_model), node_ids="n0")
    assert only["plans"] and all({r["node_id"] for r in p["ranks"]} == {"n0"} for p in only["plans"])
    # a synthetic preset is planned from its shape: previewing builds (or downloads) nothing
    big = await get(jp_fetch, "previews", model_id="synthetic:llama-1b")
    assert big["plans"] or big["infeasible"], big
    assert not list(models_cache.glob("*llama-1b*")), list(models_cache.iterdir())

    for params, code in [
        ({}, 400),
        ({"model_id": str(tiny_model), "context": "x"}, 400),
        ({"model_id": str(tiny_model), "objective": "fast"}, 400),
        ({"model_id": str(tiny_model), "sharding": "diagonal"}, 400),
        ({"model_id": str(tiny_model), "min_nodes": "0"}, 400),
        ({"model_id": "no-such-model-anywhere"}, 404),
        ({"model_id": "some-org/not-in-the-store"}, 404),  # a hub id is not downloaded to preview it
    ]:
        with pytest.raises(HTTPClientError) as err:
            await jp_fetch("exo-lab", "api", "previews", params=params, method="GET")
        assert err.value.code == code, (params, err.value)
    a.server.stop()
    b.server.stop()


async def send(jp_fetch, method: str, route: str, body: Any = None, raw: bytes | None = None, **params: str):
    """``method`` on ``/exo-lab/api/<route>``: (status, JSON answer), error statuses included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        resp = await jp_fetch("exo-lab", "api", *route.split("/"), method=method, body=data, params=params)
    except HTTPClientError as err:
        assert err.response is not None
        return err.code, json.loads(err.response.body)
    return resp.code, json.loads(resp.body)


MALFORMED_LAUNCHES: list[tuple[Any, str]] = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    ({}, "missing 'model_id'"),
    ({"model_id": ""}, "'model_id' must be"),
    ({"model_id": 3}, "'model_id' must be"),
    ({"model_id": "demo", "plan": -1}, "'plan' must be"),
    ({"model_id": "demo", "plan": True}, "'plan' must be"),
    ({"model_id": "demo", "plan": "best"}, "'plan' must be"),
    ({"model_id": "demo", "plan": {"strategy": "single"}}, "'plan' must be"),
    ({"model_id": "demo", "context": 0}, "'context' must be"),
    ({"model_id": "demo", "objective": "fast"}, "'objective' must be"),
    ({"model_id": "demo", "node_ids": [1]}, "'node_ids' must be"),
    ({"model_id": "demo", "modle": "x"}, "unknown field(s) 'modle'"),
]


async def test_launch_rejects_malformed_bodies(jp_fetch, registry: Path) -> None:
    for body, why in MALFORMED_LAUNCHES:
        raw = body if isinstance(body, bytes) else None
        status, answer = await send(jp_fetch, "POST", "instances", body, raw=raw)
        assert (status, why in answer["message"]) == (400, True), (body, answer)
    # a good body with nowhere to go: no cluster, then a coordinator that serves no API
    status, answer = await send(jp_fetch, "POST", "instances", {"model_id": "demo", "plan": 0})
    assert status == 409 and "local_cluster" in answer["message"]
    write_coordinator(registry, [])
    status, answer = await send(jp_fetch, "POST", "instances", {"model_id": "demo", "plan": 0})
    assert status == 409 and "cluster.serve()" in answer["message"] and "kernel 1234abcd" in answer["message"]


async def test_launch_goes_to_the_coordinators_api_signed_with_the_cluster_key(jp_fetch, registry: Path) -> None:
    from tests.helpers.net import free_port

    api = FakeApi()
    info = write_coordinator(registry, [], api_url=api.url)
    plan = {"model": "demo", "strategy": "single", "ranks": [{"rank": 0, "node_id": "n0", "layers": [0, 4]}]}
    status, answer = await send(
        jp_fetch, "POST", "instances", {"model_id": "demo", "plan": plan, "name": None}, coordinator=info.id
    )
    assert status == 201 and (answer["id"], answer["coordinator"]) == ("new1", info.id)
    assert api.requests == [("POST", "/instance", {"model_id": "demo", "plan": plan})]  # nulls are not passed on
    # the coordinator's refusals keep their status and message
    api.status, api.reply = 409, {"error": {"message": "this node already serves an instance named 'demo'"}}
    status, answer = await send(jp_fetch, "POST", "instances", {"model_id": "demo", "plan": 0})
    assert (status, answer["message"]) == (409, "this node already serves an instance named 'demo'")
    # a key the coordinator does not share: its 401 comes back as it is
    write_coordinator(registry, [], id=info.id, api_url=api.url, cluster_key="0" * 64)
    status, answer = await send(jp_fetch, "POST", "instances", {"model_id": "demo"})
    assert status == 401 and "signature" in answer["message"]
    # an API that does not answer is a 502
    write_coordinator(registry, [], id=info.id, api_url=f"http://127.0.0.1:{free_port()}")
    status, answer = await send(jp_fetch, "POST", "instances", {"model_id": "demo"})
    assert status == 502 and "failed" in answer["message"]
    api.server.stop()


async def test_stop_an_instance_through_its_owner_or_its_agents(jp_fetch, registry: Path) -> None:
    owner_api = FakeApi(200, {"id": "inst1", "state": "stopped"})
    running = {"state": "running", "reserved_bytes": 5, "ranks": [{"rank": 0, "alive": True, "pid": 11}]}
    a = FakeAgent("n0", "fake-0", [{"id": "inst1", **running}, {"id": "orphan", **running}])
    info = write_coordinator(registry, [a.address], api_url=owner_api.url, instances=[{"id": "inst1", "name": "tiny"}])

    for bad in ["bad id!", "x" * 65, "a/b"]:
        status, answer = await send(jp_fetch, "DELETE", f"instances/{bad}")
        assert status == 400 and "not an instance id" in answer["message"], (bad, answer)
    status, answer = await send(jp_fetch, "DELETE", "instances/nosuch")
    assert status == 404 and "inst1" in answer["message"] and "orphan" in answer["message"]

    # the coordinator that launched it stops it (its API, signed)
    status, answer = await send(jp_fetch, "DELETE", "instances/inst1", coordinator=info.id)
    assert (status, answer) == (200, {"id": "inst1", "stopped_by": "owner"})
    assert owner_api.requests == [("DELETE", "/instance/inst1", None)]
    # an instance whose owner is unknown is stopped on its agents (signed)
    status, answer = await send(jp_fetch, "DELETE", "instances/orphan")
    assert (status, answer) == (200, {"id": "orphan", "stopped_by": "agents"})
    assert ("DELETE /instances/orphan", True) in a.requests
    assert not any(p == "DELETE /instances/inst1" for p, _ in a.requests)
    owner_api.server.stop()
    a.server.stop()


async def test_routes_need_jupyters_auth(jp_fetch, jp_http_port: int, jp_base_url: str, registry: Path) -> None:
    client = AsyncHTTPClient()
    for route in ["coordinators", "topology", "instances", "previews?model_id=demo", "dashboard-url"]:
        url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}exo-lab/api/{route}"
        with pytest.raises(HTTPClientError) as err:
            await client.fetch(url, follow_redirects=False)
        assert err.value.code == 403, route
    for method, route in [("POST", "instances"), ("DELETE", "instances/inst1")]:
        url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}exo-lab/api/{route}"
        with pytest.raises(HTTPClientError) as err:
            body = b'{"model_id": "demo"}' if method == "POST" else None
            await client.fetch(url, method=method, body=body, follow_redirects=False)
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
    assert [(i["name"], i["state"], i["mine"]) for i in inst["instances"]] == [("demo", "ready", True)]
    plans = await get(jp_fetch, "previews", model_id=str(tiny_model))
    assert plans["plans"]
