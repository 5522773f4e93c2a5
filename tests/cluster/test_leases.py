"""No orphans: instances are leased, workers die with their agent, a restarted agent cleans up.

Real agents (processes on loopback), real workers, real coordinators (this process, or a child
process killed with SIGKILL).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from exo_lab.cluster.http import RequestError, SignedClient
from exo_lab.cluster.local import start_agents
from exo_lab.instance import LaunchError
from exo_lab.models import synthetic
from exo_lab.workbench import Cluster
from tests.helpers.leases import alive, instance_pids, launch_one_rank, start_agent, worker_processes
from tests.helpers.polling import wait_for

pytestmark = pytest.mark.slow
COORDINATOR = Path(__file__).resolve().parents[1] / "helpers" / "lease_coordinator.py"


@pytest.fixture(scope="module")
def key() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def agents(key):
    """Two agents that outlive the coordinators of these tests (they exit with this process)."""
    agents = start_agents(2, key)

    def answering() -> bool:
        assert agents.exited() is None, agents.exited()
        try:
            return all(SignedClient(a, key, timeout=2).json("GET", "/node") for a in agents.addresses)
        except OSError:
            return False

    wait_for(answering, 60, "the agents answer", every_s=0.1)
    yield agents
    agents.kill()
    for p in agents.processes:
        p.wait()
    shutil.rmtree(agents.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(agents, key):
    c = Cluster(agents.addresses, key, register=False).wait_for(2, links=False, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny model, and a copy of it whose weights file is cut short (loading it fails)."""
    root = tmp_path_factory.mktemp("lease-models")
    good = synthetic.create(root / "tiny", "tiny")
    broken = root / "tiny-broken"
    shutil.copytree(good, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(200_000)
    return {"good": good, "broken": broken}


def clients(agents, key) -> list[SignedClient]:
    return [SignedClient(a, key, timeout=5) for a in agents.addresses]


def clean(client: SignedClient) -> bool:
    data = client.json("GET", "/instances")
    return data["reserved_bytes"] == 0 and data["instances"] == []


def pipeline(cluster, model):
    plans = cluster.preview(model, context=2048, prompt_tokens=64)
    return next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)


def test_lease_endpoint_renews_validates_and_expires(agents, key):
    client = clients(agents, key)[0]
    iid = uuid.uuid4().hex[:10]
    owner = {"coordinator": "c1", "label": "a test", "api": "http://127.0.0.1:1"}
    info = {"model": "m", "name": "n", "plan": {"strategy": "single"}, "nodes": ["x"], "max_batch": 4}
    ranks = [{"rank": 0, "address": "127.0.0.1"}]
    answer = client.json(
        "POST",
        f"/instances/{iid}/prepare",
        {"ranks": ranks, "reserve_bytes": 1000, "owner": owner, "info": info, "lease_s": 1.0},
    )
    assert answer["lease_s"] == 1.0
    listed = client.json("GET", "/instances")["instances"]
    assert [(i["owner"], i["info"], i["lease_s"], i["status"]) for i in listed] == [(owner, info, 1.0, {})]
    assert 0 < listed[0]["lease_expires_in"] <= 1.0

    for bad in (b"not json", b"[1]", json.dumps({"status": [1]}).encode(), json.dumps({"owner": {"x": 1}}).encode()):
        with pytest.raises(RequestError) as err:
            client.request("POST", f"/instances/{iid}/lease", bad)
        assert err.value.status == 400, bad
    for bad_prepare in ({"lease_s": -1}, {"lease_s": "ten"}, {"owner": "me"}, {"info": [1]}):
        with pytest.raises(RequestError) as err:
            client.json("POST", "/instances/other/prepare", {"ranks": ranks, "reserve_bytes": 1, **bad_prepare})
        assert err.value.status == 400, bad_prepare
    with pytest.raises(RequestError) as err:
        client.json("POST", "/instances/nosuch/lease", {"status": {}})
    assert err.value.status == 404

    status = {"state": "loading", "loaded": [3, 8], "error": None}
    for _ in range(4):  # renewed for twice its lease: still there
        assert client.json("POST", f"/instances/{iid}/lease", {"status": status}) == {
            "renewed": True,
            "lease_s": 1.0,
            "state": "prepared",
        }
        time.sleep(0.5)
    assert client.json("GET", f"/instances/{iid}")["status"] == status
    # no renewal: a prepared instance is leased too, and its reservation goes with it
    wait_for(lambda: clean(client), 3.0, "the expired instance is gone")
    with pytest.raises(RequestError) as err:
        client.json("POST", f"/instances/{iid}/lease", {"status": status})
    assert err.value.status == 404


def test_the_coordinator_renews_and_stops_when_deleted_on_an_agent(cluster, agents, key, models):
    inst = cluster.launch(models["good"], plan=pipeline(cluster, models["good"]), name="leased")
    a, b = clients(agents, key)
    try:
        seen = a.json("GET", f"/instances/{inst.id}")
        assert seen["owner"] == cluster.owner() and seen["owner"]["label"] == f"python pid {os.getpid()}"
        assert seen["info"]["name"] == "leased" and seen["info"]["nodes"] == inst.plan.nodes
        assert seen["info"]["plan"]["strategy"] == "pipeline"
        wait_for(
            lambda: a.json("GET", f"/instances/{inst.id}")["status"].get("state") == "ready", 5, "a renewal's status"
        )
        assert a.json("GET", f"/instances/{inst.id}")["status"]["loaded"] == list(inst.loaded)
        pids = [p for ps in inst.pids().values() for p in ps]
        assert len(pids) == 2
        gen = inst.generate("x", max_tokens=100_000, temperature=0, ignore_eos=True)
        it = iter(gen)
        next(it)
        wait_for(  # the instance renewed at once to say it serves a request: the agents hold their link probes
            lambda: a.json("GET", f"/instances/{inst.id}")["status"]["requests"] == 1, 1.5, "a renewal says so"
        )

        b.json("DELETE", f"/instances/{inst.id}")  # someone else, behind the coordinator's back
        wait_for(lambda: inst.state == "stopped", 5, "the instance stops")
        assert "deleted on node" in (inst.error or "")
        assert list(it)[-1].finish_reason == "error"  # the request in flight ends
        wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker exits")
        wait_for(lambda: clean(a) and clean(b), 5, "no instance and no reservation on the agents")
        time.sleep(2.5)  # one more renewal period: it stays stopped and is not re-placed
        assert inst.state == "stopped" and inst.replacements == 0
        assert clean(a) and clean(b)
    finally:
        inst.delete()


def test_a_setup_failure_fails_the_instance_with_its_cause(cluster, agents, key, models):
    with pytest.raises(LaunchError, match="truncated") as err:
        cluster.launch(models["broken"], plan=pipeline(cluster, models["broken"]), name="broken")
    inst = cluster.instances[-1]
    assert inst.state == "failed" and "truncated" in (inst.error or ""), err.value
    wait_for(lambda: not worker_processes(inst.id), 10, "the workers are gone")
    a, b = clients(agents, key)
    wait_for(lambda: clean(a) and clean(b), 5, "no instance and no reservation on the agents")
    time.sleep(1.0)
    assert inst.state == "failed" and inst.replacements == 0  # it would fail the same way: not re-placed
    assert clean(a) and clean(b)
    cluster.instances.remove(inst)


def test_a_worker_whose_setup_fails_exits_and_the_agent_reports_why(agents, key, models):
    client = clients(agents, key)[0]
    iid = uuid.uuid4().hex[:10]
    # no coordinator: only the worker reports (a lease long enough for a slow start on a busy machine)
    launch_one_rank(client, iid, models["broken"], lease_s=60)
    failed = wait_for(
        lambda: (d := client.json("GET", f"/instances/{iid}"))["state"] == "failed" and d, 20, "the agent sees it fail"
    )
    assert failed["ranks"][0]["exit_code"] == 3, failed
    assert "truncated" in failed["logs"]["0"]
    assert not worker_processes(iid)
    client.json("DELETE", f"/instances/{iid}")
    assert clean(client)


def test_the_key_is_in_no_command_line_and_in_private_files_only(agents, key, models):
    """``ps`` shows every local user the command lines: the key travels by environment and 0600 files in
    0700 directories (the node state dir, its instances, each run dir)."""
    for proc in agents.processes:
        assert key not in " ".join(psutil.Process(proc.pid).cmdline())
    client = clients(agents, key)[0]
    iid = uuid.uuid4().hex[:10]
    launch_one_rank(client, iid, models["broken"])  # fails soon after: only its files matter here
    try:
        state = agents.tmpdir / "node-0"
        run = state / "instances" / iid
        for d in (state, state / "instances", run):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        assert key in (run / "rank0.json").read_text()
        files = sorted(run.iterdir())
        assert {f.name for f in files} >= {"rank0.json", "hostfile.json", "rank0.log", "rank0.pid"}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        for proc in worker_processes(iid):
            assert key not in " ".join(proc.cmdline())
    finally:
        client.json("DELETE", f"/instances/{iid}")


def test_a_killed_coordinator_leaves_nothing_behind(agents, key, tmp_path):
    out = tmp_path / "coordinator.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(COORDINATOR), key, *agents.addresses], stdout=f, stderr=subprocess.STDOUT
        )
    try:

        def launched():
            assert proc.poll() is None, out.read_text()
            lines = [x for x in out.read_text().splitlines() if x.startswith("{")]
            return json.loads(lines[0]) if lines else None

        started = wait_for(launched, 120, "the coordinator launched the demo model", every_s=0.2)
        pids = [p for ps in started["pids"].values() for p in ps]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        listed = [i for c in clients(agents, key) for i in c.json("GET", "/instances")["instances"]]
        assert {i["owner"]["label"] for i in listed} == {f"python pid {proc.pid}"}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in pids), 15, "the workers of the dead coordinator exit")
        wait_for(lambda: all(clean(c) for c in clients(agents, key)), 15 - (time.monotonic() - killed), "clean agents")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_die_with_their_agent_and_a_restarted_agent_kills_leftovers(key, models, tmp_path):
    state = tmp_path / "node"
    ids = [f"frozen-{uuid.uuid4().hex[:6]}", f"plain-{uuid.uuid4().hex[:6]}"]
    agent, address = start_agent(state, key)
    try:
        client = SignedClient(address, key, timeout=5)
        launch_one_rank(client, ids[0], models["good"], lease_s=120)
        launch_one_rank(client, ids[1], models["good"], lease_s=120)
        frozen, plain = instance_pids(client, ids[0])[0], instance_pids(client, ids[1])[0]
        assert (state / "instances" / ids[0] / "rank0.pid").exists()
        # a worker that cannot notice its agent's death (stopped) becomes a leftover
        os.kill(frozen, signal.SIGSTOP)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        wait_for(lambda: not alive(plain), 15, "the worker of the killed agent exits")  # loaded machines start slowly
        assert alive(frozen)

        agent, address = start_agent(state, key)  # the same state dir
        client = SignedClient(address, key, timeout=5)
        wait_for(lambda: not alive(frozen), 10, "the restarted agent kills the leftover worker")
        assert clean(client)
        assert not list((state / "instances").iterdir())
    finally:
        agent.terminate()
        agent.wait(10)
        for iid in ids:
            for p in worker_processes(iid):
                p.kill()
