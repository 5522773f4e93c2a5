"""Calibration: fit the cost model's per-host efficiency factors to bench measurements, and store them."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from exo_lab.bench.results import METRICS, SCHEMA, BenchResult, Calibration, _errors, _mape
from exo_lab.cluster.topology import Topology
from exo_lab.models.card import ModelCard
from exo_lab.placement.plan import Plan
from exo_lab.placement.predict import Predictor, aggregate_tps

log = logging.getLogger(__name__)

# what is fitted per host group: name, log10 bounds of the search, the NodeRates field (row_efficiency: only
# from concurrent requests, which are the only measurements it changes the prediction of)
PARAMETERS = (
    ("decode_efficiency", (-4.0, 1.0)),
    ("prefill_efficiency", (-4.0, 1.0)),
    ("hop_overhead_s", (-7.0, -0.5)),
    ("row_efficiency", (-2.0, 2.0)),
    ("step_overhead_s", (-6.0, -1.0)),
    ("request_overhead_s", (-5.0, 0.0)),
)
#: the factors on the microbenchmarked rates, which :data:`PRIOR` holds near 1
FACTORS = ("decode_efficiency", "prefill_efficiency", "row_efficiency")
#: percentage points of error a factor must pay for each squared decade it moves from 1. A small model's
#: tokens are mostly fixed costs (each step's and each request's): without this, a fit on it found decode and
#: prefill 13x and 26x slower than measured, which then made every large model's prediction as wrong
PRIOR = 2.0
#: the same for an overhead the profile measured, from its measurement (weaker: the profile measures MLX's part
#: of each step, not the serving around it); with both, a large model's slow decode is a slower rate, not a
#: step overhead of a tenth of a second, and a small model's a step overhead, not a rate 13x slower
OVERHEAD_PRIOR = 0.5
MEASURED = ("step_overhead_s",)
#: a model that reads less than this per token may be served from the CPU's caches, not its memory: its
#: measurements say nothing about the rates of a model that does, and the factors on them are not fitted
CACHE_RESIDENT_BYTES = 256 * 2**20
#: a factor is fitted only where doubling or halving it moves some predicted figure by this fraction
SENSITIVITY = 0.05
#: the orders the coordinate descent visits the parameters in (indices into PARAMETERS): overheads first, and
#: factors first; the fit keeps the better end
ORDERS = ((4, 5, 2, 0, 1, 3), (0, 1, 2, 3, 4, 5))
BATCHED = "aggregate_tps"  #: the error of concurrent requests' aggregate tok/s, per concurrency above 1
SWEEPS = 4


def _group(profile: dict[str, Any], node_id: str) -> str:
    """Nodes on one machine with one profile share their calibration (it is stored per cached profile)."""
    return f"{profile.get('hostname') or node_id}/{profile.get('cache_key') or node_id}"


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf  # 10 ** -inf == 0: no overhead


def fit_calibration(result: BenchResult, topology: Any = None, card: ModelCard | None = None) -> Calibration | None:
    """Fit each host group's :data:`PARAMETERS` (efficiency factors on the microbenchmarked rates, the
    overheads of each message, decode step and request) to ``result``'s measurements; None when no plan ran.
    ``topology`` and ``card`` default to the ones recorded in ``result`` (so a saved result can be re-fitted
    offline).

    The objective is the mean absolute percentage error of decode tok/s and TTFT over the plans that ran, and
    of the aggregate tok/s of each concurrency above 1 that was measured (what ``row_efficiency`` fits), plus
    :data:`PRIOR` times each factor's squared log10: a factor moves from 1 only as far as the measurements pay
    for it, and a fixed cost is fitted as an overhead, not as a slower rate.
    Coordinate descent in log space (a grid over each parameter's range refined by golden-section
    search), starting from the calibration the nodes have now; a step is taken only when it lowers the
    objective.
    """
    ok = result.ok
    if not ok:
        return None
    topology = topology if topology is not None else Topology.from_json(result.topology)
    card = card if card is not None else ModelCard.from_json(result.card)
    predictor = Predictor(topology, card, result.pp, result.tg)
    plans = [(p, Plan.from_json(p.plan)) for p in ok]
    nodes = {n: node for n, node in topology.nodes.items() if n in predictor.base}
    groups = {n: _group(node.profile, n) for n, node in nodes.items()}
    used = {n for _, plan in plans for n in plan.nodes}
    fitted = sorted({groups[n] for n in used if n in groups})
    names = [name for name, _ in PARAMETERS]
    start = {}
    for g in fitted:
        r = predictor.base[next(n for n in sorted(used) if groups.get(n) == g)]
        start[g] = [_log10(getattr(r, name)) for name in names]
    theta = {g: list(v) for g, v in start.items()}

    def predictions(th: dict[str, list[float]]) -> list[dict[str, Any] | None]:
        predictor.set_rates(
            {
                n: replace(r, **{name: 10 ** th[groups[n]][i] for i, name in enumerate(names)})
                for n, r in predictor.base.items()
                if groups.get(n) in th
            }
        )
        return [predictor.predict(plan) for _, plan in plans]

    def plan_errors(pb: Any, pred: dict[str, Any]) -> dict[str, float]:
        return {**_errors(pred, pb.measured), **_batched_errors(pred, pb.concurrency, result.tg)}

    factors = [i for i, name in enumerate(names) if name in FACTORS]

    def values(th: dict[str, list[float]]) -> list[float]:
        """Every predicted figure the objective compares with a measurement."""
        out = []
        for (pb, _), pred in zip(plans, predictions(th)):
            if pred is not None:
                out += [pred[m] for m in plan_errors(pb, pred) if m in pred]
                out += [aggregate_tps(pred, result.tg, p.concurrency) for p in pb.concurrency if p.concurrency > 1]
        return out

    def governs(th: dict[str, list[float]], g: str, i: int) -> bool:
        """Whether parameter ``i`` of group ``g`` is an overhead, or a factor whose doubling or halving moves some
        predicted figure by SENSITIVITY, of a model too large for the caches: a factor the measurements hardly
        depend on stays as it is (a small model's tokens barely read weights, and read them from the caches)."""
        if i not in factors:
            return True
        if card.active_bytes_per_token < CACHE_RESIDENT_BYTES:
            return False
        now = values(th)
        for step in (math.log10(2), -math.log10(2)):
            moved = {k: list(v) for k, v in th.items()}
            moved[g][i] += step
            if any(abs(b - a) > SENSITIVITY * abs(a) for a, b in zip(now, values(moved)) if a):
                return True
        return False

    # the measured overheads, which OVERHEAD_PRIOR holds the fitted ones near: group -> [(index, log10 value)]
    measured: dict[str, list[tuple[int, float]]] = {}
    for n in sorted(used):
        if n in nodes and groups[n] in start:
            profile = nodes[n].profile
            measured[groups[n]] = [
                (i, _log10(float(profile[name])))
                for i, name in enumerate(names)
                if name in MEASURED and float(profile.get(name) or 0.0) > 0
            ]

    def error(th: dict[str, list[float]]) -> float:
        errs = [
            v
            for (pb, _), pred in zip(plans, predictions(th))
            if pred is not None
            for v in plan_errors(pb, pred).values()
        ]
        prior = PRIOR * sum(v[i] ** 2 for v in th.values() for i in factors) + OVERHEAD_PRIOR * sum(
            (th[g][i] - x) ** 2 for g, pairs in measured.items() for i, x in pairs
        )
        return sum(errs) / len(errs) + prior if errs else math.inf

    def descend(order: tuple[int, ...]) -> tuple[float, dict[str, list[float]]]:
        """Coordinate descent from ``theta``, visiting the parameters in ``order``: its objective and end."""
        th = {k: list(v) for k, v in theta.items()}
        current = error(th)
        for _sweep in range(SWEEPS):
            moved = False
            for g in fitted:
                for i in (i for i in order if governs(th, g, i)):

                    def f(x: float, g: str = g, i: int = i) -> float:
                        trial = {k: list(v) for k, v in th.items()}
                        trial[g][i] = x
                        return error(trial)

                    x = _minimise(f, *PARAMETERS[i][1])
                    value = f(x)
                    if value < current - 1e-9:
                        th[g][i], current, moved = x, value, True
            if not moved:
                break
        return current, th

    # coordinate descent ends in the basin its first parameters lead to: overheads first, and factors first
    theta = min((descend(order) for order in ORDERS), key=lambda end: end[0])[1]

    def report(th: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        preds = predictions(th)
        pairs = [(pred, pb.measured) for (pb, _), pred in zip(plans, preds) if pred is not None]
        total, per_metric = _mape(pairs)
        per_plan = {str(pb.index): plan_errors(pb, pred) for (pb, _), pred in zip(plans, preds) if pred}
        batched = [e for errs in per_plan.values() for k, e in errs.items() if k.startswith(BATCHED)]
        if batched:  # the objective's mean, over every error it counts
            errs = [e for errs in per_plan.values() for e in errs.values()]
            total, per_metric = sum(errs) / len(errs), {**per_metric, BATCHED: sum(batched) / len(batched)}
        values = {str(pb.index): {m: pred[m] for m in METRICS} for (pb, _), pred in zip(plans, preds) if pred}
        return {"mape": total, "per_metric": per_metric, "per_plan": per_plan}, values

    before, _ = report(start)
    after, predicted_after = report(theta)
    predictor.set_rates({})
    constants = {
        n: {**{name: 10 ** theta[groups[n]][i] for i, name in enumerate(names)}, "group": groups[n]}
        for n in nodes
        if groups[n] in theta
    }
    return Calibration(constants, before, after, predicted_after)


def _batched_errors(pred: dict[str, Any], points: list[Any], tg: int) -> dict[str, float]:
    """Percent error of the predicted aggregate tok/s of each measured concurrency above 1
    (:func:`~exo_lab.placement.predict.aggregate_tps`), keyed ``aggregate_tps@<concurrency>``."""
    out = {}
    for point in points:
        measured = (point.aggregate_tps or {}).get("median")
        if point.concurrency > 1 and measured:
            out[f"{BATCHED}@{point.concurrency}"] = (
                100.0 * abs(aggregate_tps(pred, tg, point.concurrency) - measured) / measured
            )
    return out


def _minimise(f: Any, lo: float, hi: float, points: int = 61, tol: float = 1e-3) -> float:
    """Grid search over [lo, hi], then golden-section search around the best grid point."""
    xs = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    vals = [f(x) for x in xs]
    i = min(range(points), key=vals.__getitem__)
    a, b = xs[max(0, i - 1)], xs[min(points - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    best = min(((xs[i], vals[i]), (c, fc), (d, fd)), key=lambda t: t[1])
    return best[0]


def store_calibration(cluster: Any, calibration: Calibration, result: BenchResult) -> dict[str, str | None]:
    """Send each node its fitted factors (``POST /node/calibration``); the agents keep them with their
    profiles and report them in ``/node``, so the planner uses them. Returns where each was stored."""
    stored: dict[str, str | None] = {}
    for node, const in calibration.constants.items():
        body = {
            "calibration": {
                **const,
                "fitted_at": time.time(),
                "model": result.model,
                "pp": result.pp,
                "tg": result.tg,
                "plans": len(result.ok),
                "mape_before": calibration.before["mape"],
                "mape_after": calibration.after["mape"],
                "source": SCHEMA,
            }
        }
        try:
            resp = cluster.request(cluster.address_of(node), "POST", "/node/calibration", body, timeout=10)
            stored[node] = resp.get("stored") or "memory (no cached profile on the node)"
        except Exception as exc:
            log.warning("could not store the calibration on %s: %s", node, exc)
            stored[node] = None
    cluster.refresh()
    return stored
