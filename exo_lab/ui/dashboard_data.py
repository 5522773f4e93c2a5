"""What the dashboard shows, as plain columns and data frames: pure functions of topologies and instances.

:mod:`exo_lab.ui.dashboard` puts these into bokeh sources and Panel tables; tests read them directly.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from exo_lab.cluster.topology import Topology
from exo_lab.ui import instance_monitor as im
from exo_lab.ui.topology_widget import format_bandwidth, format_rtt, graph_edges

GIB = 1024**3
ACCENT = "#1976d2"
OK, WARN, CRIT = "#2e9d4f", "#e58a00", "#d32f2f"
FG, FG2, FG3, BORDER, BG2 = "#1f2328", "#59636e", "#8b949e", "#d8dee4", "#f6f8fa"
SERIES = ("#1e88e5", "#d81b60", "#43a047", "#f4511e", "#8e24aa", "#00897b", "#6d4c41", "#3949ab")


def gib(n: float) -> str:
    v = (n or 0) / GIB
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


X_EXTENT, Y_SQUASH = 0.9, 0.72  # an ellipse: room for labels beside the side nodes and above/below the others


def node_layout(n: int) -> list[tuple[float, float]]:
    """Node centres on an ellipse in [-1, 1]², the first at the top (an even count turned so none sits on a side)."""
    if n == 1:
        return [(0.0, 0.0)]
    start = math.pi / 2 - (math.pi / n if n % 2 == 0 else 0.0)
    angles = [start - 2 * math.pi * i / n for i in range(n)]
    x_scale = X_EXTENT / max(abs(math.cos(a)) for a in angles)  # the outermost nodes at +-X_EXTENT
    return [(round(x_scale * math.cos(a), 6), round(Y_SQUASH * math.sin(a), 6)) for a in angles]


LABEL_W, LABEL_H = 0.56, 0.15  # an edge label's size in data units at the graph's usual size (~650 x 440 px)


def _edge_label_spots(ends: list[tuple[tuple[float, float], tuple[float, float]]],
                      nodes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Where each edge's label goes: its midpoint, slid along the edge when it would cover another label or a node
    (or, when every spot does, the spot that covers least)."""
    placed: list[tuple[float, float]] = []

    def overlap(x: float, y: float) -> float:
        area = sum(max(0.0, LABEL_W - abs(x - px)) * max(0.0, LABEL_H - abs(y - py)) for px, py in placed)
        return area + sum(max(0.0, 0.5 - abs(x - nx)) * max(0.0, 0.22 - abs(y - ny)) for nx, ny in nodes)

    for (x0, y0), (x1, y1) in ends:
        spots = [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t) for t in (0.5, 0.38, 0.62, 0.3, 0.7, 0.24, 0.76)]
        placed.append(min(spots, key=lambda p: (round(overlap(*p), 6), spots.index(p))))
    return placed


def instance_shards(instances: list[tuple[str, Any]]) -> dict[str, list[str]]:
    """``{node id: ["demo · layers 0-1", ...]}``: what each node runs for the running instances."""
    out: dict[str, list[str]] = {}
    for name, inst in instances:
        plan = getattr(inst, "plan", None)
        if plan is None or getattr(inst, "state", "") in ("stopped", "failed"):
            continue
        for r in plan.ranks:
            start, end = r.layers
            where = f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"
            label = f"{name} · {where}" + (f" x{r.tensor_size}" if r.tensor_size > 1 else "")
            if label not in out.setdefault(r.node_id, []):
                out[r.node_id].append(label)
    return out


def graph_data(topo: Topology, shards: dict[str, list[str]] | None = None) -> dict[str, dict[str, list]]:
    """Columns for the graph's bokeh sources: ``nodes`` (one row per node), ``edges`` (one per connected pair)."""
    shards = shards or {}
    nodes = list(topo.nodes.values())
    pos = node_layout(len(nodes)) if nodes else []
    max_mem = max([n.memory_total_bytes for n in nodes] + [1])
    cols: dict[str, list] = {k: [] for k in (
        "id", "name", "x", "y", "size", "state", "chip", "mem", "free", "mem_text", "used_frac", "ring_color",
        "fill", "line", "gflops", "bandwidth", "addresses", "shard", "r_in", "r_out", "arc_start", "arc_end",
        "name_dy", "chip_dy", "free_dy", "shard_dy")}
    for node, (x, y) in zip(nodes, pos):
        p = node.profile or {}
        total, avail = node.memory_total_bytes, node.memory_available_bytes
        frac = min(1.0, max(0.0, (total - avail) / total)) if total else 0.0
        size = 50 + 42 * math.sqrt(total / max_mem) if total else 50
        gone = node.state != "alive"
        shard = " / ".join(shards.get(node.id, []))
        gf = (p.get("matmul_gflops") or {})
        gflops = gf.get("float32_m512") or gf.get("bfloat16_m512") or 0
        cols["id"].append(node.id)
        cols["name"].append(node.name + (" (gone)" if gone else ""))
        cols["x"].append(x)
        cols["y"].append(y)
        cols["size"].append(round(size, 1))
        cols["state"].append(node.state)
        cols["chip"].append(p.get("cpu_model") or p.get("gpu_name") or "unknown chip")
        cols["mem"].append(f"{gib(total)} GiB")
        cols["free"].append("not reachable" if gone else f"{gib(avail)} / {gib(total)} GiB free")
        cols["mem_text"].append(f"{gib(total - avail)} GiB used of {gib(total)} GiB ({100 * frac:.0f}%)")
        cols["used_frac"].append(frac)
        cols["ring_color"].append(CRIT if frac >= 0.9 else WARN if frac >= 0.7 else OK)
        cols["fill"].append("#eef0f2" if gone else "#e3eefa" if not shard else "#d6e6f9")
        cols["line"].append(FG3 if gone else ACCENT)
        cols["gflops"].append(f"{gflops:,.0f}" if gflops else "–")
        cols["bandwidth"].append(f"{p.get('memory_bandwidth_gb_per_s') or 0:,.1f} GB/s")
        cols["addresses"].append(", ".join(node.addresses))
        cols["shard"].append(shard)
        r = size / 2 + 6  # outside the memory ring
        cols["r_in"].append(size / 2 + 2)
        cols["r_out"].append(r)
        cols["arc_start"].append(math.pi / 2)  # from the top, clockwise, by the fraction in use
        cols["arc_end"].append(math.pi / 2 - 2 * math.pi * max(frac, 0.002))
        # label lines (screen pixels from the centre, to the middle of each line): below the node, or above it
        # for nodes in the upper half, so that labels stay clear of the links in the middle
        lines = [("name_dy", 13), ("chip_dy", 15), ("free_dy", 15), ("shard_dy", 17)]
        if y > 1e-6 and len(nodes) > 1:
            offset = -(r + 8)
            for col, step in reversed(lines if shard else lines[:3]):
                cols[col].append(offset)
                offset -= step
            if not shard:
                cols["shard_dy"].append(offset)
        else:
            offset = r + 12
            for col, step in lines:
                cols[col].append(offset)
                offset += step
    where = {n.id: (x, y) for n, (x, y) in zip(nodes, pos)}
    edges: dict[str, list] = {k: [] for k in ("source", "target", "xs", "ys", "mx", "my", "label", "width", "color",
                                              "dash", "rtt", "bandwidth")}
    graph = graph_edges(topo)
    spots = _edge_label_spots([(where[e["source"]], where[e["target"]]) for e in graph], pos)
    for e, (mx, my) in zip(graph, spots):
        (x0, y0), (x1, y1) = where[e["source"]], where[e["target"]]
        edges["source"].append(e["source"])
        edges["target"].append(e["target"])
        edges["xs"].append([x0, x1])
        edges["ys"].append([y0, y1])
        edges["mx"].append(mx)
        edges["my"].append(my)
        edges["label"].append(e["label"])
        edges["width"].append(e["width"])
        edges["color"].append(CRIT if not e["ok"] else "#9aa4ae" if e["gone"] else "#8c98a4")
        edges["dash"].append("dashed" if (not e["ok"] or e["gone"]) else "solid")
        edges["rtt"].append(format_rtt(e.get("rtt_ms")) if e["ok"] else "–")
        edges["bandwidth"].append(format_bandwidth(e.get("bandwidth_mbit_per_s") or 0) if e["ok"] else "–")
    return {"nodes": cols, "edges": edges}


def node_frame(topo: Topology) -> pd.DataFrame:
    """The node table: one row per node, numbers rounded for reading."""
    rows = []
    for n in sorted(topo.nodes.values(), key=lambda n: n.name):
        p = n.profile or {}
        gf = p.get("matmul_gflops") or {}
        rows.append({
            "node": n.name, "state": n.state, "chip": p.get("cpu_model") or "?", "cores": p.get("cpu_count") or 0,
            "memory free (GiB)": round(n.memory_available_bytes / GIB, 1),
            "memory (GiB)": round(n.memory_total_bytes / GIB, 1),
            "fp32 GFLOP/s": round(gf.get("float32_m512") or 0, 1),
            "memory GB/s": round(p.get("memory_bandwidth_gb_per_s") or 0, 1),
            "BLAS": p.get("blas") or "", "address": ", ".join(n.addresses),
        })
    return _frame(rows, {"node": str, "state": str, "chip": str, "cores": int, "memory free (GiB)": float,
                         "memory (GiB)": float, "fp32 GFLOP/s": float, "memory GB/s": float, "BLAS": str,
                         "address": str})


def instance_frame(instances: list[tuple[str, Any]]) -> pd.DataFrame:
    """Running instances (and models served in this process): state, shards loaded, tokens/s."""
    rows = []
    for name, inst in instances:
        summary = im.instance_summary(inst)
        progress = im.loading_progress(inst)
        stats = im.request_stats(im.request_rows(inst), getattr(inst, "requests_completed", None))
        plan = summary["plan"]
        rows.append({
            "name": name, "state": summary["state"],
            "plan": plan["description"] if plan else "one process (this machine)",
            "loaded": f"{progress['done']}/{progress['total']} layers" if progress["ranks"] else "ready",
            "requests": stats["requests"],
            "decode tok/s": _round(stats["last_decode_tps"]), "mean tok/s": _round(stats["mean_decode_tps"]),
            "predicted tok/s": _round(plan["decode_tps"] if plan else None),
            "TTFT (ms)": _round(stats["last_ttft_s"] * 1000 if stats["last_ttft_s"] is not None else None),
        })
    return _frame(rows, {"name": str, "state": str, "plan": str, "loaded": str, "requests": int,
                         "decode tok/s": float, "mean tok/s": float, "predicted tok/s": float, "TTFT (ms)": float})


def _round(v: float | None, digits: int = 1) -> float:
    return math.nan if v is None else round(float(v), digits)


def _frame(rows: list[dict[str, Any]], columns: dict[str, type]) -> pd.DataFrame:
    """A frame with these columns and dtypes even when empty (the tables format columns by dtype)."""
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype({k: ("float64" if t is float else "int64" if t is int else "object") for k, t in columns.items()})


def tps_series(instances: list[tuple[str, Any]]) -> dict[str, dict[str, list]]:
    """Decode tokens/s per finished request, over time: ``lines`` (one per instance) and ``points``."""
    lines: dict[str, list] = {"xs": [], "ys": [], "color": [], "name": []}
    points: dict[str, list] = {"t": [], "tps": [], "color": [], "name": [], "tokens": [], "ttft": []}
    for i, (name, inst) in enumerate(instances):
        rows = [r for r in im.request_rows(inst) if r["completion_tokens"] > 1 and r["generation_tps"] > 0]
        if not rows:
            continue
        color = SERIES[i % len(SERIES)]
        xs = [r["t"] * 1000 for r in rows]  # bokeh datetimes are ms since the epoch
        lines["xs"].append(xs)
        lines["ys"].append([r["generation_tps"] for r in rows])
        lines["color"].append(color)
        lines["name"].append(name)
        for x, r in zip(xs, rows):
            points["t"].append(x)
            points["tps"].append(r["generation_tps"])
            points["color"].append(color)
            points["name"].append(name)
            points["tokens"].append(r["completion_tokens"])
            points["ttft"].append(f"{r['ttft_s'] * 1000:.0f} ms")
    return {"lines": lines, "points": points}


def plans_frame(plans: Any) -> pd.DataFrame:
    """Ranked plans as a table."""
    rows = []
    for i, p in enumerate(plans.plans):
        mem = max((p.memory_bytes.get(n, 0) / p.memory_capacity_bytes[n] for n in p.nodes
                   if p.memory_capacity_bytes.get(n)), default=0.0)
        rows.append({"#": i, "plan": p.describe(), "nodes": p.num_nodes, "decode tok/s": round(p.decode_tps, 1),
                     "TTFT (ms)": round(p.ttft_s * 1000, 1), "prefill tok/s": round(p.prefill_tps, 1),
                     "peak memory": f"{100 * mem:.0f}%", "bottleneck": p.bottleneck})
    return _frame(rows, {"#": int, "plan": str, "nodes": int, "decode tok/s": float, "TTFT (ms)": float,
                         "prefill tok/s": float, "peak memory": str, "bottleneck": str})


_MEASURED_KEYS = {"decode_tps": ("decode_tps", "generation_tps", "tg_tps", "tg"),
                  "ttft_s": ("ttft_s", "ttft"), "prefill_tps": ("prefill_tps", "prompt_tps", "pp_tps", "pp")}


def _pick(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):  # {"mean": ..., "std": ...} style summaries
            for inner in ("mean", "median", "value"):
                if isinstance(v.get(inner), (int, float)):
                    return float(v[inner])
    return None


def bench_rows(doc: Any) -> list[dict[str, Any]]:
    """Predicted and measured numbers per plan from a bench JSON document (as ``exo-lab bench --json`` writes).

    Reads the result list (``results``, ``runs`` or ``plans``, or the document itself when it is a list); for
    each, the label from ``plan.description`` / ``description`` / ``plan`` / ``name``, measured values from
    ``measured`` (or the record itself) and predictions from ``predicted`` (or the plan's fields). Records
    with nothing measured are skipped. Raises ValueError when nothing can be read.
    """
    if isinstance(doc, dict):
        records = next((doc[k] for k in ("results", "runs", "plans") if isinstance(doc.get(k), list)), None)
    else:
        records = doc if isinstance(doc, list) else None
    if records is None:
        raise ValueError("not a bench result: expected a list of results (or a document with 'results')")
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        plan = rec.get("plan") if isinstance(rec.get("plan"), dict) else {}
        label = (plan.get("description") or rec.get("description") or
                 (rec.get("plan") if isinstance(rec.get("plan"), str) else None) or rec.get("name") or f"plan {i}")
        measured = rec.get("measured") if isinstance(rec.get("measured"), dict) else rec
        predicted = rec.get("predicted") if isinstance(rec.get("predicted"), dict) else plan
        row = {"label": str(label)}
        for key, names in _MEASURED_KEYS.items():
            row[f"measured_{key}"] = _pick(measured, names)
            row[f"predicted_{key}"] = _pick(predicted, names) if predicted else None
            if row[f"predicted_{key}"] is None:
                row[f"predicted_{key}"] = _pick(rec, tuple(f"predicted_{n}" for n in names))
        if row["measured_decode_tps"] is None and row["measured_ttft_s"] is None:
            continue
        rows.append(row)
    if not rows:
        raise ValueError("the bench result holds no measured decode tokens/s or TTFT")
    return rows
