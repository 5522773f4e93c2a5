"""Calibration per component: from traces, fit the cost model's compute per node, each link's latency and
bandwidth, and each group's step all-reduce separately; store them; report the error per component.

End-to-end calibration (:mod:`exo_lab.bench.calibrate`) fits per-node factors to tokens/s and TTFT, so a
slow link can hide in a node's compute factor. A trace (:mod:`exo_lab.engine.trace`) measures each part:

- **compute** per stage (the median over decode steps of its slowest rank's compute and sampling): each
  of the stage's nodes gets ``decode_efficiency`` scaled by predicted / measured (the geometric mean over
  the traces that used it) and ``layer_overhead_s`` and ``step_overhead_s`` divided by it, so the model's
  compute time for that stage (its reads, its layers' operations and its step's own) becomes the measured one;
- **link** per hop (``src -> dst`` nodes): each transfer the receiver waited for, from the send's start to
  the data held, with its size (one token's hidden state at decode, a chunk's at prefill): a least-squares
  ``latency + bytes / bandwidth`` when the sizes differ enough, else the latency with the probes' bandwidth;
- **all-reduce** per group of nodes: the step's ``all_sum`` (which also carries the sampled token back to
  the first stage) as its last rank saw it, median over decode steps.

:func:`fit_components` returns a :class:`ComponentFit` with the mean absolute error per component (percent,
over the traces) before and after; :func:`store_components` merges the fitted terms into each node's
calibration (``POST /node/calibration``: ``decode_efficiency``, ``layer_overhead_s``, ``links``, ``all_reduce``), which the
planner reads (:class:`~exo_lab.placement.cost.NodeRates`). Tensor groups' in-layer all-reduces are
measured only where the trace has ``all_reduce`` spans; otherwise they stay inside compute.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from exo_lab.cluster.topology import Topology
from exo_lab.engine.trace import Trace, component_sums
from exo_lab.models import formats
from exo_lab.models.card import ModelCard
from exo_lab.placement.cost import DTYPE_BYTES, NodeRates
from exo_lab.placement.plan import Plan
from exo_lab.placement.predict import Predictor, plan_layout

log = logging.getLogger(__name__)

#: the components whose prediction error is reported
COMPONENTS = ("compute", "link", "all-reduce", "token")


@dataclass
class ComponentFit:
    """Fitted terms per component, and the prediction error per component before and after them."""

    compute: dict[str, float]  # node id -> decode_efficiency
    links: dict[str, dict[str, dict[str, float]]]  # src node -> dst node -> {"latency_s", "bandwidth_bytes_s"}
    all_reduce: dict[str, float]  # sorted node ids, comma-joined -> seconds of a step's all-reduce
    before: dict[str, float]  # component -> mean absolute error, percent of measured
    after: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per trace: component -> measured/before/after s
    stored: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'component':11s} {'error before %':>15s} {'error after %':>14s}"]
        for c in COMPONENTS:
            if c in self.before:
                lines.append(f"{c:11s} {self.before[c]:15.1f} {self.after.get(c, math.nan):14.1f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()


def measured(trace: Trace) -> tuple[dict[str, float], list[bool]]:
    """Per token, seconds: ``compute`` (summed over stages), ``link`` (over the hops whose receiver waited for
    the data in some decode step: the median of those transfers), ``all-reduce``, ``token``; and which hops
    count in ``link`` (all of them, with what their receivers did wait, when none has such a step)."""
    rows = {r["component"]: r["measured_ms"] for r in trace.breakdown()}
    waits = [trace.link_waits(a[-1]) for a in trace.stages()[:-1]]
    counted = [bool(w) for w in waits]
    link = sum(statistics.median(w) for w in waits if w)
    if not any(counted):
        counted = [True] * len(waits)
        link = (rows["link"] or 0.0) / 1e3
    return {
        "compute": sum(trace.stage_compute()),
        "link": link,
        "all-reduce": (rows["all-reduce"] or 0.0) / 1e3,
        "token": (rows["token"] or 0.0) / 1e3,
    }, counted


def components(breakdown: dict[str, float], counted: list[bool]) -> dict[str, float]:
    """:func:`~exo_lab.engine.trace.component_sums` of a prediction, its ``link`` over the ``counted`` hops."""
    out = component_sums(breakdown)
    hops = [v for k, v in breakdown.items() if k.startswith("link ") and not k.endswith("(token)")]
    out["link"] = sum(v for v, c in zip(hops, counted) if c)
    return out


def _shape(trace: Trace) -> tuple[int, int]:
    """The traced request's prompt and generated tokens (for the predictor's request shape)."""
    first = min(trace.ranks)
    prompt = sum(int(s.args.get("tokens", 0)) for s in trace.of(first, "prefill")) + 1
    return max(1, prompt), max(1, len(trace.decode_steps()))


def _predict(
    topology: Topology, card: ModelCard, plan: Plan, trace: Trace, counted: list[bool]
) -> dict[str, float] | None:
    pp, tg = _shape(trace)
    pred = Predictor(topology, card, pp, tg).predict(plan)
    return None if pred is None else components(pred["breakdown"], counted)


def _error(pred: dict[str, float] | None, meas: dict[str, float]) -> dict[str, float]:
    if pred is None:
        return {}
    return {c: 100 * abs(pred[c] - meas[c]) / meas[c] for c in COMPONENTS if meas.get(c)}


def _fit_line(points: list[tuple[float, float]], bandwidth: float) -> tuple[float, float]:
    """``(latency, bandwidth)`` of ``t = latency + bytes / bandwidth`` through ``points`` (bytes, seconds);
    when the sizes are too alike for a slope (their transfer times differ by less than a tenth of the
    latency at ``bandwidth``) or the slope is implausible (a bandwidth beyond 20x of ``bandwidth`` either
    way), the median latency alone with ``bandwidth`` kept."""
    xs = [b for b, _ in points]
    spread = (max(xs) - min(xs)) / bandwidth
    if len(points) >= 3 and spread > 0.1 * statistics.median(t for _, t in points):
        mx, my = statistics.fmean(xs), statistics.fmean(t for _, t in points)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (t - my) for x, t in points) / sxx
        if slope > 0 and bandwidth / 20 <= 1.0 / slope <= 20 * bandwidth:
            latency = my - slope * mx
            if latency > 0:
                return latency, 1.0 / slope
    latency = statistics.median(max(0.0, t - b / bandwidth) for b, t in points)
    return latency, bandwidth


def fit_components(items: list[tuple[Trace, Plan]], topology: Topology, card: ModelCard) -> ComponentFit | None:
    """Fit compute per node, latency and bandwidth per link and the step all-reduce per group to traces of
    ``plans`` (each trace with the plan it ran); None when no trace has decode steps."""
    items = [(t, p) for t, p in items if t.decode_steps()]
    if not items:
        return None
    ratios: dict[str, list[float]] = {}
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    groups: dict[str, list[float]] = {}
    before_rows = []
    for trace, plan in items:
        meas, counted = measured(trace)
        pp, tg = _shape(trace)
        predictor = Predictor(topology, card, pp, tg)
        pred = predictor.predict(plan)
        before_rows.append(
            (trace, plan, meas, counted, None if pred is None else components(pred["breakdown"], counted))
        )
        if pred is None:
            continue
        stages, _ = plan_layout(plan)
        predicted_stage = [v for k, v in pred["breakdown"].items() if k.startswith("compute ")]
        for s, p_s, m_s in zip(stages, predicted_stage, trace.stage_compute()):
            if m_s > 0 and p_s > 0:
                for n in s.nodes:
                    ratios.setdefault(n, []).append(p_s / m_s)
        node_of = {r.rank: r.node_id for r in plan.ranks}
        traced = trace.stages()
        for a, b in zip(traced, traced[1:]):
            key = (node_of[a[-1]], node_of[b[0]])
            # a hidden state travels in the sender's weight format's activations (bf16w, q8: fp32)
            act = formats.activation_dtype_of(plan.dtypes.get(key[0]) or card.dtype)
            hidden_bytes = card.hidden_size * DTYPE_BYTES.get(act, 2)
            pts = [(float(hidden_bytes), w) for w in trace.link_waits(a[-1])]
            pts += [(float(n * hidden_bytes), w) for n, w in trace.prefill_transfers(a[-1], b[0])]
            samples.setdefault(key, []).extend(pts)
        all_sum = trace.step_all_sum()
        if all_sum is not None and len(stages) > 1:
            groups.setdefault(",".join(sorted(set(plan.nodes))), []).append(all_sum)
    base = Predictor(topology, card, 1, 1).ctx
    rates = base.rates
    compute = {
        n: rates[n].decode_efficiency * math.exp(statistics.fmean(math.log(r) for r in rs))
        for n, rs in ratios.items()
        if n in rates
    }
    links: dict[str, dict[str, dict[str, float]]] = {}
    for (a, b), pts in samples.items():
        if not pts or a == b:
            continue
        probe = base.link(a, b)
        latency, bandwidth = _fit_line(pts, probe.bandwidth_bytes_s if probe else 1e9)
        links.setdefault(a, {})[b] = {"latency_s": latency, "bandwidth_bytes_s": bandwidth, "samples": len(pts)}
    all_reduce = {g: statistics.median(v) for g, v in groups.items()}
    after_topo = with_components(topology, compute, links, all_reduce)
    rows, before, after = [], {}, {}
    for trace, plan, meas, counted, pred_before in before_rows:
        pred_after = _predict(after_topo, card, plan, trace, counted)
        rows.append({"trace": trace.id, "measured": meas, "before": pred_before, "after": pred_after})
    for which, out in (("before", before), ("after", after)):
        for c in COMPONENTS:
            errs = [e[c] for r in rows if c in (e := _error(r[which], r["measured"]))]
            if errs:
                out[c] = statistics.fmean(errs)
    return ComponentFit(compute, links, all_reduce, before, after, rows)


def _calibration(topology: Topology, node: str) -> dict[str, Any]:
    return dict(topology.nodes[node].profile.get("calibration") or {})


def merged(topology: Topology, fit_compute: dict[str, float], links: dict, all_reduce: dict[str, float]) -> dict:
    """Each node's calibration with the fitted terms merged in (node id -> calibration dict)."""
    out = {}
    for node in set(fit_compute) | set(links) | {n for g in all_reduce for n in g.split(",")}:
        if node not in topology.nodes:
            continue
        cal = _calibration(topology, node)
        if node in fit_compute:
            # the stage's whole compute time scales: its reads (the efficiency) and its operations' cost alike
            now = NodeRates.from_profile(node, topology.nodes[node].profile)
            cal["decode_efficiency"] = fit_compute[node]
            for term in ("layer_overhead_s", "step_overhead_s"):
                if getattr(now, term) > 0:
                    cal[term] = getattr(now, term) * now.decode_efficiency / fit_compute[node]
        if node in links:
            cal["links"] = {
                **(cal.get("links") or {}),
                **{
                    b: {"latency_s": v["latency_s"], "bandwidth_bytes_s": v["bandwidth_bytes_s"]}
                    for b, v in links[node].items()
                },
            }
        mine = {g: v for g, v in all_reduce.items() if node in g.split(",")}
        if mine:
            cal["all_reduce"] = {**(cal.get("all_reduce") or {}), **mine}
        out[node] = cal
    return out


def with_components(topology: Topology, compute: dict[str, float], links: dict, all_reduce: dict) -> Topology:
    """A copy of ``topology`` whose nodes carry the fitted terms (what the planner would see once stored)."""
    copy = Topology.from_json(topology.to_json())
    for node, cal in merged(topology, compute, links, all_reduce).items():
        copy.nodes[node].profile = {**copy.nodes[node].profile, "calibration": cal}
    return copy


def store_components(cluster: Any, fit: ComponentFit) -> dict[str, str | None]:
    """Merge the fitted terms into each node's calibration on its agent (``POST /node/calibration``)."""
    cluster.refresh()
    stored: dict[str, str | None] = {}
    for node, cal in merged(cluster.topology, fit.compute, fit.links, fit.all_reduce).items():
        cal["components"] = {"fitted_at": time.time(), "error_before": fit.before, "error_after": fit.after}
        try:
            resp = cluster.request(
                cluster.address_of(node), "POST", "/node/calibration", {"calibration": cal}, timeout=10
            )
            stored[node] = resp.get("stored") or "memory (no cached profile on the node)"
        except Exception as exc:
            log.warning("could not store the calibration on %s: %s", node, exc)
            stored[node] = None
    fit.stored = stored
    cluster.refresh()
    return stored
