"""Node agents as plain processes on loopback: no root needed."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import exo_lab
from exo_lab.cluster.auth import sign_headers
from exo_lab.cluster.http import RequestError, SignedClient, split_address
from exo_lab.cluster.local import agent_env
from tests.helpers.net import free_port
from tests.helpers.polling import wait_for
from tests.helpers.relay import relay

pytestmark = pytest.mark.slow


def start_agent(port: int, state: Path, key: str, peers: list[int], name: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "exo_lab.cli",
        "node",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--probe-port",
        "0",
        "--name",
        name,
        "--state-dir",
        str(state),
        "--no-mdns",
    ]
    for p in peers:
        cmd += ["--peer", f"127.0.0.1:{p}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=agent_env(key))


def http(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body if method != "GET" else None, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except urllib.error.URLError:
        return 0, {}  # not listening (yet)


def peer_states(port: int) -> dict[str, str]:
    status, data = http(port, "GET", "/node/peers")
    return {p["id"]: p["state"] for p in data["peers"]} if status == 200 else {}


@pytest.fixture(scope="module")
def cluster():
    c = exo_lab.local_cluster(3)
    yield c
    c.close()


def test_local_cluster_sees_every_node_and_link(cluster):
    assert len(cluster.nodes) == 3 and all(n.state == "alive" for n in cluster.nodes)
    topo = cluster.topology
    ids = sorted(topo.nodes)
    for a in ids:
        for b in ids:
            if a < b:
                link = topo.best_link(a, b)
                assert link and link.rtt_ms_median > 0 and link.rtt_ms_p95 >= link.rtt_ms_median
                assert link.send_mbit_per_s > 0 and link.recv_mbit_per_s > 0
    p = cluster.nodes[0].profile
    for field in (
        "memory_total_bytes",
        "memory_available_bytes",
        "cpu_model",
        "matmul_gflops",
        "memory_bandwidth_gb_per_s",
        "blas",
        "mlx_devices",
    ):
        assert p[field], field
    assert "<table>" in cluster._repr_html_() and "local-0" in repr(cluster)


def test_connecting_to_one_node_finds_the_others(cluster):
    one = exo_lab.connect([cluster.address_of(cluster.nodes[0].id)], cluster_key=cluster.cluster_key)
    assert {n.id for n in one.nodes} == {n.id for n in cluster.nodes}


def test_probe_on_demand_refreshes_measurements(cluster):
    before = {(link.src, link.dst_address): link.measured_at for link in cluster.topology.links}
    topo = cluster.probe_links()
    after = [link for link in topo.links if link.measured_at and link.measured_at > max(before.values())]
    assert len(after) >= 6  # every node re-measured every peer


def test_mutating_requests_need_a_valid_fresh_signature(cluster):
    port = int(cluster.address_of(cluster.nodes[0].id).rsplit(":", 1)[1])
    assert http(port, "GET", "/node")[0] == 200  # read-only, loopback
    assert http(port, "POST", "/node/links/probe", b"{}")[0] == 401
    bad = sign_headers("another-key", "POST", "/node/links/probe", b"{}")
    assert http(port, "POST", "/node/links/probe", b"{}", bad)[0] == 401
    body = json.dumps({"address": "127.0.0.1:1"}).encode()
    good = sign_headers(cluster.cluster_key, "POST", "/node/peers", body)
    assert http(port, "POST", "/node/peers", body, good)[0] == 200
    status, data = http(port, "POST", "/node/peers", body, good)  # the same request again
    assert status == 401 and "replayed" in data["error"]
    assert (
        http(port, "POST", "/node/peers", b"{oops", sign_headers(cluster.cluster_key, "POST", "/node/peers", b"{oops"))[
            0
        ]
        == 400
    )


def test_a_request_signed_for_one_node_is_refused_by_another(cluster):
    a, b = cluster.nodes[0].id, cluster.nodes[1].id
    port_b = split_address(cluster.address_of(b))[1]
    body = json.dumps({"address": "127.0.0.1:1"}).encode()
    for_a = sign_headers(cluster.cluster_key, "POST", "/node/peers", body, target=a)
    status, data = http(port_b, "POST", "/node/peers", body, for_a)  # a relay passing A's request on to B
    assert status == 401 and "signed for another node" in data["error"]
    port_a = split_address(cluster.address_of(a))[1]
    assert http(port_a, "POST", "/node/peers", body, for_a)[0] == 200
    with pytest.raises(RequestError, match="signed for another node"):  # the client signs for the node it expects
        SignedClient(cluster.address_of(b), cluster.cluster_key, node=a).json("GET", "/instances")


def test_an_answer_altered_on_the_way_is_refused(cluster):
    address = cluster.address_of(cluster.nodes[0].id)
    with relay(split_address(address)) as plain:  # the relay itself changes nothing: the answer is accepted
        assert SignedClient(plain, cluster.cluster_key).json("GET", "/node")["state"] == "alive"
    with relay(split_address(address), lambda body: body.replace(b'"alive"', b'"gone!"')) as altering:
        with pytest.raises(RequestError, match="response not authentic"):
            SignedClient(altering, cluster.cluster_key).json("GET", "/node")
        assert SignedClient(altering, None).json("GET", "/node")["state"] == "gone!"  # unsigned: nothing to check


def test_other_key_is_never_joined_and_gone_then_rejoined(tmp_path):
    key = secrets.token_hex(16)
    ports = [free_port() for _ in range(3)]
    procs = [
        start_agent(ports[i], tmp_path / f"s{i}", key, [p for p in ports if p != ports[i]], f"n{i}") for i in range(2)
    ]
    stranger = start_agent(ports[2], tmp_path / "s2", "a-different-cluster-key", ports[:2], "stranger")
    try:
        wait_for(lambda: len(peer_states(ports[0])) == 1 and len(peer_states(ports[1])) == 1, 60, "two nodes join")
        ids = http(ports[1], "GET", "/node")[1]["id"]
        stranger_id = wait_for(lambda: http(ports[2], "GET", "/node")[1].get("id"), 60, "stranger up")
        time.sleep(3)  # two liveness rounds: every chance for the stranger to be (wrongly) joined
        assert set(peer_states(ports[0])) == {ids}
        assert stranger_id not in peer_states(ports[0]) and peer_states(ports[2]) == {}

        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        t = time.monotonic()
        wait_for(lambda: peer_states(ports[0]).get(ids) == "gone", 10, "killed node marked gone")
        gone_after = time.monotonic() - t
        assert gone_after < 10

        procs[1] = start_agent(ports[1], tmp_path / "s1", key, [ports[0]], "n1")
        wait_for(lambda: peer_states(ports[0]).get(ids) == "alive", 30, "restarted node re-joins")
        assert http(ports[1], "GET", "/node")[1]["id"] == ids  # same state dir, same id
    finally:
        for p in [*procs, stranger]:
            p.terminate()
        codes = [p.wait(15) for p in [*procs, stranger]]
        assert codes == [0, 0, 0], codes


def test_status_cli_prints_tables(cluster):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "status",
            "--connect",
            cluster.address_of(cluster.nodes[0].id),
            f"--cluster-key={cluster.cluster_key}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "local-0" in out.stdout and "rtt ms (median)" in out.stdout


def test_clean_shutdown_on_sigterm(tmp_path):
    port = free_port()
    proc = start_agent(port, tmp_path / "s", secrets.token_hex(16), [], "solo")
    wait_for(lambda: http(port, "GET", "/node")[0] == 200 if _listening(port) else False, 60, "agent up")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
