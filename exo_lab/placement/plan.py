"""Plans: how a model is split over ranks and nodes, and what that is predicted to give."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

from exo_lab.cluster.display import text_table
from exo_lab.placement.cost import pipelined_round_s, rows_extra_s

STRATEGIES = ("single", "pipeline", "tensor", "pipeline-tensor")
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class RankSpec:
    """One MLX distributed rank: where it runs and which part of the model it holds."""

    rank: int
    node_id: str
    node_name: str
    stage: int
    layers: tuple[int, int]  # [start, end)
    tensor_index: int = 0
    tensor_size: int = 1
    address: str = "127.0.0.1"  # how its ring neighbours reach it
    dtype: str = "bfloat16"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankSpec:
        return cls(**{**d, "layers": tuple(d["layers"])})


@dataclass
class Plan:
    """A way to run a model on a cluster, with its predicted speed and memory."""

    model: str
    strategy: str
    ranks: list[RankSpec]
    backend: str = "ring"
    dtypes: dict[str, str] = field(default_factory=dict)
    dtype_reasons: dict[str, str] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    memory_capacity_bytes: dict[str, int] = field(default_factory=dict)
    prefill_tps: float = 0.0
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    bottleneck: str = ""
    explanation: str = ""
    feasible: bool = True
    reason: str | None = None
    context: int = 4096
    prompt_tokens: int = 512
    batch: int = 1
    breakdown: dict[str, float] = field(default_factory=dict)  # decode seconds per component
    #: extra seconds per decode step for each sequence decoding beside the first (continuous batching)
    decode_row_s: float = 0.0
    #: and for each more pass over the weights, a pass computing ``rows_per_pass`` rows (0: all; cost.rows_extra_s)
    decode_pass_s: float = 0.0
    rows_per_pass: int = 0
    #: per pipeline stage: one row's decode seconds (compute, all-reduces, hand-off), and each more row's
    stage_decode_s: list[float] = field(default_factory=list)
    stage_row_s: list[float] = field(default_factory=list)
    stage_pass_s: list[float] = field(default_factory=list)
    #: per pipeline stage: what its reads take longer in a tick where the other stages compute too (one bus)
    stage_bus_s: list[float] = field(default_factory=list)
    #: seconds each tick of the group schedule adds (the shared tokens' all_sum)
    tick_exchange_s: float = 0.0
    node_names: dict[str, str] = field(default_factory=dict)
    model_dtype: str = ""
    #: how layers were split: proportional (to the stages' speeds; with several sequences the head balanced in),
    #: fastest (first), layers (proportional, the head left out: balanced for prompts), or whole (one stage)
    split: str = "whole"
    lossy: bool = False  # planned with lossy weight formats allowed (q8, q4, downcasts): re-placement keeps it
    model_ref: str = ""  # how to find the model's files (path or name), for launching
    fetch_nodes: list[str] = field(default_factory=list)  # nodes that would first fetch their shard from a peer
    # not a field (so no annotation): the Cluster that previewed this plan (set by Cluster.preview),
    # never serialised; the cast types it Any so that preview may set it
    _cluster = cast(Any, None)

    @property
    def nodes(self) -> list[str]:
        """Node ids in stage order, each once."""
        out: list[str] = []
        for r in self.ranks:
            if r.node_id not in out:
                out.append(r.node_id)
        return out

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_stages(self) -> int:
        return len({r.stage for r in self.ranks})

    @property
    def key(self) -> tuple:
        """Identity of the split (ranks, layers, dtypes), for de-duplication."""
        return tuple((r.node_id, r.stage, r.layers, r.tensor_index, r.tensor_size, r.dtype) for r in self.ranks)

    def describe(self) -> str:
        """``pipeline: a[0:8] -> b[8:16]`` style summary."""
        stages: dict[int, list[RankSpec]] = {}
        for r in self.ranks:
            stages.setdefault(r.stage, []).append(r)
        parts = []
        for s in sorted(stages):
            rs = stages[s]
            names = sorted({r.node_name for r in rs})
            tp = f" x{rs[0].tensor_size}" if rs[0].tensor_size > 1 else ""
            dt = rs[0].dtype
            note = f" {_SHORT.get(dt, dt)}" if self.model_dtype and dt != self.model_dtype else ""
            parts.append(f"{'+'.join(names)}{tp}[{rs[0].layers[0]}:{rs[0].layers[1]}]{note}")
        split = {"fastest": " (fastest-first)", "layers": " (balanced for prompts)"}.get(self.split, "")
        return f"{self.strategy}: " + " -> ".join(parts) + split

    def batched_decode_tps(self, sequences: int) -> float:
        """Predicted aggregate decode tokens/s with ``sequences`` decoding together."""
        if not self.decode_tps:
            return 0.0
        if self.stage_decode_s:  # the group schedule: bounded by the slowest stage (cost.pipelined_round_s)
            return sequences / pipelined_round_s(
                self.stage_decode_s,
                self.stage_row_s,
                self.tick_exchange_s,
                sequences,
                self.stage_bus_s,
                self.stage_pass_s,
                self.rows_per_pass,
            )
        return sequences / (
            1.0 / self.decode_tps + rows_extra_s(sequences, self.decode_row_s, self.decode_pass_s, self.rows_per_pass)
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = [r.to_json() for r in self.ranks]
        d["description"] = self.describe()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        names = set(cls.__dataclass_fields__)
        data = {k: v for k, v in d.items() if k in names}
        data["ranks"] = [RankSpec.from_json(r) for r in d["ranks"]]
        return cls(**data)

    def launch(self, cluster: Any = None, name: str | None = None, wait: bool = True):
        """Launch this plan on ``cluster`` (default: the cluster that previewed it)."""
        cluster = cluster or self._cluster
        if cluster is None:
            raise RuntimeError(
                "this plan is not tied to a cluster: call plan.launch(cluster) or cluster.launch(model, plan)"
            )
        return cluster.launch(self.model_ref or self.model, plan=self, name=name, wait=wait)

    def __repr__(self) -> str:
        if not self.feasible:
            return f"<Plan infeasible {self.describe()}: {self.reason}>"
        return (
            f"<Plan {self.describe()} | decode {self.decode_tps:.2f} tok/s, TTFT {self.ttft_s:.2f} s, "
            f"prefill {self.prefill_tps:.1f} tok/s | {self.backend}>"
        )


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


#: exo's sharding names and ours, to the strategies a plan can have
SHARDINGS = {
    "single": {"single"},
    "pipeline": {"pipeline"},
    "tensor": {"tensor"},
    "pipeline-tensor": {"pipeline-tensor"},
}


def strategies_for(sharding: str | None) -> set[str] | None:
    """The plan strategies a ``sharding`` filter (one name or several, comma-separated) allows; None: all.

    Raises ValueError naming the accepted values for anything else."""
    if not sharding:
        return None
    out: set[str] = set()
    for part in sharding.lower().split(","):
        if part.strip() not in SHARDINGS:
            raise ValueError(f"'sharding' must be one of {', '.join(SHARDINGS)} (or several, comma-separated).")
        out |= SHARDINGS[part.strip()]
    return out


@dataclass
class Plans:
    """Ranked plans, best first (list-like), plus the infeasible candidates and why."""

    plans: list[Plan]
    infeasible: list[Plan] = field(default_factory=list)
    objective: str = "decode"
    model: str = ""
    selected: int = 0
    cluster: Any = field(default=None, repr=False, compare=False)  # set by Cluster.preview

    def __getitem__(self, i: int) -> Plan:
        return self.plans[i]

    def __len__(self) -> int:
        return len(self.plans)

    def __iter__(self):
        return iter(self.plans)

    @property
    def best(self) -> Plan:
        if not self.plans:
            reasons = "; ".join(sorted({p.reason or "" for p in self.infeasible})[:3])
            raise ValueError(f"no feasible plan for {self.model}: {reasons}")
        return self.plans[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "objective": self.objective,
            "plans": [p.to_json() for p in self.plans],
            "infeasible": [p.to_json() for p in self.infeasible],
        }

    def filtered(
        self, strategies: set[str] | None = None, min_nodes: int | None = None, node_ids: list[str] | None = None
    ) -> Plans:
        """These plans (feasible and not) limited to ``strategies``, at least ``min_nodes`` nodes, and only
        nodes in ``node_ids`` (ids or names); ``None`` leaves a criterion out. Ranks keep their order."""

        def keep(p: Plan) -> bool:
            if strategies is not None and p.strategy not in strategies:
                return False
            if min_nodes is not None and p.num_nodes < min_nodes:
                return False
            if node_ids:
                allowed = set(node_ids)
                return all(n in allowed or p.node_names.get(n) in allowed for n in p.nodes)
            return True

        return replace(
            self, plans=[p for p in self.plans if keep(p)], infeasible=[p for p in self.infeasible if keep(p)]
        )

    def rows(self) -> list[list[str]]:
        out = []
        for i, p in enumerate(self.plans):
            mem = ", ".join(
                f"{p.node_names.get(n, n)} {_gb(p.memory_bytes[n])}/{_gb(p.memory_capacity_bytes[n])}" for n in p.nodes
            )
            out.append(
                [
                    str(i),
                    p.describe(),
                    mem,
                    f"{p.ttft_s:.2f}",
                    f"{p.prefill_tps:.1f}",
                    f"{p.decode_tps:.2f}",
                    f"{p.batched_decode_tps(8):.2f}",
                    p.bottleneck,
                    p.explanation,
                ]
            )
        return out

    HEADER = [
        "#",
        "plan",
        "memory GB (used/free)",
        "TTFT s",
        "prefill tok/s",
        "decode tok/s",
        "8 streams tok/s",
        "bottleneck",
        "why",
    ]

    def table(self, limit: int = 10) -> str:
        text = text_table(self.HEADER, self.rows()[:limit])
        if self.infeasible:
            text += f"\n{len(self.infeasible)} infeasible, e.g.: " + "; ".join(
                f"{p.describe()}: {p.reason}" for p in self.infeasible[:3]
            )
        return text

    def __repr__(self) -> str:
        return f"Plans for {self.model} (objective: {self.objective})\n{self.table()}"

    def _repr_html_(self) -> str:
        rows = self.rows()[:20]
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in self.HEADER)
        body = ""
        for r, p in zip(rows, self.plans):
            bars = "".join(
                f"<div title='{html.escape(p.node_names.get(n, n))}' style='display:flex;align-items:center;gap:4px'>"
                f"<span style='width:70px;overflow:hidden'>{html.escape(p.node_names.get(n, n))}</span>"
                f"<span style='display:inline-block;width:90px;height:8px;background:var(--jp-layout-color3,#ddd)'>"
                f"<span style='display:block;height:8px;width:{min(100, 100 * p.memory_bytes[n] / max(1, p.memory_capacity_bytes[n])):.0f}%;"
                f"background:var(--jp-brand-color1,#1976d2)'></span></span>"
                f"<span>{_gb(p.memory_bytes[n])}/{_gb(p.memory_capacity_bytes[n])}</span></div>"
                for n in p.nodes
            )
            cells = [r[0], r[1], bars, *r[3:]]
            body += (
                "<tr>" + "".join(f"<td>{c if i == 2 else html.escape(c)}</td>" for i, c in enumerate(cells)) + "</tr>"
            )
        extra = ""
        if self.infeasible:
            items = "".join(
                f"<li>{html.escape(p.describe())}: {html.escape(p.reason or '')}</li>" for p in self.infeasible[:5]
            )
            extra = (
                f"<details><summary>{len(self.infeasible)} infeasible candidates</summary><ul>{items}</ul></details>"
            )
        return (
            f"<b>Plans for {html.escape(self.model)}</b> (objective: {self.objective})"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{extra}"
        )
