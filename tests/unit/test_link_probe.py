"""``probe_link`` against a real probe server on loopback: signed hello, round trips, each direction's
throughput the best of several transfers, and probes deferred while either end serves requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from exo_lab.cluster import links
from exo_lab.cluster.auth import Verifier

KEY = "k" * 32


class Busy:
    """The probe server's node: serving requests or not."""

    serving = False


@pytest.fixture
def busy() -> Busy:
    return Busy()


@pytest.fixture
def server(busy):
    loop = asyncio.new_event_loop()
    probe = links.ProbeServer(Verifier(KEY, node_id="peer"), busy=lambda: busy.serving)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(probe.start("127.0.0.1", 0), loop).result(10)
    yield port
    asyncio.run_coroutine_threadsafe(probe.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_each_direction_is_the_best_of_its_transfers(server, monkeypatch):
    rates = {"send": [], "recv": []}
    for name, real in (("send", links._send_rate), ("recv", links._recv_rate)):

        def timed(sock, n, cancel, defer, real=real, name=name):
            rate = real(sock, n, cancel, defer)  # a real transfer; the reported rate: the run's number
            rates[name].append(rate)
            return [120.0, 480.0, 240.0][len(rates[name]) - 1]

        monkeypatch.setattr(links, f"_{name}_rate", timed)
    link = links.probe_link(KEY, "me", "peer", "127.0.0.1", server, samples=5, transfer_bytes=1 << 20)
    assert link.error is None
    assert len(rates["send"]) == len(rates["recv"]) == 3 and all(r > 0 for r in rates["send"] + rates["recv"])
    assert link.send_mbit_per_s == link.recv_mbit_per_s == 480.0
    assert link.rtt_ms_median is not None and 0 < link.rtt_ms_median <= link.rtt_ms_p95


def test_a_probe_signed_with_another_key_is_refused(server):
    link = links.probe_link("x" * 32, "me", "peer", "127.0.0.1", server, samples=3, transfer_bytes=1 << 16)
    assert link.error is not None and link.send_mbit_per_s in (None, 0, 0.0)


def test_a_serving_peer_defers_the_probe(server, busy):
    busy.serving = True
    with pytest.raises(links.ProbeDeferred, match="peer serves"):
        links.probe_link(KEY, "me", "peer", "127.0.0.1", server, samples=3, transfer_bytes=1 << 16)
    busy.serving = False  # quiet again: measured
    assert links.probe_link(KEY, "me", "peer", "127.0.0.1", server, samples=3, transfer_bytes=1 << 16).error is None


@pytest.mark.parametrize("direction", ["send", "recv"])
def test_a_peer_that_starts_serving_stops_the_probe_under_way(server, busy, monkeypatch, direction):
    real = getattr(links, f"_{direction}_rate")

    def then_busy(sock, n, cancel, defer):
        busy.serving = True  # requests arrive at the peer between two transfers
        return real(sock, n, cancel, defer)

    monkeypatch.setattr(links, f"_{direction}_rate", then_busy)
    with pytest.raises(links.ProbeDeferred, match="peer serves"):
        links.probe_link(KEY, "me", "peer", "127.0.0.1", server, samples=3, transfer_bytes=1 << 16)


def test_requests_served_here_stop_the_probe_under_way(server):
    calls = []

    def serving() -> bool:
        calls.append(1)
        return len(calls) > 4  # after a few round trips

    with pytest.raises(links.ProbeDeferred, match="this node serves"):
        links.probe_link(KEY, "me", "peer", "127.0.0.1", server, samples=10, transfer_bytes=1 << 16, defer=serving)
    stopping = threading.Event()
    stopping.set()  # a stopping agent's probe ends as an error in the profile, not deferred
    link = links.probe_link(KEY, "me", "peer", "127.0.0.1", server, samples=3, cancel=stopping, defer=serving)
    assert link.error is not None and "ProbeCancelled" in link.error
