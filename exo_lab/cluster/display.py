"""Plain renderings of a topology: text tables (terminal) and HTML (notebook)."""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # topology.py renders itself with these functions
    from exo_lab.cluster.topology import Topology


def _gb(n: int | float | None) -> str:
    return f"{(n or 0) / 1e9:.1f}"


def measured_when(profile: dict) -> str:
    """When a profile's memory bandwidth was measured (its best run), UTC, or ``-``."""
    at = profile.get("memory_bandwidth_measured_at") or profile.get("measured_at")
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(at))) if at else "-"


def node_rows(topo: Topology) -> list[list[str]]:
    rows = []
    for n in sorted(topo.nodes.values(), key=lambda n: n.name):
        p = n.profile
        gf = p.get("matmul_gflops") or {}
        rows.append(
            [
                n.name,
                n.id,
                n.state,
                ", ".join(n.addresses),
                f"{_gb(n.memory_available_bytes)} / {_gb(n.memory_total_bytes)}",
                str(p.get("cpu_model", "?")),
                str(p.get("cpu_count", "?")),
                str(p.get("blas", "?")),
                f"{gf.get('float32_m512', 0):.0f}",
                f"{p.get('memory_bandwidth_gb_per_s', 0) or 0:.1f}",
                measured_when(p),
            ]
        )
    return rows


NODE_HEADER = [
    "name",
    "id",
    "state",
    "addresses",
    "mem free/total GB",
    "cpu",
    "cores",
    "blas",
    "fp32 GFLOP/s",
    "mem GB/s",
    "GB/s measured",
]


def link_rows(topo: Topology) -> list[list[str]]:
    names = {n.id: n.name for n in topo.nodes.values()}
    rows = []
    for link in sorted(topo.links, key=lambda link: (names.get(link.src, ""), names.get(link.dst, ""))):
        if link.error:
            rows.append(
                [
                    names.get(link.src, link.src),
                    names.get(link.dst, link.dst),
                    link.dst_address,
                    "-",
                    "-",
                    "-",
                    "-",
                    link.error[:40],
                ]
            )
            continue
        rows.append(
            [
                names.get(link.src, link.src),
                names.get(link.dst, link.dst),
                link.dst_address,
                f"{link.rtt_ms_median:.3f}",
                f"{link.rtt_ms_p95:.3f}",
                f"{link.send_mbit_per_s or 0:.0f}",
                f"{link.recv_mbit_per_s or 0:.0f}",
                "",
            ]
        )
    return rows


LINK_HEADER = ["from", "to", "address", "rtt ms (median)", "rtt ms (p95)", "send Mbit/s", "recv Mbit/s", "error"]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def nodes_text(topo: Topology) -> str:
    return f"Cluster of {len(topo.alive())} live node(s)\n" + text_table(NODE_HEADER, node_rows(topo))


def nodes_html(topo: Topology) -> str:
    return f"<b>exo_lab cluster</b>: {len(topo.alive())} live node(s)" + html_table(NODE_HEADER, node_rows(topo))


def topology_text(topo: Topology) -> str:
    return nodes_text(topo) + "\n\nLinks\n" + text_table(LINK_HEADER, link_rows(topo))


def topology_html(topo: Topology) -> str:
    return nodes_html(topo) + "<br><b>Links</b>" + html_table(LINK_HEADER, link_rows(topo))
