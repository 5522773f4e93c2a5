"""The dashboard's last trace: the newest trace any instance served here recorded, as a timeline (one lane per
rank) and the per-token breakdown beside the cost model's prediction (see :mod:`exo_lab.ui.trace_view`)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import panel as pn

from exo_lab.engine.backend import Backend
from exo_lab.ui.dashboard.theme import html_pane
from exo_lab.ui.trace_view import breakdown_html, timeline


def newest_trace(served: Sequence[tuple[str, Backend]]) -> tuple[str, Any] | None:
    """``(instance name, trace)`` of the newest trace of ``served``, or None."""
    found = [(t.started, name, t) for name, b in served if (t := b.last_trace) is not None]
    if not found:
        return None
    _, name, trace = max(found, key=lambda f: f[0])
    return name, trace


class LastTrace:
    """A pane that redraws when a newer trace appears (``update``); hidden while there is none."""

    def __init__(self) -> None:
        self.title = html_pane()
        self.chart = pn.pane.Bokeh(None, sizing_mode="stretch_width", visible=False)
        self.table = html_pane()
        self.pane = pn.Column(self.title, self.chart, self.table, sizing_mode="stretch_width", visible=False)
        self.shown: str | None = None  # the trace id drawn

    def key(self, served: Sequence[tuple[str, Backend]]) -> str | None:
        newest = newest_trace(served)
        return newest[1].id if newest else None

    def update(self, served: Sequence[tuple[str, Backend]]) -> None:
        newest = newest_trace(served)
        if newest is None or newest[1].id == self.shown:
            self.pane.visible = newest is not None
            return
        name, trace = newest
        self.shown = trace.id
        self.title.object = (
            f"<div class='exo-hint'>last trace: <b>{html.escape(name)}</b> · {html.escape(trace.label or '')} "
            f"· {len(trace.spans)} spans over {trace.duration_ns / 1e6:.0f} ms</div>"
        )
        self.chart.object = timeline(trace, width=800)
        self.chart.visible = True
        self.table.object = breakdown_html(trace)
        self.pane.visible = True
