"""The cost model's predictions: what a split of a model over nodes will do, in tokens/s and seconds.

The planner (:mod:`exo_lab.placement.planner`) calls :func:`predict_into` on every candidate it
evaluates; the bench (:mod:`exo_lab.bench`) calls :class:`Predictor` on the plans it measures, at
the measured request shape, so predicted and measured compare like with like. The formulas'
constants live in :mod:`exo_lab.placement.cost`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from exo_lab import defaults
from exo_lab.cluster.topology import LinkProfile, Topology, best_of
from exo_lab.models import formats
from exo_lab.models.card import ModelCard
from exo_lab.placement.cost import (
    DTYPE_BYTES,
    LOOPBACK,
    LinkCost,
    NodeRates,
    bytes_per_weight,
    calibrated_link,
    cpu_share,
    pipelined_round_s,
    rows_extra_s,
    share,
    streamed_prefill_s,
    weight_scale,
)
from exo_lab.placement.plan import Plan


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: ``k`` tensor ranks, all on ``nodes[0]`` (local) or one per node."""

    nodes: tuple[str, ...]
    k: int = 1

    @property
    def local(self) -> bool:
        return len(self.nodes) == 1

    def ranks_on(self, node: str) -> int:
        if node not in self.nodes:
            return 0
        return self.k if self.local else 1


class CostContext:
    """What the cost model knows for one request shape: node rates, links, the model's sizes."""

    def __init__(
        self, topology: Topology, card: ModelCard, context: int, prompt_tokens: int, batch: int, lossy: bool = False
    ) -> None:
        self.topology = topology
        self.card = card
        self.lossy = lossy  # may a node compute in a format that changes the tokens (q8, q4, a downcast)
        self.context = context
        self.prompt = prompt_tokens
        self.batch = batch
        self.nodes = [n for n in topology.alive() if n.profile]
        self.names = {n.id: n.name for n in self.nodes}
        self.rates = {n.id: NodeRates.from_profile(n.id, n.profile) for n in self.nodes}
        self._links: dict[tuple[str, str], LinkCost | None] = {}
        self._best: dict[tuple[str, str], LinkProfile | None] = {}
        self._paths: dict[tuple[str, str], list[LinkProfile]] | None = None
        self.act = DTYPE_BYTES.get(card.dtype, 2)  # the stored dtype's bytes (a rank's activations: its format's)
        self.avg_ctx: float = min(context, prompt_tokens + context // 4)  # the Predictor's is pp + tg / 2

    def set_rates(self, rates: dict[str, NodeRates]) -> None:
        """Use these node rates (calibration candidates); links carry the nodes' calibrated overheads."""
        self.rates = rates
        self._links.clear()

    def best_link(self, a: str, b: str) -> LinkProfile | None:
        """The topology's fastest working path from ``a`` to ``b``, looked up once per pair: the topology scans
        every link for it, and a plan over many nodes weighs thousands of candidates."""
        if self._paths is None:
            self._paths = self.topology.paths()
        key = (a, b)
        if key not in self._best:
            self._best[key] = best_of(self._paths.get(key, []))
        return self._best[key]

    def link(self, a: str, b: str) -> LinkCost | None:
        """Latency and bandwidth between ranks on ``a`` and ``b`` (loopback when equal; None: not measured),
        with the nodes' calibrated per-message overhead."""
        key = (a, b)
        if key not in self._links:
            fitted = self.rates[a].links.get(b) if a != b and a in self.rates else None
            if fitted is not None:  # a calibration per component: measured latency and bandwidth, overheads in
                self._links[key] = LinkCost(*fitted)
                return self._links[key]
            base: LinkCost | None = LOOPBACK
            if a != b:
                best = self.best_link(a, b)
                base = (
                    None
                    if best is None or not best.bandwidth_mbit_per_s
                    else LinkCost((best.rtt_ms_median or 0.0) / 2000.0, best.bandwidth_mbit_per_s * 1e6 / 8)
                )
            self._links[key] = base and calibrated_link(base, self.rates.get(a), self.rates.get(b))
        return self._links[key]

    def address(self, src: str, dst: str) -> str:
        if src == dst:
            node = self.topology.nodes[dst]
            return node.addresses[0] if node.addresses else "127.0.0.1"
        best = self.best_link(src, dst)
        return best.dst_address if best else self.topology.nodes[dst].addresses[0]

    def dtype_options(self, node: str) -> list[str]:
        """Formats ``node`` may compute in: the stored dtype and fp32 (exact), and with ``lossy`` every
        format of :mod:`exo_lab.models.formats`; a quantized checkpoint only in its own."""
        native = self.card.dtype
        if self.card.quantization or native not in formats.FORMATS:
            return [native]
        return formats.lossy_formats(native) if self.lossy else formats.exact_formats(native)

    def layers_per_s(self, node: str, dtype: str) -> float:
        """Decode speed of one process in parameters read per second (weights only)."""
        bpw = bytes_per_weight(self.card, dtype)
        return self.rates[node].decode_read_rate(dtype, bool(self.card.quantization), bpw) / bpw

    def fastest_dtype(self, node: str, activations: str | None = None) -> tuple[str, str]:
        """The format ``node`` decodes fastest in (measured), and why; ``activations``: only formats
        computing with activations in that dtype."""
        opts = self.dtype_options(node)
        if activations is not None:
            opts = [d for d in opts if d not in formats.FORMATS or formats.activation_dtype(d) == activations]
            opts = opts or ["float32"]
        if len(opts) == 1:
            why = "quantized weights" if self.card.quantization else "the model's dtype"
            return opts[0], why
        speeds = {d: self.layers_per_s(node, d) for d in opts if self.rates[node].has(d, False)}
        if not speeds:
            return self.card.dtype, "no measurement; the model's dtype"
        best = max(speeds, key=lambda d: speeds[d])
        lossy = "" if best in formats.exact_formats(self.card.dtype) else " (lossy: allowed)"
        if best == self.card.dtype:
            return best, "the model's dtype is also the fastest measured here"
        other = self.card.dtype
        ratio = speeds[best] / speeds[other] if speeds.get(other) else float("inf")
        return (
            best,
            f"{best} decodes {ratio:.1f}x faster than {other} on this node (measured), "
            f"at {weight_scale(self.card, best):.2g}x the memory{lossy}",
        )


def predict_into(
    ctx: CostContext,
    plan: Plan,
    stages: list[Stage],
    alloc: list[int],
    dtypes: dict[str, str],
    node_share: Callable[[str], float],
) -> None:
    """Set ``plan``'s predicted decode and prefill tok/s, TTFT, breakdown, batched row time and bottleneck
    for ``stages`` holding ``alloc`` layers each, in ``dtypes``, each node getting ``node_share`` of its host.
    The link between consecutive stages must be measured (both callers check it first)."""
    card = ctx.card
    quant = bool(card.quantization)
    node_cpu_share = node_shares(ctx, stages, cpu=True)

    def hidden_bytes(node: str) -> float:
        """One row's hidden state as ``node`` sends it: in its weight format's activations (bf16w, q8: fp32)."""
        return card.hidden_size * DTYPE_BYTES.get(formats.activation_dtype_of(dtypes[node]), ctx.act)

    head_held = card.embedding_bytes if card.tie_word_embeddings else card.head_bytes
    dec: dict[str, float] = {}
    pre: dict[str, float] = {}
    row_s = 0.0  # a batched step: each more sequence adds its matmuls, at the rate of a many-row product
    pass_s = 0.0  # and each more pass over the weights, where a kernel computes a few rows per pass
    per_pass = 0  # how many (0: all of them): the fewest of any rank's
    # per stage, for the group schedule (engine/pipeline.py): one row's decode (with its all-reduces and its
    # hand-off), each more row, the whole prompt's prefill, and handing one prefill chunk on
    stage_dec: list[float] = []
    stage_row: list[float] = []
    stage_pass: list[float] = []
    stage_pre: list[float] = []
    stage_hop: list[float] = []
    stage_bus: list[float] = []  # what a stage's reads take longer while the other stages compute too
    piped_buses = pipeline_bus_shares(ctx, stages)
    # how many chunks a prefill runs each layer's operations in (Lockstep.prefill's, streamed through a pipeline)
    quantized = formats.all_quantized(dtypes[n] for s in stages for n in s.nodes)
    step = defaults.prefill_step(len(stages), ctx.rates[stages[0].nodes[0]].gpu, quantized)
    pre_chunks = max(1, -(-(ctx.prompt - 1) // step))
    chunks = pre_chunks if len(stages) > 1 else 1  # the chunks streamed through the stages
    ahead: bool | None = None  # whether the ranks decode a step ahead (decided at the first rank)
    start = 0
    for si, (s, count) in enumerate(zip(stages, alloc)):
        label = "+".join(ctx.names[n] for n in s.nodes) + (f" x{s.k}" if s.k > 1 else "")
        stop = start + count
        last = si == len(stages) - 1
        active = card.active_bytes(start, stop)  # what one decoded token reads (routed experts: the chosen ones)
        flops_layers = card.flops_per_token(start, stop)
        kv_split = s.k if card.kv_splits_with_tensor else 1
        kv = card.kv_bytes(int(ctx.avg_ctx), start, stop) / kv_split
        t_dec = t_pre = t_row = t_pass = t_busy = 0.0
        buses = bus_shares(ctx, s)
        for ti in range(s.k):
            node = s.nodes[0] if s.local else s.nodes[ti]
            r = ctx.rates[node]
            sh = node_share(node)
            scale = weight_scale(card, dtypes[node])
            bpw = bytes_per_weight(card, dtypes[node])
            rate = r.decode_read_rate(dtypes[node], quant, bpw)
            head = head_held * scale if last else 0.0
            read_bytes = active * scale / s.k + kv + head / s.k
            # each rank runs every operation of its layers, whatever its share of their weights, and its step's own
            cpu = node_cpu_share(node)
            layers_s, step_s = count * r.layer_overhead_s / cpu, r.step_overhead_s / cpu
            bound = r.bus_bound(dtypes[node], quant, bpw)
            reads_s = _read_s(read_bytes, rate, sh, buses.get(node, 1.0), bound)
            if ahead is None:
                ahead = len(stages) == 1 and steps_ahead(ctx, s, reads_s + layers_s, layers_s + step_s)
            t_dec = max(t_dec, _step_s(reads_s + layers_s, step_s, ahead))
            busy_bus = min(buses.get(node, 1.0), piped_buses.get(node, 1.0))
            t_busy = max(t_busy, _step_s(_read_s(read_bytes, rate, sh, busy_bus, bound) + layers_s, step_s, ahead))
            flops = r.prefill_flops(dtypes[node], quant) * sh
            attn = card.attention_flops(ctx.prompt, start, stop) / s.k
            head_flops = card.head_flops_per_token if last else 0.0
            compute = (ctx.prompt * flops_layers / s.k + attn + head_flops) / flops
            t_pre = max(t_pre, compute + pre_chunks * count * r.layer_overhead_s / node_cpu_share(node))
            flops_row = (flops_layers / s.k + head_flops / s.k) / sh
            row_rate, pass_rate, rows = r.decode_row_costs(dtypes[node], quant, bpw)
            t_row = max(t_row, flops_row / row_rate)
            t_pass = max(t_pass, flops_row / pass_rate)
            per_pass = rows if not per_pass else min(per_pass, rows or per_pass)
        start = stop
        if s.k > 1:
            link = ctx.link(s.nodes[0], s.nodes[0]) if s.local else _worst_link(ctx, s.nodes)
            assert link is not None  # a node's loopback link is always known
            hidden = max(hidden_bytes(n) for n in s.nodes)
            # each more row of a batch adds its hidden state to every all-reduce
            t_row += 2 * count * (link.all_reduce(hidden, s.k) - link.all_reduce(0, s.k))
        row_s += t_row
        pass_s += t_pass
        stage_bus.append(t_busy - t_dec)
        dec[f"compute {label}"] = t_dec
        pre[f"compute {label}"] = t_pre
        stage_row.append(t_row)
        stage_pass.append(t_pass)
        if s.k > 1:
            dec[f"all-reduce {label}"] = 2 * count * link.all_reduce(hidden, s.k)
            pre[f"all-reduce {label}"] = 2 * count * link.all_reduce(ctx.prompt * hidden, s.k)
            t_dec += dec[f"all-reduce {label}"]
            t_pre += pre[f"all-reduce {label}"]
        stage_dec.append(t_dec)
        stage_pre.append(t_pre)
        stage_hop.append(0.0)
    for i, (a, b) in enumerate(zip(stages, stages[1:])):
        link = ctx.link(a.nodes[0], b.nodes[0])
        assert link is not None  # the callers return before predicting when a stage link is not measured
        key = f"link {ctx.names[a.nodes[0]]}->{ctx.names[b.nodes[0]]}"
        hidden = hidden_bytes(a.nodes[0])
        dec[key] = link.transfer(hidden)
        pre[key] = link.transfer(ctx.prompt * hidden)
        stage_dec[i] += dec[key]
        per_row = link.transfer(hidden) - link.transfer(0)  # each more row's hidden state on the hop
        stage_row[i] += per_row
        row_s += per_row
        stage_hop[i] = link.transfer(ctx.prompt * hidden / chunks)
    exchange = 0.0
    if len(stages) > 1:  # each tick, the sampled tokens go back to the first stage (one all_sum)
        back = ctx.link(stages[-1].nodes[0], stages[0].nodes[0]) or LOOPBACK
        group = ",".join(sorted({n for s in stages for n in s.nodes}))  # a measured step all-reduce, if fitted
        measured = ctx.rates[stages[0].nodes[0]].all_sum_s.get(group)  # fitted from traces: a token's, all ticks
        exchange = back.latency_s if measured is None else measured / len(stages)
        dec[f"link {ctx.names[stages[-1].nodes[0]]}->{ctx.names[stages[0].nodes[0]]} (tokens, every tick)"] = (
            len(stages) * exchange
        )
    t_token = sum(dec.values())
    t_prefill = streamed_prefill_s(stage_pre, stage_hop, chunks)
    plan.decode_tps = 1.0 / t_token
    plan.prefill_tps = ctx.prompt / t_prefill
    plan.ttft_s = ctx.rates[stages[0].nodes[0]].request_overhead_s + t_prefill + t_token
    plan.breakdown = dec
    plan.decode_row_s = row_s
    plan.decode_pass_s = pass_s if per_pass else 0.0
    plan.rows_per_pass = per_pass
    plan.stage_decode_s = stage_dec
    plan.stage_row_s = stage_row
    plan.stage_pass_s = stage_pass if per_pass else [0.0] * len(stage_pass)
    plan.stage_bus_s = stage_bus
    plan.tick_exchange_s = exchange
    worst = max(dec, key=lambda k: dec[k])
    plan.bottleneck = f"{worst} ({100 * dec[worst] / t_token:.0f}% of each token)"


def steps_ahead(ctx: CostContext, stage: Stage, compute_s: float, build_s: float) -> bool:
    """Whether a one-stage instance on ``stage`` decodes a step ahead (:mod:`exo_lab.engine.lookahead`, as
    ``EXO_LAB_LOOKAHEAD`` here says): ``always``; or, with ``auto``, when every rank has a core to spare (a GPU,
    or two cores for each of the stage's ranks on its machine) and, on a CPU, building a step (``build_s``, its
    operations and its own work) is at least ``LOOKAHEAD_MIN_BUILD_SHARE`` of the step."""
    mode = defaults.lookahead()
    if mode != "auto":
        return mode == "always"
    machines: dict[str, int] = {}
    for n in stage.nodes:
        r = ctx.rates[n]
        machines[r.bus or r.host] = machines.get(r.bus or r.host, 0) + stage.ranks_on(n)
    for n in stage.nodes:
        r = ctx.rates[n]
        if not r.gpu and r.cores < 2 * machines[r.bus or r.host]:
            return False
    gpu = all(ctx.rates[n].gpu for n in stage.nodes)
    return gpu or build_s >= defaults.LOOKAHEAD_MIN_BUILD_SHARE * (compute_s + build_s)


def _read_s(read_bytes: float, rate: float, host_share: float, bus_share: float, bound: float) -> float:
    """Seconds a rank takes to read ``read_bytes`` at ``rate`` with ``host_share`` of its host, on a memory bus
    that gives it ``bus_share`` of its speed (the machine's other readers): only the part of the time spent
    waiting on memory (``bound``, :meth:`~exo_lab.placement.cost.NodeRates.bus_bound`) slows with the bus."""
    alone = read_bytes / (rate * host_share)
    slower = min(1.0, bus_share / host_share)
    return alone * (bound / slower + 1.0 - bound)


def _step_s(compute_s: float, own_s: float, ahead: bool) -> float:
    """A decode step of a rank: its compute (reads and its layers' operations) then its own work (sampling,
    landing and streaming the tokens), or, a step ahead, the two beside each other."""
    return max(compute_s, own_s) if ahead else compute_s + own_s


def _worst_link(ctx: CostContext, nodes: tuple[str, ...]) -> LinkCost:
    pairs = list(itertools.combinations(nodes, 2))
    links = [link for a, b in pairs if (link := ctx.link(a, b)) is not None]
    if len(links) < len(pairs):  # a pair not measured
        return LinkCost(1.0, 1e3)
    return max(links, key=lambda link: (link.latency_s, -link.bandwidth_bytes_s))


def bus_shares(ctx: CostContext, stage: Stage) -> dict[str, float]:
    """The share of its memory bus each rank of a tensor group spread over nodes gets while the group computes
    (always at once): nodes on one physical machine (the same boot id: simulated hosts, containers) share its
    bus as ranks of one host do (:func:`~exo_lab.placement.cost.share` over the group's ranks there and the
    cores of their hosts; measured here: two one-core sim hosts reading at once each read 0.78-0.83 as fast
    as alone). The share slows only the part of a rank's reading that waits on memory (:func:`_read_s`): q4
    on one core is compute-bound and hardly slows. Nodes that report no boot id share nothing."""
    if stage.k <= 1 or stage.local:
        return {}
    return _shared_bus(ctx, stage.nodes)


def pipeline_bus_shares(ctx: CostContext, stages: list[Stage]) -> dict[str, float]:
    """The share of its memory bus each node of a pipeline gets in a tick of the group schedule where the
    stages compute at once (several sequences: one group in each stage), as :func:`bus_shares`. One
    sequence goes through the stages one at a time: they do not share then."""
    if len(stages) < 2:
        return {}
    return _shared_bus(ctx, list(dict.fromkeys(n for s in stages for n in s.nodes)))


def _shared_bus(ctx: CostContext, nodes: Sequence[str]) -> dict[str, float]:
    on_bus: dict[str, list[str]] = {}
    for n in nodes:
        if (bus := ctx.rates[n].bus) and not ctx.rates[n].gpu:  # a GPU reads its own memory
            on_bus.setdefault(bus, []).append(n)
    out = {}
    for same in on_bus.values():
        hosts = {ctx.rates[n].host: ctx.rates[n].cores for n in same}
        out.update({n: share(len(same), sum(hosts.values()), False) for n in same})
    return out


def node_shares(ctx: CostContext, stages: list[Stage], cpu: bool = False) -> Callable[[str], float]:
    """The share of its host's compute each node of ``stages`` gets (ranks of one host split its cores and
    memory bandwidth: :func:`~exo_lab.placement.cost.share`); ``cpu``: of one core's time, for what each rank
    runs on one thread (:func:`~exo_lab.placement.cost.cpu_share`)."""
    used = list(dict.fromkeys(n for s in stages for n in s.nodes))
    host_ranks: dict[str, int] = {}
    for n in used:
        host = ctx.rates[n].host
        host_ranks[host] = host_ranks.get(host, 0) + sum(s.ranks_on(n) for s in stages)

    def node_share(n: str) -> float:
        r = ctx.rates[n]
        return (cpu_share if cpu else share)(host_ranks[r.host], r.cores, r.gpu)

    return node_share


def plan_layout(plan: Plan) -> tuple[list[Stage], list[int]]:
    """The stages and per-stage layer counts behind ``plan``."""
    by_stage: dict[int, list] = {}
    for r in plan.ranks:
        by_stage.setdefault(r.stage, []).append(r)
    stages, alloc = [], []
    for s in sorted(by_stage):
        rs = sorted(by_stage[s], key=lambda r: r.tensor_index)
        nodes = tuple(dict.fromkeys(r.node_id for r in rs))
        stages.append(Stage(nodes, rs[0].tensor_size))
        alloc.append(rs[0].layers[1] - rs[0].layers[0])
    return stages, alloc


class Predictor:
    """The cost model's predictions for given plans at one request shape (``pp``, ``tg``).

    The planner's own formulas (:func:`predict_into`) on the plan's exact split; the KV cache read
    at decode is that of the average context ``pp + tg / 2``. ``rates`` may be replaced per node
    (calibration candidates).
    """

    def __init__(self, topology: Topology, card: ModelCard, pp: int, tg: int) -> None:
        self.ctx = CostContext(topology, card, max(pp + tg, pp), pp, 1)
        self.ctx.avg_ctx = pp + tg / 2
        self.base = dict(self.ctx.rates)

    def set_rates(self, rates: dict[str, NodeRates]) -> None:
        """Use ``rates`` for these nodes (the profiles' own for the others)."""
        self.ctx.set_rates({**self.base, **rates})

    def predict(self, plan: Plan) -> dict[str, Any] | None:
        """Predicted ``decode_tps``, ``prefill_tps``, ``ttft_s``, ``breakdown`` and ``decode_row_s`` of
        ``plan`` (None if a node of the plan is gone or has no profile, or a link is not measured)."""
        ctx = self.ctx
        stages, alloc = plan_layout(plan)
        used = list(dict.fromkeys(n for s in stages for n in s.nodes))
        if any(n not in ctx.rates for n in used):
            return None
        for a, b in zip(stages, stages[1:]):
            if ctx.link(a.nodes[0], b.nodes[0]) is None:
                return None
        out = copy.copy(plan)
        predict_into(ctx, out, stages, alloc, dict(plan.dtypes), node_shares(ctx, stages))
        return {
            "decode_tps": out.decode_tps,
            "prefill_tps": out.prefill_tps,
            "ttft_s": out.ttft_s,
            "breakdown": dict(out.breakdown),
            "decode_row_s": out.decode_row_s,
            "decode_pass_s": out.decode_pass_s,
            "rows_per_pass": out.rows_per_pass,
            "stage_decode_s": list(out.stage_decode_s),
            "stage_row_s": list(out.stage_row_s),
            "stage_pass_s": list(out.stage_pass_s),
            "tick_exchange_s": out.tick_exchange_s,
        }


def predict(topology: Topology, card: ModelCard, plan: Plan, pp: int, tg: int) -> dict[str, Any] | None:
    """Predicted ``decode_tps``, ``prefill_tps``, ``ttft_s`` and the decode breakdown of ``plan``
    for a ``pp``-token prompt and ``tg`` generated tokens (None if a node of the plan is gone)."""
    return Predictor(topology, card, pp, tg).predict(plan)


def aggregate_tps(pred: dict[str, Any], tg: int, concurrency: int = 1) -> float:
    """Predicted completion tokens/s of ``concurrency`` requests submitted together.

    The ranks prefill each prompt alone (the batch waits), then decode the requests together: one
    process or one tensor group in steps that cost one token's time plus ``decode_row_s`` for each more
    sequence, a pipeline in the group schedule (:func:`~exo_lab.placement.cost.pipelined_round_s`:
    bounded by its slowest stage, not the sum of its stages).
    """
    prefill = pred["ttft_s"] - 1.0 / pred["decode_tps"]
    batched = concurrency / decode_aggregate_tps(pred, concurrency)
    return concurrency * tg / (concurrency * prefill + tg * batched)


def decode_aggregate_tps(pred: dict[str, Any], concurrency: int) -> float:
    """Predicted tokens/s of ``concurrency`` sequences all decoding together (no prefill in between): one
    process or one tensor group in steps of one token's time plus ``decode_row_s`` per more sequence, a
    pipeline in the group schedule (:func:`~exo_lab.placement.cost.pipelined_round_s`)."""
    step = 1.0 / pred["decode_tps"]
    if pred.get("stage_decode_s"):
        batched = pipelined_round_s(
            pred["stage_decode_s"],
            pred["stage_row_s"],
            pred.get("tick_exchange_s", 0.0),
            concurrency,
            pred.get("stage_bus_s"),
            pred.get("stage_pass_s"),
            pred.get("rows_per_pass", 0),
        )
    else:
        batched = step + rows_extra_s(
            concurrency, pred.get("decode_row_s", 0.0), pred.get("decode_pass_s", 0.0), pred.get("rows_per_pass", 0)
        )
    return concurrency / batched
