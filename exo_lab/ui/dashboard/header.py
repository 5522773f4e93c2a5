"""The dashboard's header bar: what it shows (a cluster, a what-if spec, this machine), nodes, models, the API."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from exo_lab.cluster.topology import Topology
from exo_lab.ui.dashboard.instance_rows import InstanceRow
from exo_lab.ui.dashboard.theme import gib

HEADER_CSS = """
:host { width: 100%; }
.exo-page-header { display: flex; align-items: center; gap: 18px; flex-wrap: wrap; padding: 14px 22px;
  background: #10243e; color: #fff; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
.exo-logo { font-size: 20px; font-weight: 700; letter-spacing: -0.01em; }
.exo-logo span { color: #64b5f6; }
.exo-mode { font-size: 13px; color: #b6c6da; }
.exo-chips { display: flex; gap: 8px; flex-wrap: wrap; margin-left: auto; }
.exo-chip { font-size: 12px; padding: 3px 10px; border-radius: 12px; background: rgba(255,255,255,0.1);
  color: #e3ecf6; white-space: nowrap; }
.exo-chip b { color: #fff; }
.exo-chip.err { background: rgba(239,83,80,0.25); }
.exo-chip a { color: #90caf9; text-decoration: none; }
"""

MODES = {"cluster": "cluster dashboard", "what-if": "what-if cluster", "this machine": "this machine"}


def header_html(source: Any, topo: Topology | None, instances: Sequence[InstanceRow]) -> str:
    """The bar's HTML: the logo, the mode, and chips for nodes, models, the API URL and the last refresh error."""
    chips = []
    if topo is not None:
        alive = len(topo.alive())
        mem = sum(n.memory_total_bytes for n in topo.alive())
        chips.append(f"<b>{alive}</b> node{'s' if alive != 1 else ''} · {gib(mem)} GiB")
    ready = sum(1 for r in instances if r.state == "ready")
    chips.append(f"<b>{len(instances)}</b> model{'s' if len(instances) != 1 else ''} · {ready} ready")
    if source.api_url:
        chips.append(
            f"API <a href='{html.escape(source.api_url)}/v1/models' target='_blank'>"
            f"{html.escape(source.api_url)}/v1</a>"
        )
    err = f"<span class='exo-chip err'>{html.escape(source.error)}</span>" if source.error else ""
    return (
        f"<div class='exo-page-header'><div class='exo-logo'>exo<span>_</span>lab</div>"
        f"<div class='exo-mode'>{html.escape(MODES[source.mode])}</div><div class='exo-chips'>{err}"
        + "".join(f"<span class='exo-chip'>{c}</span>" for c in chips)
        + "</div></div>"
    )
