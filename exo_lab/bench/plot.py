"""Bokeh charts of a bench result: measured against predicted, and tokens/s against concurrency."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from exo_lab.bench.metrics import METRICS

if TYPE_CHECKING:
    from exo_lab.bench.results import BenchResult

# bokeh is imported inside each chart function: it takes about a second to import and only
# drawing needs it (a bench result is made, saved and printed without it)

PALETTE = ("#1e88e5", "#d81b60", "#43a047", "#f4511e", "#8e24aa", "#00897b", "#6d4c41", "#3949ab")
LABELS = {"decode_tps": "decode tok/s", "prefill_tps": "prefill tok/s", "ttft_s": "TTFT s"}
MARKERS = {"decode_tps": "circle", "prefill_tps": "square", "ttft_s": "triangle"}


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def decode_bars(result: BenchResult) -> Any:
    """Grouped bars per plan: measured decode tokens/s, predicted, and predicted after calibration (if any)."""
    from bokeh.models import ColumnDataSource, DataRange1d, FactorRange, HoverTool
    from bokeh.plotting import figure
    from bokeh.transform import factor_cmap

    after = result.calibration.predicted_after if result.calibration else {}
    kinds = ["measured", "predicted"] + (["calibrated"] if after else [])
    data: dict[str, Any] = {"x": [], "value": [], "kind": [], "plan": []}
    for p in result.ok:
        values = {
            "measured": p.median("decode_tps"),
            "predicted": p.predicted.get("decode_tps"),
            "calibrated": after.get(str(p.index), {}).get("decode_tps"),
        }
        for kind in kinds:
            data["x"].append((f"#{p.index}", kind))
            data["value"].append(values[kind] or 0.0)
            data["kind"].append(kind)
            data["plan"].append(p.description)
    fig = figure(
        x_range=FactorRange(*data["x"]),
        height=300,
        width=460,
        title="decode tokens/s per plan",
        toolbar_location=None,
        tools="",
        name="exo-bench-decode-bars",
    )
    fig.vbar(
        x="x",
        top="value",
        width=0.9,
        source=ColumnDataSource(data),
        legend_field="kind",
        fill_color=factor_cmap("x", palette=["#1e88e5", "#bdbdbd", "#ffb300"][: len(kinds)], factors=kinds, start=1),
    )
    fig.add_tools(HoverTool(tooltips=[("plan", "@plan"), ("", "@kind"), ("tok/s", "@value{0.0}")]))
    cast(DataRange1d, fig.y_range).start = 0  # figure's default y_range (none given above)
    fig.xaxis.major_label_orientation = 0.8
    fig.yaxis.axis_label = "tokens/s"
    fig.legend.location = "top_right"
    fig.legend.label_text_font_size = "8pt"
    return fig


def measured_vs_predicted(result: BenchResult) -> Any:
    """Every metric of every plan as a point (predicted, measured) on log axes, coloured by plan and
    shaped by metric; y = x is a perfect prediction. Hollow markers: predicted after calibration."""
    from bokeh.models import ColumnDataSource, HoverTool, Slope
    from bokeh.plotting import figure

    fig = figure(
        height=300,
        width=460,
        x_axis_type="log",
        y_axis_type="log",
        title="measured vs predicted",
        toolbar_location=None,
        tools="",
        name="exo-bench-scatter",
    )
    fig.xaxis.axis_label = "predicted"
    fig.yaxis.axis_label = "measured"
    after = result.calibration.predicted_after if result.calibration else {}
    cols = ("x", "y", "color", "marker", "plan", "metric", "ratio")
    points: dict[str, Any] = {c: [] for c in cols}
    calibrated: dict[str, Any] = {c: [] for c in cols}
    for i, p in enumerate(result.ok):
        for metric in METRICS:
            meas, pred = p.median(metric), p.predicted.get(metric)
            cal = after.get(str(p.index), {}).get(metric)
            for target, x in ((points, pred), (calibrated, cal)):
                if meas and x:
                    for col, value in zip(
                        cols, (x, meas, _color(i), MARKERS[metric], p.description, LABELS[metric], meas / x)
                    ):
                        target[col].append(value)
    fig.scatter(
        "x", "y", source=ColumnDataSource(points), marker="marker", size=10, color="color", legend_field="metric"
    )
    if calibrated["x"]:
        fig.scatter(
            "x",
            "y",
            source=ColumnDataSource(calibrated),
            marker="marker",
            size=10,
            line_color="color",
            fill_color=None,
            legend_label="after calibration (hollow)",
        )
    fig.add_layout(Slope(gradient=1, y_intercept=0, line_dash="dashed", line_color="#757575"))
    fig.add_tools(
        HoverTool(
            tooltips=[
                ("plan", "@plan"),
                ("metric", "@metric"),
                ("predicted", "@x{0.000}"),
                ("measured", "@y{0.000}"),
                ("measured/predicted", "@ratio{0.00}"),
            ]
        )
    )
    fig.legend.location = "top_left"
    fig.legend.label_text_font_size = "8pt"
    return fig


def concurrency_lines(result: BenchResult) -> Any:
    """Aggregate tokens/s against concurrency per plan (measured solid with min-max whiskers, predicted
    dashed; log scale, since predictions and measurements can be far apart)."""
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    fig = figure(
        height=300,
        width=940,
        y_axis_type="log",
        title="aggregate tokens/s against concurrency (dashed: predicted)",
        toolbar_location=None,
        tools="",
        name="exo-bench-concurrency",
    )
    fig.xaxis.axis_label = "concurrent requests"
    fig.yaxis.axis_label = "completion tokens/s"
    fig.xaxis.ticker = sorted({c.concurrency for p in result.ok for c in p.concurrency}) or [1]
    for i, p in enumerate(result.ok):
        pts = [c for c in p.concurrency if c.aggregate_tps.get("median")]
        xs = [c.concurrency for c in pts]
        source = ColumnDataSource(
            {
                "x": xs,
                "y": [c.aggregate_tps["median"] for c in pts],
                "lo": [c.aggregate_tps["min"] for c in pts],
                "hi": [c.aggregate_tps["max"] for c in pts],
                "pred": [c.predicted_aggregate_tps for c in pts],
                "plan": [p.description] * len(xs),
            }
        )
        label = f"#{p.index} {p.description}"[:60]
        fig.line("x", "y", source=source, color=_color(i), line_width=2, legend_label=label)
        fig.scatter("x", "y", source=source, color=_color(i), size=7, legend_label=label)
        fig.segment("x", "lo", "x", "hi", source=source, color=_color(i))
        if all(c.predicted_aggregate_tps for c in pts):
            fig.line("x", "pred", source=source, color=_color(i), line_dash="dashed", legend_label=label)
    fig.add_tools(
        HoverTool(
            tooltips=[("plan", "@plan"), ("concurrency", "@x"), ("tok/s", "@y{0.0}"), ("predicted", "@pred{0.0}")]
        )
    )
    fig.legend.label_text_font_size = "8pt"
    fig.legend.click_policy = "hide"
    fig.add_layout(fig.legend[0], "right")
    return fig


def plot(result: BenchResult) -> Any:
    """The three charts in one bokeh layout (show it with ``bokeh.io.show``)."""
    from bokeh.layouts import column, row
    from bokeh.models import Div

    if not result.ok:
        return column(Div(text=f"<b>bench {result.model}</b>: no plan ran ({len(result.plans)} skipped or failed)"))
    title = Div(
        text=f"<b>bench {result.model}</b> pp={result.pp} tg={result.tg} repeat={result.repeat}"
        + (f" &mdash; {result.calibration.summary()}" if result.calibration else "")
    )
    return column(
        title, row(decode_bars(result), measured_vs_predicted(result)), concurrency_lines(result), name="exo-bench"
    )
