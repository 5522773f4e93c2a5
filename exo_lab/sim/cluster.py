"""A simulated multi-host cluster on one Linux machine: namespaces, shaped links, limits.

::

    with SimCluster({"hosts": ["a", "b", "c"], "lan": {},
                     "links": [{"a": "a", "b": "b", "rate": "100mbit", "delay": "5ms"}]}) as sim:
        print(sim.root_address, sim.hosts["a"].url, sim.hosts["a"].local_url)
        sim.exec("a", ["ping", "-c1", sim.hosts["b"].link_to("a").addr])
        cluster = sim.cluster()
        inst = cluster.launch("demo")   # workers in the hosts, generation from here

Each host is a network namespace running one node command (by default the
exo_lab node agent). The LAN is a bridge in its own namespace; cables are TAP
pairs joined by a delay line (:mod:`exo_lab.sim.forwarder`), rate-limited with
``tbf``; see :mod:`exo_lab.sim.layout` for names and addresses.

The root namespace (this machine) joins the sim like one more host without
an agent: a veth from it to a port of the LAN's bridge (a bridge of its own
when the spec has no LAN) gives it ``root_address`` on the LAN and on-link
routes to every cable address, so a notebook here reaches every agent and
every worker at its own address (``url``). The root's port is never shaped:
traffic to a host still passes that host's shaped LAN port, but cables'
delay and rate apply only between hosts. Only the two routes of the sim's own
subnets (``10.213.<i>.0/24``, ``10.214.<i>.0/24``) are added, on that device,
and go with it. Each node is also reachable through a loopback relay
(``local_url``, :mod:`exo_lab.sim.portmap`), which works without the link
(``root_link=False``). No agent runs in the root namespace.

Everything created is recorded (:mod:`exo_lab.sim.state`) before it exists,
so :meth:`SimCluster.down` -- or ``exo-lab sim down --name NAME`` from any
other process, also after the creator was killed -- removes all of it and
nothing else.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import secrets
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from exo_lab import _blas, defaults
from exo_lab.paths import cache_dir
from exo_lab.sim import cgroups, layout, netns, procs, state
from exo_lab.sim.layout import SimHost
from exo_lab.sim.spec import SimSpec

log = logging.getLogger(__name__)

DEFAULT_PORT = defaults.AGENT_PORT
# fmt: off
DEFAULT_NODE_COMMAND: tuple[str, ...] = (
    "{python}", "-m", "exo_lab.cli", "node", "--host", "0.0.0.0", "--port", "{port}", "--name", "{name}",
    "--state-dir", "{state_dir}", "{peers}",
)
# fmt: on
"""Placeholders: ``{python}``, ``{port}``, ``{name}``, ``{state_dir}``, ``{cluster_key}``,
``{lan_addr}``, ``{sim}``; a token that is exactly ``{peers}`` becomes ``--peer ADDR:PORT`` per peer.
Every host's command gets the cluster key as ``EXO_LAB_CLUSTER_KEY`` (never in argv, where ``ps`` shows it)."""

NodeCommand = Sequence[str] | Callable[[SimHost], Sequence[str]]
HELPER_START_S = 20.0  # a forwarder or the relay must report ready within this
READY_PATH = "/node"  # polled until it answers with any HTTP status (the agent's node info)
# kept out of each host's ephemeral range: polling the node's port on 127.0.0.1 before it listens can
# otherwise pick that very port as the client's own and connect to itself (TCP simultaneous open),
# and the node then fails to bind it (EADDRINUSE); the node's port and its probe port
RESERVED_PORTS = "net.ipv4.ip_local_reserved_ports"


class SimError(RuntimeError):
    """The sim could not be built or taken down; the message says what to do."""


def _sim_python() -> str:
    return sys.executable


def _helper_env() -> dict[str, str]:
    """Environment for the forwarders and the relay: no OpenBLAS, they never touch MLX."""
    env = dict(os.environ)
    env[defaults.BLAS] = "reference"
    env.pop("LD_PRELOAD", None)
    return env


def _read_line(proc: subprocess.Popen, what: str, log_path: Path, timeout: float = HELPER_START_S) -> str:
    """The first stdout line of a helper, or SimError with its log when it fails to start."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SimError(f"{what} did not start within {timeout:.0f} s; see {log_path}")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(5)
                raise SimError(f"{what} exited with {proc.returncode} before it was ready:\n{_tail(log_path)}")
            buf += chunk
    proc.stdout.close()
    return buf.split(b"\n", 1)[0].decode()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _fill(token: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        token = token.replace("{" + key + "}", value)
    return token


class SimCluster:
    """Build, use and remove a simulated cluster. Also a context manager (``up`` / ``down``).

    ``spec``: a :class:`SimSpec`, its dict form, or a spec file path.
    ``node_command``: argv template (see :data:`DEFAULT_NODE_COMMAND`) or a
    function of the :class:`SimHost`; None runs the exo_lab node agent.
    ``cluster_key``: the nodes' shared secret (random when None).
    ``base_dir``: per-host state dirs and logs (default ``<cache>/sim/<name>``).
    ``port``: the port each node listens on inside its namespace.
    ``peers``: pass each node ``--peer`` for every host it reaches directly
    (False: leave discovery to mDNS on the LAN).
    ``root_link``: link the root namespace into the sim (``root_address``);
    False leaves the root namespace untouched (nodes only through the relay).
    """

    def __init__(
        self,
        spec: SimSpec | Mapping[str, Any] | str | Path,
        node_command: NodeCommand | None = None,
        cluster_key: str | None = None,
        base_dir: str | Path | None = None,
        port: int = DEFAULT_PORT,
        peers: bool = True,
        root_link: bool = True,
    ) -> None:
        self.spec = SimSpec.coerce(spec)
        self.node_command: NodeCommand = DEFAULT_NODE_COMMAND if node_command is None else node_command
        self._key = cluster_key or secrets.token_hex(24)  # hex: never starts with "-", which argparse would misread
        if base_dir is None:
            base_dir = cache_dir() / "sim" / self.spec.name
        self.base_dir = Path(base_dir).resolve()
        self.port = port
        self.peers = peers
        self.root_link = root_link
        self._state: state.SimState | None = None
        self._children: list[subprocess.Popen] = []
        self._nodes: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def attach(cls, name: str) -> SimCluster:
        """The running sim ``name`` (from its state file), e.g. to take it down from another process."""
        st = state.load(name)
        sim = cls(st.spec, cluster_key=st.cluster_key, base_dir=st.base_dir, root_link=st.root_address is not None)
        sim._state = st
        return sim

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_up(self) -> bool:
        return self._state is not None and self._state.status == "up"

    def __enter__(self) -> Self:
        return self if self._state is not None else self.up()  # `with SimCluster(...).up(wait=5):` works too

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, wait: float | None = 60.0) -> Self:
        """Build namespaces, LAN, cables and limits, start a node per host.

        ``wait``: seconds to wait until every node answers HTTP on its
        ``local_url`` (None or 0: do not wait). On any failure everything
        built so far is removed again.
        """
        if self._state is not None:
            raise SimError(f"sim {self.name!r} is already up in this object; call down() first")
        why = netns.available()
        if why:
            raise SimError(f"cannot build a simulated cluster here: {why}")
        with state.lock():
            self._claim()
        try:
            self._build()
            if wait:
                self.wait_ready(wait)
        except BaseException:
            log.info("building sim %r failed; removing what was built", self.name)
            self.down()
            raise
        return self

    def _claim(self) -> None:
        """Under the run-dir lock: check the name is free, pick an index, write the first state."""
        path = state.path_for(self.name)
        if path.exists():
            raise SimError(
                f"a sim named {self.name!r} is already up (state in {path}); "
                f"take it down with `exo-lab sim down --name {self.name}` or choose another name"
            )
        taken = {s.index for s in state.all_states()}
        index = state.free_index(taken)
        plan = layout.plan(self.spec, index, self.port, self.base_dir, root=self.root_link)
        wanted = [h.netns for h in plan.hosts.values()] + ([plan.lan_netns] if plan.lan_netns else [])
        clash = sorted(set(wanted) & set(netns.list_netns()))
        if clash:
            raise SimError(
                f"network namespace(s) {', '.join(clash)} already exist but no sim records them; "
                f"if they are left over, remove them with `ip netns delete NAME`, or choose another sim name"
            )
        if plan.root_ifname:
            _check_root_free(plan)
        for h in self.spec.hosts:
            if h.cores is not None:
                cgroups.check_cores(h.cores, h.name)
        self._state = state.SimState(
            name=self.name,
            index=index,
            spec=self.spec.to_json(),
            base_dir=str(self.base_dir),
            cluster_key=self._key,
            owner_pid=os.getpid(),
            hosts={n: h.to_json() for n, h in plan.hosts.items()},
            root_address=plan.root_addr,
        )
        self._state.save()

    def _save(self) -> None:
        assert self._state is not None
        self._state.save()

    def _record(self, kind: str, ident: str, create: Callable[[], None]) -> None:
        """Write ``ident`` into the state's ``kind`` list, then create it; unrecord if creation fails."""
        assert self._state is not None
        items: list[str] = getattr(self._state, kind)
        items.append(ident)
        self._save()
        try:
            create()
        except BaseException:
            items.remove(ident)  # not ours: it never came to be, or it already existed
            self._save()
            raise

    def _build(self) -> None:
        assert self._state is not None
        st = self._state
        plan = layout.plan(self.spec, st.index, self.port, self.base_dir, root=st.root_address is not None)
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        lan_netns = plan.lan_netns
        if lan_netns:
            self._record("netns", lan_netns, lambda: netns.add(lan_netns))
            netns.add_bridge(lan_netns, layout.BRIDGE)
        for h in plan.hosts.values():
            self._record("netns", h.netns, lambda h=h: netns.add(h.netns))
            netns.sysctl(h.netns, {RESERVED_PORTS: f"{h.port}-{h.port + 1}"})
        self._build_lan(plan)
        self._build_root_link(plan)
        self._build_links(plan)
        self._build_cgroups()
        log.info("sim %r: network built in %.2f s", self.name, time.monotonic() - t0)
        self._start_relay()
        for name in plan.hosts:
            self._start_node(name)
        st.status = "up"
        self._save()
        log.info("sim %r is up: %s", self.name, ", ".join(f"{h.name}={h.url}" for h in self.hosts.values()))

    def _build_lan(self, plan: layout.Layout) -> None:
        if plan.lan_netns is None or self.spec.lan is None:
            return
        rate = self.spec.lan.rate
        for i, h in enumerate(plan.hosts.values()):
            port = f"p{i}"
            netns.add_veth(layout.LAN_IFNAME, h.netns, port, plan.lan_netns)
            netns.set_master(plan.lan_netns, port, layout.BRIDGE)
            netns.up(plan.lan_netns, port)
            netns.add_addr(h.netns, layout.LAN_IFNAME, f"{h.lan_addr}/24")
            netns.up(h.netns, layout.LAN_IFNAME)
            netns.add_route(h.netns, "224.0.0.0/4", layout.LAN_IFNAME)  # mDNS goes out on the LAN
            if rate:
                netns.set_rate(h.netns, layout.LAN_IFNAME, rate)
                netns.set_rate(plan.lan_netns, port, rate)

    def _build_root_link(self, plan: layout.Layout) -> None:
        """The root namespace's veth into the bridge, its address and its two routes (see the module doc)."""
        if plan.root_addr is None or plan.root_ifname is None or plan.lan_netns is None:
            return
        dev, lan_ns = plan.root_ifname, plan.lan_netns
        self._record("root_links", dev, lambda: netns.add_veth_from_root(dev, layout.ROOT_PORT, lan_ns))
        netns.set_master(lan_ns, layout.ROOT_PORT, layout.BRIDGE)
        netns.up(lan_ns, layout.ROOT_PORT)
        netns.add_addr(None, dev, f"{plan.root_addr}/24")  # implies the route to the LAN subnet
        netns.up(None, dev)
        netns.add_route(None, plan.link_subnet, dev, src=plan.root_addr)
        for i, h in enumerate(plan.hosts.values()):
            port_dev = layout.LAN_IFNAME
            if self.spec.lan is None:  # the bridge is the root's alone: an isolated port per host, no address
                port_dev, port = layout.HOST_ROOT_IFNAME, f"p{i}"
                netns.add_veth(port_dev, h.netns, port, lan_ns)
                netns.set_master(lan_ns, port, layout.BRIDGE)
                netns.set_isolated(lan_ns, port)
                netns.up(lan_ns, port)
                netns.up(h.netns, port_dev)
                netns.add_route(h.netns, f"{plan.root_addr}/32", port_dev)
            # the root asks on this port for every address of the host (its cables' too): answer for all
            keys = (f"net.ipv4.conf.{name}.arp_ignore" for name in ("all", port_dev))
            netns.sysctl(h.netns, dict.fromkeys(keys, "0"))

    def _build_links(self, plan: layout.Layout) -> None:
        for j, link in enumerate(self.spec.links):
            ends = []
            for me in (link.a, link.b):
                h = plan.hosts[me]
                hl = next(x for x in h.links if x.index == j)
                netns.add_tap(h.netns, hl.ifname)
                netns.add_addr(h.netns, hl.ifname, f"{hl.addr}/{hl.prefixlen}")
                netns.up(h.netns, hl.ifname)
                if link.rate:
                    netns.set_rate(h.netns, hl.ifname, link.rate)
                ends.append(f"{h.netns}:{hl.ifname}")
            log_path = self.base_dir / "logs" / f"forwarder-{j}-{link.label}.log"
            # started inside a's namespace, so a sweep of that namespace finds it even if unrecorded
            ns_a = plan.hosts[link.a].netns
            cmd = ["ip", "netns", "exec", ns_a, _sim_python(), "-m", "exo_lab.sim.forwarder", *ends]
            cmd += ["--delay", f"{round(link.delay * 1e6)}us", "--loss", repr(link.loss), "--seed", str(j)]
            self._spawn_helper(cmd, f"forwarder:{link.label}", log_path)

    def _spawn_helper(self, cmd: list[str], role: str, log_path: Path) -> str:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logf,
                env=_helper_env(),
                start_new_session=True,
            )
        self._children.append(proc)
        assert self._state is not None
        self._state.processes.append(procs.record(proc.pid, role))
        self._save()
        return _read_line(proc, role, log_path)

    def _build_cgroups(self) -> None:
        assert self._state is not None
        for spec_host in self.spec.hosts:
            if spec_host.cores is None and spec_host.memory is None:
                continue
            name = layout.cgroup_name(self.name, spec_host.name)
            made: list[str] = []
            wants = []
            if spec_host.cores is not None:
                wants.append(("cpuset", lambda p, c=spec_host.cores: cgroups.make_cpuset(p, c)))
            if spec_host.memory is not None:
                wants.append(("memory", lambda p, m=spec_host.memory: cgroups.make_memory(p, m)))
            for controller, make in wants:
                path = cgroups.planned_path(controller, name)
                if path is None:
                    continue
                try:
                    self._record("cgroups", str(path), lambda make=make, path=path: make(path))
                except OSError as exc:
                    log.warning("not limiting host %r with %s: %s", spec_host.name, controller, exc)
                    continue
                made.append(str(path))
            h = self._state.hosts[spec_host.name]
            h["cgroups"] = made
            self._save()

    def _start_relay(self) -> None:
        assert self._state is not None
        hosts = list(self._state.hosts.values())
        cmd = [_sim_python(), "-m", "exo_lab.sim.portmap", *(f"{h['netns']}:{h['port']}" for h in hosts)]
        line = self._spawn_helper(cmd, "portmap", self.base_dir / "logs" / "portmap.log")
        try:
            ports = [int(p) for p in json.loads(line)]
        except (ValueError, TypeError) as exc:
            raise SimError(f"the port relay printed {line!r}, not a list of ports") from exc
        for h, port in zip(hosts, ports, strict=True):
            h["local_url"] = f"http://127.0.0.1:{port}"
        self._save()

    def node_argv(self, host: str) -> list[str]:
        """The command that runs in ``host``'s namespace."""
        h = self.hosts[host]
        if callable(self.node_command):
            return list(self.node_command(h))
        assert self._state is not None
        values = {
            "python": _sim_python(),
            "port": str(h.port),
            "name": h.name,
            "state_dir": h.state_dir,
            "cluster_key": self._key,
            "lan_addr": h.lan_addr or "",
            "sim": self.name,
        }
        peers = layout.peers_of(layout.plan(self.spec, self._state.index, self.port), host) if self.peers else []
        argv: list[str] = []
        for token in self.node_command:
            if token == "{peers}":
                for peer in peers:
                    argv += ["--peer", peer]
            else:
                argv.append(_fill(token, values))
        return argv

    def _host_env(self, host: str) -> dict[str, str]:
        env = _blas.child_env()
        env[defaults.SIM] = self.name
        env[defaults.SIM_HOST] = host
        env[defaults.CLUSTER_KEY] = self._key
        return env

    def _start_node(self, host: str) -> None:
        assert self._state is not None
        h = self.hosts[host]
        Path(h.state_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(h.state_dir).parent / "node.log"
        argv = self.node_argv(host)
        cmd = enter(h, argv)
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self._host_env(host),
                cwd=h.state_dir,
                start_new_session=True,
            )
        self._children.append(proc)
        self._nodes[host] = proc
        self._state.processes.append(procs.record(proc.pid, f"node:{host}", group=True))
        self._save()
        log.debug("host %s: %s", host, " ".join(argv))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until every node answers HTTP (any status will do) on its ``local_url``."""
        deadline = time.monotonic() + timeout
        pending = dict(self.hosts)
        while pending:
            for name, h in list(pending.items()):
                proc = self._nodes.get(name)
                if proc is not None and proc.poll() is not None:
                    log_path = Path(h.state_dir).parent / "node.log"
                    raise SimError(
                        f"the node on host {name!r} exited with {proc.returncode}; its log ({log_path}) ends:\n"
                        f"{_tail(log_path)}"
                    )
                if h.local_url and _answers_http(h.local_url + READY_PATH):
                    del pending[name]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise SimError(
                    f"node(s) {', '.join(pending)} did not answer HTTP within {timeout:.0f} s; "
                    f"see the node.log files under {self.base_dir}"
                )
            time.sleep(0.1)

    def down(self, timeout: float = 5.0) -> None:
        """Stop every process and remove every namespace and cgroup this sim created.

        Safe to call twice, and from a process other than the creator
        (:meth:`attach`). Raises SimError (keeping the state file) when
        something could not be removed, so that ``down`` can be tried again.
        """
        st = self._state
        if st is None:
            try:
                st = state.load(self.name)
            except FileNotFoundError:
                return
        st.status = "stopping"
        st.save()
        procs.stop(st.processes, timeout=timeout)
        for ns in st.netns:
            procs.kill_pids(netns.pids(ns))
        for cg in st.cgroups:
            procs.kill_pids(cgroups.procs(cg))
        for child in self._children:
            try:
                child.wait(timeout=2)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not exit", child.pid)
        for dev in st.root_links:
            netns.delete_link(dev)
        for ns in reversed(st.netns):
            netns.delete(ns)
        left_dev = [dev for dev in st.root_links if netns.link_exists(dev)]
        left_ns = [ns for ns in st.netns if netns.exists(ns)]
        left_cg = [cg for cg in st.cgroups if not cgroups.remove(cg)]
        if left_dev or left_ns or left_cg:
            st.root_links, st.netns, st.cgroups = left_dev, left_ns, left_cg
            st.save()
            raise SimError(
                f"sim {self.name!r}: could not remove {', '.join(left_dev + left_ns + left_cg)}; "
                f"see the log above, then run `exo-lab sim down --name {self.name}` again"
            )
        st.remove()
        self._state = None
        self._children.clear()
        self._nodes.clear()
        log.info("sim %r is down", self.name)

    # ---------------------------------------------------------------- using it

    def _require_state(self) -> state.SimState:
        if self._state is None:
            raise SimError(f"sim {self.name!r} is not up; call up() first (or SimCluster.attach(name))")
        return self._state

    @property
    def hosts(self) -> dict[str, SimHost]:
        """Each host's namespace, addresses (LAN and per cable), URLs and state dir, by name."""
        return {n: SimHost.from_json(h) for n, h in self._require_state().hosts.items()}

    @property
    def urls(self) -> list[str]:
        """Node URLs inside the sim (``http://<lan-addr>:<port>``, else a cable's address)."""
        return [h.url for h in self.hosts.values()]

    @property
    def root_address(self) -> str | None:
        """This machine's (the root namespace's) address on the sim's LAN; None without ``root_link``."""
        return self._require_state().root_address

    @property
    def root_urls(self) -> list[str]:
        """Node URLs as the root namespace reaches them over its link: ``url`` (the relay for a host with no address)."""
        if self.root_address is None:
            raise SimError(f"sim {self.name!r} was built with root_link=False; use local_urls")
        return [h.url if h.addresses else (h.local_url or h.url) for h in self.hosts.values()]

    @property
    def local_urls(self) -> list[str]:
        """Node URLs reachable from this machine's root namespace through the loopback relay."""
        missing = [h.name for h in self.hosts.values() if not h.local_url]
        if missing:
            raise SimError(f"host(s) {', '.join(missing)} have no relay port yet; wait for up() to finish")
        return [h.local_url for h in self.hosts.values() if h.local_url]

    @property
    def cluster_key(self) -> str:
        return self._key

    def cluster(self) -> Any:
        """``exo_lab.connect`` to the simulated nodes, from this machine as a host of the sim.

        With the root's link (the default): at their own addresses
        (``root_urls``), following peers; the workers that a launch starts in
        the hosts are reached directly too, so instances run, generate and
        serve from here. Without it: through the relay (``local_urls``),
        never following peers (their addresses have no route from here), and
        no instance can be reached.
        """
        # imported here: the workbench loads MLX (instances), which the sim itself never needs
        from exo_lab.workbench import connect

        if self.root_address is None:
            return connect(self.local_urls, cluster_key=self._key, follow_peers=False)
        return connect(self.root_urls, cluster_key=self._key, follow_peers=True)

    def _in_host(self, host: str, argv: Sequence[str], cgroup: bool) -> list[str]:
        h = self.hosts.get(host)
        if h is None:
            raise KeyError(f"no host {host!r} in sim {self.name!r}; hosts are {', '.join(self.hosts)}")
        return enter(h, argv, cgroup)

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        cgroup: bool = True,
        check: bool = True,
        capture_output: bool = True,
        text: bool = True,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` (its namespace and, with ``cgroup``, its limits) and wait."""
        kwargs.setdefault("env", self._host_env(host))
        return subprocess.run(
            self._in_host(host, argv, cgroup), check=check, capture_output=capture_output, text=text, **kwargs
        )

    def popen(self, host: str, argv: Sequence[str], *, cgroup: bool = True, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``; ``down()`` stops it with the namespace."""
        kwargs.setdefault("env", self._host_env(host))
        return subprocess.Popen(self._in_host(host, argv, cgroup), **kwargs)

    def status(self) -> dict[str, Any]:
        """What is running and what exists, for ``exo-lab sim status``."""
        st = self._state
        if st is None:
            try:
                st = state.load(self.name)
            except FileNotFoundError:
                return {"name": self.name, "status": "down"}
        return describe(st)


def describe(st: state.SimState) -> dict[str, Any]:
    """A JSON-ready report of a recorded sim: processes alive, namespaces present."""
    roles = {p.role: procs.running(p.pid, p.start) for p in st.processes}
    hosts = {}
    for name, h in st.hosts.items():
        hosts[name] = {
            "netns": h["netns"],
            "addresses": ([h["lan_addr"]] if h.get("lan_addr") else []) + [link["addr"] for link in h["links"]],
            "url": SimHost.from_json(h).url,
            "local_url": h.get("local_url"),
            "node_running": roles.get(f"node:{name}", False),
            "cgroups": h.get("cgroups", []),
        }
    return {
        "name": st.name,
        "index": st.index,
        "status": st.status,
        "root_address": st.root_address,
        "root_links": {dev: netns.link_exists(dev) for dev in st.root_links},
        "owner_pid": st.owner_pid,
        "owner_running": bool(st.owner_pid) and procs.running(st.owner_pid),
        "created": st.created,
        "hosts": hosts,
        "processes": [{"role": p.role, "pid": p.pid, "running": roles[p.role]} for p in st.processes],
        "netns": {ns: netns.exists(ns) for ns in st.netns},
        "cgroups": {cg: os.path.isdir(cg) for cg in st.cgroups},
        "spec": st.spec,
    }


def _check_root_free(plan: layout.Layout) -> None:
    """SimError when the root namespace already has the sim's device, or routes as specific as the sim's."""
    assert plan.root_ifname is not None
    if netns.link_exists(plan.root_ifname):
        raise SimError(
            f"device {plan.root_ifname} already exists in the root namespace but no sim records it; "
            f"if it is left over, remove it with `ip link delete {plan.root_ifname}`"
        )
    ours = [ipaddress.ip_network(plan.lan_subnet), ipaddress.ip_network(plan.link_subnet)]
    for prefix in netns.route_prefixes():
        try:
            net = ipaddress.ip_network(prefix, strict=False)
        except ValueError:  # "default", "unreachable", ...
            continue
        if net.prefixlen == 0 or not any(net.overlaps(o) for o in ours):
            continue
        if net.prefixlen >= 24:
            raise SimError(
                f"this machine already routes {net}, which the sim's subnets {ours[0]} and {ours[1]} overlap; "
                "build the sim with root_link=False (`exo-lab sim up --no-root-link`)"
            )
        log.warning(
            "this machine routes %s; its part in %s goes to the sim while it is up", net, " and ".join(map(str, ours))
        )


def enter(host: SimHost, argv: Sequence[str], cgroup: bool = True) -> list[str]:
    """``argv`` run inside ``host``: its cgroups (when ``cgroup``), its network namespace, cgroups visible, and
    its own hostname (its namespace's name, in a UTS namespace: what tells the planner that two simulated
    hosts are two machines whose ranks do not share cores)."""
    own_name = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', host.netns]
    inner = ["ip", "netns", "exec", host.netns, *own_name, *cgroups.remount(argv)]
    return cgroups.wrap(inner, host.cgroups if cgroup else ())


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any status means a server is there
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError):
        return False


def list_sims() -> list[dict[str, Any]]:
    """A :func:`describe` report for every recorded sim."""
    return [describe(st) for st in state.all_states()]


def down(name: str) -> None:
    """Take down sim ``name`` (from any process)."""
    SimCluster.attach(name).down()


def down_all() -> list[str]:
    """Take down every recorded sim; returns their names."""
    names = [st.name for st in state.all_states()]
    for name in names:
        down(name)
    return names
