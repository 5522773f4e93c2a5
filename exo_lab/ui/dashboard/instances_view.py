"""The dashboard's instances: every instance of the cluster (wherever it was launched) and the models served
here, with their state, load progress, owner, nodes and tokens/s, and a Stop button for each instance."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import panel as pn
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure

from exo_lab.engine.backend import Backend
from exo_lab.ui import instance_monitor as im
from exo_lab.ui.dashboard.frames import rounded, typed_frame
from exo_lab.ui.dashboard.instance_rows import LOADING, InstanceRow
from exo_lab.ui.dashboard.last_trace import LastTrace
from exo_lab.ui.dashboard.theme import ACCENT, BORDER, CRIT, FG2, SERIES, card, card_title, html_pane

#: Tabulator columns drawn from HTML (the progress bar, the Stop button); every other cell is text
HTML_COLUMNS = ("loaded", "stop")

TABLE_CSS = f"""
.exo-load {{ display: flex; align-items: center; gap: 8px; }}
.exo-bar {{ width: 90px; height: 8px; border-radius: 4px; background: {BORDER}; overflow: hidden; flex: none; }}
.exo-bar > div {{ height: 100%; background: {ACCENT}; transition: width 0.3s; }}
.exo-stop {{ font: inherit; font-size: 12px; padding: 1px 10px; border-radius: 5px; cursor: pointer;
  border: 1px solid color-mix(in srgb, {CRIT} 45%, white); background: #fff; color: {CRIT}; }}
.exo-stop:hover {{ background: color-mix(in srgb, {CRIT} 8%, white); }}
"""


def loaded_html(row: InstanceRow) -> str:
    """Layers loaded: a bar and ``done/total layers`` while it loads, the count once it is up."""
    done, total = row.loaded
    text = (
        f"{done}/{total} layers"
        if total
        else "starting…"
        if row.state in LOADING
        else "loaded"
        if row.state == "ready"
        else ""
    )
    if row.state not in LOADING:
        return html.escape(text)
    pct = 100 * done / total if total else 0
    return (
        f"<div class='exo-load' title='{pct:.0f}%'><div class='exo-bar'><div style='width:{pct:.0f}%'></div></div>"
        f"<span>{html.escape(text)}</span></div>"
    )


def instance_frame(rows: Sequence[InstanceRow]) -> pd.DataFrame:
    """Every instance (and model served in this process): state, progress, owner, nodes, tokens/s, Stop."""
    out = []
    for row in rows:
        backend = row.backend
        stats = im.request_stats(im.request_rows(backend), backend.requests_completed) if backend else None
        plan = im.instance_summary(backend)["plan"] if backend is not None else None
        out.append(
            {
                "name": row.name,
                "id": row.id,
                "state": row.state,
                "loaded": loaded_html(row),
                "owner": row.owner,
                "nodes": ", ".join(row.nodes),
                "plan": row.plan,
                "requests": stats["requests"] if stats else 0,
                "decode tok/s": rounded(stats["last_decode_tps"] if stats else None),
                "mean tok/s": rounded(stats["mean_decode_tps"] if stats else None),
                "predicted tok/s": rounded(plan["decode_tps"] if plan else None),
                "TTFT (ms)": rounded(
                    stats["last_ttft_s"] * 1000 if stats and stats["last_ttft_s"] is not None else None
                ),
                "stop": "<button class='exo-stop' title='stop this instance and free its memory'>Stop</button>"
                if row.stoppable
                else "",
            }
        )
    return typed_frame(
        out,
        {
            "name": str,
            "id": str,
            "state": str,
            "loaded": str,
            "owner": str,
            "nodes": str,
            "plan": str,
            "requests": int,
            "decode tok/s": float,
            "mean tok/s": float,
            "predicted tok/s": float,
            "TTFT (ms)": float,
            "stop": str,
        },
    )


def tps_series(instances: Sequence[tuple[str, Backend]]) -> dict[str, dict[str, Any]]:
    """Decode tokens/s per finished request, over time: ``lines`` (one per instance) and ``points``."""
    lines: dict[str, list[Any]] = {"xs": [], "ys": [], "color": [], "name": []}
    points: dict[str, list[Any]] = {"t": [], "tps": [], "color": [], "name": [], "tokens": [], "ttft": []}
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


def tps_figure() -> tuple[Any, ColumnDataSource, ColumnDataSource]:
    """Decode tokens/s per request over time, one colour per instance."""
    empty = tps_series([])
    lines = ColumnDataSource(empty["lines"], name="exo-tps-lines")
    points = ColumnDataSource(empty["points"], name="exo-tps-points")
    now = time.time() * 1000
    fig = figure(
        name="exo-tps",
        height=210,
        sizing_mode="stretch_width",
        x_axis_type="datetime",
        tools="",
        toolbar_location=None,
        min_border_left=40,
        outline_line_color=None,
        y_range=Range1d(start=0, end=1),
        x_range=Range1d(start=now - 300_000, end=now + 30_000),
    )
    fig.multi_line("xs", "ys", source=lines, line_color="color", line_width=2)
    dots = fig.scatter(
        "t", "tps", source=points, color="color", fill_color="white", size=7, line_width=2, legend_field="name"
    )
    fig.add_tools(
        HoverTool(
            renderers=[dots],
            tooltips=[
                ("instance", "@name"),
                ("decode", "@tps{0.0} tok/s"),
                ("tokens", "@tokens"),
                ("TTFT", "@ttft"),
                ("finished", "@t{%H:%M:%S}"),
            ],
            formatters={"@t": "datetime"},
        )
    )
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


class InstancesView:
    """The instances card: a table (state, progress, owner, nodes, requests, tokens/s, Stop) and decode tokens/s
    over time. ``source`` (a :class:`~exo_lab.ui.dashboard.source.DashboardSource`) stops instances."""

    def __init__(self, source: Any = None) -> None:
        self.source = source
        self.rows: list[InstanceRow] = []
        self.tps_fig, self.tps_lines, self.tps_points = tps_figure()
        self.table = pn.widgets.Tabulator(
            instance_frame([]),
            show_index=False,
            disabled=True,
            sizing_mode="stretch_width",
            layout="fit_data_fill",
            theme="simple",
            selectable=False,
            formatters={c: {"type": "html"} for c in HTML_COLUMNS},
            titles={"stop": ""},
            sortable={"stop": False},
            stylesheets=[TABLE_CSS],
        )
        self.table.on_click(self._on_stop_click, column="stop")
        self.note = html_pane()
        self.last_trace = LastTrace()  # the newest trace of an instance served here
        self.card = card(
            html_pane(card_title("Instances", "every instance of the cluster, and the models served here")),
            self.table,
            self.tps_fig,
            self.note,
            self.last_trace.pane,
        )
        self._key: Any = None

    def _on_stop_click(self, event: Any) -> None:
        """The Stop button of a row: stop that instance (on a thread: the source's)."""
        frame = self.table.value
        if self.source is None or not 0 <= event.row < len(frame):
            return
        iid = frame["id"].iloc[event.row]
        row = next((r for r in self.rows if r.id == iid), None)
        if row is not None and row.stoppable:
            self.source.stop(iid)

    def update(
        self,
        rows: Sequence[InstanceRow],
        launches: dict[str, str],
        has_cluster: bool,
        stops: dict[str, str] | None = None,
    ) -> bool:
        """Redraw when an instance changed (state, loading, requests, owner); True when it did."""
        served = [(r.name, r.backend) for r in rows if r.backend is not None]
        key = tuple(
            (
                r.key,
                r.stoppable,
                r.backend.requests_completed if r.backend is not None else 0,
                len(r.backend.usage_history) if r.backend is not None else 0,
            )
            for r in rows
        ) + tuple(sorted((stops or {}).items()))
        key += (self.last_trace.key(served),)
        if key == self._key:
            return False
        self._key = key
        self.rows = list(rows)
        self.table.value = instance_frame(rows)
        series = tps_series(served)
        self.tps_lines.data = series["lines"]
        self.tps_points.data = series["points"]
        top = max(series["points"]["tps"], default=0)
        self.tps_fig.y_range.end = top * 1.15 if top else 1
        if series["points"]["t"]:  # at least a minute wide, so one request is not a whole axis of microseconds
            t0, t1 = min(series["points"]["t"]), max(series["points"]["t"])
            pad = max(30_000.0, 0.06 * (t1 - t0))
            self.tps_fig.x_range.start, self.tps_fig.x_range.end = t0 - pad, t1 + pad
        launch = [f"{k}: {v}" for k, v in launches.items() if v.startswith("launching")]
        note = (
            ""
            if rows
            else "No instances yet: preview a model below and launch a plan"
            if has_cluster
            else "No models served in this process."
        )
        if served and not series["points"]["t"]:
            note = "Decode tokens/s appear per request as requests finish (chat here, or call the API)."
        names = {r.id: r.name for r in rows}
        errors = [f"{r.name} failed: {r.error}" for r in rows if r.error and r.state == "failed"]
        errors += [f"{names.get(i, i)}: {v}" for i, v in (stops or {}).items() if v.startswith("stop failed")]
        self.note.object = "".join(
            [f"<div class='exo-error'>{html.escape(x)}</div>" for x in errors]
            + [f"<div class='exo-hint'>{html.escape(x)}</div>" for x in [*launch, note] if x]
        )
        self.table.visible = bool(rows)
        self.tps_fig.visible = bool(served)
        self.last_trace.update(served)
        return True
