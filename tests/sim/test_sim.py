"""The simulated cluster: spec parsing (anywhere) and real namespaces with shaped links (root only).

The namespace tests use a stand-in node (an HTTP server plus a TCP echo/sink
one port up) instead of the exo_lab node agent, and measure the cables with a
small client run inside a host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo_lab.sim import layout, netns, procs, state
from exo_lab.sim.cluster import SimCluster, SimError
from exo_lab.sim.spec import HostSpec, LinkSpec, SimSpec, SpecError
from exo_lab.sim.units import parse_delay, parse_rate, parse_size

# ---------------------------------------------------------------- spec (no root needed)


def test_units() -> None:
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("10mbps") == 80_000_000  # tc: bps is bytes per second
    assert parse_rate("1.5gbit") == 1_500_000_000
    assert parse_delay("5ms") == pytest.approx(0.005)
    assert parse_delay("500us") == pytest.approx(0.0005)
    assert parse_delay(2) == pytest.approx(0.002)
    assert parse_size("4G") == 4 << 30
    assert parse_size("512M") == 512 << 20
    for bad in ("fast", "10 furlongs", "-5mbit"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_spec_round_trip_and_forms(tmp_path: Path) -> None:
    data = {
        "name": "demo3",
        "hosts": [{"name": "a", "cores": "0-1", "memory": "4G"}, {"name": "b"}, "c"],
        "lan": {"rate": "1gbit"},
        "links": [{"a": "a", "b": "b", "rate": "100mbit", "delay": "5ms", "loss": 0.01}],
    }
    spec = SimSpec.from_json(data)
    assert spec.host("a") == HostSpec("a", cores=(0, 1), memory=4 << 30)
    assert spec.links[0].delay == pytest.approx(0.005) and spec.links[0].rtt == pytest.approx(0.010)
    assert SimSpec.from_json(spec.to_json()) == spec
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.yaml").write_text(
        "name: demo3\nhosts: [{name: a, cores: [0, 1], memory: 4G}, {name: b}, {name: c}]\n"
        "lan: {rate: 1gbit}\nlinks:\n  - {a: a, b: b, rate: 100mbit, delay: 5ms, loss: 0.01}\n"
    )
    assert SimSpec.from_file(tmp_path / "s.json") == spec == SimSpec.from_file(tmp_path / "s.yaml")
    flags = SimSpec.from_flags(3, ["a-b:rate=100mbit,delay=5ms,loss=0.01"], lan_rate="1gbit", name="demo3")
    assert flags.links == spec.links and [h.name for h in flags.hosts] == ["a", "b", "c"]
    assert SimSpec.from_flags(2, lan=False).lan is None
    example = SimSpec.from_file(Path(layout.__file__).parent / "specs" / "sim-3-hosts.yaml")
    assert example.links[0] == LinkSpec("a", "b", rate="100mbit", delay="5ms")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"hosts": []}, "no hosts"),
        ({"hosts": ["a", "a"]}, "unique"),
        ({"hosts": ["lan"]}, "reserved"),
        ({"hosts": ["A b"]}, "not valid"),
        ({"hosts": ["a"], "links": [{"a": "a", "b": "z"}]}, "not in hosts"),
        ({"hosts": ["a", "b"], "links": [{"a": "a", "b": "b", "dealy": "5ms"}]}, "unknown key"),
        ({"hosts": ["a", "b"], "links": [{"a": "a", "b": "b", "loss": 1.5}]}, "loss"),
        ({"hosts": ["a", "b"], "links": [{"a": "a", "b": "b", "rate": "fast"}]}, "rate"),
        ({"hosts": [{"name": "a", "memory": "1K"}]}, "below"),
    ],
)
def test_spec_errors_say_what_to_fix(data: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        SimSpec.from_json(data)


def test_layout_addresses() -> None:
    spec = SimSpec.from_flags(3, ["a-b:delay=5ms", "b-c:delay=2ms"])
    plan = layout.plan(spec, index=7)
    a, b, c = plan.hosts["a"], plan.hosts["b"], plan.hosts["c"]
    assert (a.netns, plan.lan_netns) == ("exolab-sim-a", "exolab-sim-lan")
    assert [a.lan_addr, b.lan_addr, c.lan_addr] == ["10.213.7.1", "10.213.7.2", "10.213.7.3"]
    assert (a.link_to("b").addr, b.link_to("a").addr) == ("10.214.7.1", "10.214.7.2")
    assert (b.link_to("c").addr, c.link_to("b").addr) == ("10.214.7.5", "10.214.7.6")
    assert a.url == "http://10.213.7.1:52416"
    assert all(len(link.ifname) <= netns.IFNAMSIZ for h in plan.hosts.values() for link in h.links)
    assert layout.peers_of(plan, "a") == ["10.213.7.2:52416", "10.213.7.3:52416"]
    no_lan = layout.plan(SimSpec.from_flags(3, ["a-b:delay=5ms"], lan=False), index=0)
    assert layout.peers_of(no_lan, "a") == ["10.214.0.2:52416"] and no_lan.hosts["c"].addresses == []
    assert (plan.root_addr, no_lan.lan_netns) == (None, None)  # the root joins only when asked
    rooted = layout.plan(SimSpec.from_flags(3, ["a-b:delay=5ms"], lan=False), index=7, root=True)
    assert (rooted.root_addr, rooted.root_ifname, rooted.lan_netns) == ("10.213.7.254", "exolab-lan7", "exolab-sim-lan")
    assert (rooted.lan_subnet, rooted.link_subnet) == ("10.213.7.0/24", "10.214.7.0/24")
    assert all(h.lan_addr is None for h in rooted.hosts.values())  # the root's bridge gives hosts no address
    assert len(layout.root_ifname(layout.MAX_INDEX)) <= netns.IFNAMSIZ


def _run_forwarder(delay: float, loss: float = 0.0, rate: int | None = None):
    """A forwarder thread between two SOCK_SEQPACKET pairs (frames keep their boundaries, like a TAP)."""
    import socket
    import threading

    from exo_lab.sim.forwarder import Forwarder

    a_app, a_fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b_fwd, b_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a_fwd, b_fwd):
        s.setblocking(False)
    fwd = Forwarder(a_fwd.fileno(), b_fwd.fileno(), delay, loss, rate, seed=1)
    wake_r, wake_w = os.pipe()
    thread = threading.Thread(target=fwd.run, args=(wake_r,), daemon=True)
    thread.start()

    def stop() -> None:
        fwd.stopping = True
        os.write(wake_w, b"x")
        thread.join(5)
        for fd in (wake_r, wake_w):
            os.close(fd)
        for s in (a_app, a_fwd, b_fwd, b_app):
            s.close()

    return a_app, b_app, fwd, stop


class _Receiver:
    """Collect ``(arrival time, frame)`` from ``sock`` in a thread until it stays idle for ``idle`` s."""

    def __init__(self, sock, idle: float = 0.3) -> None:
        import threading

        self.frames: list[tuple[float, bytes]] = []
        sock.settimeout(idle)
        self.thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self.thread.start()

    def _run(self, sock) -> None:
        try:
            while True:
                frame = sock.recv(70000)
                self.frames.append((time.monotonic(), frame))
        except TimeoutError:
            pass

    def wait(self) -> list[tuple[float, bytes]]:
        self.thread.join(30)
        return self.frames


def test_forwarder_delay_loss_and_rate() -> None:
    a, b, fwd, stop = _run_forwarder(delay=0.02)
    try:
        rx, sent = _Receiver(b), []
        for i in range(10):
            sent.append(time.monotonic())
            a.send(i.to_bytes(4, "big") * 16)
            time.sleep(0.005)
        got = rx.wait()
        assert [int.from_bytes(f[:4], "big") for _, f in got] == list(range(10))  # in order, none lost
        lat = sorted(t - s for (t, _), s in zip(got, sent, strict=True))
        assert lat[0] >= 0.02 and lat[5] < 0.02 + 0.005, lat
        b.send(b"back")  # and the other way
        a.settimeout(2)
        assert a.recv(100) == b"back"
    finally:
        stop()

    a, b, fwd, stop = _run_forwarder(delay=0.0, loss=0.25)
    try:
        rx = _Receiver(b)
        for _ in range(2000):
            a.send(b"x" * 64)
        rx.wait()
        a_to_b = next(iter(fwd.dirs.values()))
        assert a_to_b.frames == 2000 and 0.2 < a_to_b.dropped / 2000 < 0.3, fwd.stats()
    finally:
        stop()

    a, b, fwd, stop = _run_forwarder(delay=0.0, rate=8_000_000)  # 1000-byte frames take 1 ms each
    try:
        rx, t0 = _Receiver(b), time.monotonic()
        for _ in range(40):
            a.send(bytes(1000))
        got = rx.wait()
        assert len(got) == 40 and got[-1][0] - t0 == pytest.approx(0.040, abs=0.01)
    finally:
        stop()


# ---------------------------------------------------------------- real namespaces (root)

_WHY_NOT = netns.available()
needs_netns = pytest.mark.skipif(_WHY_NOT is not None, reason=f"simulated cluster: {_WHY_NOT}")

STANDIN = r"""
import http.server, socket, socketserver, sys, threading

port = int(sys.argv[1])

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf

class Probe(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = recv_exact(s, 1)
        if mode == b"e":  # echo
            while data := s.recv(65536):
                s.sendall(data)
        elif mode == b"s":  # sink n bytes, then say done
            left = int.from_bytes(recv_exact(s, 8), "big")
            while left > 0:
                left -= len(s.recv(min(left, 1 << 20)))
            s.sendall(b"k")

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

threading.Thread(target=Server(("0.0.0.0", port + 1), Probe).serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", port), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

PROBE = r"""
import json, socket, statistics, sys, time

mode, rest = sys.argv[1], sys.argv[2:]
if mode == "connect":  # ADDR:PORT ...
    out = {}
    for target in rest:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            out[target] = True
        except OSError:
            out[target] = False
    print(json.dumps(out))
elif mode == "rtt":  # ADDR PORT N
    s = socket.create_connection((rest[0], int(rest[1])), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"e")
    times = []
    for _ in range(int(rest[2])):
        t = time.perf_counter()
        s.sendall(b"x" * 32)
        got = 0
        while got < 32:
            got += len(s.recv(64))
        times.append(time.perf_counter() - t)
    print(json.dumps({"median": statistics.median(times), "min": min(times)}))
elif mode == "send":  # ADDR PORT NBYTES
    n = int(rest[2])
    s = socket.create_connection((rest[0], int(rest[1])), timeout=10)
    t = time.perf_counter()
    s.sendall(b"s" + n.to_bytes(8, "big"))
    block = bytes(1 << 20)
    left = n
    while left > 0:
        left -= s.send(block[: min(left, len(block))])
    assert s.recv(1) == b"k"
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "bits_per_s": n * 8 / seconds}))
"""

MDNS = r"""
import socket, sys, threading
from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

TYPE = "_exo-lab._tcp.local."
zc = Zeroconf()
if sys.argv[1] == "register":
    info = ServiceInfo(TYPE, f"{sys.argv[2]}.{TYPE}", addresses=[socket.inet_aton(sys.argv[3])], port=52416)
    zc.register_service(info)
    print("registered", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    zc.unregister_service(info)
else:
    found = threading.Event()

    class Listener:
        def add_service(self, zc, type_, name):
            if name.startswith(sys.argv[2] + "."):
                found.set()

        def update_service(self, zc, type_, name):
            pass

        def remove_service(self, zc, type_, name):
            pass

    ServiceBrowser(zc, TYPE, Listener())
    print("found" if found.wait(float(sys.argv[3])) else "not found", flush=True)
zc.close()
"""

A_B = {"delay": 0.005, "rate": 50_000_000}
B_C = {"delay": 0.002, "rate": 200_000_000}


def _name(tag: str) -> str:
    return f"t{tag}{os.getpid() % 100000}"  # unique per test run: other runs may be up at the same time


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("simscripts")
    out = {}
    for name, text in (("standin", STANDIN), ("probe", PROBE), ("mdns", MDNS)):
        (d / f"{name}.py").write_text(text)
        out[name] = d / f"{name}.py"
    return out


def _standin(scripts: dict[str, Path]) -> list[str]:
    return [sys.executable, str(scripts["standin"]), "{port}"]


@pytest.fixture(scope="module")
def sim(scripts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    if _WHY_NOT is not None:
        pytest.skip(f"simulated cluster: {_WHY_NOT}")
    spec = {
        "name": _name("m"),
        "hosts": [{"name": "a", "cores": [0], "memory": "512M"}, {"name": "b"}, {"name": "c"}],
        "lan": {},
        "links": [
            {"a": "a", "b": "b", "rate": "50mbit", "delay": "5ms"},
            {"a": "b", "b": "c", "rate": "200mbit", "delay": "2ms"},
        ],
    }
    cluster = SimCluster(spec, node_command=_standin(scripts), base_dir=tmp_path_factory.mktemp("sim"))
    with cluster.up(wait=30):
        yield cluster
    assert not state.path_for(spec["name"]).exists()


def probe(sim: SimCluster, host: str, scripts: dict[str, Path], *args: object) -> dict:
    out = sim.exec(host, [sys.executable, str(scripts["probe"]), *map(str, args)], timeout=60)
    return json.loads(out.stdout)


@pytest.mark.slow
@needs_netns
def test_hosts_reach_each_other(sim: SimCluster, scripts: dict[str, Path]) -> None:
    h = sim.hosts
    assert h["a"].url == f"http://{h['a'].lan_addr}:52416"
    port = h["a"].port + 1
    from_a = probe(
        sim,
        "a",
        scripts,
        "connect",
        f"{h['b'].lan_addr}:{port}",
        f"{h['c'].lan_addr}:{port}",
        f"{h['b'].link_to('a').addr}:{port}",
    )
    from_c = probe(sim, "c", scripts, "connect", f"{h['a'].lan_addr}:{port}", f"{h['b'].link_to('c').addr}:{port}")
    assert all(from_a.values()) and all(from_c.values()), (from_a, from_c)
    # no route from a to the b-c cable: a cable is not a LAN
    assert probe(sim, "a", scripts, "connect", f"{h['c'].link_to('b').addr}:{port}") == {
        f"{h['c'].link_to('b').addr}:{port}": False
    }
    import urllib.request

    for host in h.values():  # the root namespace reaches each node at every address it has, and through the relay
        for url in [host.local_url, *(f"http://{addr}:{host.port}" for addr in host.addresses)]:
            with urllib.request.urlopen(f"{url}/", timeout=5) as r:
                assert r.status == 200, url
    # by one device with the root's LAN address and the routes of the sim's two subnets, nothing else
    plan = layout.plan(sim.spec, sim._require_state().index, root=True)
    assert plan.root_ifname and sim.root_address == plan.root_addr
    assert f"inet {plan.root_addr}/24 " in netns.run(["-4", "addr", "show", "dev", plan.root_ifname])
    routes = netns.run(["-4", "route", "show", "dev", plan.root_ifname]).splitlines()
    assert sorted(line.split()[0] for line in routes) == [plan.lan_subnet, plan.link_subnet], routes


@pytest.mark.slow
@needs_netns
@pytest.mark.parametrize(("src", "dst", "link"), [("a", "b", A_B), ("c", "b", B_C)])
def test_cable_rtt_is_twice_the_delay(
    sim: SimCluster, scripts: dict[str, Path], src: str, dst: str, link: dict
) -> None:
    addr = sim.hosts[dst].link_to(src).addr
    got = probe(sim, src, scripts, "rtt", addr, sim.port + 1, 50)["median"]
    want = 2 * link["delay"]
    print(f"RTT {src}-{dst}: want {want * 1e3:.2f} ms, median {got * 1e3:.2f} ms")
    assert abs(got - want) <= max(0.2 * want, 0.001), f"median RTT {got * 1e3:.2f} ms, want {want * 1e3:.2f} ms"


@pytest.mark.slow
@needs_netns
def test_cable_throughput_is_shaped(sim: SimCluster, scripts: dict[str, Path]) -> None:
    addr = sim.hosts["b"].link_to("a").addr
    got = probe(sim, "a", scripts, "send", addr, sim.port + 1, 4 << 20)["bits_per_s"]
    print(f"throughput a->b: shaped {A_B['rate'] / 1e6:.0f} Mbit/s, measured {got / 1e6:.1f} Mbit/s")
    assert abs(got - A_B["rate"]) <= 0.25 * A_B["rate"], (
        f"{got / 1e6:.1f} Mbit/s over a {A_B['rate'] / 1e6:.0f} Mbit/s cable"
    )


@pytest.mark.slow
@needs_netns
def test_lan_rtt_is_small(sim: SimCluster, scripts: dict[str, Path]) -> None:
    got = probe(sim, "a", scripts, "rtt", sim.hosts["c"].lan_addr, sim.port + 1, 50)["median"]
    print(f"LAN RTT a-c: median {got * 1e3:.3f} ms")
    assert got < 0.002


@pytest.mark.slow
@needs_netns
def test_mdns_crosses_the_lan(sim: SimCluster, scripts: dict[str, Path]) -> None:
    cmd = [sys.executable, str(scripts["mdns"])]
    with sim.popen(
        "a",
        [*cmd, "register", "node-a", sim.hosts["a"].lan_addr],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as reg:
        assert reg.stdout is not None and reg.stdout.readline().strip() == "registered"
        try:
            out = sim.exec("c", [*cmd, "browse", "node-a", "5"], timeout=30).stdout.strip()
        finally:
            assert reg.stdin is not None
            reg.stdin.close()  # the registrar unregisters and exits
    assert out == "found"


@pytest.mark.slow
@needs_netns
def test_host_limits_are_cgroups(sim: SimCluster) -> None:
    paths = sim.hosts["a"].cgroups
    if not paths:
        pytest.skip("cgroup v1 cpuset/memory are not usable here (see the log)")
    lines = sim.exec("a", ["cat", "/proc/self/cgroup"]).stdout
    for path in paths:
        assert Path(path).name in lines
        if "cpuset" in path:
            assert Path(path, "cpuset.cpus").read_text().strip() == "0"
        else:
            assert int(Path(path, "memory.limit_in_bytes").read_text()) == 512 << 20
    assert "exolab" not in sim.exec("b", ["cat", "/proc/self/cgroup"]).stdout
    # inside the host, a node can read its own limit (for its profile)
    rel = next(line.split(":", 2)[2] for line in lines.splitlines() if line.split(":")[1] == "memory")
    if any("memory" in p for p in paths):
        limit = sim.exec("a", ["cat", f"/sys/fs/cgroup/memory{rel}/memory.limit_in_bytes"]).stdout
        assert int(limit) == 512 << 20


@pytest.mark.slow
@needs_netns
def test_each_host_is_a_machine_of_its_own_name(sim: SimCluster) -> None:
    """Hosts differ in hostname (a UTS namespace each): the planner splits cores only between ranks of one host."""
    names = {h: sim.exec(h, ["hostname"]).stdout.strip() for h in ("a", "b")}
    assert names == {h: sim.hosts[h].netns for h in ("a", "b")}
    assert socket.gethostname() not in names.values()


@pytest.mark.slow
@needs_netns
def test_node_ports_are_never_a_clients_own(sim: SimCluster) -> None:
    """A client polling a node's port before it listens must not get that port as its ephemeral one."""
    for name, host in sim.hosts.items():
        reserved = sim.exec(name, ["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]).stdout.strip()
        assert reserved == f"{host.port}-{host.port + 1}", (name, reserved)
    assert f"{sim.port}" not in Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text()  # the root's: untouched


def _snapshot_gone(st: state.SimState, root_links_before: set[str]) -> None:
    """Assert that nothing recorded in ``st`` is left, the root namespace's device and routes included."""
    assert not state.path_for(st.name).exists()
    assert not set(st.netns) & set(netns.list_netns())
    assert st.root_links and not any(netns.link_exists(dev) for dev in st.root_links)
    subnets = (f"10.213.{st.index}.", f"10.214.{st.index}.")
    assert not [r for r in netns.route_prefixes() if r.startswith(subnets)], netns.route_prefixes()
    for p in st.processes:
        assert not procs.running(p.pid, p.start), f"{p.role} (pid {p.pid}) still runs"
    for cg in st.cgroups:
        assert not os.path.exists(cg), f"cgroup {cg} is left"
    assert set(netns.link_names()) <= root_links_before, "a device appeared in the root namespace"


@pytest.mark.slow
@needs_netns
def test_down_removes_everything(sim: SimCluster, scripts: dict[str, Path], tmp_path: Path) -> None:
    before = set(netns.link_names())
    spec = {
        "name": _name("d"),
        "hosts": [{"name": "a", "memory": "256M", "cores": [0]}, "b"],
        "lan": {"rate": "1gbit"},
        "links": [{"a": "a", "b": "b", "delay": "1ms", "rate": "100mbit"}],
    }
    second = SimCluster(spec, node_command=_standin(scripts), base_dir=tmp_path).up(wait=30)
    st = state.load(spec["name"])
    assert len(st.netns) == 3 and len(st.processes) == 4  # lan + 2 hosts; forwarder, relay, 2 nodes
    assert set(netns.link_names()) - before == {layout.root_ifname(st.index)} == set(st.root_links)
    # two sims up at once (this one and the module's): each has its own device and subnet here
    first = layout.root_ifname(sim._require_state().index)
    assert sim.root_address != second.root_address and netns.link_exists(first)
    extra = second.popen("b", ["sleep", "600"])  # started by a user inside a host: goes with it
    second.down()
    _snapshot_gone(st, before)
    assert extra.wait(5) is not None
    assert netns.link_exists(first)  # the other sim keeps its own
    second.down()  # twice is fine


@pytest.mark.slow
@needs_netns
def test_the_root_joins_a_sim_without_a_lan(scripts: dict[str, Path], tmp_path: Path) -> None:
    spec = {"name": _name("n"), "hosts": ["a", "b", "c"], "links": [{"a": "a", "b": "b"}, {"a": "b", "b": "c"}]}
    with SimCluster(spec, node_command=_standin(scripts), base_dir=tmp_path).up(wait=30) as lanless:
        h = lanless.hosts
        assert lanless.root_urls == [h["a"].url, h["b"].url, h["c"].url]
        import urllib.request

        for host in h.values():  # every cable address, from the root namespace
            for addr in host.addresses:
                with urllib.request.urlopen(f"http://{addr}:{host.port}/", timeout=5) as r:
                    assert r.status == 200, addr
        # the root's bridge gives a host no address its node would report, and the hosts no path to each other
        lines = lanless.exec("a", ["ip", "-4", "-o", "addr", "show"]).stdout.splitlines()
        assert [line.split()[3] for line in lines if line.split()[1] != "lo"] == [f"{h['a'].link_to('b').addr}/30"]
        far = f"{h['c'].link_to('b').addr}:{lanless.port + 1}"
        assert probe(lanless, "a", scripts, "connect", far) == {far: False}


@pytest.mark.slow
@needs_netns
def test_failed_up_leaves_nothing(scripts: dict[str, Path], tmp_path: Path) -> None:
    before = set(netns.link_names())
    spec = {"name": _name("f"), "hosts": [{"name": "a", "memory": "256M"}, "b"], "links": [{"a": "a", "b": "b"}]}
    sim = SimCluster(spec, node_command=[sys.executable, "-c", "raise SystemExit('no node here')"], base_dir=tmp_path)
    with pytest.raises(SimError, match="no node here"):
        sim.up(wait=30)
    assert not state.path_for(spec["name"]).exists()
    assert not [ns for ns in netns.list_netns() if ns.startswith(f"exolab-{spec['name']}-")]
    assert set(netns.link_names()) <= before
    with SimCluster(spec, node_command=_standin(scripts), base_dir=tmp_path, root_link=False) as first:
        with pytest.raises(SimError, match="already up"):
            SimCluster(spec, node_command=_standin(scripts), base_dir=tmp_path).up()
        assert first.is_up
        # root_link=False leaves the root namespace alone: the nodes only through the relay
        assert first.root_address is None and set(netns.link_names()) <= before
        assert [u.startswith("http://127.0.0.1:") for u in first.local_urls] == [True, True]
        with pytest.raises(SimError, match="root_link=False"):
            first.root_urls  # noqa: B018


@pytest.mark.slow
@needs_netns
def test_down_after_the_creator_was_killed(scripts: dict[str, Path], tmp_path: Path) -> None:
    before = set(netns.link_names())
    name = _name("k")
    cli = [sys.executable, "-m", "exo_lab.cli"]
    up = subprocess.Popen(
        [
            *cli,
            "sim",
            "up",
            "--nodes",
            "2",
            "--link",
            "a-b:delay=1ms",
            "--name",
            name,
            "--base-dir",
            str(tmp_path),
            "--node-command",
            f"{sys.executable} {scripts['standin']} {{port}}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:  # foreground: it prints this once everything is up
            if "Press Ctrl-C" in line:
                break
        else:
            pytest.fail(f"sim up exited with {up.wait()}")
        st = state.load(name)
        assert st.status == "up" and st.owner_pid == up.pid
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
        if up.stdout is not None:
            up.stdout.close()
    assert all(procs.running(p.pid, p.start) for p in st.processes), "the sim should outlive its creator"
    assert SimCluster.attach(name).status()["owner_running"] is False
    status = subprocess.run(
        [sys.executable, "-m", "exo_lab.sim.cli", "status", "--name", name], capture_output=True, text=True, timeout=60
    )
    assert f"this machine: {st.root_address} on {st.root_links[0]}" in status.stdout, status.stdout + status.stderr
    down = subprocess.run(
        [*cli, "sim", "down", "--name", name], capture_output=True, text=True, timeout=60, check=False
    )
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 5
    while any(procs.running(p.pid, p.start) for p in st.processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    _snapshot_gone(st, before)
