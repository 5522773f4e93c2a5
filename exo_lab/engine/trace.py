"""Per-rank timelines of generation: spans, their collection, clock alignment and Chrome trace export.

Every process that generates (a shard worker, or the coordinator running an
:class:`~exo_lab.engine.generator.Engine`) has one :data:`TRACER`. While it is off (the default) a hook
costs one attribute read (``TRACER.on``) or a call returning a shared no-op context; while it is on,
each hook records a span ``(name, start_ns, end_ns, step, args)`` on this process's monotonic clock
(``time.perf_counter_ns``) into a bounded buffer.

The hooks (in :mod:`exo_lab.engine.lockstep`, :mod:`exo_lab.engine.worker`,
:mod:`exo_lab.engine.generator`) name what a rank does in a step:

==============  =================================================================================
``admit``       a job joining the batch (its prefill inside)
``prefill``     one prefill chunk (``args``: ``tokens``, ``pos``)
``recv``        waiting for and receiving the previous stage's hidden states (a wait: it ends when
                they arrived)
``compute``     this stage's layers (with a tensor group's all-reduces unless ``all_reduce`` spans
                are recorded inside it)
``send``        handing the hidden states to the next stage
``all_reduce``  a tensor group's in-layer all-reduce inside ``compute`` (recorded only in ``detail``:
                it evaluates each all-reduce apart, which slows a tensor group's decode down)
``sample``      sampling the step's tokens (the last stage's lead rank)
``all_sum``     the step's small all-reduce giving every rank the tokens, stop flags, admissions
``step``        the Engine's whole decode step (one process: prefill of joining prompts inside)
==============  =================================================================================

While tracing, the lock-step loop evaluates at each boundary (after ``recv``, after ``compute``) so
that each span holds what its name says; the values computed are the same (greedy output is
unchanged), only MLX's overlap of those parts is lost. No hook adds communication: ranks may turn
tracing on at different steps without falling out of step.

A :class:`Trace` is what a recording gives back: every rank's spans on the coordinator's clock, each
rank's clock offset with its uncertainty (half the shortest round trip of the probes that measured it,
see :func:`estimate_offset`), and the cost model's predicted components for the same plan. It
exports to Chrome/Perfetto trace JSON (:meth:`Trace.to_chrome`, one track per rank) and sums itself up
per token (:meth:`Trace.breakdown`).
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: spans a process keeps while tracing (the oldest go first)
MAX_SPANS = 200_000
#: what each span name counts as in :meth:`Trace.breakdown`
KIND = {
    "compute": "compute",
    "sample": "compute",
    "step": "compute",
    "recv": "link",
    "send": "link",
    "all_reduce": "all-reduce",
    "all_sum": "all-reduce",
    "admit": "admission",
    "prefill": "prefill",
}
#: a span as a process keeps it: name, start_ns, end_ns, step, args
RawSpan = tuple[str, int, int, int, dict[str, Any]]


class _Null:
    """The context a hook gets while tracing is off: does nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()


class _Open:
    """One span being timed (tracing on)."""

    __slots__ = ("tracer", "name", "args", "start")

    def __init__(self, tracer: Tracer, name: str, args: dict[str, Any]) -> None:
        self.tracer, self.name, self.args = tracer, name, args

    def __enter__(self) -> None:
        self.start = time.perf_counter_ns()

    def __exit__(self, *exc: object) -> None:
        t = self.tracer
        t.spans.append((self.name, self.start, time.perf_counter_ns(), t.step, self.args))


class Tracer:
    """One process's span recorder (see the module docstring). ``step`` is set by the loop that owns it."""

    def __init__(self) -> None:
        self.on = False
        self.detail = False  # also a tensor group's in-layer all-reduces (an eval per all-reduce: costly)
        self.step = 0
        self.spans: deque[RawSpan] = deque(maxlen=MAX_SPANS)

    def enable(self, on: bool = True, detail: bool = False) -> None:
        """Turn recording on (clearing what an earlier recording left) or off; ``detail``: record a tensor
        group's in-layer all-reduces too."""
        if on and not self.on:
            self.spans.clear()
        self.on, self.detail = on, on and detail

    def span(self, name: str, **args: Any) -> Any:
        """``with TRACER.span("name", key=value):`` times its block while tracing is on."""
        if not self.on:
            return _NULL
        return _Open(self, name, args)

    def ready(self, name: str, value: Any) -> Any:
        """``value`` (MLX arrays) evaluated inside a span ``name`` while tracing is on; untouched when off."""
        if self.on:
            import mlx.core as mx

            start = time.perf_counter_ns()
            mx.eval(value)
            self.spans.append((name, start, time.perf_counter_ns(), self.step, {}))
        return value

    def timed(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` (building MLX arrays); while tracing, built and evaluated inside a span ``name`` (so that
        spans recorded while it is built, the tensor all-reduces, nest in it)."""
        if not self.on:
            return make()
        import mlx.core as mx

        start = time.perf_counter_ns()
        value = make()
        mx.eval(value)
        self.spans.append((name, start, time.perf_counter_ns(), self.step, {}))
        return value

    def since(self, start_ns: int = 0) -> list[RawSpan]:
        """The spans that ended at or after ``start_ns`` (this process's clock)."""
        return [s for s in list(self.spans) if s[2] >= start_ns]


#: this process's tracer
TRACER = Tracer()


class _TracedDistributed:
    """``mlx.core.distributed`` whose ``all_sum`` (the tensor-sharded linears' all-reduce), while tracing in
    detail, evaluates its input first and records the all-reduce as an ``all_reduce`` span."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def all_sum(self, x: Any, *, group: Any = None, stream: Any = None) -> Any:
        if not TRACER.detail:
            return self._real.all_sum(x, group=group, stream=stream)
        import mlx.core as mx

        mx.eval(x)  # this rank's partial product: part of compute
        start = time.perf_counter_ns()
        out = self._real.all_sum(x, group=group, stream=stream)
        mx.eval(out)
        TRACER.spans.append(("all_reduce", start, time.perf_counter_ns(), TRACER.step, {}))
        return out


class CoreWith:
    """``mlx.core`` with another ``distributed`` (what :mod:`mlx.nn.layers.distributed` sees as ``mx``)."""

    def __init__(self, real: Any, distributed: Any) -> None:
        self._real = real
        self.distributed = distributed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def trace_tensor_all_reduces() -> None:
    """Let the tensor-sharded linears (:mod:`mlx.nn.layers.distributed`) record their all-reduces while tracing
    (a rank with a tensor group calls it once); while tracing is off they run as before."""
    import mlx.nn.layers.distributed as layers

    if not isinstance(layers.mx.distributed, _TracedDistributed):  # over a peer link's, if one is routed
        layers.mx = CoreWith(layers.mx, _TracedDistributed(layers.mx.distributed))  # pyright: ignore[reportAttributeAccessIssue]


def now_ns() -> int:
    """The clock spans are recorded on (monotonic, per host)."""
    return time.perf_counter_ns()


def estimate_offset(probe: Callable[[], int], rounds: int = 15) -> tuple[int, int]:
    """``(offset_ns, uncertainty_ns)`` of a remote clock: remote = local + offset, within +-uncertainty.

    ``probe()`` asks the remote clock (a round trip) and returns its reading. Each round trip brackets
    the reading between the local send and receive times; the shortest one bounds the offset best:
    offset = reading - midpoint, uncertainty = half that round trip (a true bound, whatever the
    asymmetry of the two directions).
    """
    best: tuple[int, int] | None = None
    for _ in range(rounds):
        t0 = now_ns()
        remote = probe()
        t1 = now_ns()
        half = (t1 - t0) // 2
        if best is None or half < best[1]:
            best = (remote - (t0 + half), half)
    assert best is not None
    return best


@dataclass
class Span:
    """One span on the coordinator's clock, in ns from the start of its trace."""

    rank: int
    name: str
    start_ns: int
    end_ns: int
    step: int
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_json(self) -> list[Any]:
        return [self.rank, self.name, self.start_ns, self.end_ns, self.step, self.args]

    @classmethod
    def from_json(cls, d: list[Any]) -> Span:
        return cls(int(d[0]), str(d[1]), int(d[2]), int(d[3]), int(d[4]), dict(d[5] or {}))


@dataclass
class RankInfo:
    """A rank of a trace: where it ran, and how well its clock is aligned with the coordinator's."""

    rank: int
    stage: int = 0
    node: str = ""
    offset_ns: int = 0  # its clock minus the coordinator's
    uncertainty_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "stage": self.stage,
            "node": self.node,
            "offset_ns": self.offset_ns,
            "uncertainty_ns": self.uncertainty_ns,
        }


@dataclass
class Trace:
    """A recording of every rank's spans (see the module docstring)."""

    id: str
    backend: str
    spans: list[Span]
    ranks: dict[int, RankInfo]
    started: float = field(default_factory=time.time)  # unix time of its start
    duration_ns: int = 0
    label: str = ""
    plan: str = ""  # the plan, described
    predicted: dict[str, float] = field(default_factory=dict)  # the cost model's decode seconds per component

    @property
    def uncertainty_ns(self) -> int:
        """The worst clock uncertainty of its ranks."""
        return max((r.uncertainty_ns for r in self.ranks.values()), default=0)

    def of(self, rank: int, name: str | None = None) -> list[Span]:
        """``rank``'s spans (named ``name``), in time order."""
        return sorted(
            (s for s in self.spans if s.rank == rank and (name is None or s.name == name)), key=lambda s: s.start_ns
        )

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "backend": self.backend,
            "label": self.label,
            "plan": self.plan,
            "started": self.started,
            "duration_ns": self.duration_ns,
            "ranks": [r.to_json() for r in self.ranks.values()],
            "predicted": self.predicted,
            "spans": [s.to_json() for s in self.spans],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Trace:
        ranks = {int(r["rank"]): RankInfo(**r) for r in d.get("ranks", [])}
        return cls(
            str(d["id"]),
            str(d.get("backend", "")),
            [Span.from_json(s) for s in d.get("spans", [])],
            ranks,
            float(d.get("started", 0.0)),
            int(d.get("duration_ns", 0)),
            str(d.get("label", "")),
            str(d.get("plan", "")),
            {k: float(v) for k, v in (d.get("predicted") or {}).items()},
        )

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/traces`` lists."""
        return {
            "id": self.id,
            "backend": self.backend,
            "label": self.label,
            "plan": self.plan,
            "started": self.started,
            "duration_ms": self.duration_ns / 1e6,
            "ranks": len(self.ranks),
            "spans": len(self.spans),
            "clock_uncertainty_ms": self.uncertainty_ns / 1e6,
        }

    def to_chrome(self) -> dict[str, Any]:
        """Chrome/Perfetto trace JSON (the Trace Event Format): one process track per rank, times in µs."""
        events: list[dict[str, Any]] = []
        for r in sorted(self.ranks.values(), key=lambda r: r.rank):
            where = f" on {r.node}" if r.node else ""
            events.append(
                {
                    "ph": "M",
                    "name": "process_name",
                    "pid": r.rank,
                    "tid": 0,
                    "args": {"name": f"rank {r.rank} (stage {r.stage}{where})"},
                }
            )
            events.append(
                {"ph": "M", "name": "process_sort_index", "pid": r.rank, "tid": 0, "args": {"sort_index": r.rank}}
            )
        for s in sorted(self.spans, key=lambda s: (s.rank, s.start_ns, -s.end_ns)):
            events.append(
                {
                    "ph": "X",
                    "name": s.name,
                    "cat": KIND.get(s.name, "other"),
                    "pid": s.rank,
                    "tid": 0,
                    "ts": s.start_ns / 1e3,
                    "dur": max(s.dur_ns, 0) / 1e3,
                    "args": {"step": s.step, **s.args},
                }
            )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {
                "id": self.id,
                "backend": self.backend,
                "label": self.label,
                "plan": self.plan,
                "clock_uncertainty_us": {str(r.rank): r.uncertainty_ns / 1e3 for r in self.ranks.values()},
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the Chrome trace JSON (open it in https://ui.perfetto.dev or chrome://tracing)."""
        p = Path(path)
        p.write_text(json.dumps(self.to_chrome()))
        return p

    # ------------------------------------------------------------------ analysis
    def decode_steps(self) -> list[int]:
        """Steps in which no rank admitted a job (pure decode steps), that every rank computed."""
        admitted = {s.step for s in self.spans if s.name in ("admit", "prefill")}
        computed: dict[int, set[int]] = {}
        for s in self.spans:
            if s.name in ("compute", "step") and s.step not in admitted:
                computed.setdefault(s.step, set()).add(s.rank)
        return sorted(k for k, v in computed.items() if v >= set(self.ranks))

    def hops(self, step: int) -> list[tuple[Span, Span]]:
        """``(send on the sender, recv on the receiver)`` of every pipeline hop in decode ``step``."""
        out = []
        stages = self.stages()
        for a, b in zip(stages, stages[1:]):
            sends = [s for s in self.of(a[-1], "send") if s.step == step]
            recvs = [s for s in self.of(b[0], "recv") if s.step == step]
            if sends and recvs:
                out.append((sends[-1], recvs[-1]))
        return out

    def link_waits(self, src: int) -> list[float]:
        """Seconds from ``src`` starting to send to the next stage holding the data (``recv`` ended), in the
        decode steps where the receiver was already waiting when the send started (by more than the clocks'
        uncertainty): the hop's whole transfer time, as the receiver waited for it."""
        tol = self.uncertainty_ns
        return [
            (r.end_ns - s.start_ns) / 1e9
            for k in self.decode_steps()
            for s, r in self.hops(k)
            if s.rank == src and r.start_ns + tol < s.start_ns
        ]

    def stages(self) -> list[list[int]]:
        """The ranks of each pipeline stage, in stage order."""
        by: dict[int, list[int]] = {}
        for r in sorted(self.ranks.values(), key=lambda r: r.rank):
            by.setdefault(r.stage, []).append(r.rank)
        return [by[k] for k in sorted(by)]

    def per_step(self) -> list[dict[str, float]]:
        """Each decode step's measured components in seconds: ``token`` (the step's time, from the end of the
        previous step's ``all_sum`` to the end of this one's), ``compute`` (per stage the slowest rank's
        compute without its all-reduces, plus sampling, summed over stages), ``link`` (per hop: the part of the
        transfer the receiver waited for, from the later of the send's and the recv's starts to the data
        held; a transfer done before the receiver asked costs no time), ``all-reduce`` (the step's ``all_sum`` as
        its last rank saw it, plus per stage a rank's tensor all-reduces) and ``idle`` (the rest)."""
        steps = self.decode_steps()
        ends = {}
        for s in self.spans:
            if s.name in ("all_sum", "step"):
                ends[s.step] = max(ends.get(s.step, 0), s.end_ns)
        out = []
        stages = self.stages()
        for k in steps:
            if k - 1 not in ends or k not in ends:
                continue
            token = (ends[k] - ends[k - 1]) / 1e9
            mine = [s for s in self.spans if s.step == k]
            compute = reduce_ = 0.0
            for ranks in stages:
                c = max(
                    sum(s.dur_ns for s in mine if s.rank == r and s.name in ("compute", "step", "sample"))
                    - sum(s.dur_ns for s in mine if s.rank == r and s.name == "all_reduce")
                    for r in ranks
                )
                a = max(sum(s.dur_ns for s in mine if s.rank == r and s.name == "all_reduce") for r in ranks)
                compute += c / 1e9
                reduce_ += a / 1e9
            sums = [s.dur_ns for s in mine if s.name == "all_sum"]
            per_rank_sum: dict[int, int] = {}
            for s in mine:
                if s.name == "all_sum":
                    per_rank_sum[s.rank] = per_rank_sum.get(s.rank, 0) + s.dur_ns
            if sums:
                reduce_ += min(per_rank_sum.values()) / 1e9
            link = sum(max(0, r.end_ns - max(s.start_ns, r.start_ns)) for s, r in self.hops(k)) / 1e9
            idle = max(0.0, token - compute - link - reduce_)
            out.append(
                {"step": k, "token": token, "compute": compute, "link": link, "all-reduce": reduce_, "idle": idle}
            )
        return out

    def predicted_components(self) -> dict[str, float]:
        """The cost model's per-token seconds for this trace's plan, in :meth:`breakdown`'s components."""
        return component_sums(self.predicted)

    def stage_compute(self) -> list[float]:
        """Per pipeline stage: the median over decode steps of its slowest rank's compute (and sampling,
        without its tensor all-reduces), seconds."""
        steps = set(self.decode_steps())
        out = []
        for ranks in self.stages():
            per: dict[int, dict[int, int]] = {}
            for s in self.spans:
                if s.step in steps and s.rank in ranks and s.name in ("compute", "step", "sample", "all_reduce"):
                    sign = -1 if s.name == "all_reduce" else 1
                    per.setdefault(s.step, {}).setdefault(s.rank, 0)
                    per[s.step][s.rank] += sign * s.dur_ns
            values = [max(v.values()) / 1e9 for v in per.values()]
            out.append(statistics.median(values) if values else 0.0)
        return out

    def step_all_sum(self) -> float | None:
        """The median over decode steps of the step's ``all_sum`` as its last rank saw it (seconds), or None."""
        steps = set(self.decode_steps())
        per: dict[int, dict[int, int]] = {}
        for s in self.spans:
            if s.step in steps and s.name == "all_sum":
                per.setdefault(s.step, {}).setdefault(s.rank, 0)
                per[s.step][s.rank] += s.dur_ns
        values = [min(v.values()) / 1e9 for v in per.values() if len(v) == len(self.ranks)]
        return statistics.median(values) if values else None

    def prefill_transfers(self, src: int, dst: int) -> list[tuple[int, float]]:
        """``(tokens, seconds)`` of each prefill chunk's hop from ``src`` to ``dst``, where the receiver was
        waiting before the send started: from the send's start to the data held."""
        tol = self.uncertainty_ns
        out = []
        for step in sorted({s.step for s in self.spans if s.name == "prefill"}):
            chunks = [c for c in self.of(src, "prefill") if c.step == step]
            theirs = [c for c in self.of(dst, "prefill") if c.step == step]
            for mine, other in zip(chunks, theirs):
                send = [s for s in self.of(src, "send") if mine.start_ns <= s.start_ns <= mine.end_ns]
                recv = [s for s in self.of(dst, "recv") if other.start_ns <= s.start_ns <= other.end_ns]
                if send and recv and recv[0].start_ns + tol < send[0].start_ns:
                    out.append((int(mine.args.get("tokens", 0)), (recv[0].end_ns - send[0].start_ns) / 1e9))
        return out

    def breakdown(self) -> list[dict[str, Any]]:
        """Per token (decode steps, median over steps): measured compute / link / all-reduce / idle / token
        beside the cost model's prediction for the same plan (None where the plan predicted nothing)."""
        rows = self.per_step()
        pred = self.predicted_components() if self.predicted else {}
        out = []
        for comp in ("compute", "link", "all-reduce", "idle", "token"):
            measured = statistics.median(r[comp] for r in rows) if rows else None
            predicted = pred.get(comp) if pred else None
            out.append(
                {
                    "component": comp,
                    "measured_ms": None if measured is None else measured * 1e3,
                    "predicted_ms": None if predicted is None else predicted * 1e3,
                }
            )
        return out

    def table(self) -> str:
        """:meth:`breakdown` as text."""

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines = [f"{'per token':12s} {'measured ms':>12s} {'predicted ms':>13s}"]
        for r in self.breakdown():
            lines.append(f"{r['component']:12s} {ms(r['measured_ms']):>12s} {ms(r['predicted_ms']):>13s}")
        tokens = sorted(r["token"] for r in self.per_step())
        if len(tokens) >= 2:  # how far the slow steps are from the fast ones: what else the hosts ran meanwhile
            at = [tokens[int(q * (len(tokens) - 1))] * 1e3 for q in (0.1, 0.5, 0.9)]
            lines.append(
                f"token spread: p10 {at[0]:.3f}, median {at[1]:.3f}, p90 {at[2]:.3f} ms over {len(tokens)} steps"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"<Trace {self.id} {self.backend} {len(self.ranks)} ranks, {len(self.spans)} spans, "
            f"{self.duration_ns / 1e6:.1f} ms, clocks within +-{self.uncertainty_ns / 1e3:.0f} us>"
        )


def component_sums(breakdown: dict[str, float]) -> dict[str, float]:
    """A cost-model breakdown (``Plan.breakdown``: seconds per named part) summed into ``compute``, ``link``,
    ``all-reduce`` (tensor groups' all-reduces and the sampled token's way back, which the step's
    ``all_sum`` carries), ``idle`` (0: the model predicts none) and ``token``."""
    out = {"compute": 0.0, "link": 0.0, "all-reduce": 0.0, "idle": 0.0}
    for key, v in breakdown.items():
        if key.startswith("compute"):
            out["compute"] += v
        elif key.startswith("all-reduce") or key.endswith(("(token)", "(tokens, every tick)")):
            out["all-reduce"] += v
        elif key.startswith("link"):
            out["link"] += v
    out["token"] = sum(breakdown.values())
    return out


def new_id() -> str:
    """A trace id: 16 hex digits (what ``GET /v1/traces/{id}`` accepts)."""
    return uuid.uuid4().hex[:16]


def assemble(
    trace_id: str,
    backend: str,
    start_ns: int,
    end_ns: int,
    per_rank: Iterable[tuple[RankInfo, list[RawSpan]]],
    label: str = "",
    plan: str = "",
    predicted: dict[str, float] | None = None,
    started: float | None = None,
) -> Trace:
    """A :class:`Trace` of the spans within ``[start_ns, end_ns]`` (coordinator clock), each rank's raw spans
    moved onto the coordinator's clock by its offset."""
    spans: list[Span] = []
    ranks: dict[int, RankInfo] = {}
    for info, raw in per_rank:
        ranks[info.rank] = info
        for name, s, e, step, args in raw:
            s, e = s - info.offset_ns, e - info.offset_ns
            if s >= start_ns and e <= end_ns:
                spans.append(Span(info.rank, name, s - start_ns, e - start_ns, step, args))
    spans.sort(key=lambda s: (s.start_ns, s.rank))
    return Trace(
        trace_id,
        backend,
        spans,
        ranks,
        time.time() if started is None else started,
        end_ns - start_ns,
        label,
        plan,
        dict(predicted or {}),
    )


@dataclass
class Recording:
    """A recording in progress (:meth:`~exo_lab.engine.backend.Backend.trace`); ``trace`` once it ended."""

    id: str
    label: str
    start_ns: int
    started: float = field(default_factory=time.time)
    trace: Trace | None = None
