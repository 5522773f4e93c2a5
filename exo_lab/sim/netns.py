"""Thin wrappers over iproute2 for network namespaces and the devices in them.

Every device is created directly inside the namespace it belongs in (``ip -n
NS ...``), never moved there later. The one device a sim puts in the root
namespace is the root's own end of its LAN link (:func:`add_veth_from_root`);
it is created there, with its peer created directly in the LAN namespace.
Deleting a namespace deletes its devices (veth peers, bridges and TAPs
included) once no process holds it; deleting either end of a veth pair deletes
both.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Self

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
IFNAMSIZ = 15  # longest interface name the kernel accepts


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its error output."""


def available() -> str | None:
    """None when namespaces can be made here, else why not (for skip messages)."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode != 0:
        return "'ip netns' does not work on this machine"
    return None


def run(args: Sequence[str], ns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NS] ARGS`` and return its stdout; raise NetnsError on failure when ``check``."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and check:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    log.debug("%s", " ".join(cmd))
    return proc.stdout


def tc(args: Sequence[str], ns: str) -> None:
    """Run ``tc -n NS ARGS``."""
    cmd = ["tc", "-n", ns, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    log.debug("%s", " ".join(cmd))


def sysctl(ns: str, values: Mapping[str, str]) -> None:
    """Set per-namespace sysctls (``{"net.ipv4.conf.all.arp_ignore": "0"}``) inside ``ns``, in one process."""
    script = "; ".join(
        f"echo {shlex.quote(v)} > {shlex.quote('/proc/sys/' + k.replace('.', '/'))}" for k, v in values.items()
    )
    proc = subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"setting {', '.join(values)} in {ns} failed: {proc.stderr.strip()}")


def list_netns() -> list[str]:
    """Names of all named network namespaces."""
    out = run(["netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def add(name: str) -> None:
    """Create namespace ``name`` with its loopback up."""
    run(["netns", "add", name])
    run(["link", "set", "lo", "up"], ns=name)


def delete(name: str) -> None:
    """Delete namespace ``name`` if it exists."""
    if exists(name):
        run(["netns", "delete", name], check=False)


def pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    if not exists(name):
        return []
    out = run(["netns", "pids", name], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1-{IFNAMSIZ} characters")
    return name


def add_veth(name: str, ns: str, peer: str, peer_ns: str) -> None:
    """A veth pair with one end ``name`` in ``ns`` and the other ``peer`` in ``peer_ns``."""
    run(
        [
            "link",
            "add",
            "name",
            check_ifname(name),
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            check_ifname(peer),
            "netns",
            peer_ns,
        ]
    )


def add_veth_from_root(name: str, peer: str, peer_ns: str) -> None:
    """A veth pair with ``name`` in the root namespace (ours) and ``peer`` created directly in ``peer_ns``."""
    here = ["link", "add", "name", check_ifname(name), "type", "veth"]
    run([*here, "peer", "name", check_ifname(peer), "netns", peer_ns])


def link_exists(name: str, ns: str | None = None) -> bool:
    """Whether device ``name`` exists in ``ns`` (the root namespace when None)."""
    cmd = ["ip", *(["-n", ns] if ns else []), "link", "show", "dev", name]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def delete_link(name: str, ns: str | None = None) -> None:
    """Delete device ``name`` (with its veth peer) if it exists."""
    if link_exists(name, ns):
        run(["link", "delete", "dev", name], ns=ns, check=False)


def add_bridge(ns: str, name: str) -> None:
    """A bridge that floods multicast like a dumb switch (no IGMP snooping), up."""
    run(["link", "add", check_ifname(name), "type", "bridge", "mcast_snooping", "0", "stp_state", "0"], ns=ns)
    run(["link", "set", name, "up"], ns=ns)


def add_tap(ns: str, name: str) -> None:
    """A persistent TAP device; a forwarder attaches to it later."""
    run(["tuntap", "add", "dev", check_ifname(name), "mode", "tap"], ns=ns)


def set_master(ns: str, dev: str, bridge: str) -> None:
    run(["link", "set", dev, "master", bridge], ns=ns)


def set_isolated(ns: str, dev: str) -> None:
    """Make bridge port ``dev`` isolated: it exchanges frames only with the bridge's ports that are not."""
    run(["link", "set", "dev", dev, "type", "bridge_slave", "isolated", "on"], ns=ns)


def up(ns: str | None, dev: str) -> None:
    run(["link", "set", dev, "up"], ns=ns)


def add_addr(ns: str | None, dev: str, cidr: str) -> None:
    run(["addr", "add", cidr, "dev", dev], ns=ns)


def add_route(ns: str | None, prefix: str, dev: str, src: str | None = None) -> None:
    """A route to ``prefix`` on ``dev`` (on-link: no gateway), from ``src`` when given."""
    run(["route", "add", prefix, "dev", dev, *(["src", src] if src else [])], ns=ns)


def route_prefixes(ns: str | None = None) -> list[str]:
    """Destinations of the IPv4 routes in ``ns``'s main table (``default`` included as is)."""
    out = run(["-4", "route", "show", "table", "main"], ns=ns, check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def set_rate(ns: str, dev: str, rate_bps: int) -> None:
    """Shape ``dev``'s egress to ``rate_bps`` with tbf.

    The bucket holds at least 64 KiB so that TSO/GSO super-frames pass whole
    (tbf would otherwise split them into MTU frames) and ~4 ms of traffic at
    high rates; the queue holds ~50 ms of traffic before tbf drops.
    """
    burst = max(64 * 1024 + 2048, rate_bps // 8 // 250)
    tc(
        [
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{rate_bps}bit",
            "burst",
            str(burst),
            "latency",
            "50ms",
        ],
        ns=ns,
    )


def link_names(ns: str | None = None) -> list[str]:
    """Interface names in ``ns`` (the root namespace when None)."""
    out = run(["-o", "link", "show"], ns=ns, check=False)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def open_ns_fd(name: str) -> int:
    """An fd on namespace ``name`` for :func:`os.setns`."""
    return os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)


class inside:
    """``with inside("ns"):`` runs this thread in namespace ``ns``, then returns it home.

    Sockets and TAP fds opened inside stay in ``ns`` after the block. Only
    for single-purpose helper processes: other code on this thread would see
    the wrong namespace meanwhile.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._home = -1

    def __enter__(self) -> Self:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fd = open_ns_fd(self.name)
        try:
            os.setns(fd, os.CLONE_NEWNET)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.setns(self._home, os.CLONE_NEWNET)
        finally:
            os.close(self._home)
