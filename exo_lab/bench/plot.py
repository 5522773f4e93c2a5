"""Bokeh charts of a bench result: measured against predicted, tokens/s against prompt length and concurrency."""

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


def _label(result: BenchResult, index: int, description: str) -> str:
    return (f"#{index} " if result.target.get("kind", "plans") == "plans" else "") + description[:48]


def tps_vs_prompt(result: BenchResult) -> Any:
    """Prompt and decode tokens/s against prompt length (log x), one request at a time (the lowest concurrency
    measured): a line per target and generation length, p10-p90 whiskers; dashed: decode."""
    from bokeh.models import BasicTickFormatter, ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    fig = figure(
        height=300,
        width=940,
        x_axis_type="log",
        y_axis_type="log",
        title="tokens/s against prompt length (solid: prompt, dashed: decode)",
        toolbar_location=None,
        tools="",
        name="exo-bench-sweep-prompt",
    )
    fig.xaxis.axis_label = "prompt tokens"
    fig.yaxis.axis_label = "tokens/s per request"
    fig.xaxis.ticker = sorted({pt.pp for p in result.plans for pt in p.points}) or [1]
    fig.xaxis.formatter = BasicTickFormatter()  # the sizes swept, not powers of ten
    fig.yaxis.formatter = BasicTickFormatter()
    i = 0
    for p in result.plans:
        ok = [pt for pt in p.points if pt.ok]
        if not ok:
            continue
        low = min(pt.concurrency for pt in ok)
        for tg in sorted({pt.tg for pt in ok}):
            pts = sorted((pt for pt in ok if pt.tg == tg and pt.concurrency == low), key=lambda pt: pt.pp)
            label = f"{_label(result, p.index, p.description)} tg={tg}"
            for metric, dash in (("prompt_tps", "solid"), ("decode_tps", "dashed")):
                rows = [pt for pt in pts if pt.median(metric)]
                source = ColumnDataSource(
                    {
                        "x": [pt.pp for pt in rows],
                        "y": [pt.median(metric) for pt in rows],
                        "lo": [getattr(pt, metric)["p10"] for pt in rows],
                        "hi": [getattr(pt, metric)["p90"] for pt in rows],
                        "what": [LABELS.get(metric, "prompt tok/s")] * len(rows),
                        "target": [label] * len(rows),
                    }
                )
                fig.line("x", "y", source=source, color=_color(i), line_width=2, line_dash=dash, legend_label=label)
                fig.scatter("x", "y", source=source, color=_color(i), size=6, legend_label=label)
                fig.segment("x", "lo", "x", "hi", source=source, color=_color(i))
            i += 1
    fig.add_tools(HoverTool(tooltips=[("", "@target"), ("", "@what"), ("prompt tokens", "@x"), ("tok/s", "@y{0.0}")]))
    if fig.legend:
        fig.legend.label_text_font_size = "8pt"
        fig.legend.click_policy = "hide"
        fig.add_layout(fig.legend[0], "right")
    return fig


def tps_vs_concurrency(result: BenchResult) -> Any:
    """Aggregate tokens/s against concurrency for every prompt and generation length (p10-p90 whiskers)."""
    from bokeh.models import BasicTickFormatter, ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    fig = figure(
        height=300,
        width=940,
        y_axis_type="log",
        title="aggregate tokens/s against concurrency, per prompt and generation length",
        toolbar_location=None,
        tools="",
        name="exo-bench-sweep-concurrency",
    )
    fig.xaxis.axis_label = "concurrent requests"
    fig.yaxis.axis_label = "completion tokens/s"
    fig.xaxis.ticker = sorted({pt.concurrency for p in result.plans for pt in p.points}) or [1]
    fig.yaxis.formatter = BasicTickFormatter()
    i = 0
    for p in result.plans:
        ok = [pt for pt in p.points if pt.ok]
        for pp, tg in sorted({(pt.pp, pt.tg) for pt in ok}):
            pts = sorted((pt for pt in ok if pt.pp == pp and pt.tg == tg), key=lambda pt: pt.concurrency)
            label = f"{_label(result, p.index, p.description)} pp={pp} tg={tg}"
            source = ColumnDataSource(
                {
                    "x": [pt.concurrency for pt in pts],
                    "y": [pt.aggregate_tps["median"] for pt in pts],
                    "lo": [pt.aggregate_tps["p10"] for pt in pts],
                    "hi": [pt.aggregate_tps["p90"] for pt in pts],
                    "target": [label] * len(pts),
                }
            )
            fig.line("x", "y", source=source, color=_color(i), line_width=2, legend_label=label)
            fig.scatter("x", "y", source=source, color=_color(i), size=6, legend_label=label)
            fig.segment("x", "lo", "x", "hi", source=source, color=_color(i))
            i += 1
    fig.add_tools(HoverTool(tooltips=[("", "@target"), ("concurrency", "@x"), ("tok/s", "@y{0.0}")]))
    if fig.legend:
        fig.legend.label_text_font_size = "8pt"
        fig.legend.click_policy = "hide"
        fig.add_layout(fig.legend[0], "right")
    return fig


def sweep_charts(result: BenchResult) -> list[Any]:
    """Tokens/s against prompt length and against concurrency (none when no combination ran)."""
    if not any(pt.ok for p in result.plans for pt in p.points):
        return []
    return [tps_vs_prompt(result), tps_vs_concurrency(result)]


def plot(result: BenchResult) -> Any:
    """The charts in one bokeh layout (show it with ``bokeh.io.show``): for plans launched here, measured
    against predicted and tokens/s against concurrency; for a sweep, tokens/s against prompt length and
    against concurrency at every size."""
    from bokeh.layouts import column, row
    from bokeh.models import Div

    title = Div(
        text=f"<b>{result._title()}</b>" + (f" &mdash; {result.calibration.summary()}" if result.calibration else "")
    )
    sweep = sweep_charts(result)
    if result.target.get("kind", "plans") != "plans":
        if not sweep:
            return column(Div(text=f"<b>{result._title()}</b>: nothing ran ({result.plans[0].reason})"))
        return column(title, *sweep, name="exo-bench")
    if not result.ok:
        return column(Div(text=f"<b>bench {result.model}</b>: no plan ran ({len(result.plans)} skipped or failed)"))
    charts = [row(decode_bars(result), measured_vs_predicted(result)), concurrency_lines(result)]
    return column(title, *charts, *(sweep if result.is_sweep else []), name="exo-bench")
