"""Bench results in the dashboard: predicted vs measured speed per plan, from a bench JSON document."""

from __future__ import annotations

import html
import importlib.util
import logging
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DataRange1d, FactorRange, HoverTool, Title
from bokeh.plotting import figure

from exo_lab.ui.dashboard.theme import ACCENT, BORDER, FG, FG2, card, card_title, html_pane

log = logging.getLogger(__name__)


_MEASURED_KEYS = {
    "decode_tps": ("decode_tps", "generation_tps", "tg_tps", "tg"),
    "ttft_s": ("ttft_s", "ttft"),
    "prefill_tps": ("prefill_tps", "prompt_tps", "pp_tps", "pp"),
}


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
        plan: dict[str, Any] = rec["plan"] if isinstance(rec.get("plan"), dict) else {}
        label = (
            plan.get("description")
            or rec.get("description")
            or (rec.get("plan") if isinstance(rec.get("plan"), str) else None)
            or rec.get("name")
            or f"plan {i}"
        )
        measured: dict[str, Any] = rec["measured"] if isinstance(rec.get("measured"), dict) else rec
        predicted: dict[str, Any] = rec["predicted"] if isinstance(rec.get("predicted"), dict) else plan
        row: dict[str, Any] = {"label": str(label)}
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


def bench_available() -> bool:
    """Whether the bench runner (``exo_lab.bench``) is installed; bench JSON files load without it."""
    return importlib.util.find_spec("exo_lab.bench") is not None


def bench_module_charts(doc: Any) -> list[Any] | None:
    """The bench runner's own charts for one of its documents; None for other documents or without the runner."""
    if not (isinstance(doc, dict) and str(doc.get("schema", "")).startswith("exo_lab.bench/") and bench_available()):
        return None
    try:
        from exo_lab.bench import BenchResult
        from exo_lab.bench.plot import concurrency_lines, decode_bars, measured_vs_predicted, sweep_charts

        result = BenchResult.from_json(doc)
        if not result.ok:
            return None
        sweep = [pn.pane.Bokeh(f) for f in sweep_charts(result)] if result.is_sweep else []
        if result.target.get("kind", "plans") != "plans":  # a running instance or a URL: no plans, no predictions
            return sweep or None
        figs = [decode_bars(result), measured_vs_predicted(result), concurrency_lines(result)]
    except Exception as exc:
        log.info("bench charts from exo_lab.bench failed (%s); drawing the generic ones", exc)
        return None
    return [pn.Row(pn.pane.Bokeh(figs[0]), pn.pane.Bokeh(figs[1]), margin=0), pn.pane.Bokeh(figs[2]), *sweep]


def bench_figures(rows: list[dict[str, Any]]) -> list[Any]:
    """Bar charts of predicted vs measured decode tok/s and TTFT per plan."""
    from bokeh.transform import dodge

    labels = [r["label"] if len(r["label"]) <= 60 else r["label"][:57] + "…" for r in rows]
    figs = []
    for key, title, unit in (("decode_tps", "Decode tokens/s", "tok/s"), ("ttft_s", "Time to first token", "s")):
        data = {
            "plan": labels,
            "predicted": [r[f"predicted_{key}"] or 0 for r in rows],
            "measured": [r[f"measured_{key}"] or 0 for r in rows],
        }
        if not any(data["measured"]):
            continue
        src = ColumnDataSource(data)
        height = 70 + 46 * len(rows)
        fig = figure(
            y_range=FactorRange(factors=list(reversed(labels))),
            x_range=DataRange1d(start=0),
            height=height,
            sizing_mode="stretch_width",
            title=Title(text=title, text_font_size="13px", text_color=FG),
            tools="",
            toolbar_location=None,
            outline_line_color=None,
            name=f"exo-bench-{key}",
        )
        fig.hbar(
            y=dodge("plan", 0.17, range=fig.y_range),
            right="predicted",
            height=0.3,
            source=src,
            color="#f0a04b",
            legend_label="predicted",
        )
        fig.hbar(
            y=dodge("plan", -0.17, range=fig.y_range),
            right="measured",
            height=0.3,
            source=src,
            color=ACCENT,
            legend_label="measured",
        )
        fig.add_tools(
            HoverTool(
                tooltips=[
                    ("plan", "@plan"),
                    ("predicted", f"@predicted{{0.00}} {unit}"),
                    ("measured", f"@measured{{0.00}} {unit}"),
                ]
            )
        )
        fig.xaxis.axis_label = unit
        fig.legend.location = "bottom_right"
        fig.legend.orientation = "horizontal"
        fig.legend.label_text_font_size = "11px"
        fig.grid.grid_line_color = "#eef1f4"
        fig.axis.axis_line_color = BORDER
        fig.axis.major_label_text_color = FG2
        fig.ygrid.grid_line_color = None
        figs.append(fig)
    return figs


class BenchView:
    """The bench card: a file input and the charts of the loaded result (``source.bench``)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._version = -1
        self.input = pn.widgets.FileInput(accept=".json", multiple=False, width=260)
        self.input.param.watch(self._on_bench_file, "value")
        self.area = pn.Column(sizing_mode="stretch_width", margin=0)
        self.card = card(
            html_pane(card_title("Bench results", "predicted vs measured, per plan")),
            pn.Row(self.input, margin=0),
            self.area,
        )

    def update(self) -> None:
        """Redraw when the source holds another bench result."""
        if self.source.bench_version != self._version:
            self._version = self.source.bench_version
            self._draw_bench()

    def _draw_bench(self) -> None:
        doc = self.source.bench
        if doc is None:
            hint = (
                "Load a bench result (<code>exo-lab bench MODEL --json results.json</code>) to compare predicted "
                "and measured speed per plan."
                if bench_available()
                else "Load a bench result JSON to compare predicted and measured speed per plan "
                "(the bench runner is not part of this installation)."
            )
            self.area.objects = [html_pane(f"<div class='exo-hint'>{hint}</div>")]
            return
        try:
            rows = bench_rows(doc)
        except ValueError as exc:
            self.area.objects = [html_pane(f"<div class='exo-error'>{html.escape(str(exc))}</div>")]
            return
        model = doc.get("model", "") if isinstance(doc, dict) else ""
        text = f"{len(rows)} plan{'s' if len(rows) != 1 else ''} measured" + (
            f" for <b>{html.escape(str(model))}</b>" if model else ""
        )
        if isinstance(doc, dict) and doc.get("pp"):
            text += f" · {doc['pp']}-token prompts, {doc.get('tg')} generated tokens"
        charts = bench_module_charts(doc)
        if charts is None:
            charts = [
                pn.Row(
                    *[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in bench_figures(rows)],
                    sizing_mode="stretch_width",
                    margin=0,
                )
            ]
        self.area.objects = [html_pane(f"<div class='exo-note'>{text}</div>"), *charts]

    def _on_bench_file(self, event: Any) -> None:
        if not event.new:
            return
        try:
            self.source.load_bench(event.new)
        except (ValueError, UnicodeDecodeError) as exc:
            self.area.objects = [html_pane(f"<div class='exo-error'>Not a bench result: {html.escape(str(exc))}</div>")]
