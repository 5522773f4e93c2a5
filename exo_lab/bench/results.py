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

SCHEMA = "exo_lab.bench/1"
LINKS_SOURCE = "computed-from-plan"


class BenchError(RuntimeError):
    """A benchmark could not run (bad arguments, a failed generation)."""


# ----------------------------------------------------------------------------- results


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread of ``values``: ``{"median", "min", "max", "stdev", "n", "values"}``."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "stdev": None, "n": 0, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "values": vals,
    }


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
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanBench:
        data = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        data["links"] = [LinkTraffic.from_json(x) for x in d.get("links", [])]
        data["concurrency"] = [ConcurrencyPoint.from_json(x) for x in d.get("concurrency", [])]
        return cls(**data)


@dataclass
class Calibration:
    """Fitted efficiency factors and the prediction error before and after them (same measurements)."""

    constants: dict[
        str, dict[str, Any]
    ]  # node id -> {"decode_efficiency", "prefill_efficiency", "hop_overhead_s", "group"}
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

    # -- JSON
    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["plans"] = [p.to_json() for p in self.plans]
        d["calibration"] = self.calibration.to_json() if self.calibration else None
        return json.loads(json.dumps(d))  # plain JSON types only (tuples -> lists, int keys -> str)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchResult:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} document (schema {d.get('schema')!r}); this exo_lab reads {SCHEMA} only")
        data = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
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

    def table(self) -> str:
        lines = [
            f"bench {self.model}: pp={self.pp} tg={self.tg} repeat={self.repeat} "
            f"concurrency={','.join(map(str, self.concurrency))}",
            text_table(self.HEADER, self.rows()),
            f"* {self.notes.get('links', '')}",
        ]
        skipped = [p for p in self.plans if p.status == "skipped"]
        if skipped:
            lines.append(f"skipped {len(skipped)} plan(s): " + "; ".join(f"#{p.index} {p.reason}" for p in skipped[:3]))
        if self.calibration:
            lines.append(self.calibration.summary())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        cal = f"<p>{html.escape(self.calibration.summary())}</p>" if self.calibration else ""
        return (
            f"<b>bench {html.escape(self.model)}</b> pp={self.pp} tg={self.tg} repeat={self.repeat} "
            f"concurrency={','.join(map(str, self.concurrency))}"
            + html_table(self.HEADER, self.rows())
            + f"<small>* {html.escape(self.notes.get('links', ''))}</small>{cal}"
        )

    def plot(self) -> Any:
        """Bokeh layout: decode tok/s per plan (measured and predicted bars), measured against predicted
        for every metric (log axes, y = x is a perfect prediction), and tokens/s against concurrency."""
        return _plot(self)


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


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

JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://exo-lab.dev/schemas/bench-1.json",
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
        "prompt": {"type": "object", "required": ["tokens", "template_tokens", "method"]},
        "topology": {"type": "object", "required": ["version", "nodes", "links"]},
        "profiles": {"type": "object", "additionalProperties": {"type": "object"}},
        "card": {"type": "object", "required": ["hidden_size", "num_layers"]},
        "notes": {"type": "object", "required": ["links"]},
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
                ],
                "properties": {
                    "status": {"enum": ["ok", "skipped", "failed"]},
                    "plan": {"type": "object", "required": ["ranks", "strategy"]},
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
}


def validate(doc: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``doc`` is a valid ``exo_lab.bench/1`` document."""
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
