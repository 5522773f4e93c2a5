"""A trace drawn: a Bokeh timeline (one lane per rank, wheel-zoomable) and the per-token breakdown table.

:func:`timeline` is the chart (spans as bars coloured by what they count as: compute, link,
all-reduce, admission/prefill; the first few decode steps in view, the rest a pan or zoom away),
:func:`breakdown_html` the table of measured compute / link / all-reduce / idle per token beside the
cost model's prediction for the same plan. In a notebook a :class:`~exo_lab.engine.trace.Trace`
displays as both (:func:`trace_mimebundle`, registered by :mod:`exo_lab.ui.display`): a self-contained
page (BokehJS inline, so it works offline) in an iframe.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exo_lab.engine.trace import Trace

# bokeh is imported inside the functions: a second to import, and only drawing needs it

COLORS = {
    "compute": "#1e88e5",
    "link": "#f4511e",
    "all-reduce": "#8e24aa",
    "admission": "#9e9e9e",
    "prefill": "#bdbdbd",
    "other": "#6d4c41",
}
#: decode steps in view at first
STEPS_IN_VIEW = 4


def _kind(name: str) -> str:
    from exo_lab.engine.trace import KIND

    return KIND.get(name, "other")


def timeline(trace: Trace, steps: int = STEPS_IN_VIEW, width: int = 900) -> Any:
    """Bokeh figure: a lane per rank (stage and node named), each span a bar, ms on the x axis."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
    from bokeh.plotting import figure

    ranks = sorted(trace.ranks.values(), key=lambda r: r.rank)
    lanes = [f"rank {r.rank} · stage {r.stage}" + (f" · {r.node}" if r.node else "") for r in ranks]
    lane_of = dict(zip((r.rank for r in ranks), lanes))
    nested = {"admit", "prefill"}  # containers: drawn thinner, behind what they hold
    data: dict[str, Any] = {k: [] for k in ("lane", "left", "right", "name", "step", "ms", "color", "height")}
    for s in sorted(trace.spans, key=lambda s: (s.name not in nested, s.start_ns)):
        data["lane"].append(lane_of.get(s.rank, f"rank {s.rank}"))
        data["left"].append(s.start_ns / 1e6)
        data["right"].append(max(s.end_ns, s.start_ns + 1000) / 1e6)
        data["name"].append(s.name)
        data["step"].append(s.step)
        data["ms"].append(s.dur_ns / 1e6)
        data["color"].append(COLORS[_kind(s.name)])
        data["height"].append(0.85 if s.name in nested else 0.6)
    end_ms = trace.duration_ns / 1e6 or max(data["right"], default=1.0)
    view = (0.0, end_ms)
    decode = trace.decode_steps()
    if len(decode) > steps:
        first = [s for s in trace.spans if s.step in decode[:steps]]
        view = (min(s.start_ns for s in first) / 1e6, max(s.end_ns for s in first) / 1e6)
    pad = 0.02 * (view[1] - view[0] or 1.0)
    fig = figure(
        y_range=FactorRange(factors=list(reversed(lanes))),
        x_range=Range1d(start=view[0] - pad, end=view[1] + pad, bounds=(min(0.0, view[0] - pad), end_ms + pad)),
        height=90 + 45 * len(lanes),
        width=width,
        title=f"trace {trace.id} · {trace.plan or trace.backend} · clocks within ±{trace.uncertainty_ns / 1e3:.0f} µs",
        tools="xpan,xwheel_zoom,xbox_zoom,reset,save",
        active_scroll="xwheel_zoom",
        name="exo-trace-timeline",
    )
    fig.hbar(
        y="lane",
        left="left",
        right="right",
        height="height",
        fill_color="color",
        line_color=None,
        source=ColumnDataSource(data),
    )
    fig.add_tools(HoverTool(tooltips=[("span", "@name"), ("step", "@step"), ("ms", "@ms{0.000}")]))
    fig.xaxis.axis_label = "ms since the trace began"
    return fig


def breakdown_html(trace: Trace) -> str:
    """Per token: measured and predicted milliseconds per component, as an HTML table."""

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    rows = "".join(
        f"<tr><td style='text-align:left'><span style='color:{COLORS.get(r['component'], '#000')}'>■</span> "
        f"{html.escape(r['component'])}</td><td>{ms(r['measured_ms'])}</td><td>{ms(r['predicted_ms'])}</td></tr>"
        for r in trace.breakdown()
    )
    steps = len(trace.per_step())
    return (
        "<table class='exo-trace-breakdown'><thead><tr><th style='text-align:left'>per token</th>"
        "<th>measured ms</th><th>predicted ms</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><small>median over {steps} decode steps; clocks aligned within "
        f"±{trace.uncertainty_ns / 1e3:.0f} µs</small>"
    )


def trace_html(trace: Trace) -> str:
    """A standalone page: the timeline (BokehJS inline) above the breakdown table."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    page = file_html(timeline(trace), INLINE, title=f"trace {trace.id}")
    return page.replace(
        "</body>", f"<div style='font-family:sans-serif;font-size:13px'>{breakdown_html(trace)}</div></body>"
    )


def trace_mimebundle(trace: Trace, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The notebook display of a trace: the page of :func:`trace_html` in an iframe."""
    page = html.escape(trace_html(trace), quote=True)
    height = 90 + 45 * len(trace.ranks) + 260
    frame = f'<iframe srcdoc="{page}" style="width:100%;height:{height}px;border:0" class="exo-trace"></iframe>'
    return {"text/html": frame, "text/plain": repr(trace)}, {}
