"""Free ports come from below the kernel's ephemeral range, so no outgoing connection is ever handed one."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from exo_lab.cluster import ports


def test_free_port_is_below_the_ephemeral_range_and_free() -> None:
    first, last = ports.ephemeral_range()
    assert 0 < first <= last
    got = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST <= p < first for p in got), (got, first)
    assert len(got) > 1  # chosen at random: parallel tests do not all try the same port
    random.seed(0)
    first_pick = ports.free_port()
    random.seed(0)
    assert ports.free_port() != first_pick or ports.free_port() != first_pick  # seeding `random` does not fix it
    with socket.socket() as s:
        s.bind(("127.0.0.1", got.pop()))  # free indeed


def test_a_taken_port_is_not_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(ports._rng, "sample", lambda _r, _k: [taken, taken])
        free = ports.free_port()  # every candidate taken: falls back to one bind(0) finds
        assert free != taken


def test_without_room_below_the_range_any_free_port_will_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "range").write_text("1024\t65000\n")
    monkeypatch.setattr(ports, "PORT_RANGE", tmp_path / "range")
    assert ports.ephemeral_range() == (1024, 65000)
    assert 0 < ports.free_port("0.0.0.0") <= 65535
    monkeypatch.setattr(ports, "PORT_RANGE", tmp_path / "missing")
    assert ports.ephemeral_range()[0] >= 32768  # the system's default


def test_a_port_handed_out_is_not_returned_though_nothing_binds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    low = ports.LOWEST
    monkeypatch.setattr(ports._rng, "sample", lambda _r, _k: [low, low + 1])
    assert ports.free_port(exclude={low}) == low + 1
    got = ports.free_port(exclude={low, low + 1})  # every candidate handed out: bind(0), never one of them
    assert got not in (low, low + 1) and 0 < got <= 65535


def test_an_agent_never_hands_out_one_port_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports are picked before any worker binds them: a node's second prepare (and a rank's control port beside
    its ring port) must not get a port the first one holds."""
    from exo_lab.cluster.workers import WorkerManager

    picks = iter([20_001, 20_001, 20_002, 20_001, 20_002, 20_003, 20_004])  # the same port, again and again
    monkeypatch.setattr(ports._rng, "sample", lambda _r, k: [next(picks)] + [20_005 + i for i in range(k - 1)])
    manager = WorkerManager(tmp_path, "k" * 64, "127.0.0.1")
    a = manager.prepare("a", [{"rank": 0, "address": "127.0.0.1"}], 0, 1 << 30)
    b = manager.prepare("b", [{"rank": 0, "address": "127.0.0.1"}], 0, 1 << 30)
    got = [int(p.rsplit(":", 1)[1]) for out in (a, b) for r in out.values() for p in (r["ring"], r["control"])]
    assert len(set(got)) == 4, got
    assert manager.ports_handed_out() == set(got)
