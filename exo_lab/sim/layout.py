"""Where everything of a simulated cluster goes: namespaces, interfaces, addresses.

Pure: (spec, sim index) -> names and addresses; nothing is created here.

- Namespaces: ``exolab-<sim>-<host>`` per host, ``exolab-<sim>-lan`` for the
  LAN's bridge.
- LAN: ``10.213.<index>.0/24``; host number ``i`` (spec order) is
  ``10.213.<index>.<i+1>`` on its ``eth0``; the bridge ``br0`` and its ports
  ``p<i>`` live in the LAN namespace.
- Cable number ``j`` (spec order) is ``10.214.<index>.<4j>/30``: its ``a`` end
  is ``.4j+1``, its ``b`` end ``.4j+2``, each on a TAP named ``l<j>-<peer>``
  (cut to 15 characters) in that host's namespace.
- The root namespace (this machine) is ``10.213.<index>.254/24`` on
  ``exolab-lan<index>``, a veth whose other end is the bridge port ``root``.
  It reaches the LAN by that address and every cable address on-link
  (``10.214.<index>.0/24`` on the same device: the host that holds the
  address answers). A sim without a LAN still gets the bridge, for the root
  alone: each host's ``root0`` is an isolated port with no address and one
  route, back to the root, so the hosts never meet over it and their agents
  see no new address.

``index`` (0-255) is chosen per running sim so that two sims never share a
subnet or a root device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exo_lab import defaults
from exo_lab.sim.netns import IFNAMSIZ
from exo_lab.sim.spec import SimSpec

LAN_OCTETS = (10, 213)
LINK_OCTETS = (10, 214)
LAN_IFNAME = "eth0"
BRIDGE = "br0"
ROOT_HOST_NUMBER = 254  # the root namespace's address on a sim's LAN ends in .254 (hosts use .1-.200)
ROOT_IFNAME_PREFIX = "exolab-lan"  # + index: the root namespace's end of its link into sim <index>
ROOT_PORT = "root"  # the other end: a port of the bridge, in the LAN namespace
HOST_ROOT_IFNAME = "root0"  # a host's port to the root in a sim without a LAN (no address)
MAX_INDEX = 255
NS_PREFIX = "exolab-"


def netns_name(sim: str, host: str) -> str:
    """``exolab-<sim>-<host>``; ``host`` may be ``lan`` for the bridge's namespace."""
    return f"{NS_PREFIX}{sim}-{host}"


def cgroup_name(sim: str, host: str) -> str:
    return f"{NS_PREFIX}{sim}-{host}"


def link_ifname(index: int, peer: str) -> str:
    return f"l{index}-{peer}"[:IFNAMSIZ]


def root_ifname(index: int) -> str:
    """The root namespace's device into sim number ``index``: ``exolab-lan<index>``."""
    return f"{ROOT_IFNAME_PREFIX}{index}"


@dataclass(frozen=True)
class HostLink:
    """One cable as seen from one of its hosts."""

    index: int
    peer: str
    ifname: str
    addr: str
    peer_addr: str
    rate: int | None = None
    delay: float = 0.0
    loss: float = 0.0
    prefixlen: int = 30

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostLink:
        return cls(**data)


@dataclass(frozen=True)
class SimHost:
    """A simulated host: its namespace, addresses and node URLs.

    ``url`` is the node's address inside the sim (what other hosts use, and
    the root namespace when it joins the sim: see :mod:`exo_lab.sim.layout`);
    ``local_url`` reaches the same node from the root namespace through a
    loopback port relay (it works also when the root has no link of its own).
    """

    name: str
    netns: str
    lan_addr: str | None
    links: tuple[HostLink, ...] = ()
    port: int = defaults.AGENT_PORT
    state_dir: str = ""
    local_url: str | None = None
    cgroups: tuple[str, ...] = field(default=())

    @property
    def addresses(self) -> list[str]:
        """Every address of this host, LAN first."""
        return ([self.lan_addr] if self.lan_addr else []) + [link.addr for link in self.links]

    @property
    def url(self) -> str:
        """``http://<lan-addr>:<port>`` (or the first cable's address when there is no LAN)."""
        addrs = self.addresses
        return f"http://{addrs[0]}:{self.port}" if addrs else f"http://127.0.0.1:{self.port}"

    def link_to(self, peer: str) -> HostLink:
        """The first cable to ``peer``."""
        for link in self.links:
            if link.peer == peer:
                return link
        raise KeyError(f"host {self.name!r} has no cable to {peer!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "netns": self.netns,
            "lan_addr": self.lan_addr,
            "links": [link.to_json() for link in self.links],
            "port": self.port,
            "url": self.url,
            "local_url": self.local_url,
            "state_dir": self.state_dir,
            "cgroups": list(self.cgroups),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimHost:
        data = {k: v for k, v in data.items() if k != "url"}
        data["links"] = tuple(HostLink.from_json(link) for link in data.get("links", ()))
        data["cgroups"] = tuple(data.get("cgroups", ()))
        return cls(**data)

    def with_(self, **changes: Any) -> SimHost:
        return replace(self, **changes)


@dataclass(frozen=True)
class Layout:
    """Names and addresses for one sim.

    ``lan_netns`` holds the bridge: the spec's LAN, or (``root_addr`` set,
    no LAN in the spec) a bridge for the root's link alone. ``root_addr`` and
    ``root_ifname``: the root namespace's address and device, None when the
    root does not join.
    """

    index: int
    lan_netns: str | None
    hosts: dict[str, SimHost]
    root_addr: str | None = None
    root_ifname: str | None = None

    @property
    def lan_subnet(self) -> str:
        return f"{LAN_OCTETS[0]}.{LAN_OCTETS[1]}.{self.index}.0/24"

    @property
    def link_subnet(self) -> str:
        """Every cable address of this sim."""
        return f"{LINK_OCTETS[0]}.{LINK_OCTETS[1]}.{self.index}.0/24"


def lan_addr(index: int, host_number: int) -> str:
    return f"{LAN_OCTETS[0]}.{LAN_OCTETS[1]}.{index}.{host_number + 1}"


def root_addr(index: int) -> str:
    return f"{LAN_OCTETS[0]}.{LAN_OCTETS[1]}.{index}.{ROOT_HOST_NUMBER}"


def link_addrs(index: int, link_number: int) -> tuple[str, str]:
    base = 4 * link_number
    return (
        f"{LINK_OCTETS[0]}.{LINK_OCTETS[1]}.{index}.{base + 1}",
        f"{LINK_OCTETS[0]}.{LINK_OCTETS[1]}.{index}.{base + 2}",
    )


def plan(
    spec: SimSpec, index: int, port: int = defaults.AGENT_PORT, base_dir: str | Path = "", root: bool = False
) -> Layout:
    """Every namespace, interface and address of ``spec`` run as sim number ``index``.

    ``root``: the root namespace joins (its address and device are set).
    """
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"sim index {index} is outside 0-{MAX_INDEX}")
    hosts: dict[str, SimHost] = {}
    for i, h in enumerate(spec.hosts):
        links = []
        for j, link in spec.links_of(h.name):
            addr_a, addr_b = link_addrs(index, j)
            mine, theirs, peer = (addr_a, addr_b, link.b) if link.a == h.name else (addr_b, addr_a, link.a)
            links.append(HostLink(j, peer, link_ifname(j, peer), mine, theirs, link.rate, link.delay, link.loss))
        hosts[h.name] = SimHost(
            name=h.name,
            netns=netns_name(spec.name, h.name),
            lan_addr=lan_addr(index, i) if spec.lan is not None else None,
            links=tuple(links),
            port=port,
            state_dir=str(Path(base_dir) / h.name / "state") if base_dir else "",
        )
    lan_ns = netns_name(spec.name, "lan") if spec.lan is not None or root else None
    if root:
        return Layout(index, lan_ns, hosts, root_addr=root_addr(index), root_ifname=root_ifname(index))
    return Layout(index, lan_ns, hosts)


def peers_of(layout: Layout, host: str) -> list[str]:
    """``addr:port`` of every host that ``host`` reaches directly: over the LAN, else over a cable."""
    me = layout.hosts[host]
    out = []
    for other in layout.hosts.values():
        if other.name == host:
            continue
        if me.lan_addr and other.lan_addr:
            out.append(f"{other.lan_addr}:{other.port}")
            continue
        cables = [link for link in me.links if link.peer == other.name]
        if cables:
            out.append(f"{cables[0].peer_addr}:{other.port}")
    return out
