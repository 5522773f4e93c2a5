"""Links are measured again on schedule, but not while a node at either end serves requests.

Three real agents on loopback measuring their links every second; an instance on the first one, leased by
hand through the agent's HTTP API with the status a coordinator sends (requests in flight or not).
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
import uuid

import pytest

from exo_lab.cluster.http import SignedClient
from exo_lab.cluster.local import start_agents
from tests.helpers.polling import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agents():
    key = secrets.token_hex(32)
    agents = start_agents(3, key, probe_interval_s=1.0)
    clients = [SignedClient(a, key, timeout=5) for a in agents.addresses]

    def linked() -> bool:
        assert agents.exited() is None, agents.exited()
        try:
            return all(len(c.json("GET", "/node/links")["links"]) == 2 for c in clients)
        except OSError:
            return False

    wait_for(linked, 60, "every agent measured its links to the others", every_s=0.2)
    yield clients
    agents.kill()
    for p in agents.processes:
        p.wait()
    shutil.rmtree(agents.tmpdir, ignore_errors=True)


def measured_at(client: SignedClient) -> dict[str, float]:
    return {link["dst"]: link["measured_at"] for link in client.json("GET", "/node/links")["links"]}


class Renewals:
    """Renew an instance's lease every 0.3 s with ``{"requests": requests}``, as its coordinator would."""

    def __init__(self, client: SignedClient, iid: str) -> None:
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(client, iid), daemon=True)
        self._thread.start()

    def _loop(self, client: SignedClient, iid: str) -> None:
        while not self._stop.wait(0.3):
            client.json("POST", f"/instances/{iid}/lease", {"status": {"state": "ready", "requests": self.requests}})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_links_of_a_serving_node_wait_until_it_is_quiet(agents):
    a, b, c = agents
    ids = [x.json("GET", "/node")["id"] for x in agents]
    iid = uuid.uuid4().hex[:10]
    a.json(
        "POST",
        f"/instances/{iid}/prepare",
        {"ranks": [{"rank": 0, "address": "127.0.0.1"}], "reserve_bytes": 1 << 20, "lease_s": 30},
    )
    renewals = Renewals(a, iid)
    try:
        before = [measured_at(x) for x in agents]  # idle: every link is measured again on schedule
        wait_for(lambda: all(measured_at(a)[n] > before[0][n] for n in ids[1:]), 10, "a's links measured again")

        renewals.requests = 2  # a serves requests
        wait_for(lambda: a.json("GET", f"/instances/{iid}")["status"]["requests"] == 2, 5, "a renewal says so")
        time.sleep(1.0)  # probes under way stop at their next exchange
        serving = [measured_at(x) for x in agents]
        time.sleep(3.5)
        now = [measured_at(x) for x in agents]
        assert now[0] == serving[0], "the serving node probed its links"
        assert now[1][ids[0]] == serving[1][ids[0]] and now[2][ids[0]] == serving[2][ids[0]], "a peer probed it"
        assert now[1][ids[2]] > serving[1][ids[2]], "a link between two quiet nodes is still measured"
        assert all(link["error"] is None for x in agents for link in x.json("GET", "/node/links")["links"])

        explicit = b.json("POST", "/node/links/probe", {})["links"]  # asked for: a still defers it
        assert {link["dst"]: link["measured_at"] for link in explicit}[ids[0]] == now[1][ids[0]]
    finally:
        renewals.stop()
        a.json("DELETE", f"/instances/{iid}")
    wait_for(
        lambda: measured_at(a)[ids[1]] > now[0][ids[1]] and measured_at(b)[ids[0]] > now[1][ids[0]],
        10,
        "the links are measured once the instance is gone",
    )
