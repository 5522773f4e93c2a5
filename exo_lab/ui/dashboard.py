"""The exo_lab dashboard: a Panel app for a cluster, its instances and the models served in this process.

``exo-lab dashboard`` and ``exo-lab up`` serve it (loopback only unless told otherwise); ``panel serve
exo_lab/ui/dashboard.py`` works too (configured by ``EXO_LAB_DASHBOARD_CONNECT`` and
``EXO_LAB_DASHBOARD_BENCH``). Contents: the topology graph (bokeh), the node table, placement previews for a
chosen model, running instances with their tokens/s, a chat box that streams from a served model or a running
instance, and bench results as charts.

A :class:`DashboardSource` holds what every browser session shows and refreshes it on a thread of its own;
each session (:class:`Dashboard`) copies what changed into its bokeh models once a second, on its own loop.
"""

from __future__ import annotations

import asyncio
import html
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure

from exo_lab.cluster.topology import NodeInfo, Topology
from exo_lab.placement.plan import Plans
from exo_lab.ui import instance_monitor as im
from exo_lab.ui.dashboard_data import (ACCENT, BG2, BORDER, CRIT, FG, FG2, FG3, OK, gib, bench_rows, graph_data,
                                       instance_frame, instance_shards, node_frame, plans_frame, tps_series)


log = logging.getLogger(__name__)

DEFAULT_PORT = 52418  # 52415 API, 52416 node agent, 52417 its link probes
TICK_MS = 1000


def bench_available() -> bool:
    """Whether the bench runner (``exo_lab.bench``) is installed; bench JSON files load without it."""
    return importlib.util.find_spec("exo_lab.bench") is not None


def bench_module_charts(doc: Any) -> list[Any] | None:
    """The bench runner's own charts for one of its documents; None for other documents or without the runner."""
    if not (isinstance(doc, dict) and str(doc.get("schema", "")).startswith("exo_lab.bench/") and bench_available()):
        return None
    try:
        from exo_lab.bench import BenchResult
        from exo_lab.bench.plot import concurrency_lines, decode_bars, measured_vs_predicted

        result = BenchResult.from_json(doc)
        if not result.ok:
            return None
        figs = [decode_bars(result), measured_vs_predicted(result), concurrency_lines(result)]
    except Exception as exc:  # noqa: BLE001  (another version's document or charts: the generic charts still work)
        log.info("bench charts from exo_lab.bench failed (%s); drawing the generic ones", exc)
        return None
    return [pn.Row(pn.pane.Bokeh(figs[0]), pn.pane.Bokeh(figs[1]), margin=0), pn.pane.Bokeh(figs[2])]


# ----------------------------------------------------------------------------- shared state


def _machine_topology() -> Topology:
    """This machine as a one-node topology, measured in a child process (MLX stays out of this one)."""
    code = ("import json, exo_lab\nfrom exo_lab.placement.preview import this_machine\n"
            "print(json.dumps(this_machine().to_json()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"profiling this machine failed: {out.stderr.strip()[-500:]}")
    return Topology.from_json(json.loads(out.stdout.strip().splitlines()[-1]))


class DashboardSource:
    """What every dashboard session shows: a cluster (or a fixed topology, or this machine), models, bench results.

    ``cluster``: an :class:`exo_lab.Cluster` (refreshed every ``refresh_s`` seconds; its instances are listed
    and its plans can be launched). ``topology``: a fixed topology instead (a what-if spec). Neither: this
    machine, profiled in the background. ``registry``: the models served in this process (an API server's
    :class:`~exo_lab.api.registry.ModelRegistry`); they can be chatted with. ``api_url``: shown in the header.
    ``bench``: a bench JSON document (or a path to one).
    """

    def __init__(self, cluster: Any = None, topology: Topology | None = None, registry: Any = None,
                 api_url: str | None = None, bench: Any = None, refresh_s: float = 2.0) -> None:
        self.cluster = cluster
        self.registry = registry
        self.api_url = api_url
        self.refresh_s = refresh_s
        self.mode = "cluster" if cluster is not None else "what-if" if topology is not None else "this machine"
        self._topology = cluster.topology if cluster is not None else topology
        self.version = 1 if self._topology is not None else 0
        self.error = ""
        self.bench: dict[str, Any] | None = None
        self.bench_version = 0
        if bench is not None:
            self.load_bench(bench)
        self.sessions: weakref.WeakSet[Dashboard] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.launches: dict[str, str] = {}  # plan description -> "launching…", "launched as NAME…", "launch failed: …"

    # lifecycle
    def start(self) -> "DashboardSource":
        """Start the background refresh (idempotent)."""
        if self._thread is None and (self.cluster is not None or self.mode == "this machine"):
            self._thread = threading.Thread(target=self._refresh_loop, name="exo-lab-dashboard-refresh", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _set_topology(self, topo: Topology) -> None:
        with self._lock:
            if self._topology is None or topo.to_json() != self._topology.to_json():
                self._topology = topo
                self.version += 1

    def _refresh_loop(self) -> None:
        if self.cluster is None:
            try:
                self._set_topology(_machine_topology())
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                log.warning("%s", exc)
                self.error = str(exc)
                self._set_topology(Topology({"local": NodeInfo("local", socket.gethostname(), ["127.0.0.1"])}))
        while not self._stop.wait(self.refresh_s):
            try:
                if self.cluster is not None:
                    self.cluster.refresh()
                    topo = self.cluster.topology
                else:
                    topo = self._with_live_memory()
            except Exception as exc:  # noqa: BLE001  (shown in the header; the next round retries)
                log.warning("dashboard refresh failed: %s", exc)
                self.error = f"refresh failed: {exc}"
                continue
            self.error = ""
            self._set_topology(topo)

    def _with_live_memory(self) -> Topology:
        from exo_lab.cluster.profile import memory_now

        topo = Topology.from_json(self._topology.to_json())
        total, available = memory_now()
        for node in topo.nodes.values():
            node.profile = {**node.profile, "memory_total_bytes": total, "memory_available_bytes": available}
        return topo

    # reads
    @property
    def topology(self) -> Topology | None:
        """The latest topology (None while this machine is still being profiled)."""
        return self._topology

    def instances(self) -> list[tuple[str, Any]]:
        """``(name, object)`` for each model served here and each instance of the cluster, in that order."""
        out: list[tuple[str, Any]] = []
        if self.registry is not None:
            out += list(self.registry.items())
        if self.cluster is not None:
            seen = {id(b) for _, b in out}
            out += [(inst.name, inst) for inst in list(self.cluster.instances) if id(inst) not in seen]
        return out

    def chat_models(self) -> dict[str, Any]:
        """What the chat box can talk to: served models and ready instances."""
        return {name: obj for name, obj in self.instances() if im.instance_summary(obj)["state"] == "ready"}

    def model_suggestions(self) -> list[str]:
        """Models to preview: those served here, cached ones and the synthetic presets."""
        from exo_lab.models import list_cached
        from exo_lab.models.synthetic import PRESETS

        names: list[str] = []
        for name, obj in self.instances():
            path = getattr(obj, "path", None)
            names.append(str(path) if path is not None else name)
        try:
            names += list_cached()
        except OSError:
            pass
        names += [f"synthetic:{p}" for p in PRESETS]
        return list(dict.fromkeys(names))

    def preview(self, model: str, context: int, prompt_tokens: int, objective: str) -> Any:
        """Ranked plans for ``model`` on the current topology (launchable when there is a cluster)."""
        if self.cluster is not None:
            return self.cluster.preview(model, context=context, prompt_tokens=prompt_tokens, objective=objective)
        from exo_lab.placement.preview import preview

        topo = self.topology
        if topo is None:
            raise RuntimeError("this machine is still being profiled; try again in a moment")
        return preview(topo, model, context, prompt_tokens, 1, objective)

    def launch(self, plan: Any, name: str | None = None) -> threading.Thread:
        """Launch ``plan`` on the cluster in the background; the instance appears in the instances table."""
        if self.cluster is None:
            raise RuntimeError("launching needs a live cluster: start the dashboard with --connect or --local N")
        key = plan.describe()

        def run() -> None:
            self.launches[key] = "launching…"
            try:
                inst = plan.launch(name=name, wait=False)
            except Exception as exc:  # noqa: BLE001  (reported in the page)
                log.warning("launching %s failed: %s", key, exc)
                self.launches[key] = f"launch failed: {exc}"
            else:
                self.launches[key] = f"launched as {inst.name}: see Instances"

        thread = threading.Thread(target=run, name="exo-lab-dashboard-launch", daemon=True)
        thread.start()
        return thread

    def load_bench(self, bench: Any) -> None:
        """Load bench results: a JSON document, its text or bytes, or a path to a file."""
        if isinstance(bench, (str, Path)) and not str(bench).lstrip().startswith(("{", "[")):
            bench = Path(bench).read_text()
        if isinstance(bench, bytes):
            bench = bench.decode()
        if isinstance(bench, str):
            bench = json.loads(bench)
        bench_rows(bench)  # raises ValueError when there is nothing to show
        self.bench = bench
        self.bench_version += 1


# ----------------------------------------------------------------------------- the page

PAGE_CSS = """
body { background: #f3f5f8; margin: 0; }
.bk-root, body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
"""

CARD = {"background": "#ffffff", "border": f"1px solid {BORDER}", "border-radius": "10px", "padding": "6px 16px 14px",
        "box-shadow": "0 1px 2px rgba(31,35,40,0.04)"}

HTML_CSS = f"""
:host {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: {FG}; }}
.exo-card-title {{ font-size: 15px; font-weight: 600; margin: 6px 0 0; display: flex; gap: 10px; align-items: baseline; }}
.exo-card-sub {{ font-size: 12px; font-weight: 400; color: {FG2}; }}
.exo-hint {{ color: {FG3}; font-size: 12px; font-style: italic; }}
.exo-note {{ color: {FG2}; font-size: 12.5px; line-height: 1.45; }}
.exo-note code, .exo-hint code {{ font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11.5px;
  background: {BG2}; border: 1px solid {BORDER}; border-radius: 4px; padding: 0 4px; font-style: normal; }}
.exo-error {{ color: {CRIT}; font-size: 12.5px; background: color-mix(in srgb, {CRIT} 8%, white);
  border: 1px solid color-mix(in srgb, {CRIT} 30%, white); border-radius: 6px; padding: 6px 10px; }}
.exo-ok {{ color: {OK}; }}
"""

HEADER_CSS = f"""
:host {{ width: 100%; }}
.exo-header {{ display: flex; align-items: center; gap: 18px; flex-wrap: wrap; padding: 14px 22px;
  background: #10243e; color: #fff; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }}
.exo-logo {{ font-size: 20px; font-weight: 700; letter-spacing: -0.01em; }}
.exo-logo span {{ color: #64b5f6; }}
.exo-mode {{ font-size: 13px; color: #b6c6da; }}
.exo-chips {{ display: flex; gap: 8px; flex-wrap: wrap; margin-left: auto; }}
.exo-chip {{ font-size: 12px; padding: 3px 10px; border-radius: 12px; background: rgba(255,255,255,0.1);
  color: #e3ecf6; white-space: nowrap; }}
.exo-chip b {{ color: #fff; }}
.exo-chip.err {{ background: rgba(239,83,80,0.25); }}
.exo-chip a {{ color: #90caf9; text-decoration: none; }}
"""

CHAT_CSS = f"""
:host {{ width: 100%; }}
.exo-chat {{ height: 340px; overflow-y: auto; display: flex; flex-direction: column-reverse;
  background: {BG2}; border: 1px solid {BORDER}; border-radius: 8px; padding: 10px 12px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 13px; box-sizing: border-box; }}
.exo-chat-inner {{ display: flex; flex-direction: column; gap: 10px; }}
.exo-chat-empty {{ color: {FG3}; font-style: italic; text-align: center; margin: auto 0; padding: 120px 0; }}
.exo-msg {{ max-width: 82%; display: flex; flex-direction: column; gap: 3px; }}
.exo-msg.user {{ align-self: flex-end; align-items: flex-end; }}
.exo-msg.assistant {{ align-self: flex-start; }}
.exo-who {{ font-size: 11px; color: {FG3}; font-weight: 600; letter-spacing: 0.02em; }}
.exo-bubble {{ padding: 7px 11px; border-radius: 12px; white-space: pre-wrap; word-break: break-word; line-height: 1.45; }}
.exo-msg.user .exo-bubble {{ background: {ACCENT}; color: #fff; border-bottom-right-radius: 4px; }}
.exo-msg.assistant .exo-bubble {{ background: #fff; border: 1px solid {BORDER}; border-bottom-left-radius: 4px; }}
.exo-msg.error .exo-bubble {{ border-color: {CRIT}; color: {CRIT}; }}
.exo-msg.streaming .exo-bubble::after {{ content: "▍"; color: {ACCENT}; animation: exo-blink 1s steps(2) infinite; }}
@keyframes exo-blink {{ 50% {{ opacity: 0; }} }}
.exo-usage {{ font-size: 11px; color: {FG3}; font-variant-numeric: tabular-nums; }}
"""


def _card_title(title: str, sub: str = "") -> str:
    return f"<div class='exo-card-title'>{html.escape(title)}<span class='exo-card-sub'>{html.escape(sub)}</span></div>"


def _html(text: str = "", **kwargs: Any) -> pn.pane.HTML:
    return pn.pane.HTML(text, stylesheets=[HTML_CSS], margin=(0, 0), **kwargs)


def topology_figure() -> tuple[Any, ColumnDataSource, ColumnDataSource]:
    """An empty graph: a bokeh figure with a node source and an edge source (see :func:`graph_data`)."""
    nodes = ColumnDataSource(graph_data(Topology())["nodes"], name="exo-node-source")
    edges = ColumnDataSource(graph_data(Topology())["edges"], name="exo-edge-source")
    fig = figure(name="exo-topology", height=440, sizing_mode="stretch_width", tools="", toolbar_location=None,
                 x_range=Range1d(-1.45, 1.45), y_range=Range1d(-1.55, 1.55), min_border=0, outline_line_color=None,
                 background_fill_color=None, border_fill_color=None)
    fig.axis.visible = False
    fig.grid.visible = False
    fig.multi_line("xs", "ys", source=edges, line_width="width", line_color="color", line_dash="dash",
                   line_alpha=0.85, name="exo-edges")
    fig.text("mx", "my", text="label", source=edges, text_align="center", text_baseline="middle",
             text_font_size="11px", text_color=FG2, background_fill_color="#ffffff", background_fill_alpha=1.0,
             border_line_color=BORDER, padding=3, border_radius=4, name="exo-edge-labels")
    node = fig.scatter("x", "y", source=nodes, size="size", fill_color="fill", line_color="line", line_width=1.5,
                       name="exo-nodes")
    fig.annulus("x", "y", inner_radius="r_in", outer_radius="r_out", inner_radius_units="screen",
                outer_radius_units="screen", source=nodes, fill_color="#e6e9ed", line_color=None,
                name="exo-node-mem-track")
    fig.annular_wedge("x", "y", inner_radius="r_in", outer_radius="r_out", start_angle="arc_start",
                      end_angle="arc_end", direction="clock", inner_radius_units="screen",
                      outer_radius_units="screen", source=nodes, fill_color="ring_color", line_color=None,
                      name="exo-node-mem-used")
    fig.text("x", "y", text="mem", source=nodes, text_align="center", text_baseline="middle", text_font_size="12.5px",
             text_font_style="bold", text_color=FG, name="exo-node-mem")
    for col, dy, size, style, color in (("name", "name_dy", "13px", "bold", FG), ("chip", "chip_dy", "11px", "normal", FG2),
                                        ("free", "free_dy", "11px", "normal", FG2),
                                        ("shard", "shard_dy", "11px", "bold", ACCENT)):
        fig.text("x", "y", text=col, source=nodes, y_offset=dy, text_align="center", text_baseline="middle",
                 text_font_size=size, text_font_style=style, text_color=color, name=f"exo-node-{col}")
    fig.add_tools(HoverTool(renderers=[node], tooltips=[
        ("node", "@name"), ("chip", "@chip"), ("memory", "@mem_text"), ("fp32 GFLOP/s", "@gflops"),
        ("memory bandwidth", "@bandwidth"), ("address", "@addresses"), ("runs", "@shard")]))
    return fig, nodes, edges


def tps_figure() -> tuple[Any, ColumnDataSource, ColumnDataSource]:
    """Decode tokens/s per request over time, one colour per instance."""
    empty = tps_series([])
    lines = ColumnDataSource(empty["lines"], name="exo-tps-lines")
    points = ColumnDataSource(empty["points"], name="exo-tps-points")
    now = time.time() * 1000
    fig = figure(name="exo-tps", height=210, sizing_mode="stretch_width", x_axis_type="datetime", tools="",
                 toolbar_location=None, min_border_left=40, outline_line_color=None, y_range=Range1d(0, 1),
                 x_range=Range1d(now - 300_000, now + 30_000))
    fig.multi_line("xs", "ys", source=lines, line_color="color", line_width=2)
    dots = fig.scatter("t", "tps", source=points, color="color", fill_color="white", size=7, line_width=2,
                       legend_field="name")
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("instance", "@name"), ("decode", "@tps{0.0} tok/s"),
                                                         ("tokens", "@tokens"), ("TTFT", "@ttft"),
                                                         ("finished", "@t{%H:%M:%S}")],
                            formatters={"@t": "datetime"}))
    fig.yaxis.axis_label = "decode tok/s"
    fig.yaxis.axis_label_text_font_style = "normal"
    fig.yaxis.axis_label_text_color = FG2
    fig.axis.axis_line_color = BORDER
    fig.axis.major_tick_line_color = BORDER
    fig.axis.minor_tick_line_color = None
    fig.axis.major_label_text_color = FG2
    fig.grid.grid_line_color = "#eef1f4"
    fig.legend.location = "bottom_left"
    fig.legend.orientation = "horizontal"
    fig.legend.label_text_font_size = "11px"
    fig.legend.background_fill_alpha = 0.8
    fig.legend.border_line_color = None
    return fig, lines, points


def bench_figures(rows: list[dict[str, Any]]) -> list[Any]:
    """Bar charts of predicted vs measured decode tok/s and TTFT per plan."""
    from bokeh.transform import dodge

    labels = [r["label"] if len(r["label"]) <= 60 else r["label"][:57] + "…" for r in rows]
    figs = []
    for key, title, unit in (("decode_tps", "Decode tokens/s", "tok/s"), ("ttft_s", "Time to first token", "s")):
        data = {"plan": labels, "predicted": [r[f"predicted_{key}"] or 0 for r in rows],
                "measured": [r[f"measured_{key}"] or 0 for r in rows]}
        if not any(data["measured"]):
            continue
        src = ColumnDataSource(data)
        height = 70 + 46 * len(rows)
        fig = figure(y_range=list(reversed(labels)), height=height, sizing_mode="stretch_width", title=title,
                     tools="", toolbar_location=None, outline_line_color=None, name=f"exo-bench-{key}")
        fig.hbar(y=dodge("plan", 0.17, range=fig.y_range), right="predicted", height=0.3, source=src,
                 color="#f0a04b", legend_label="predicted")
        fig.hbar(y=dodge("plan", -0.17, range=fig.y_range), right="measured", height=0.3, source=src,
                 color=ACCENT, legend_label="measured")
        fig.add_tools(HoverTool(tooltips=[("plan", "@plan"), ("predicted", f"@predicted{{0.00}} {unit}"),
                                          ("measured", f"@measured{{0.00}} {unit}")]))
        fig.x_range.start = 0
        fig.xaxis.axis_label = unit
        fig.title.text_font_size = "13px"
        fig.title.text_color = FG
        fig.legend.location = "bottom_right"
        fig.legend.orientation = "horizontal"
        fig.legend.label_text_font_size = "11px"
        fig.grid.grid_line_color = "#eef1f4"
        fig.axis.axis_line_color = BORDER
        fig.axis.major_label_text_color = FG2
        fig.ygrid.grid_line_color = None
        figs.append(fig)
    return figs


NO_CHAT_MODEL = {"cluster": "No model is ready to chat with yet: preview a model below and launch a plan.",
                 "what-if": "A what-if cluster runs nothing. To chat, serve a model (exo-lab up) or open the "
                            "dashboard of a live cluster (exo-lab dashboard --local 2).",
                 "this machine": "No model is served here: exo-lab up serves one, with this dashboard."}


def _transcript_html(messages: list[dict[str, Any]], empty: str = "Send a message to chat with the selected model.") -> str:
    if not messages:
        return f"<div class='exo-chat'><div class='exo-chat-empty'>{html.escape(empty)}</div></div>"
    parts = []
    for m in messages:
        role = m["role"]
        classes = f"exo-msg {role}" + (" streaming" if m.get("streaming") else "") + (" error" if m.get("error") else "")
        who = "you" if role == "user" else m.get("model", "model")
        text = m.get("error") or m["content"]
        usage = f"<div class='exo-usage'>{html.escape(m['usage'])}</div>" if m.get("usage") else ""
        parts.append(f"<div class='{classes}'><div class='exo-who'>{html.escape(who)}</div>"
                     f"<div class='exo-bubble'>{html.escape(text)}</div>{usage}</div>")
    return f"<div class='exo-chat'><div class='exo-chat-inner'>{''.join(parts)}</div></div>"


def _usage_text(usage: Any, finish: str | None) -> str:
    if usage is None:
        return ""
    bits = [f"{usage.completion_tokens} tokens"]
    if usage.generation_tps:
        bits.append(f"{usage.generation_tps:.1f} tok/s")
    if usage.ttft_s:
        bits.append(f"TTFT {usage.ttft_s * 1000:.0f} ms")
    if finish and finish != "stop":
        bits.append(f"finish: {finish}")
    return " · ".join(bits)


class Dashboard:
    """One browser session's page. ``layout`` is the Panel object; :meth:`tick` copies what changed."""

    def __init__(self, source: DashboardSource) -> None:
        self.source = source
        self._version = -1
        self._instances_key: Any = None
        self._bench_version = -1
        self.messages: list[dict[str, Any]] = []
        self.chat_updates = 0  # transcript pushes, for tests: a streamed reply takes several
        self._generation: Any = None
        self.plans: Any = None
        self._launched: str | None = None  # the plan this page launched last, and what it shows about it
        self._launch_status = ""

        self.header = pn.pane.HTML("", stylesheets=[HEADER_CSS], sizing_mode="stretch_width", margin=0)
        # topology + nodes
        self.graph, self.node_source, self.edge_source = topology_figure()
        self.graph_note = _html()
        self.node_table = pn.widgets.Tabulator(node_frame(Topology()), show_index=False, disabled=True,
                                               sizing_mode="stretch_width", layout="fit_data_fill",
                                               theme="simple", selectable=False)
        # instances
        self.tps_fig, self.tps_lines, self.tps_points = tps_figure()
        self.instance_table = pn.widgets.Tabulator(instance_frame([]), show_index=False, disabled=True,
                                                   sizing_mode="stretch_width", layout="fit_data_fill", theme="simple",
                                                   selectable=False)
        self.instance_note = _html()
        # chat
        self.chat_model = pn.widgets.Select(label="model", options=[], width=220)
        self.chat_max_tokens = pn.widgets.IntInput(label="max tokens", value=64, start=1, end=8192, width=110)
        self.chat_temperature = pn.widgets.FloatInput(label="temperature", value=0.0, start=0.0, end=2.0, step=0.1,
                                                      width=110)
        self.transcript = pn.pane.HTML(_transcript_html([]), stylesheets=[CHAT_CSS], sizing_mode="stretch_width",
                                       margin=(4, 0))
        self.chat_input = pn.widgets.TextInput(placeholder="Message the model…", sizing_mode="stretch_width")
        self.send_button = pn.widgets.Button(label="Send", color="primary", width=80)
        self.stop_button = pn.widgets.Button(label="Stop", color="default", width=70, disabled=True)
        self.clear_button = pn.widgets.Button(label="Clear", color="light", width=70)
        self.send_button.on_click(self._on_send)
        self.chat_input.param.watch(self._on_send, "enter_pressed")
        self.stop_button.on_click(self._on_stop)
        self.clear_button.on_click(self._on_clear)
        # previews
        self.preview_model = pn.widgets.AutocompleteInput(
            label="model", options=source.model_suggestions(), restrict=False, min_characters=2, case_sensitive=False,
            search_strategy="includes",
            placeholder="a model name, path, hub id, synthetic:<preset> or a config.json", sizing_mode="stretch_width")
        if source.registry is not None and source.registry.names():
            first = source.instances()[0][1]
            self.preview_model.value = str(getattr(first, "path", "") or "")
        self.preview_context = pn.widgets.IntInput(label="context", value=4096, start=16, step=1024, width=110)
        self.preview_prompt = pn.widgets.IntInput(label="prompt tokens", value=512, start=1, step=128, width=110)
        self.preview_objective = pn.widgets.Select(label="rank by", options={"decode tok/s": "decode",
                                                                            "time to first token": "ttft"}, width=160)
        self.preview_button = pn.widgets.Button(label="Preview", color="primary", width=100, align="end")
        self.preview_button.on_click(self._on_preview)
        self.plan_table = pn.widgets.Tabulator(plans_frame(Plans([])), show_index=False, disabled=True,
                                               sizing_mode="stretch_width", layout="fit_data_fill", theme="simple",
                                               selectable=1, pagination="local", page_size=8, visible=False)
        self.plan_table.param.watch(self._on_plan_selected, "selection")
        self.plan_note = _html("<div class='exo-hint'>Pick a model and press Preview to rank the ways to run it on "
                               "these nodes.</div>")
        self.launch_button = pn.widgets.Button(label="Launch selected plan", color="success", width=180,
                                               disabled=True, visible=source.cluster is not None)
        self.launch_button.on_click(self._on_launch)
        # bench
        self.bench_input = pn.widgets.FileInput(accept=".json", multiple=False, width=260)
        self.bench_input.param.watch(self._on_bench_file, "value")
        self.bench_area = pn.Column(sizing_mode="stretch_width", margin=0)

        self.layout = self._layout()
        self.tick()
        self._render_chat()
        self.chat_updates = 0
        source.sessions.add(self)

    # ------------------------------------------------------------------ layout
    def _layout(self) -> pn.Column:
        def card(*objs: Any, **kw: Any) -> pn.Column:
            return pn.Column(*objs, styles=CARD, sizing_mode="stretch_width", margin=(8, 8), **kw)

        topo_card = card(_html(_card_title("Topology", "nodes, memory in use, measured links")), self.graph,
                         self.graph_note, min_width=480)
        nodes_card = card(_html(_card_title("Nodes")), self.node_table)
        inst_card = card(_html(_card_title("Instances", "served here or launched on the cluster")),
                         self.instance_table, self.tps_fig, self.instance_note)
        chat_card = card(_html(_card_title("Chat", "streams from the selected model")),
                         pn.Row(self.chat_model, self.chat_max_tokens, self.chat_temperature, margin=0),
                         self.transcript,
                         pn.Row(self.chat_input, self.send_button, self.stop_button, self.clear_button, margin=0),
                         min_width=420)
        preview_card = card(_html(_card_title("Placement preview", "ranked plans for a model on these nodes")),
                            pn.Row(self.preview_model, self.preview_context, self.preview_prompt,
                                   self.preview_objective, self.preview_button, margin=0),
                            self.plan_note, self.plan_table, self.launch_button)
        bench_card = card(_html(_card_title("Bench results", "predicted vs measured, per plan")),
                          pn.Row(self.bench_input, margin=0), self.bench_area)
        return pn.Column(
            self.header,
            pn.Row(topo_card, chat_card, sizing_mode="stretch_width", margin=(6, 8, 0, 8)),
            pn.Row(nodes_card, sizing_mode="stretch_width", margin=(0, 8)),
            pn.Row(inst_card, sizing_mode="stretch_width", margin=(0, 8)),
            pn.Row(preview_card, sizing_mode="stretch_width", margin=(0, 8)),
            pn.Row(bench_card, sizing_mode="stretch_width", margin=(0, 8, 16, 8)),
            sizing_mode="stretch_width", margin=0, styles={"background": "#f3f5f8"},
        )

    # ------------------------------------------------------------------ updates
    def tick(self) -> None:
        """Copy what changed in the source into this page (runs every second on the session's loop)."""
        src = self.source
        topo = src.topology
        instances = src.instances()
        shards = instance_shards(instances)
        key = (src.version, tuple(sorted((k, tuple(v)) for k, v in shards.items())))
        if key != self._version and topo is not None:
            self._version = key
            data = graph_data(topo, shards)
            self.node_source.data = data["nodes"]
            self.edge_source.data = data["edges"]
            self.node_table.value = node_frame(topo)
            links = len(data["edges"]["label"])
            self.graph_note.object = (
                "<div class='exo-hint'>Ring colour: memory in use · line width: link bandwidth (log scale) · "
                "labels: round-trip time and bandwidth" + ("" if links else " (a single node: no links)") + "</div>")
        elif topo is None:
            self.graph_note.object = "<div class='exo-hint'>Profiling this machine…</div>"
        inst_key = tuple((n, str(im.instance_summary(o)), getattr(o, "requests_completed", None),
                          len(getattr(o, "usage_history", ()) or ()),
                          str(im.loading_progress(o))) for n, o in instances)
        if inst_key != self._instances_key:
            self._instances_key = inst_key
            self.instance_table.value = instance_frame(instances)
            series = tps_series(instances)
            self.tps_lines.data = series["lines"]
            self.tps_points.data = series["points"]
            top = max(series["points"]["tps"], default=0)
            self.tps_fig.y_range.end = top * 1.15 if top else 1
            if series["points"]["t"]:  # at least a minute wide, so one request is not a whole axis of microseconds
                t0, t1 = min(series["points"]["t"]), max(series["points"]["t"])
                pad = max(30_000.0, 0.06 * (t1 - t0))
                self.tps_fig.x_range.start, self.tps_fig.x_range.end = t0 - pad, t1 + pad
            launch = [f"{k}: {v}" for k, v in src.launches.items() if v.startswith("launching")]
            note = ("" if instances else "No instances yet: preview a model below and launch a plan"
                    if src.cluster is not None else "No models served in this process.")
            if instances and not series["points"]["t"]:
                note = "Decode tokens/s appear per request as requests finish (chat here, or call the API)."
            self.instance_note.object = "".join(f"<div class='exo-hint'>{html.escape(x)}</div>"
                                                for x in [*launch, note] if x)
            self.instance_table.visible = bool(instances)
            self.tps_fig.visible = bool(instances)
            models = list(src.chat_models())
            if models != list(self.chat_model.options):
                self.chat_model.options = models
                if models and self.chat_model.value not in models:
                    self.chat_model.value = models[0]
                if not self.messages:
                    self._render_chat()
        if self._launched is not None:
            status = src.launches.get(self._launched)
            if status and status != self._launch_status:
                self._launch_status = status
                cls = "exo-error" if status.startswith("launch failed") else "exo-note"
                self.plan_note.object = f"<div class='{cls}'>{html.escape(self._launched)}: {html.escape(status)}</div>"
        if src.bench_version != self._bench_version:
            self._bench_version = src.bench_version
            self._draw_bench()
        self._draw_header(topo, instances)

    def _draw_header(self, topo: Topology | None, instances: list[tuple[str, Any]]) -> None:
        src = self.source
        chips = []
        if topo is not None:
            alive = len(topo.alive())
            mem = sum(n.memory_total_bytes for n in topo.alive())
            chips.append(f"<b>{alive}</b> node{'s' if alive != 1 else ''} · {gib(mem)} GiB")
        ready = sum(1 for _, o in instances if im.instance_summary(o)["state"] == "ready")
        chips.append(f"<b>{len(instances)}</b> model{'s' if len(instances) != 1 else ''} · {ready} ready")
        if src.api_url:
            chips.append(f"API <a href='{html.escape(src.api_url)}/v1/models' target='_blank'>"
                         f"{html.escape(src.api_url)}/v1</a>")
        err = f"<span class='exo-chip err'>{html.escape(src.error)}</span>" if src.error else ""
        mode = {"cluster": "cluster dashboard", "what-if": "what-if cluster", "this machine": "this machine"}[src.mode]
        text = (f"<div class='exo-header'><div class='exo-logo'>exo<span>_</span>lab</div>"
                f"<div class='exo-mode'>{html.escape(mode)}</div><div class='exo-chips'>{err}"
                + "".join(f"<span class='exo-chip'>{c}</span>" for c in chips) + "</div></div>")
        if text != self.header.object:
            self.header.object = text

    def _draw_bench(self) -> None:
        doc = self.source.bench
        if doc is None:
            hint = ("Load a bench result (<code>exo-lab bench MODEL --json results.json</code>) to compare predicted "
                    "and measured speed per plan." if bench_available() else
                    "Load a bench result JSON to compare predicted and measured speed per plan "
                    "(the bench runner is not part of this installation).")
            self.bench_area.objects = [_html(f"<div class='exo-hint'>{hint}</div>")]
            return
        try:
            rows = bench_rows(doc)
        except ValueError as exc:
            self.bench_area.objects = [_html(f"<div class='exo-error'>{html.escape(str(exc))}</div>")]
            return
        model = doc.get("model", "") if isinstance(doc, dict) else ""
        text = f"{len(rows)} plan{'s' if len(rows) != 1 else ''} measured" + (
            f" for <b>{html.escape(str(model))}</b>" if model else "")
        if isinstance(doc, dict) and doc.get("pp"):
            text += f" · {doc['pp']}-token prompts, {doc.get('tg')} generated tokens"
        charts = bench_module_charts(doc)
        if charts is None:
            charts = [pn.Row(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in bench_figures(rows)],
                             sizing_mode="stretch_width", margin=0)]
        self.bench_area.objects = [_html(f"<div class='exo-note'>{text}</div>"), *charts]

    # ------------------------------------------------------------------ chat
    def _render_chat(self) -> None:
        empty = {} if self.chat_model.options else {"empty": NO_CHAT_MODEL[self.source.mode]}
        self.transcript.object = _transcript_html(self.messages, **empty)
        self.chat_updates += 1

    async def _on_send(self, _event: Any = None) -> None:
        text = (self.chat_input.value_input or self.chat_input.value or "").strip()
        if not text or self._generation is not None:
            return
        models = self.source.chat_models()
        name = self.chat_model.value
        if name not in models:
            self.messages.append({"role": "assistant", "model": "exo_lab", "content": "",
                                  "error": "No model is ready: serve one, or launch a plan on the cluster."})
            self._render_chat()
            return
        backend = models[name]
        self.chat_input.value = ""
        self.chat_input.value_input = ""
        history = [{"role": m["role"], "content": m["content"]} for m in self.messages
                   if not m.get("error") and m["role"] in ("user", "assistant") and m.get("model", name) == name]
        self.messages.append({"role": "user", "content": text})
        reply = {"role": "assistant", "model": name, "content": "", "streaming": True}
        self.messages.append(reply)
        self._render_chat()
        self.send_button.disabled, self.stop_button.disabled = True, False
        try:
            gen = backend.chat([*history, {"role": "user", "content": text}],
                               max_tokens=int(self.chat_max_tokens.value), temperature=float(self.chat_temperature.value))
            self._generation = gen
            last = 0.0
            async for chunk in gen:
                if chunk.error:
                    reply["error"] = chunk.error
                reply["content"] += chunk.text
                now = time.monotonic()
                if chunk.finish_reason is None and now - last >= 0.05:
                    last = now
                    self._render_chat()
            reply["usage"] = _usage_text(gen.usage, gen.finish_reason)
        except Exception as exc:  # noqa: BLE001  (bad input or a failed instance: shown in the transcript)
            reply["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            reply["streaming"] = False
            self._generation = None
            self.send_button.disabled, self.stop_button.disabled = False, True
            self._render_chat()

    def _on_stop(self, _event: Any = None) -> None:
        if self._generation is not None:
            self._generation.cancel()

    def _on_clear(self, _event: Any = None) -> None:
        if self._generation is None:
            self.messages = []
            self._render_chat()

    # ------------------------------------------------------------------ previews
    async def _on_preview(self, _event: Any = None) -> None:
        model = (self.preview_model.value_input or self.preview_model.value or "").strip()
        if not model:
            self.plan_note.object = "<div class='exo-error'>Name a model first.</div>"
            return
        self.preview_button.disabled = True
        self.plan_note.object = f"<div class='exo-hint'>Planning {html.escape(model)}…</div>"
        try:
            plans = await asyncio.to_thread(self.source.preview, model, int(self.preview_context.value),
                                            int(self.preview_prompt.value), self.preview_objective.value)
        except Exception as exc:  # noqa: BLE001  (an unknown model, a bad config: shown where the user looks)
            self.plans = None
            self.plan_table.visible = False
            self.launch_button.disabled = True
            self.plan_note.object = f"<div class='exo-error'>{html.escape(f'{type(exc).__name__}: {exc}')}</div>"
            return
        finally:
            self.preview_button.disabled = False
        self.plans = plans
        self.plan_table.value = plans_frame(plans)
        self.plan_table.visible = bool(plans.plans)
        self.plan_table.selection = [0] if plans.plans else []
        self._describe_selected()

    def _on_plan_selected(self, _event: Any = None) -> None:
        self._describe_selected()

    def _describe_selected(self) -> None:
        plans = self.plans
        if plans is None:
            return
        if not plans.plans:
            reasons = "; ".join(sorted({p.reason or "" for p in plans.infeasible})[:3])
            self.plan_note.object = f"<div class='exo-error'>No plan fits: {html.escape(reasons)}</div>"
            self.launch_button.disabled = True
            return
        sel = self.plan_table.selection
        i = sel[0] if sel else 0
        p = plans.plans[i]
        head = (f"<b>{len(plans.plans)}</b> feasible plan{'s' if len(plans.plans) != 1 else ''} for "
                f"<b>{html.escape(plans.model)}</b>" + (f", {len(plans.infeasible)} infeasible" if plans.infeasible else "")
                + f". Plan #{i}: {html.escape(p.explanation or p.describe())}")
        status = self.source.launches.get(p.describe())
        if status:
            head += f" <b>{html.escape(status)}</b>"
        self.plan_note.object = f"<div class='exo-note'>{head}</div>"
        can = (self.source.cluster is not None and p.strategy != "pipeline-tensor" and p.feasible)
        self.launch_button.disabled = not can

    def _instance_name(self, model: str) -> str:
        """A short, unused name for an instance of ``model``: the directory's name for a path."""
        base = Path(model).name if "/" in model else model
        taken = {name for name, _ in self.source.instances()}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    def _on_launch(self, _event: Any = None) -> None:
        plans = self.plans
        if plans is None or not plans.plans:
            return
        sel = self.plan_table.selection
        p = plans.plans[sel[0] if sel else 0]
        self._launched, self._launch_status = p.describe(), ""
        self.source.launch(p, name=self._instance_name(plans.model))
        self.launch_button.disabled = True

    # ------------------------------------------------------------------ bench
    def _on_bench_file(self, event: Any) -> None:
        if not event.new:
            return
        try:
            self.source.load_bench(event.new)
        except (ValueError, UnicodeDecodeError) as exc:
            self.bench_area.objects = [_html(f"<div class='exo-error'>Not a bench result: "
                                             f"{html.escape(str(exc))}</div>")]


# ----------------------------------------------------------------------------- apps and servers


def create_app(source: DashboardSource | None = None) -> pn.viewable.Viewable:
    """The page for one browser session (``panel serve`` calls this once per session, via the module's end).

    Without a ``source``, one shared per process is made from the environment (:func:`source_from_env`).
    """
    pn.extension("tabulator", raw_css=[PAGE_CSS])
    if source is None:
        source = pn.state.as_cached("exo-lab-dashboard-source", source_from_env)
    source.start()
    dash = Dashboard(source)
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        pn.state.add_periodic_callback(dash.tick, period=TICK_MS)
    return dash.layout


def source_from_env() -> DashboardSource:
    """A source configured by ``EXO_LAB_DASHBOARD_CONNECT`` (``host:port,...``) and ``EXO_LAB_DASHBOARD_BENCH``."""
    import exo_lab

    addresses = [a for a in os.environ.get("EXO_LAB_DASHBOARD_CONNECT", "").split(",") if a.strip()]
    cluster = exo_lab.connect(addresses) if addresses else None
    return DashboardSource(cluster=cluster, bench=os.environ.get("EXO_LAB_DASHBOARD_BENCH") or None)


def _origins(host: str, port: int) -> list[str]:
    hosts = {host, "localhost", "127.0.0.1"}
    if host in ("0.0.0.0", "::"):
        hosts.add(socket.gethostname())
        hosts.add(socket.getfqdn())
    return sorted(f"{h}:{port}" for h in hosts if h not in ("0.0.0.0", "::"))


class DashboardServer:
    """The dashboard served on ``host:port`` from a thread with its own event loop (like the API server)."""

    def __init__(self, source: DashboardSource, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.source = source
        self.host = host
        self.port = port
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "DashboardServer":
        """Bind and serve; returns once the port listens (OSError when it cannot)."""
        from panel.io.server import get_server
        from tornado.ioloop import IOLoop

        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []
        self.source.start()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = get_server({"/": lambda: create_app(self.source)}, port=self.port, address=self.host,
                                          websocket_origin=_origins(self.host, self.port), loop=IOLoop.current(),
                                          show=False, start=False, title="exo_lab dashboard")
                self._server.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"exo-lab-dashboard-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            exc = failure[0]
            if isinstance(exc, OSError):
                raise OSError(exc.errno, f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror}; "
                                         "pass another --dashboard-port") from exc
            raise exc
        log.info("exo_lab dashboard on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and the source's refresh."""
        loop, server = self._loop, self._server
        if loop is not None and self.running:
            def shutdown() -> None:
                try:
                    server.stop()
                finally:
                    loop.stop()

            loop.call_soon_threadsafe(shutdown)
            self._thread.join(timeout)
        self.source.close()

    def __enter__(self) -> "DashboardServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<exo_lab DashboardServer {self.url} {'running' if self.running else 'stopped'}>"


def serve_dashboard(source: DashboardSource | None = None, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                    **source_kwargs: Any) -> DashboardServer:
    """Serve the dashboard and return the running server (``source_kwargs`` build a source when none is given)."""
    return DashboardServer(source or DashboardSource(**source_kwargs), host, port).start()


if __name__.startswith("bokeh_app"):  # `panel serve exo_lab/ui/dashboard.py`
    create_app().servable(title="exo_lab dashboard")
