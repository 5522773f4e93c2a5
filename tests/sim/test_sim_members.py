"""Three simulated machines, each running ``exo-lab up``: one cluster, driven from any of them.

Host a launches a pipeline over b and c (``POST /instance`` on a's API); a client chats through c's
API (forwarded to a, streaming kept); b's ``/events`` shows it load and become ready; b's API stops it
and every node frees its memory. Then a's ``exo-lab up`` is killed with SIGKILL while it owns an
instance: the nodes stop its workers and release its reservations within 15 s. The test runs in the
root namespace, which is on the simulated LAN.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from exo_lab.cluster.auth import sign_headers
from exo_lab.sim.cluster import SimCluster
from exo_lab.sim.spec import SimSpec
from tests.helpers.polling import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 ('ip') is not installed"),
]

API_PORT = 52415
API_KEY = "sim-members-api-key"
SPEC = {"name": "members3", "hosts": ["a", "b", "c"], "lan": {}}
UP = (
    "{python}", "-m", "exo_lab.cli", "up", "--no-model", "--no-dashboard", "--host", "0.0.0.0",
    "--port", str(API_PORT), "--api-key", API_KEY, "--agent-port", "{port}", "--node-name", "{name}",
    "--state-dir", "{state_dir}", "{peers}",
)  # fmt: skip


@pytest.fixture(scope="module")
def sim():
    s = SimCluster(SimSpec.from_json(SPEC), node_command=UP)
    s.up(wait=120)
    yield s
    s.down()


def api(sim: SimCluster, host: str) -> str:
    return f"http://{sim.hosts[host].lan_addr}:{API_PORT}"


def call(sim: SimCluster, host: str, method: str, path: str, body: dict | None = None):
    r = httpx.request(
        method, api(sim, host) + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    return r.status_code, r.json()


def agent(sim: SimCluster, host: str) -> dict:
    """The agent's instances, read from the root namespace as from any other machine: signed."""
    headers = sign_headers(sim.cluster_key, "GET", "/instances")
    return httpx.get(sim.hosts[host].url + "/instances", headers=headers, timeout=30).json()


@pytest.fixture(scope="module")
def ids(sim):
    def formed():
        try:  # the agents answer first (sim.up waits for them); each API follows once its member is connected
            status, state = call(sim, "a", "GET", "/state")
        except httpx.HTTPError:
            return None
        alive = {n["name"]: n["id"] for n in state.get("nodes", []) if n["state"] == "alive"} if status == 200 else {}
        if set(alive) != {"a", "b", "c"}:
            return None
        # a pipeline over b and c needs their link measured: until then its plan is infeasible ("no measured link")
        pair = {alive["b"], alive["c"]}
        measured = any({link.get("src"), link.get("dst")} == pair and not link.get("error") for link in state["links"])
        return alive if measured else None

    return wait_for(formed, 120, "a's /state shows a, b and c alive and the b-c link measured")


def test_one_cluster_launched_on_a_served_by_c_stopped_by_b(sim, ids):
    events: list[dict] = []

    def read_events() -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        try:
            with httpx.stream("GET", api(sim, "b") + "/events", headers=headers, timeout=None) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
        except httpx.HTTPError:
            pass

    threading.Thread(target=read_events, daemon=True).start()
    status, plans = call(
        sim, "a", "GET", f"/instance/previews?model_id=demo&sharding=pipeline&node_ids={ids['b']},{ids['c']}"
    )
    assert status == 200 and plans["plans"], plans
    status, launched = call(
        sim,
        "a",
        "POST",
        "/instance",
        {"model_id": "demo", "plan": 0, "sharding": "pipeline", "node_ids": [ids["b"], ids["c"]], "min_nodes": 2},
    )
    assert status == 201, launched
    iid = launched["id"]
    assert {r["node_id"] for r in launched["plan"]["ranks"]} == {ids["b"], ids["c"]}

    def seen(kind: str) -> bool:
        return any(e["type"] == kind and e.get("instance", {}).get("id") == iid for e in events)

    wait_for(lambda: seen("instance_ready"), 180, "b's /events: instance ready")
    assert seen("instance_loading") or seen("instance_created")

    client = openai.OpenAI(base_url=api(sim, "c") + "/v1", api_key=API_KEY)
    assert "demo" in [m.id for m in client.models.list().data]
    msgs = [{"role": "user", "content": "Hello"}]
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, temperature=0, stream=True)
        if c.choices
    ]
    direct = openai.OpenAI(base_url=api(sim, "a") + "/v1", api_key=API_KEY).chat.completions.create(
        model="demo", messages=msgs, max_tokens=8, temperature=0
    )
    assert len(pieces) > 1 and "".join(pieces) == direct.choices[0].message.content

    before = {h: agent(sim, h)["reserved_bytes"] for h in "bc"}
    assert all(before.values())
    status, deleted = call(sim, "b", "DELETE", f"/instance/{iid}")
    assert status == 200 and deleted["via"] == "owner", deleted
    wait_for(lambda: seen("instance_deleted"), 30, "b's /events: instance deleted")
    for h in "abc":
        assert agent(sim, h) | {"node": None} == {"node": None, "reserved_bytes": 0, "instances": []}


def test_killing_the_owner_frees_every_node_within_15_s(sim, ids):
    status, launched = call(
        sim, "a", "POST", "/instance", {"model_id": "demo", "sharding": "pipeline", "node_ids": [ids["b"], ids["c"]]}
    )
    assert status == 201, launched
    iid = launched["id"]
    wait_for(lambda: call(sim, "b", "GET", f"/instance/{iid}")[1].get("state") == "ready", 180, "ready")
    pids = [r["pid"] for h in "bc" for i in agent(sim, h)["instances"] for r in i["ranks"]]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)

    owner = sim._nodes["a"]  # `exo-lab up` on a (and its agent, which exits with it)
    os.killpg(owner.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: (
            not any(psutil.pid_exists(p) for p in pids)
            and all(agent(sim, h)["reserved_bytes"] == 0 and not agent(sim, h)["instances"] for h in "bc")
        ),
        15,
        "b and c stop the dead owner's workers and free its memory",
    )
    print(f"\nowner killed: workers gone and reservations freed after {time.monotonic() - killed:.1f} s")
