"""A node agent refuses unsigned or oversized requests before it reads their bodies, and keeps serving."""

from __future__ import annotations

import secrets
import socket
import time

import pytest

from exo_lab.cluster.agent import MAX_MANUAL_PEERS
from exo_lab.cluster.auth import sign_headers
from exo_lab.cluster.http import RequestError, SignedClient
from tests.helpers.leases import start_agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    key = secrets.token_hex(32)
    proc, address = start_agent(tmp_path_factory.mktemp("limits") / "state", key, name="limits-node")
    yield address, key
    proc.terminate()
    proc.wait(10)


def head_only(address: str, method: str, path: str, length: int, headers: dict[str, str] | None = None) -> bytes:
    """Send a request's headers announcing ``length`` body bytes, none of them; what comes back within 3 s."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=3) as s:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {address}", f"Content-Length: {length}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            return s.recv(4096)
        except TimeoutError:
            return b""


def test_an_unsigned_post_is_refused_before_its_body_arrives(agent):
    address, _ = agent
    t = time.monotonic()
    answer = head_only(address, "POST", "/node/peers", 500_000)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"missing signature" in answer and time.monotonic() - t < 2.5


def test_a_stale_signature_is_refused_before_its_body_arrives(agent):
    address, key = agent
    stale = sign_headers(key, "POST", "/node/peers", b"x")
    stale["X-Exo-Lab-Timestamp"] = f"{time.time() - 3600:.3f}"
    answer = head_only(address, "POST", "/node/peers", 500_000, stale)
    assert answer.startswith(b"HTTP/1.1 401") and b"window" in answer, answer[:200]


def test_a_body_over_one_mib_is_refused_unread(agent):
    address, key = agent
    signed = sign_headers(key, "POST", "/node/peers", b"x" * (2 << 20))
    answer = head_only(address, "POST", "/node/peers", 2 << 20, signed)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_signed_requests_still_work(agent):
    address, key = agent
    client = SignedClient(address, key)
    assert client.json("POST", "/node/peers", {"address": "127.0.0.1:9"})["added"] == "127.0.0.1:9"
    assert client.json("GET", "/node")["id"]


def test_the_agents_tables_stay_bounded_under_many_requests(agent):
    """Lease renewals, reads and handshakes by the hundred leave every table the size it was (nonces aside: they
    are kept for their window, see test_auth); manual peers stop at their cap, with a 409."""
    address, key = agent
    node = SignedClient(address, key).json("GET", "/node")["id"]
    client = SignedClient(address, key, node=node, source="soak")
    owner = {"coordinator": "soak", "label": "a soak", "api": None}
    client.json(
        "POST",
        "/instances/bounded/prepare",
        {"ranks": [{"rank": 0, "address": "127.0.0.1"}], "reserve_bytes": 0, "owner": owner, "lease_s": 120},
    )
    local = SignedClient(address, None)
    before = local.json("GET", "/node/memory")["tables"]
    for i in range(200):
        status = {"state": "ready", "loaded": [i, 200], "error": None}
        client.json("POST", "/instances/bounded/lease", {"status": status, "owner": owner})
        client.json("GET", "/instances")
        local.json("GET", "/node/links")
        client.json("POST", "/node/hello", {"id": "soak", "challenge": f"c{i}"})
    after = local.json("GET", "/node/memory")
    assert {k: v for k, v in after["tables"].items() if k != "nonces"} == {
        k: v for k, v in before.items() if k != "nonces"
    }
    assert after["tables"]["instances"] == 1 and after["tables"]["peers"] == 0
    assert after["tables"]["nonces"] <= before["nonces"] + 800 and after["rss_bytes"] > 0
    refused = 0
    for port in range(1, MAX_MANUAL_PEERS + 10):  # closed ports: contacted, and kept as manual peers, up to the cap
        try:
            client.json("POST", "/node/peers", {"address": f"127.0.0.1:{port}"})
        except RequestError as exc:
            assert exc.status == 409
            refused += 1
    assert local.json("GET", "/node/memory")["tables"]["manual_peers"] == MAX_MANUAL_PEERS and refused >= 9
    client.json("DELETE", "/instances/bounded")
