"""Coordinator registration: one private file per Cluster, kept current, gone on close, exit or death."""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from exo_lab.cluster import coordinators
from exo_lab.cluster.auth import fingerprint


class FakeCluster:
    """What a registration reads of a :class:`~exo_lab.Cluster`."""

    def __init__(self, key: str | None = "k" * 64) -> None:
        self.cluster_key = key
        self.follow_peers = False
        self._contacts = {"n1": "127.0.0.1:1001"}
        self._addresses = {"127.0.0.1:1001": "n1", "127.0.0.1:1002": None}
        self.instances: list = []


def fake_instance(state: str = "loading") -> SimpleNamespace:
    plan = SimpleNamespace(
        strategy="pipeline",
        backend="ring",
        nodes=["n1", "n2"],
        node_names={"n1": "local-0", "n2": "local-1"},
        decode_tps=12.3456,
        ttft_s=0.25,
        describe=lambda: "pipeline: local-0 [0-3] -> local-1 [4-7]",
    )
    return SimpleNamespace(
        id="abc123",
        name="tiny",
        model="/models/tiny",
        state=state,
        error=None,
        loaded=(3, 8),
        created=1,
        plan=plan,
        replacements=0,
    )


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EXO_LAB_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "run" / "coordinators"


def test_register_writes_a_private_file_and_close_removes_it(registry: Path) -> None:
    cluster = FakeCluster()
    reg = coordinators.register(cluster, interval_s=0.05)
    try:
        assert reg.path.parent == registry
        assert stat.S_IMODE(registry.stat().st_mode) == 0o700
        assert stat.S_IMODE(reg.path.stat().st_mode) == 0o600
        data = json.loads(reg.path.read_text())
        assert data["pid"] == os.getpid()
        assert data["agents"] == ["127.0.0.1:1001", "127.0.0.1:1002"]
        assert data["cluster_key"] == cluster.cluster_key
        assert data["fingerprint"] == fingerprint(cluster.cluster_key)
        assert data["follow_peers"] is False
        found = coordinators.coordinators()
        assert [c.id for c in found] == [reg.info.id]
        assert "cluster_key" not in found[0].public_json()
    finally:
        reg.close()
    assert not reg.path.exists()
    assert coordinators.coordinators() == []


def test_instances_and_urls_follow_the_cluster(registry: Path) -> None:
    cluster = FakeCluster()
    reg = coordinators.register(cluster, interval_s=0.05)
    try:
        cluster.instances.append(fake_instance())
        wait_until(lambda: json.loads(reg.path.read_text())["instances"])
        inst = json.loads(reg.path.read_text())["instances"][0]
        assert inst["state"] == "loading"
        assert (inst["loaded_layers"], inst["total_layers"]) == (3, 8)
        assert inst["node_names"] == ["local-0", "local-1"]
        assert inst["predicted_decode_tps"] == 12.346

        cluster.instances[0].state = "ready"
        wait_until(lambda: json.loads(reg.path.read_text())["instances"][0]["state"] == "ready")

        reg.update(dashboard_url="http://127.0.0.1:5006/dashboard")
        assert json.loads(reg.path.read_text())["dashboard_url"] == "http://127.0.0.1:5006/dashboard"
        with pytest.raises(TypeError, match="unknown coordinator fields: colour"):
            reg.update(colour="red")
    finally:
        reg.close()


def test_a_collected_cluster_unregisters(registry: Path) -> None:
    cluster = FakeCluster()
    reg = coordinators.register(cluster, interval_s=0.05)
    path = reg.path
    assert path.exists()
    del cluster
    gc.collect()
    wait_until(lambda: not path.exists())


def test_files_of_dead_or_other_processes_are_pruned(registry: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    info = coordinators.CoordinatorInfo(
        id=f"{proc.pid}-1", pid=proc.pid, process_started=1.0, kind="python", label="dead", agents=["127.0.0.1:1"]
    )
    registry.mkdir(parents=True)
    stale = registry / f"{info.id}.json"
    stale.write_text(json.dumps(info.to_json()))
    # our own pid but another start time: the pid was reused
    reused = coordinators.CoordinatorInfo(
        id=f"{os.getpid()}-99", pid=os.getpid(), process_started=1.0, kind="python", label="reused", agents=[]
    )
    (registry / f"{reused.id}.json").write_text(json.dumps(reused.to_json()))
    (registry / "garbage.json").write_text("{not json")

    assert coordinators.coordinators() == []
    assert not stale.exists()
    assert not (registry / f"{reused.id}.json").exists()
    assert (registry / "garbage.json").exists()  # not ours to judge: left alone


def test_a_process_that_exits_removes_its_registration(registry: Path) -> None:
    code = (
        "import sys, time\n"
        "from exo_lab.cluster.coordinators import register\n"
        "class C:\n"
        "    cluster_key = None; follow_peers = True; _contacts = {}; _addresses = {'127.0.0.1:9': None}\n"
        "    instances = []\n"
        "c = C()\n"
        "reg = register(c)\n"
        "print(reg.path, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    path = Path(proc.stdout.readline().strip())
    assert path.exists()
    assert [c.kind for c in coordinators.coordinators()] == ["python"]
    proc.communicate("\n", timeout=30)
    assert proc.returncode == 0
    assert not path.exists()


def test_cluster_registers_and_unregisters(registry: Path) -> None:
    import exo_lab

    with exo_lab.local_cluster(1) as cluster:
        assert cluster.registration is not None
        found = coordinators.coordinators()
        assert [c.id for c in found] == [cluster.registration.info.id]
        assert found[0].agents == [cluster.address_of(cluster.nodes[0].id)]
    assert coordinators.coordinators() == []


class FakeServer:
    host, port, url = "127.0.0.1", 52415, "http://127.0.0.1:52415"

    def __init__(self) -> None:
        self.registry = SimpleNamespace(names=lambda: ["demo"], get=lambda name: SimpleNamespace(path="/m/demo"))


def test_a_server_without_agents_registers_this_machine(registry: Path) -> None:
    server = FakeServer()
    reg = coordinators.register_server(server, kind="exo-lab up")
    try:
        [info] = coordinators.coordinators()
        assert (info.kind, info.api_url, info.agents, info.cluster_key) == ("exo-lab up", server.url, [], None)
        [node] = info.local_topology["nodes"]
        assert node["state"] == "alive" and node["profile"]["memory_total_bytes"] > 0
        [inst] = info.instances
        assert (inst["name"], inst["state"], inst["model"]) == ("demo", "ready", "/m/demo")
    finally:
        reg.close()
    with pytest.raises(ValueError):
        coordinators.Registration()


@pytest.mark.slow
def test_exo_lab_serve_registers_until_it_stops(registry: Path, tiny_model: Path) -> None:
    from tests.helpers.net import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "serve",
            "--model",
            str(tiny_model),
            "--name",
            "tiny",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        wait_until(lambda: coordinators.coordinators(), timeout=10)
        [info] = coordinators.coordinators()
        assert info.pid == proc.pid and info.kind == "exo-lab serve"
        assert info.api_url == f"http://127.0.0.1:{port}"
        assert [i["name"] for i in info.instances] == ["tiny"]
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
    assert list(registry.glob("*.json")) == []
