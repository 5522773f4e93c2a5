"""Ranked plans side by side, with the selected one drawn on the cluster: what ``cluster.preview(model)`` shows.

:class:`PlanComparison` is an ``ipywidgets.VBox`` of two widgets: a :class:`PlanTable` (an anywidget: the
ranked table, the selected plan's details and its Launch button) and a
:class:`~exo_lab.ui.topology_widget.TopologyWidget` whose ``highlight`` shows the selected plan's stages.
Python does the sums (table rows, stage labels, measured/predicted ratios); the front ends only draw.
A click on a row sets ``selected``; the observer here moves the highlight and ``plans.selected``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets
import traitlets

from exo_lab.cluster.topology import Topology
from exo_lab.placement.plan import Plan, Plans
from exo_lab.ui import topology_widget as tw

log = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# One colour per pipeline stage, the same in the table and on the graph (readable on light and dark).
STAGE_COLORS = ("#1e88e5", "#d81b60", "#43a047", "#f4511e", "#8e24aa", "#00897b", "#6d4c41", "#3949ab")
METRICS = ("decode_tps", "prefill_tps", "ttft_s")  # what a bench can measure, in ``measured``
NO_LAUNCH = "preview on a live cluster (cluster.preview) to launch"


def can_launch(plan: Plan) -> bool:
    """A plan launches when it came from a live cluster's preview (the launch itself reports other problems)."""
    return callable(getattr(plan, "launch", None)) and getattr(plan, "_cluster", None) is not None and plan.feasible


INFEASIBLE_SHOWN = 50


def stage_color(stage: int) -> str:
    return STAGE_COLORS[stage % len(STAGE_COLORS)]


def _layers(layers: tuple[int, int] | list[int]) -> str:
    start, end = layers
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def plan_stages(plan: Plan) -> list[dict[str, Any]]:
    """The plan's stages in order: nodes, layers, tensor width, dtype, colour and ``describe()``'s text for it."""
    by_stage: dict[int, list] = {}
    for r in plan.ranks:
        by_stage.setdefault(r.stage, []).append(r)
    out = []
    for s in sorted(by_stage):
        rs = by_stage[s]
        ids = list(dict.fromkeys(r.node_id for r in rs))
        first = rs[0]
        dt = first.dtype
        note = _SHORT.get(dt, dt) if plan.model_dtype and dt != plan.model_dtype else ""
        tp = f" x{first.tensor_size}" if first.tensor_size > 1 else ""
        names = sorted({r.node_name for r in rs})
        out.append(
            {
                "stage": s,
                "color": stage_color(s),
                "node_ids": ids,
                "node_names": [plan.node_names.get(i, i) for i in ids],
                "layers": list(first.layers),
                "tensor_size": first.tensor_size,
                "dtype": dt,
                "dtype_note": note,
                "text": f"{'+'.join(names)}{tp}[{first.layers[0]}:{first.layers[1]}]{' ' + note if note else ''}",
            }
        )
    return out


def stage_label(stage: dict[str, Any]) -> str:
    """``stage 0 · layers 0-15 · x2 fp32``: what a node's pill on the graph says."""
    tp = f"x{stage['tensor_size']}" if stage["tensor_size"] > 1 else ""
    extra = " ".join(x for x in (tp, stage["dtype_note"]) if x)
    return " · ".join(x for x in (f"stage {stage['stage']}", _layers(stage["layers"]), extra) if x)


def plan_highlight(plan: Plan) -> dict[str, Any]:
    """``TopologyWidget.highlight`` for a plan: a pill and colour per node used, and the links it sends over.

    Links are those between consecutive stages, and within a stage whose tensor group spans nodes.
    """
    stages = plan_stages(plan)
    nodes: dict[str, dict[str, str]] = {}
    for st in stages:
        for node_id in st["node_ids"]:
            if node_id in nodes:  # one node in two stages: both labels, first stage's colour
                nodes[node_id]["label"] += f" / {stage_label(st)}"
            else:
                nodes[node_id] = {"label": stage_label(st), "color": st["color"]}
    edges: list[list[str]] = []

    def add(a: str, b: str) -> None:
        if a != b and [a, b] not in edges and [b, a] not in edges:
            edges.append([a, b])

    for st in stages:
        for i, a in enumerate(st["node_ids"]):
            for b in st["node_ids"][i + 1 :]:
                add(a, b)
    for st, nxt in zip(stages, stages[1:]):
        for a in st["node_ids"]:
            for b in nxt["node_ids"]:
                add(a, b)
    return {"nodes": nodes, "edges": edges}


def _measured_for(measured: dict[Any, Any], index: int) -> dict[str, Any] | None:
    m = measured.get(index, measured.get(str(index)))
    return m if isinstance(m, dict) else None


def compare_measured(plan: Plan, measured: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{metric: {"measured", "predicted", "ratio"}}`` (ratio = measured / predicted) for each metric given."""
    out: dict[str, dict[str, float]] = {}
    for key in METRICS:
        value = (measured or {}).get(key)
        if value is None:
            continue
        predicted = float(getattr(plan, key))
        value = float(value)
        out[key] = {"measured": value, "predicted": predicted, "ratio": value / predicted if predicted else 0.0}
    return out


def plan_row(index: int, plan: Plan, best_decode_tps: float, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row: everything the front end shows for a ranked plan, already computed."""
    stages = plan_stages(plan)
    stage_of = {node_id: st for st in reversed(stages) for node_id in st["node_ids"]}
    memory = []
    for node_id in plan.nodes:
        used, cap = plan.memory_bytes.get(node_id, 0), plan.memory_capacity_bytes.get(node_id, 0)
        memory.append(
            {
                "node_id": node_id,
                "name": plan.node_names.get(node_id, node_id),
                "used_bytes": used,
                "capacity_bytes": cap,
                "frac": used / cap if cap else 1.0,
                "color": stage_of[node_id]["color"] if node_id in stage_of else STAGE_COLORS[0],
            }
        )
    total = sum(plan.breakdown.values())
    breakdown = [
        {"name": k, "seconds": v, "frac": v / total if total else 0.0}
        for k, v in sorted(plan.breakdown.items(), key=lambda kv: -kv[1])
    ]
    return {
        "index": index,
        "description": plan.describe(),
        "strategy": plan.strategy,
        "split": plan.split,
        "backend": plan.backend,
        "num_nodes": plan.num_nodes,
        "num_ranks": len(plan.ranks),
        "stages": stages,
        "memory": memory,
        "ttft_s": plan.ttft_s,
        "prefill_tps": plan.prefill_tps,
        "decode_tps": plan.decode_tps,
        "decode_rel": plan.decode_tps / best_decode_tps if best_decode_tps else 0.0,
        "bottleneck": plan.bottleneck,
        "explanation": plan.explanation,
        "breakdown": breakdown,
        "dtypes": [
            {"node": plan.node_names.get(n, n), "dtype": d, "reason": plan.dtype_reasons.get(n, "")}
            for n, d in plan.dtypes.items()
        ],
        "launchable": can_launch(plan),
        "measured": compare_measured(plan, measured),
    }


class PlanTable(anywidget.AnyWidget):
    """The ranked table; a click (or Enter, or the arrow keys) on a row sets ``selected``.

    The front end sends ``{"event": "launch", "index": i}`` when Launch is pressed; ``launch`` says how
    that went: ``{"index": i, "state": "running" | "done" | "error", "text": ...}``.
    """

    _esm = _STATIC / "plan_comparison.js"
    _css = _STATIC / "plan_comparison.css"

    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    infeasible = traitlets.List(traitlets.Dict()).tag(sync=True)
    summary = traitlets.Dict().tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    limit = traitlets.Int(10).tag(sync=True)
    measured = traitlets.Dict().tag(sync=True)
    launch = traitlets.Dict().tag(sync=True)


class PlanComparison(ipywidgets.VBox):
    """Ranked plans and the cluster graph with the selected plan drawn on it.

    ``selected`` is the rank of the selected plan (-1 when there is none); ``measured`` takes bench
    results, ``{rank: {"decode_tps": ..., "ttft_s": ..., "prefill_tps": ...}}``, shown next to the
    predictions with their ratio.
    """

    selected = traitlets.Int(-1)
    measured = traitlets.Dict()

    def __init__(self, plans: Plans, topology: Topology | None = None, limit: int = 10, **kwargs: Any) -> None:
        if topology is None and plans.cluster is not None:
            topology = getattr(plans.cluster, "topology", None)
        self.plans = plans
        self._launch_lock = threading.Lock()
        self._best_decode_tps = max((p.decode_tps for p in plans.plans), default=0.0)
        selected = min(max(plans.selected, 0), len(plans) - 1) if plans.plans else -1
        self.table = PlanTable(
            limit=max(1, limit),
            selected=selected,
            summary=self._summary(max(1, limit)),
            infeasible=[
                {"description": p.describe(), "strategy": p.strategy, "reason": p.reason or ""}
                for p in plans.infeasible[:INFEASIBLE_SHOWN]
            ],
        )
        self.topology_widget = tw.TopologyWidget(topology=topology) if topology is not None else None
        children = [self.table] + ([self.topology_widget] if self.topology_widget is not None else [])
        super().__init__(children=children, **kwargs)
        self.add_class("exo-plan-comparison")
        traitlets.link((self.table, "selected"), (self, "selected"))
        traitlets.link((self.table, "measured"), (self, "measured"))
        self.table.observe(self._rebuild_rows, names=["limit", "measured"])
        self.table.on_msg(self._on_message)
        self._rebuild_rows()
        self._show(selected)

    def _summary(self, limit: int) -> dict[str, Any]:
        p = self.plans
        first = p.plans[0] if p.plans else (p.infeasible[0] if p.infeasible else None)
        return {
            "model": p.model,
            "objective": p.objective,
            "count": len(p.plans),
            "infeasible": len(p.infeasible),
            "initial_limit": limit,
            "best_decode_tps": self._best_decode_tps,
            "context": first.context if first else None,
            "prompt_tokens": first.prompt_tokens if first else None,
            "batch": first.batch if first else None,
            "no_launch": NO_LAUNCH,
        }

    @property
    def selected_plan(self) -> Plan | None:
        """The selected plan, or None when there is no feasible plan."""
        return self.plans.plans[self.selected] if 0 <= self.selected < len(self.plans) else None

    @traitlets.validate("selected")
    def _valid_selected(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not self.plans.plans:
            return -1
        if not 0 <= value < len(self.plans):
            raise traitlets.TraitError(f"selected must be a plan rank from 0 to {len(self.plans) - 1}, not {value}")
        return value

    @traitlets.validate("measured")
    def _valid_measured(self, proposal: dict[str, Any]) -> dict[Any, Any]:
        for key, value in proposal["value"].items():
            if not str(key).isdigit() or int(key) >= len(self.plans):
                raise traitlets.TraitError(f"measured keys are plan ranks (0 to {len(self.plans) - 1}), not {key!r}")
            unknown = set(value) - set(METRICS) if isinstance(value, dict) else {"(not a dict)"}
            if unknown:
                raise traitlets.TraitError(
                    f"measured[{key!r}] may only hold {', '.join(METRICS)}; got {sorted(unknown)}"
                )
        return proposal["value"]

    @traitlets.observe("selected")
    def _on_selected(self, change: dict[str, Any]) -> None:
        self._show(change["new"])
        if change["new"] >= self.table.limit and change["new"] >= len(self.table.rows):
            self._rebuild_rows()

    def _show(self, index: int) -> None:
        if index >= 0:
            self.plans.selected = index
        if self.topology_widget is not None:
            plan = self.selected_plan
            self.topology_widget.highlight = plan_highlight(plan) if plan is not None else {}
            self.topology_widget.title = f"Plan #{index} on the cluster" if plan is not None else "Cluster topology"

    def _rebuild_rows(self, _change: dict[str, Any] | None = None) -> None:
        shown = min(len(self.plans), max(self.table.limit, self.selected + 1))
        measured = self.table.measured
        self.table.rows = [
            plan_row(i, p, self._best_decode_tps, _measured_for(measured, i))
            for i, p in enumerate(self.plans.plans[:shown])
        ]

    def _on_message(self, _widget: Any, content: dict[str, Any], _buffers: list[bytes]) -> None:
        if content.get("event") == "launch":
            self.launch(int(content.get("index", self.selected)))

    def launch(self, index: int | None = None) -> threading.Thread | None:
        """Call ``plan.launch()`` for the plan at ``index`` (default: the selected one) in the background.

        The widget shows the result or the error. Plans without ``launch`` are refused (None is returned).
        """
        index = self.selected if index is None else index
        if not 0 <= index < len(self.plans):
            raise IndexError(f"no plan #{index}; there are {len(self.plans)}")
        plan = self.plans.plans[index]
        if not can_launch(plan):
            log.info("plan #%d has no launch(): %s", index, NO_LAUNCH)
            return None
        if not self._launch_lock.acquire(blocking=False):
            log.info("a launch is already running")
            return None
        self.table.launch = {"index": index, "state": "running", "text": f"launching plan #{index}…"}
        thread = threading.Thread(target=self._run_launch, args=(index, plan), name="exo-lab-plan-launch", daemon=True)
        thread.start()
        return thread

    def _run_launch(self, index: int, plan: Plan) -> None:
        try:
            result = plan.launch()
        except Exception as exc:
            log.warning("launching plan #%d failed: %s", index, exc)
            self.table.launch = {"index": index, "state": "error", "text": f"{type(exc).__name__}: {exc}"}
        else:
            self.table.launch = {
                "index": index,
                "state": "done",
                "text": repr(result) if result is not None else "launched",
            }
        finally:
            self._launch_lock.release()

    def close(self) -> None:
        """Close the table and the graph too."""
        for child in (self.table, self.topology_widget):
            if child is not None:
                child.close()
        super().close()


def plans_mimebundle(plans: Plans, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The comparison widget for ``Plans._repr_mimebundle_``; None outside a kernel (tables are the fallback)."""
    if not tw.in_widget_kernel():
        return None
    topology = getattr(plans.cluster, "topology", None) if plans.cluster is not None else None
    bundle = PlanComparison(plans, topology=topology)._repr_mimebundle_(**kwargs)
    if bundle is None:
        return None
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    return {**data, "text/plain": repr(plans), "text/html": plans._repr_html_()}, metadata
