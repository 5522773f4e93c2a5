"""The dashboard's instances: the models served here and the cluster's instances, their state and tokens/s."""

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
from exo_lab.ui.dashboard.theme import BORDER, FG2, SERIES, card, card_title, html_pane


def instance_frame(instances: Sequence[tuple[str, Backend]]) -> pd.DataFrame:
    """Running instances (and models served in this process): state, shards loaded, tokens/s."""
    rows = []
    for name, inst in instances:
        summary = im.instance_summary(inst)
        progress = im.loading_progress(inst)
        stats = im.request_stats(im.request_rows(inst), inst.requests_completed)
        plan = summary["plan"]
        rows.append(
            {
                "name": name,
                "state": summary["state"],
                "plan": plan["description"] if plan else "one process (this machine)",
                "loaded": f"{progress['done']}/{progress['total']} layers" if progress["ranks"] else "ready",
                "requests": stats["requests"],
                "decode tok/s": rounded(stats["last_decode_tps"]),
                "mean tok/s": rounded(stats["mean_decode_tps"]),
                "predicted tok/s": rounded(plan["decode_tps"] if plan else None),
                "TTFT (ms)": rounded(stats["last_ttft_s"] * 1000 if stats["last_ttft_s"] is not None else None),
            }
        )
    return typed_frame(
        rows,
        {
            "name": str,
            "state": str,
            "plan": str,
            "loaded": str,
            "requests": int,
            "decode tok/s": float,
            "mean tok/s": float,
            "predicted tok/s": float,
            "TTFT (ms)": float,
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
    """The instances card: a table (state, shards loaded, requests, tokens/s) and decode tokens/s over time."""

    def __init__(self) -> None:
        self.tps_fig, self.tps_lines, self.tps_points = tps_figure()
        self.table = pn.widgets.Tabulator(
            instance_frame([]),
            show_index=False,
            disabled=True,
            sizing_mode="stretch_width",
            layout="fit_data_fill",
            theme="simple",
            selectable=False,
        )
        self.note = html_pane()
        self.card = card(
            html_pane(card_title("Instances", "served here or launched on the cluster")),
            self.table,
            self.tps_fig,
            self.note,
        )
        self._key: Any = None

    def update(self, instances: Sequence[tuple[str, Backend]], launches: dict[str, str], has_cluster: bool) -> bool:
        """Redraw when an instance changed (state, loading, requests); True when it did."""
        key = tuple(
            (
                n,
                str(im.instance_summary(o)),
                o.requests_completed,
                len(o.usage_history),
                str(im.loading_progress(o)),
            )
            for n, o in instances
        )
        if key == self._key:
            return False
        self._key = key
        self.table.value = instance_frame(instances)
        series = tps_series(instances)
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
            if instances
            else "No instances yet: preview a model below and launch a plan"
            if has_cluster
            else "No models served in this process."
        )
        if instances and not series["points"]["t"]:
            note = "Decode tokens/s appear per request as requests finish (chat here, or call the API)."
        self.note.object = "".join(f"<div class='exo-hint'>{html.escape(x)}</div>" for x in [*launch, note] if x)
        self.table.visible = bool(instances)
        self.tps_fig.visible = bool(instances)
        return True
