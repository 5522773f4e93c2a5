"""Instances as cluster state over HTTP: two coordinators on one cluster, each serving its API.

Coordinator ``a`` launches; ``b`` lists, serves (forwarding to ``a``, streaming kept) and stops
what ``a`` launched; every route answers malformed input with a clear error and keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import anthropic
import httpx
import openai
import pytest

import exo_lab
from tests.helpers.polling import wait_for
from tests.helpers.raw_http import raw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def members():
    a = exo_lab.local_cluster(2)
    b = exo_lab.connect([a.address_of(n.id) for n in a.nodes], cluster_key=a.cluster_key)
    a.serve()
    b.serve()
    yield a, b
    b.close()
    a.close()


def url(cluster) -> str:
    return cluster.server.url


class Events:
    """``GET /events`` read on a thread: every event, in order."""

    def __init__(self, base: str) -> None:
        self.items: list[dict] = []
        self._client = httpx.Client(timeout=None)
        threading.Thread(target=self._read, args=(base,), daemon=True).start()

    def _read(self, base: str) -> None:
        try:
            with self._client.stream("GET", f"{base}/events") as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.items.append(json.loads(line[6:]))
        except httpx.HTTPError:  # closed at the end of the test, or the server stopped
            pass

    def of(self, kind: str, iid: str) -> list[dict]:
        return [e for e in self.items if e["type"] == kind and e.get("instance", {}).get("id") == iid]

    def close(self) -> None:
        self._client.close()


def get(base: str, path: str):
    r = httpx.get(base + path, timeout=60)
    return r.status_code, r.json()


def test_previews_filter_by_sharding_nodes_and_node_ids(members):
    a, _ = members
    status, data = get(url(a), "/instance/previews?model_id=demo&sharding=pipeline")
    assert status == 200 and data["plans"] and {p["strategy"] for p in data["plans"]} == {"pipeline"}
    assert [p["index"] for p in data["plans"]] == list(range(len(data["plans"])))
    status, data = get(url(a), "/instance/previews?model_id=demo&min_nodes=2")
    assert status == 200 and data["plans"] and all(len({r["node_id"] for r in p["ranks"]}) >= 2 for p in data["plans"])
    first = a.nodes[0]
    status, data = get(url(a), f"/instance/previews?model_id=demo&node_ids={first.id}")
    assert status == 200 and data["plans"]
    assert all({r["node_id"] for r in p["ranks"]} == {first.id} for p in data["plans"])
    for query, param in [
        ("model_id=demo&sharding=diagonal", "sharding"),
        ("model_id=demo&min_nodes=zero", "min_nodes"),
        ("model_id=demo&node_ids=nosuchnode", "node_ids"),
        ("model_id=demo&objective=fast", "objective"),
        ("sharding=pipeline", "model_id"),
    ]:
        status, data = get(url(a), f"/instance/previews?{query}")
        assert status == 400 and data["error"]["param"] == param, (query, data)
    status, data = get(url(a), "/instance/previews?model_id=no-such-model")
    assert status == 404 and data["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{", None),
        (b"[]", None),
        (json.dumps({"plan": 0}).encode(), "model_id"),
        (json.dumps({"model_id": 3}).encode(), "model_id"),
        (json.dumps({"model_id": "demo", "plan": 99, "sharding": "pipeline"}).encode(), "plan"),
        (json.dumps({"model_id": "demo", "plan": "first"}).encode(), "plan"),
        (json.dumps({"model_id": "demo", "plan": -1}).encode(), "plan"),
        (json.dumps({"model_id": "demo", "plan": {"strategy": "pipeline"}}).encode(), "plan"),
        (json.dumps({"model_id": "demo", "max_batch": 0}).encode(), "max_batch"),
        (json.dumps({"model_id": "demo", "sharding": "diagonal"}).encode(), "sharding"),
        (json.dumps({"model_id": "no-such-model"}).encode(), "model_id"),
    ],
)
def test_launch_rejects_malformed_requests(members, body, param):
    a, _ = members
    status, data = raw(a.server, "POST", "/instance", body, {"Content-Type": "application/json"})
    err = json.loads(data)["error"]
    assert 400 <= status < 500 and err["message"], (status, data)
    if param is not None:
        assert err["param"] == param, err
    assert a.server.running and not [i for i in a.instances if i.state != "stopped"]


def test_unknown_instances_are_404_and_nothing_breaks(members):
    a, b = members
    for method in ("GET", "DELETE"):
        status, data = raw(b.server, method, "/instance/nosuchid")
        assert status == 404 and json.loads(data)["error"]["code"] == "instance_not_found"
    status, _ = raw(b.server, "GET", "/instance/bad%20id")
    assert status == 404
    assert get(url(a), "/health")[0] == 200 and get(url(b), "/health")[0] == 200


def test_launched_on_a_served_and_stopped_through_b(members):
    a, b = members
    events = Events(url(b))
    status, data = raw(
        a.server,
        "POST",
        "/instance",
        json.dumps({"model_id": "demo", "plan": 0, "sharding": "pipeline", "min_nodes": 2, "name": "demo-pp"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 201, data
    launched = json.loads(data)
    iid = launched["id"]
    assert launched["name"] == "demo-pp" and launched["plan"]["strategy"] == "pipeline"

    # b sees it load and become ready, from its own API
    wait_for(lambda: events.of("instance_ready", iid), 120, "instance_ready on b's /events")
    assert events.items[0]["type"] == "state"
    assert events.of("instance_created", iid) or events.of("instance_loading", iid)
    status, listed = get(url(b), "/instances")
    mine = next(i for i in listed["instances"] if i["id"] == iid)
    assert mine["state"] == "ready" and len(mine["nodes"]) == 2 and mine["owner"]["api"] == a.api_url
    status, one = get(url(b), f"/instance/{iid}")
    assert status == 200 and one["id"] == iid
    status, st = get(url(b), "/state")
    assert status == 200 and {n["id"] for n in st["nodes"]} == {n.id for n in a.nodes}
    assert any(i["id"] == iid for i in st["instances"]) and set(st["models"]) == {n.id for n in a.nodes}

    # b's API serves a's instance: /v1/models lists it, chat streams through b, same tokens as through a
    ob = openai.OpenAI(base_url=f"{url(b)}/v1", api_key="none")
    assert "demo-pp" in [m.id for m in ob.models.list().data]
    msgs = [{"role": "user", "content": "Hello there"}]
    direct = openai.OpenAI(base_url=f"{url(a)}/v1", api_key="none").chat.completions.create(
        model="demo-pp", messages=msgs, max_tokens=8, temperature=0
    )
    pieces = [
        c.choices[0].delta.content or ""
        for c in ob.chat.completions.create(model="demo-pp", messages=msgs, max_tokens=8, temperature=0, stream=True)
        if c.choices
    ]
    assert len(pieces) > 1 and "".join(pieces) == direct.choices[0].message.content
    ab = anthropic.Anthropic(base_url=url(b), api_key="none")
    msg = ab.messages.create(model="demo-pp", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert msg.content[0].text and msg.usage.output_tokens == 4

    # a request for a model nobody serves is still a 404 in the caller's family
    with pytest.raises(anthropic.NotFoundError):
        ab.messages.create(model="nobody-serves-this", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])

    # in b's notebook: the same instance, with its owner
    seen = {i.id: i for i in b.list_instances()}
    assert seen[iid].name == "demo-pp" and seen[iid].api == a.api_url and seen[iid].state == "ready"

    # b stops it: through a (its owner), every worker gone, every reservation freed
    status, data = raw(b.server, "DELETE", f"/instance/{iid}")
    assert status == 200 and json.loads(data)["via"] == "owner"
    wait_for(lambda: events.of("instance_deleted", iid), 30, "instance_deleted on b's /events")
    assert "demo-pp" not in a.server.registry.names()
    for node in a.nodes:
        agent = a.request(a.address_of(node.id), "GET", "/instances")
        assert agent["reserved_bytes"] == 0 and not agent["instances"]
    wait_for(lambda: "demo-pp" not in [m.id for m in ob.models.list().data], 10, "demo-pp gone from b's /v1/models")
    events.close()


def test_a_killed_worker_comes_back_under_the_same_id_and_answers(members):
    """A worker of a pipeline is SIGKILLed mid-generation: the instance is re-placed and stays listed, on every
    member, under the id it was launched with (re-placing, then ready), and answers through b again."""
    a, b = members
    body = {"model_id": "demo", "plan": 0, "sharding": "pipeline", "min_nodes": 2, "name": "demo-heal"}
    status, data = raw(a.server, "POST", "/instance", json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert status == 201, data
    iid = json.loads(data)["id"]
    inst = next(i for i in a.instances if i.id == iid)

    def listed(member) -> dict:
        return next((i for i in get(url(member), "/instances")[1]["instances"] if i["id"] == iid), {})

    wait_for(lambda: listed(b).get("state") == "ready", 120, "demo-heal ready on b")
    msgs = [{"role": "user", "content": "Hello there"}]
    ob = openai.OpenAI(base_url=f"{url(b)}/v1", api_key="none", max_retries=0)
    before = ob.chat.completions.create(model="demo-heal", messages=msgs, max_tokens=8, temperature=0)
    victim = listed(b)["pids"][inst.plan.nodes[1]][0]
    stream = ob.chat.completions.create(
        model="demo-heal", messages=msgs, max_tokens=2000, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    os.kill(victim, signal.SIGKILL)
    try:  # the request in flight ends: with an error frame, or cut
        for _ in stream:
            pass
    except (openai.APIError, httpx.HTTPError):
        pass
    states = []

    def back() -> bool:
        now = listed(b), listed(a)
        states.append(now[1].get("state", "gone"))
        return all(i.get("state") == "ready" for i in now) and inst.replacements == 1

    wait_for(back, 120, "demo-heal ready again under its id")
    # the owner lists it all along, never lost by its id (another member reads the agents: between the old
    # placement's stop and the new one's launch it may miss it for a moment)
    assert "gone" not in states, states
    assert inst.id == iid and inst.launch_id != iid and inst.state == "ready"
    assert {i for ids in listed(a)["launch_ids"].values() for i in ids} == {inst.launch_id}
    after = ob.chat.completions.create(model="demo-heal", messages=msgs, max_tokens=8, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content
    status, data = raw(b.server, "DELETE", f"/instance/{iid}")
    assert status == 200 and json.loads(data)["via"] == "owner"
    wait_for(lambda: not listed(b), 30, "demo-heal gone once deleted")


def test_owner_unreachable_is_a_503_in_the_callers_family(members):
    """Last: stops a's API while its instance runs."""
    a, b = members
    inst = a.launch("demo", name="orphan-api", wait=True)
    wait_for(lambda: b.control.route("orphan-api"), 20, "b routes orphan-api to a")
    a.server.stop()
    ab = anthropic.Anthropic(base_url=url(b), api_key="none", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err:
        ab.messages.create(model="orphan-api", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 503 and "cannot be reached" in err.value.message
    status, data = raw(b.server, "POST", "/api/chat", json.dumps({"model": "orphan-api", "messages": []}).encode())
    assert status == 503 and isinstance(json.loads(data)["error"], str)  # Ollama's shape
    assert b.delete_instance(inst.id) == "agents"  # the owner's API is down: b stops it on the nodes
    wait_for(lambda: inst.state == "stopped", 15, "the owner sees its lease refused and stops")
    with pytest.raises(KeyError):
        b.delete_instance(inst.id)
