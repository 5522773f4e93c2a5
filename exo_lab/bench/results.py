"""Bench results: per-plan measurements beside predictions, their JSON schema, tables and plots."""

from __future__ import annotations

import html
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exo_lab.bench.metrics import FIT_METRICS, METRICS
from exo_lab.bench.plot import plot as _plot
from exo_lab.cluster.display import html_table, text_table
from exo_lab.placement.plan import Plan, Plans

SCHEMA = "exo_lab.bench/2"
#: older documents this exo_lab still reads (``/1``: one pp and tg, plans only; no sweep points)
READS = ("exo_lab.bench/1", SCHEMA)
LINKS_SOURCE = "computed-from-plan"


class BenchError(RuntimeError):
    """A benchmark could not run (bad arguments, a failed generation)."""


# ----------------------------------------------------------------------------- results


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolated linearly between the closest ranks."""
    vals = sorted(values)
    pos = (len(vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread of ``values``: ``{"median", "min", "max", "p10", "p90", "stdev", "n", "values"}``."""
    vals = [float(v) for v in values]
    if not vals:
        return {
            "median": None,
            "min": None,
            "max": None,
            "p10": None,
            "p90": None,
            "stdev": None,
            "n": 0,
            "values": [],
        }
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "p10": percentile(vals, 10),
        "p90": percentile(vals, 90),
        "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "values": vals,
    }


@dataclass
class SweepPoint:
    """One combination of a sweep: ``concurrency`` requests of ``pp`` prompt and ``tg`` generated tokens at
    once, ``repeat`` times. Per-request rates over every request; aggregate tokens/s per repeat.

    ``timing`` says where the timings come from: ``"engine"`` (rank 0's own clock, an instance this
    process holds) or ``"stream"`` (this client's clock over the streamed chunks of an HTTP answer:
    TTFT from sending the request to the first chunk with text, decode from the first to the last).
    ``prompt_tps`` is prompt tokens / TTFT on either, so servers compare like with like."""

    pp: int
    tg: int
    concurrency: int
    status: str = "ok"  # "ok" or "failed"
    reason: str | None = None
    timing: str = "engine"
    ttft_s: dict[str, Any] = field(default_factory=lambda: stat([]))
    prompt_tps: dict[str, Any] = field(default_factory=lambda: stat([]))
    decode_tps: dict[str, Any] = field(default_factory=lambda: stat([]))
    aggregate_tps: dict[str, Any] = field(default_factory=lambda: stat([]))
    client_ttft_s: dict[str, Any] = field(default_factory=lambda: stat([]))
    wall_s: dict[str, Any] = field(default_factory=lambda: stat([]))
    prompt_tokens: list[int] = field(default_factory=list)  # per request, as the server counted them
    completion_tokens: list[int] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # timings the server reported itself (llama.cpp's)
    predicted: dict[str, Any] = field(default_factory=dict)  # METRICS and aggregate_tps, for a known plan

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def median(self, metric: str) -> float | None:
        m = getattr(self, metric, None)
        return m.get("median") if isinstance(m, dict) else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepPoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class ConcurrencyPoint:
    """``concurrency`` requests at once, ``repeat`` times: aggregate tokens/s and time to first token."""

    concurrency: int
    aggregate_tps: dict[str, Any]  # stat over repeats: completion tokens / wall time
    client_ttft_s: dict[str, Any]  # stat over every request: submit -> first token (queueing included)
    wall_s: dict[str, Any]
    predicted_aggregate_tps: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConcurrencyPoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class LinkTraffic:
    """Bytes one rank sends another for one request (computed from the plan, see the module doc)."""

    src: str
    dst: str
    src_name: str
    dst_name: str
    kind: str  # "pipeline hop" or "tensor all-reduce"
    from_rank: int
    to_rank: int
    prefill_bytes: float
    decode_bytes_per_token: float
    bytes_per_request: float
    source: str = LINKS_SOURCE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinkTraffic:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class PlanBench:
    """One plan's benchmark: what it was predicted to do, what it did, and the ratio."""

    index: int  # the plan's rank in the plans it came from
    description: str
    strategy: str
    status: str  # "ok", "skipped" or "failed"
    plan: dict[str, Any]
    reason: str | None = None
    predicted: dict[str, Any] = field(default_factory=dict)  # METRICS + breakdown + aggregate_tps
    measured: dict[str, Any] = field(default_factory=dict)  # metric -> stat, plus token counts
    ratios: dict[str, float] = field(default_factory=dict)  # measured median / predicted
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> bytes
    links: list[LinkTraffic] = field(default_factory=list)
    concurrency: list[ConcurrencyPoint] = field(default_factory=list)
    launch_s: float | None = None
    points: list[SweepPoint] = field(default_factory=list)  # every (pp, tg, concurrency) of the sweep
    trace: dict[str, Any] | None = None  # a traced request (bench --trace): exo_lab.engine.trace.Trace.to_json()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def median(self, metric: str) -> float | None:
        m = self.measured.get(metric)
        return m.get("median") if isinstance(m, dict) else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["links"] = [link.to_json() for link in self.links]
        d["concurrency"] = [c.to_json() for c in self.concurrency]
        d["points"] = [p.to_json() for p in self.points]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanBench:
        data = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        data["links"] = [LinkTraffic.from_json(x) for x in d.get("links", [])]
        data["concurrency"] = [ConcurrencyPoint.from_json(x) for x in d.get("concurrency", [])]
        data["points"] = [SweepPoint.from_json(x) for x in d.get("points", [])]
        return cls(**data)


@dataclass
class Calibration:
    """Fitted efficiency factors and the prediction error before and after them (same measurements)."""

    constants: dict[
        str, dict[str, Any]
    ]  # node id -> {"decode_efficiency", "prefill_efficiency", "hop_overhead_s", "row_efficiency", "group"}
    before: dict[str, Any]  # {"mape", "per_metric": {metric: mape}, "per_plan": {index: {metric: error %}}}
    after: dict[str, Any]
    predicted_after: dict[str, dict[str, float]]  # plan index -> METRICS predicted with the factors
    metrics: list[str] = field(default_factory=lambda: list(FIT_METRICS))
    stored: dict[str, str | None] = field(default_factory=dict)  # node id -> where the agent stored it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def summary(self) -> str:
        return (
            f"prediction error (MAPE of {' and '.join(self.metrics)} over {len(self.before.get('per_plan', {}))} "
            f"plans): before {self.before['mape']:.1f}%, after calibration {self.after['mape']:.1f}%"
        )


@dataclass
class BenchResult:
    """A whole bench run: settings, the cluster it ran on, and one :class:`PlanBench` per plan."""

    model: str
    model_ref: str
    pp: int
    tg: int
    repeat: int
    warmup: int
    concurrency: list[int]
    plans: list[PlanBench]
    topology: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)  # how the exact-length prompt was built
    calibration: Calibration | None = None
    components: dict[str, Any] | None = None  # calibration per component from the traces (bench/components.py)
    created: float = field(default_factory=time.time)
    exo_lab_version: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    schema: str = SCHEMA
    #: every size of the sweep: {"pp": [...], "tg": [...], "concurrency": [...]}; ``pp`` and ``tg`` above are the first
    sweep: dict[str, list[int]] = field(default_factory=dict)
    #: what was measured: {"kind": "plans"} (launched here), {"kind": "instance", "id", "name", "api"} (already
    #: running in the cluster) or {"kind": "url", "url", "model"} (any OpenAI-compatible server)
    target: dict[str, Any] = field(default_factory=lambda: {"kind": "plans"})

    def __post_init__(self) -> None:
        if not self.sweep:
            self.sweep = {"pp": [self.pp], "tg": [self.tg], "concurrency": list(self.concurrency)}

    # -- JSON
    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["plans"] = [p.to_json() for p in self.plans]
        d["calibration"] = self.calibration.to_json() if self.calibration else None
        return json.loads(json.dumps(d))  # plain JSON types only (tuples -> lists, int keys -> str)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchResult:
        if d.get("schema") not in READS:
            raise ValueError(
                f"not an exo_lab bench document (schema {d.get('schema')!r}); this exo_lab reads {', '.join(READS)}"
            )
        data = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        data["schema"] = SCHEMA  # an older document is read as the current version (its new fields defaulted)
        data["plans"] = [PlanBench.from_json(p) for p in d["plans"]]
        data["calibration"] = Calibration.from_json(d["calibration"]) if d.get("calibration") else None
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        return cls.from_json(json.loads(Path(path).read_text()))

    # -- views
    @property
    def ok(self) -> list[PlanBench]:
        return [p for p in self.plans if p.ok]

    def mape(self) -> float | None:
        """Mean absolute percentage error of the predictions (decode tok/s and TTFT) over the plans that ran."""
        return _mape([(p.predicted, p.measured) for p in self.ok])[0]

    def measured_for(self, plans: Plans | Sequence[Plan]) -> dict[int, dict[str, float]]:
        """``{rank: {"decode_tps", "prefill_tps", "ttft_s"}}`` for ``plans`` (matched by split), as
        :class:`~exo_lab.ui.plan_comparison.PlanComparison` takes in ``measured``."""
        seq = plans.plans if isinstance(plans, Plans) else list(plans)
        by_key = {_plan_key(p.plan): p for p in self.ok}
        out: dict[int, dict[str, float]] = {}
        for i, plan in enumerate(seq):
            hit = by_key.get(plan.key)
            if hit is not None:
                out[i] = {m: v for m in METRICS if (v := hit.median(m)) is not None}
        return out

    def show_in(self, widget: Any) -> None:
        """Put these measurements beside the predictions of a plan comparison widget."""
        widget.measured = self.measured_for(widget.plans)

    HEADER = [
        "#",
        "plan",
        "status",
        "TTFT ms meas/pred",
        "prefill tok/s meas/pred",
        "decode tok/s meas/pred",
        "decode ratio",
        "peak RSS MB per node (plan)",
        "agg tok/s by concurrency",
        "link bytes/request*",
    ]

    def rows(self) -> list[list[str]]:
        out = []
        for p in self.plans:
            if not p.ok:
                out.append([str(p.index), p.description, p.status, "", "", "", "", "", "", p.reason or ""])
                continue
            pr = p.predicted
            mem = ", ".join(
                f"{m['name']} {_mb(m.get('peak_rss_bytes'))} ({_mb(m.get('predicted_bytes'))})"
                for m in p.memory.values()
            )
            conc = " ".join(f"c{c.concurrency}:{_num(c.aggregate_tps.get('median'))}" for c in p.concurrency)
            links = ", ".join(
                f"{x.src_name}->{x.dst_name} {_bytes(x.bytes_per_request)}" for x in p.links if x.src != x.dst
            ) or ("loopback only" if p.links else "-")
            ttft = p.median("ttft_s")
            out.append(
                [
                    str(p.index),
                    p.description,
                    "ok",
                    f"{_num(None if ttft is None else 1000 * ttft)} / {_num(1000 * pr['ttft_s'])}",
                    f"{_num(p.median('prefill_tps'))} / {_num(pr['prefill_tps'])}",
                    f"{_num(p.median('decode_tps'))} / {_num(pr['decode_tps'])}",
                    f"{p.ratios.get('decode_tps', 0.0):.2f}x",
                    mem,
                    conc,
                    links,
                ]
            )
        return out

    SWEEP_HEADER = [
        "target",
        "pp",
        "tg",
        "c",
        "TTFT ms median [p10-p90]",
        "prompt tok/s",
        "decode tok/s [p10-p90]",
        "agg tok/s",
        "pred decode",
        "peak RSS MB per node",
    ]

    @property
    def is_sweep(self) -> bool:
        """More than one size, or a target this bench did not launch: the sweep table says it all."""
        sizes = len(self.sweep.get("pp", [])) * len(self.sweep.get("tg", [])) * len(self.sweep.get("concurrency", []))
        return sizes > 1 or self.target.get("kind", "plans") != "plans"

    def sweep_rows(self) -> list[list[str]]:
        """One row per plan (or target) and combination: medians with their p10-p90 spread."""
        out = []
        for p in self.plans:
            label = f"#{p.index} {p.description}" if self.target.get("kind", "plans") == "plans" else p.description
            if not p.ok and not p.points:
                out.append([label, "", "", "", p.status, "", "", "", "", p.reason or ""])
                continue
            mem = ", ".join(f"{m['name']} {_mb(m.get('peak_rss_bytes'))}" for m in p.memory.values()) or "n/a"
            for pt in p.points:
                if not pt.ok:
                    out.append(
                        [label, str(pt.pp), str(pt.tg), str(pt.concurrency), "failed", "", "", "", "", pt.reason or ""]
                    )
                    continue
                ttft = pt.ttft_s
                out.append(
                    [
                        label,
                        str(pt.pp),
                        str(pt.tg),
                        str(pt.concurrency),
                        f"{_ms(ttft.get('median'))} [{_ms(ttft.get('p10'))}-{_ms(ttft.get('p90'))}]",
                        _num(pt.median("prompt_tps")),
                        f"{_num(pt.median('decode_tps'))} [{_num(pt.decode_tps.get('p10'))}-"
                        f"{_num(pt.decode_tps.get('p90'))}]",
                        _num(pt.median("aggregate_tps")),
                        _num(pt.predicted.get("decode_tps")),
                        mem,
                    ]
                )
        return out

    def sweep_table(self) -> str:
        return text_table(self.SWEEP_HEADER, self.sweep_rows())

    def _title(self) -> str:
        kind = self.target.get("kind", "plans")
        where = {"url": f" at {self.target.get('url')}", "instance": f" instance {self.target.get('id')}"}.get(kind, "")
        sizes = self.sweep or {"pp": [self.pp], "tg": [self.tg], "concurrency": self.concurrency}
        return (
            f"bench {self.model}{where}: pp={','.join(map(str, sizes['pp']))} tg={','.join(map(str, sizes['tg']))} "
            f"repeat={self.repeat} concurrency={','.join(map(str, sizes['concurrency']))}"
        )

    def table(self) -> str:
        if self.target.get("kind", "plans") != "plans":
            lines = [self._title(), self.sweep_table()]
            if self.notes.get("timing"):
                lines.append(f"timing: {self.notes['timing']}")
            return "\n".join(lines)
        lines = [
            self._title(),
            text_table(self.HEADER, self.rows()),
            f"* {self.notes.get('links', '')}",
        ]
        if self.is_sweep:
            lines += ["every combination:", self.sweep_table()]
        skipped = [p for p in self.plans if p.status == "skipped"]
        if skipped:
            lines.append(f"skipped {len(skipped)} plan(s): " + "; ".join(f"#{p.index} {p.reason}" for p in skipped[:3]))
        if self.calibration:
            lines.append(self.calibration.summary())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        title = f"<b>{html.escape(self._title())}</b>"
        sweep = html_table(self.SWEEP_HEADER, self.sweep_rows()) if self.is_sweep else ""
        if self.target.get("kind", "plans") != "plans":
            return title + sweep
        cal = f"<p>{html.escape(self.calibration.summary())}</p>" if self.calibration else ""
        return (
            title
            + html_table(self.HEADER, self.rows())
            + f"<small>* {html.escape(self.notes.get('links', ''))}</small>{cal}"
            + sweep
        )

    def plot(self) -> Any:
        """Bokeh layout: decode tok/s per plan (measured and predicted bars), measured against predicted
        for every metric (log axes, y = x is a perfect prediction), and tokens/s against concurrency; for a
        sweep, tokens/s against prompt length and against concurrency for every combination."""
        return _plot(self)

    def save_plot(self, path: str | Path) -> Path:
        """Write :meth:`plot` as a standalone HTML page (bokeh's resources inlined: it opens offline)."""
        from bokeh.embed import file_html
        from bokeh.resources import INLINE

        path = Path(path)
        path.write_text(file_html(self.plot(), INLINE, title=self._title()))
        return path


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _ms(x: float | None) -> str:
    return _num(None if x is None else 1000 * x)


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _bytes(x: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:.0f} B"


def _plan_key(d: dict[str, Any]) -> tuple:
    return tuple(
        (r["node_id"], r["stage"], tuple(r["layers"]), r["tensor_index"], r["tensor_size"], r["dtype"])
        for r in d["ranks"]
    )


def _errors(pred: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
    out = {}
    for m in FIT_METRICS:
        meas = (measured.get(m) or {}).get("median")
        if meas and pred.get(m) is not None:
            out[m] = 100.0 * abs(pred[m] - meas) / meas
    return out


def _mape(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[float | None, dict[str, float]]:
    per_metric: dict[str, list[float]] = {}
    for pred, meas in pairs:
        for m, e in _errors(pred, meas).items():
            per_metric.setdefault(m, []).append(e)
    allv = [e for v in per_metric.values() for e in v]
    return (sum(allv) / len(allv) if allv else None), {m: sum(v) / len(v) for m, v in per_metric.items()}


# ----------------------------------------------------------------------------- schema


_STAT = {
    "type": "object",
    "required": ["median", "min", "max", "stdev", "n", "values"],
    "properties": {
        "median": {"type": ["number", "null"]},
        "n": {"type": "integer", "minimum": 0},
        "values": {"type": "array", "items": {"type": "number"}},
    },
}
_METRICS_OBJ = {
    "type": "object",
    "required": list(METRICS),
    "properties": {m: {"type": "number", "exclusiveMinimum": 0} for m in METRICS},
}

_SPREAD = {**_STAT, "required": [*_STAT["required"], "p10", "p90"]}
_SIZES = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1}
_POINT = {
    "type": "object",
    "required": [
        "pp",
        "tg",
        "concurrency",
        "status",
        "reason",
        "timing",
        "ttft_s",
        "prompt_tps",
        "decode_tps",
        "aggregate_tps",
        "client_ttft_s",
        "wall_s",
        "prompt_tokens",
        "completion_tokens",
        "server",
        "predicted",
    ],
    "properties": {
        "pp": {"type": "integer", "minimum": 1},
        "tg": {"type": "integer", "minimum": 1},
        "concurrency": {"type": "integer", "minimum": 1},
        "status": {"enum": ["ok", "failed"]},
        "timing": {"enum": ["engine", "stream"]},
        "prompt_tokens": {"type": "array", "items": {"type": "integer"}},
        "completion_tokens": {"type": "array", "items": {"type": "integer"}},
    },
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {
        "properties": {
            m: {**_SPREAD, "properties": {**_SPREAD["properties"], "n": {"type": "integer", "minimum": 1}}}
            for m in ("ttft_s", "prompt_tps", "decode_tps", "aggregate_tps", "wall_s")
        }
    },
}
#: what a plan this bench launched and measured carries beyond a sweep's points
_LAUNCHED_OK = {
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {
        "properties": {
            "predicted": {**_METRICS_OBJ, "required": [*METRICS, "breakdown", "aggregate_tps"]},
            "measured": {
                "type": "object",
                "required": [
                    *METRICS,
                    "engine_prompt_tps",
                    "total_s",
                    "client_ttft_s",
                    "prompt_tokens",
                    "completion_tokens",
                ],
                "properties": {
                    **{m: _STAT for m in (*METRICS, "engine_prompt_tps", "client_ttft_s")},
                    "prompt_tokens": {"type": "array", "items": {"type": "integer"}},
                    "completion_tokens": {"type": "array", "items": {"type": "integer"}},
                },
            },
            "ratios": {"type": "object", "required": list(METRICS)},
            "launch_s": {"type": "number"},
            "memory": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "type": "object",
                    "required": ["name", "predicted_bytes", "rss_bytes", "peak_rss_bytes", "ranks"],
                },
            },
            "concurrency": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": [
                        "concurrency",
                        "aggregate_tps",
                        "client_ttft_s",
                        "wall_s",
                        "predicted_aggregate_tps",
                    ],
                    "properties": {"aggregate_tps": _STAT, "client_ttft_s": _STAT, "wall_s": _STAT},
                },
            },
        }
    },
}

JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://exo-lab.dev/schemas/bench-2.json",
    "title": SCHEMA,
    "type": "object",
    "required": [
        "schema",
        "created",
        "exo_lab_version",
        "model",
        "model_ref",
        "pp",
        "tg",
        "repeat",
        "warmup",
        "concurrency",
        "sweep",
        "target",
        "prompt",
        "topology",
        "profiles",
        "card",
        "plans",
        "calibration",
        "notes",
    ],
    "properties": {
        "schema": {"const": SCHEMA},
        "pp": {"type": "integer", "minimum": 1},
        "tg": {"type": "integer", "minimum": 1},
        "repeat": {"type": "integer", "minimum": 1},
        "warmup": {"type": "integer", "minimum": 0},
        "concurrency": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
        "sweep": {"type": "object", "required": ["pp", "tg", "concurrency"], "additionalProperties": _SIZES},
        "target": {
            "type": "object",
            "required": ["kind"],
            "properties": {"kind": {"enum": ["plans", "instance", "url"]}},
            "allOf": [
                {"if": {"properties": {"kind": {"const": "url"}}}, "then": {"required": ["url", "model"]}},
                {"if": {"properties": {"kind": {"const": "instance"}}}, "then": {"required": ["id", "name"]}},
            ],
        },
        "prompt": {"type": "object"},
        "topology": {"type": "object"},
        "profiles": {"type": "object", "additionalProperties": {"type": "object"}},
        "card": {"type": "object"},
        "notes": {"type": "object"},
        "plans": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "index",
                    "description",
                    "strategy",
                    "status",
                    "reason",
                    "plan",
                    "predicted",
                    "measured",
                    "ratios",
                    "memory",
                    "links",
                    "concurrency",
                    "launch_s",
                    "points",
                ],
                "properties": {
                    "status": {"enum": ["ok", "skipped", "failed"]},
                    "points": {"type": "array", "items": _POINT},
                    "trace": {"type": ["object", "null"], "required": ["id", "ranks", "spans", "predicted"]},
                    "links": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "src",
                                "dst",
                                "kind",
                                "prefill_bytes",
                                "decode_bytes_per_token",
                                "bytes_per_request",
                                "source",
                            ],
                            "properties": {"source": {"const": LINKS_SOURCE}},
                        },
                    },
                },
            },
        },
        "calibration": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["constants", "before", "after", "predicted_after", "metrics", "stored"],
                    "properties": {
                        "constants": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "required": ["decode_efficiency", "prefill_efficiency", "hop_overhead_s", "group"],
                            },
                        },
                        "before": {"type": "object", "required": ["mape", "per_metric", "per_plan"]},
                        "after": {"type": "object", "required": ["mape", "per_metric", "per_plan"]},
                    },
                },
            ]
        },
    },
    "allOf": [
        {  # plans launched by this bench: the cluster they ran on, and each plan's prediction beside its measurement
            "if": {"properties": {"target": {"properties": {"kind": {"const": "plans"}}}}},
            "then": {
                "properties": {
                    "prompt": {"required": ["tokens", "template_tokens", "method"]},
                    "topology": {"required": ["version", "nodes", "links"]},
                    "card": {"required": ["hidden_size", "num_layers"]},
                    "notes": {"required": ["links"]},
                    "plans": {"items": {"properties": {"plan": {"required": ["ranks", "strategy"]}}, **_LAUNCHED_OK}},
                }
            },
        }
    ],
}


def validate(doc: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``doc`` is a valid document of the current version (:data:`SCHEMA`; read an
    older one with :meth:`BenchResult.from_json`, which brings it to this version)."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    try:
        import jsonschema
    except ImportError:  # the structural check above and below is what we can do without it
        missing = [k for k in JSON_SCHEMA["required"] if k not in doc]
        if missing:
            raise ValueError(f"missing fields: {missing}") from None
        return
    try:
        jsonschema.validate(doc, JSON_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(f"invalid {SCHEMA} document at /{where}: {exc.message}") from exc
