"""Topology: the nodes of a cluster, their profiles, and the measured links.

The JSON form below is what a live cluster reports and what a *what-if*
cluster spec is written in (see ``exo_lab/sim/specs/*.json``)::

    {
      "version": 1,
      "nodes": [
        {"id": "a1b2c3", "name": "studio-1",
         "addresses": ["192.168.1.10"], "port": 52416, "probe_port": 52417,
         "state": "alive",                        # or "gone"
         "profile": {                             # DeviceProfile fields; a spec may give a subset
            "memory_total_bytes": 549755813888, "memory_available_bytes": 515396075520,
            "cpu_model": "Apple M3 Ultra", "cpu_count": 32, "mlx_devices": ["cpu", "gpu"],
            "gpu_memory_bytes": 498216206336,
            "matmul_gflops": {"bfloat16_m512": 28000.0, "bfloat16_m1": 700.0, ...},
            "memory_bandwidth_gb_per_s": 800.0, "blas": "accelerate"}}
      ],
      "links": [
        {"src": "a1b2c3", "dst": "d4e5f6",       # node ids; one entry per measured direction/address
         "src_address": "192.168.1.10", "dst_address": "192.168.1.11",
         "rtt_ms_median": 0.08, "rtt_ms_p95": 0.12,
         "send_mbit_per_s": 9400.0,              # src -> dst
         "recv_mbit_per_s": 9350.0,              # dst -> src
         "measured_at": 1790000000.0, "rdma": false, "error": null}
      ]
    }

Units are in the field names. A link missing in one direction is taken to be
symmetric. :meth:`Topology.best_link` picks, for a pair of nodes, the address
pair with the highest bandwidth (ties: lowest latency).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import networkx as nx
import yaml

from exo_lab import defaults
from exo_lab.cluster import display
from exo_lab.cluster.machine import DeviceProfile

TOPOLOGY_VERSION = 1


@dataclass
class LinkProfile:
    """One measured path between two nodes (one address pair)."""

    src: str
    dst: str
    src_address: str | None
    dst_address: str
    rtt_ms_median: float | None = None
    rtt_ms_p95: float | None = None
    send_mbit_per_s: float | None = None
    recv_mbit_per_s: float | None = None
    measured_at: float | None = None
    rdma: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rtt_ms_median is not None

    @property
    def bandwidth_mbit_per_s(self) -> float:
        """The slower direction's throughput (0 when unmeasured)."""
        vals = [v for v in (self.send_mbit_per_s, self.recv_mbit_per_s) if v]
        return min(vals) if vals else 0.0

    def reversed(self) -> LinkProfile:
        return LinkProfile(
            self.dst,
            self.src,
            self.dst_address,
            self.src_address or "",
            self.rtt_ms_median,
            self.rtt_ms_p95,
            self.recv_mbit_per_s,
            self.send_mbit_per_s,
            self.measured_at,
            self.rdma,
            self.error,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinkProfile:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class NodeInfo:
    """A node agent as the cluster sees it."""

    id: str
    name: str
    addresses: list[str]
    port: int = defaults.AGENT_PORT
    probe_port: int | None = None
    state: str = "alive"
    profile: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    models: list[str] = field(default_factory=list)  # models in this node's store

    @property
    def url(self) -> str:
        return f"http://{self.addresses[0]}:{self.port}" if self.addresses else ""

    @property
    def memory_total_bytes(self) -> int:
        return int(self.profile.get("memory_total_bytes") or 0)

    @property
    def memory_available_bytes(self) -> int:
        return int(self.profile.get("memory_available_bytes") or self.memory_total_bytes)

    @property
    def device(self):
        """The profile as a :class:`~exo_lab.cluster.profile.DeviceProfile`."""
        return DeviceProfile.from_json(self.profile)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeInfo:
        names = set(cls.__dataclass_fields__)
        d = {k: v for k, v in data.items() if k in names}
        d.setdefault("name", d.get("id", "?"))
        d.setdefault("addresses", [])
        return cls(**d)


def best_of(paths: list[LinkProfile]) -> LinkProfile | None:
    """The fastest working one of ``paths`` (between the same two nodes): highest bandwidth, then lowest latency."""
    ok = [link for link in paths if link.ok]
    if not ok:
        return None
    return max(ok, key=lambda link: (round(link.bandwidth_mbit_per_s, -1), -(link.rtt_ms_median or 0)))


@dataclass
class Topology:
    """Nodes by id and every measured link."""

    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    links: list[LinkProfile] = field(default_factory=list)
    # not a field (so no annotation): the Cluster that produced this topology (set by Cluster.refresh),
    # never serialised; the cast types it Any so that refresh may set it
    _source = cast(Any, None)

    def alive(self) -> list[NodeInfo]:
        return [n for n in self.nodes.values() if n.state == "alive"]

    def links_between(self, a: str, b: str) -> list[LinkProfile]:
        """Every measured path from ``a`` to ``b`` (reverse measurements flipped)."""
        out = [link for link in self.links if link.src == a and link.dst == b]
        out += [link.reversed() for link in self.links if link.src == b and link.dst == a]
        return out

    def paths(self) -> dict[tuple[str, str], list[LinkProfile]]:
        """:meth:`links_between` for every pair of nodes at once (one pass over the links)."""
        forward: dict[tuple[str, str], list[LinkProfile]] = {}
        backward: dict[tuple[str, str], list[LinkProfile]] = {}
        for link in self.links:
            forward.setdefault((link.src, link.dst), []).append(link)
            backward.setdefault((link.dst, link.src), []).append(link.reversed())
        return {key: forward.get(key, []) + backward.get(key, []) for key in {*forward, *backward}}

    def best_link(self, a: str, b: str) -> LinkProfile | None:
        """The fastest working path from ``a`` to ``b``: highest bandwidth, then lowest latency."""
        return best_of(self.links_between(a, b))

    def to_networkx(self):
        """An undirected ``networkx.Graph``: node attrs from NodeInfo, edge attrs from the best link."""
        g = nx.Graph()
        for n in self.nodes.values():
            g.add_node(
                n.id, name=n.name, state=n.state, memory_total_bytes=n.memory_total_bytes, addresses=list(n.addresses)
            )
        ids = sorted(self.nodes)
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                link = self.best_link(a, b)
                if link is not None:
                    g.add_edge(
                        a,
                        b,
                        rtt_ms=link.rtt_ms_median,
                        bandwidth_mbit_per_s=link.bandwidth_mbit_per_s,
                        src_address=link.src_address,
                        dst_address=link.dst_address,
                    )
        return g

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TOPOLOGY_VERSION,
            "nodes": [n.to_json() for n in self.nodes.values()],
            "links": [link.to_json() for link in self.links],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        if data.get("version", TOPOLOGY_VERSION) != TOPOLOGY_VERSION:
            raise ValueError(f"topology version {data.get('version')} is not supported (expected {TOPOLOGY_VERSION})")
        nodes = [NodeInfo.from_json(n) for n in data.get("nodes", [])]
        ids = [n.id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError("topology has duplicate node ids")
        links = [LinkProfile.from_json(link) for link in data.get("links", [])]
        for link in links:
            if link.src not in ids or link.dst not in ids:
                raise ValueError(f"link {link.src}->{link.dst} names a node that is not in the topology")
        return cls({n.id: n for n in nodes}, links)

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        """Read a topology or what-if spec (JSON, or YAML by extension)."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            return cls.from_json(yaml.safe_load(text))
        return cls.from_json(json.loads(text))

    def _repr_html_(self) -> str:
        return display.topology_html(self)
