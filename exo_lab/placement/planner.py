"""The planner: (topology, model card, request shape) -> ranked plans. Pure: no I/O, no clocks.

Candidates:

- every node alone (``single``), and alone with a local tensor group of up to
  ``cores`` ranks where heads divide (``tensor``) — on Linux CPU, where MLX
  computes on one core per process, this is how a machine is used fully;
- pipelines over ordered node sequences: all of them for clusters of up to
  ``max_exhaustive`` nodes (exact, so adding a node or speeding up a link
  never makes the best plan worse), else chains through the fastest links
  from every start node plus chains over the largest nodes, each prefix up to
  a few nodes past the first that holds the model; each stage optionally a
  local tensor group (``pipeline-tensor``);
- tensor groups across ``k`` nodes (``tensor``), where mlx_lm's ``shard()`` splits the model that way
  (:meth:`~exo_lab.models.card.ModelCard.tensor_split_problem`: heads, KV heads, MLP and expert widths
  divide, whole quantization groups, the family has a ``shard()``); a size it cannot split comes back
  once in ``Plans.infeasible`` with the reason.

Each candidate is tried with every node in its fastest measured weight format (with ``lossy``,
q8, q4 and downcasts too) and in the model's own dtype, and with two layer splits: in proportion to each
stage's decode speed under its memory cap (balanced stages: what a pipeline
with several requests in flight needs; planned for several sequences, the last stage's head is balanced in),
and fastest stages first up to their caps (least time for one stream, where stages run one after another).
Planned for several sequences, a third split balances the layers alone: a prompt's chunks stream through the
stages without the head, so that split gives the shorter TTFT and the other more tokens/s (llama-1b on two
one-core hosts: a[0:8] -> b[8:16] against a[0:10] -> b[10:16]). The objective ranks: ``decode`` by the tokens/s
of all the sequences planned for, decoding together; ``ttft`` by the time to a prompt's first token.
Candidates that cannot fit come back in ``Plans.infeasible`` with the reason. See :mod:`exo_lab.placement.cost`
for the formulas.
"""

from __future__ import annotations

import itertools
import math

from exo_lab.cluster.topology import Topology
from exo_lab.models import formats
from exo_lab.models.card import ModelCard
from exo_lab.placement.cost import PREFILL_CHUNK, RANK_OVERHEAD_BYTES, weight_scale
from exo_lab.placement.plan import Plan, Plans, RankSpec
from exo_lab.placement.predict import CostContext, Stage, node_shares, predict_into

OBJECTIVES = ("decode", "ttft")
TENSOR_SIZES = (2, 4, 8)


def _sig(x: float, digits: int = 3) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    return round(x, -int(math.floor(math.log10(x))) + digits - 1)


def _split_layers(
    total: int, speeds: list[float], caps: list[int], extra: list[float] | None = None
) -> list[int] | None:
    """Integer layer counts proportional to ``speeds`` under ``caps`` (None if they cannot hold ``total``).

    ``extra``: work each stage has beside its layers, in layers (the last stage's head): the stages' times,
    layers plus extra over speed, are balanced (a pipeline's group schedule runs at its slowest stage's pace).
    """
    n = len(speeds)
    if sum(caps) < total or any(c < 1 for c in caps) or total < n:
        return None
    extra = extra or [0.0] * n
    alloc = [0] * n
    free = list(range(n))
    remaining = total
    while free:
        weight = sum(speeds[i] for i in free)
        work = remaining + sum(extra[i] for i in free)
        ideal = {i: max(0.0, work * speeds[i] / weight - extra[i]) for i in free}
        if sum(ideal.values()) > 0:  # extra beyond a stage's share: rescale what is left to the layers
            scale = remaining / sum(ideal.values())
            ideal = {i: v * scale for i, v in ideal.items()}
        over = [i for i in free if ideal[i] >= caps[i]]
        if not over:
            floors = {i: max(1, int(ideal[i])) for i in free}
            left = remaining - sum(floors.values())
            order = sorted(free, key=lambda i: (-(ideal[i] - int(ideal[i])), i))
            for i in order:
                if left <= 0:
                    break
                if floors[i] < caps[i]:
                    floors[i] += 1
                    left -= 1
            while left < 0:  # max(1, ...) over-assigned: take back from the largest
                i = max(free, key=lambda j: floors[j])
                floors[i] -= 1
                left += 1
            if left > 0:
                return None
            for i in free:
                alloc[i] = floors[i]
            break
        take = {i: caps[i] for i in over}
        short = len(free) - len(over) - (remaining - sum(take.values()))  # the other stages keep a layer each
        for _ in range(max(0, short)):  # from the capped stages holding the most
            take[max(take, key=lambda j: (take[j], -j))] -= 1
        for i, layers in take.items():
            alloc[i] = layers
            remaining -= layers
            free.remove(i)
    if any(a < 1 for a in alloc) or sum(alloc) != total:
        return None
    return alloc


def _fill_fastest(total: int, speeds: list[float], caps: list[int]) -> list[int] | None:
    """Layers to the fastest stages first, each up to its cap (every stage at least one)."""
    n = len(speeds)
    if sum(caps) < total or any(c < 1 for c in caps) or total < n:
        return None
    alloc = [1] * n
    left = total - n
    for i in sorted(range(n), key=lambda i: (-speeds[i], i)):
        take = min(left, caps[i] - 1)
        alloc[i] += take
        left -= take
    return alloc if left == 0 else None


def _evaluate(ctx: CostContext, stages: list[Stage], native: bool, split: str = "proportional") -> Plan:
    card = ctx.card
    bool(card.quantization)
    used = list(dict.fromkeys(n for s in stages for n in s.nodes))
    ranks_on_node = {n: sum(s.ranks_on(n) for s in stages) for n in used}
    node_share = node_shares(ctx, stages)
    dtypes, reasons = {}, {}
    for n in used:
        if native:
            dtypes[n], reasons[n] = card.dtype, "the model's dtype (fits where a faster one may not)"
        else:
            dtypes[n], reasons[n] = ctx.fastest_dtype(n)
    for s in stages:  # a tensor group sums partial results: its ranks compute with one activation dtype
        if (
            len({formats.activation_dtype(dtypes[n]) if dtypes[n] in formats.FORMATS else dtypes[n] for n in s.nodes})
            > 1
        ):
            for n in s.nodes:
                dtypes[n], reasons[n] = ctx.fastest_dtype(n, activations="float32")

    # memory: fixed bytes per node (overhead, embedding, head), then bytes per layer
    first, last = stages[0], stages[-1]
    fixed: dict[str, float] = {n: RANK_OVERHEAD_BYTES * ranks_on_node[n] for n in used}
    act_peak = PREFILL_CHUNK * (card.hidden_size * 4 + card.intermediate_size * 2) * ctx.act
    for n in used:
        fixed[n] += act_peak * ranks_on_node[n]
    emb = card.embedding_bytes
    for n in first.nodes:
        fixed[n] += emb * weight_scale(card, dtypes[n])
    for n in last.nodes:
        head = (card.embedding_bytes if card.tie_word_embeddings else card.head_bytes) + card.norm_bytes
        if not (card.tie_word_embeddings and n in first.nodes):
            fixed[n] += head * weight_scale(card, dtypes[n])
    avg_layer = sum(card.layer_bytes) / card.num_layers
    kv_layers = [
        float(kv * ctx.batch) for kv in card.kv_bytes_per_layer(ctx.context)
    ]  # batch sequences of context tokens
    kv_ctx = sum(kv_layers) / card.num_layers
    speeds = [sum(ctx.layers_per_s(n, dtypes[n]) * node_share(n) * s.ranks_on(n) for n in s.nodes) for s in stages]
    head_layers = (card.embedding_bytes if card.tie_word_embeddings else card.head_bytes) / max(avg_layer, 1.0)
    # the last stage reads the head for every token: with several sequences in flight (the group schedule runs
    # at the slowest stage's pace) the stages' times are balanced, head included
    extra = [0.0] * (len(stages) - 1) + [head_layers] if ctx.batch > 1 else None

    def splitter(total: int, speeds: list[float], caps: list[int]) -> list[int] | None:
        if split == "fastest":
            return _fill_fastest(total, speeds, caps)
        # "layers": the stages' layers balanced without the head, as a prompt's chunks meet them (the head computes
        # the last token only): the split for the TTFT of a plan for several sequences, whose decode balances the head
        balanced = (
            _split_layers(total, speeds, caps, extra) if extra and len(stages) > 1 and split != "layers" else None
        )
        return balanced or _split_layers(total, speeds, caps)

    # layers differ (DeepSeek-V3's first three are dense): caps from the mean layer, and if the exact
    # layers of that split do not fit, from the largest layer (every split under those caps fits)
    alloc: list[int] | None = None
    caps: list[int] = []
    for per_layer_weights, per_layer_kv in ((avg_layer, kv_ctx), (max(card.layer_bytes), max(kv_layers))):
        caps = [_stage_cap(ctx, s, fixed, dtypes, per_layer_weights, per_layer_kv) for s in stages]
        alloc = splitter(card.num_layers, speeds, caps)
        if alloc is not None and _fits(ctx, stages, alloc, fixed, dtypes, kv_layers):
            break
    strategy = _strategy(stages)
    plan = Plan(
        model=card.name,
        strategy=strategy,
        ranks=[],
        context=ctx.context,
        prompt_tokens=ctx.prompt,
        batch=ctx.batch,
        dtypes=dtypes,
        dtype_reasons=reasons,
        node_names={n: ctx.names[n] for n in used},
        model_dtype=card.dtype,
        split=split if len(stages) > 1 else "whole",
        lossy=ctx.lossy,
    )
    for s in stages:  # mlx_lm's shard() must be able to split the model this way
        if s.k > 1 and (problem := card.tensor_split_problem(s.k)):
            return _infeasible(plan, stages, f"no tensor split over {s.k} ranks: {problem}")
        if s.k > 1 and len(stages) > 1 and (problem := card.pair_split_problem()):
            return _infeasible(plan, stages, problem)
    # links between consecutive stages must exist
    for a, b in zip(stages, stages[1:]):
        if ctx.link(a.nodes[0], b.nodes[0]) is None:
            return _infeasible(
                plan, stages, f"no measured link between {ctx.names[a.nodes[0]]} and {ctx.names[b.nodes[0]]}"
            )
    if alloc is None:
        return _infeasible(plan, stages, _memory_reason(ctx, stages, caps, speeds, fixed, avg_layer, kv_ctx, dtypes))

    # ranks, layers and memory
    start = 0
    rank = 0
    mem = {n: fixed[n] for n in used}
    prev_node = stages[-1].nodes[0]
    for si, (s, count) in enumerate(zip(stages, alloc)):
        layers = (start, start + count)
        for ti in range(s.k):
            node = s.nodes[0] if s.local else s.nodes[ti]
            mem[node] += int(_rank_layer_bytes(ctx, s, layers, dtypes[node], kv_layers))
            addr = "127.0.0.1" if len(used) == 1 else ctx.address(prev_node, node)
            plan.ranks.append(RankSpec(rank, node, ctx.names[node], si, layers, ti, s.k, addr, dtypes[node]))
            rank += 1
        prev_node = s.nodes[0]
        start += count
    plan.memory_bytes = {n: int(v) for n, v in mem.items()}
    plan.memory_capacity_bytes = {n: ctx.rates[n].memory_bytes for n in used}
    over = [n for n in used if mem[n] > ctx.rates[n].memory_bytes]
    if over:
        n = over[0]
        return _infeasible(
            plan, stages, f"needs {mem[n] / 1e9:.1f} GB on {ctx.names[n]}, has {ctx.rates[n].memory_bytes / 1e9:.1f} GB"
        )
    predict_into(ctx, plan, stages, alloc, dtypes, node_share)
    plan.backend = _backend(ctx, used)
    model_name = card.path.rstrip("/").rsplit("/", 1)[-1] if card.path else card.name
    holders = [n for n in ctx.nodes if model_name in n.models]
    if holders:  # somebody has the files: the others would fetch their shards first
        plan.fetch_nodes = [n for n in used if model_name not in ctx.topology.nodes[n].models]
    return plan


def _kv_share(card: ModelCard, k: int) -> float:
    """The part of a layer's cache one of ``k`` tensor ranks keeps (MLA's latent is not split)."""
    return 1.0 / k if card.kv_splits_with_tensor else 1.0


def _stage_cap(
    ctx: CostContext, s: Stage, fixed: dict[str, float], dtypes: dict[str, str], weights: float, kv: float
) -> int:
    """How many layers of ``weights`` bytes and ``kv`` cache bytes each the stage's ranks hold."""
    card = ctx.card
    per_node = []
    for n in s.nodes:
        frac = 1.0 if s.local else 1.0 / s.k
        kv_frac = _kv_share(card, s.k) * (s.k if s.local else 1)  # the node's ranks' parts of each cache
        per_layer = weights * weight_scale(card, dtypes[n]) * frac + kv * kv_frac
        room = ctx.rates[n].memory_bytes - fixed[n]
        per_node.append(int(room // per_layer) if room > 0 else 0)
    return min(per_node)


def _rank_layer_bytes(ctx: CostContext, s: Stage, layers: tuple[int, int], dtype: str, kv_layers: list[float]) -> float:
    """Bytes one rank of stage ``s`` holds for ``layers``: its share of their weights and caches."""
    card = ctx.card
    a, b = layers
    return card.weight_bytes_of(a, b) * weight_scale(card, dtype) / s.k + sum(kv_layers[a:b]) * _kv_share(card, s.k)


def _fits(
    ctx: CostContext,
    stages: list[Stage],
    alloc: list[int],
    fixed: dict[str, float],
    dtypes: dict[str, str],
    kv_layers: list[float],
) -> bool:
    """Whether every node holds its ranks' exact layers of ``alloc``."""
    mem = dict(fixed)
    start = 0
    for s, count in zip(stages, alloc):
        for ti in range(s.k):
            node = s.nodes[0] if s.local else s.nodes[ti]
            mem[node] += _rank_layer_bytes(ctx, s, (start, start + count), dtypes[node], kv_layers)
        start += count
    return all(mem[n] <= ctx.rates[n].memory_bytes for n in mem)


def _backend(ctx: CostContext, used: list[str]) -> str:
    profiles = [ctx.topology.nodes[n].profile for n in used]
    if all("gpu" in (p.get("mlx_devices") or []) and p.get("system") == "Linux" for p in profiles) and len(used) > 1:
        return "nccl"
    if len(used) > 1 and all(
        (link := ctx.best_link(a, b)) is not None and link.rdma for a, b in itertools.combinations(used, 2)
    ):
        return "jaccl"
    return "ring"


def _strategy(stages: list[Stage]) -> str:
    tensor = any(s.k > 1 for s in stages)
    if len(stages) == 1:
        return "tensor" if tensor else "single"
    return "pipeline-tensor" if tensor else "pipeline"


def _infeasible(plan: Plan, stages: list[Stage], reason: str) -> Plan:
    plan.feasible = False
    plan.reason = reason
    if not plan.ranks:
        rank = 0
        for si, s in enumerate(stages):
            for ti in range(s.k):
                node = s.nodes[0] if s.local else s.nodes[ti]
                plan.ranks.append(RankSpec(rank, node, plan.node_names.get(node, node), si, (0, 0), ti, s.k))
                rank += 1
    return plan


def _memory_reason(ctx, stages, caps, speeds, fixed, avg_layer, kv_ctx, dtypes) -> str:
    """Name the node that falls shortest of its proportional share."""
    card = ctx.card
    total = sum(speeds) or 1.0
    worst: tuple[float, str, float, float] | None = None
    for s, sp in zip(stages, speeds):
        share_layers = card.num_layers * sp / total
        for n in s.nodes:
            frac = 1.0 if s.local else 1.0 / s.k
            need = fixed[n] + share_layers * (avg_layer * weight_scale(card, dtypes[n]) + kv_ctx) * frac
            have = ctx.rates[n].memory_bytes
            if worst is None or need - have > worst[0]:
                worst = (need - have, n, need, have)
    assert worst is not None  # _evaluate's stages are never empty, nor is a stage's nodes
    _, n, need, have = worst
    return f"needs {need / 1e9:.1f} GB on {ctx.names[n]}, has {have / 1e9:.1f} GB"


def _link_score(ctx: CostContext, a: str, b: str) -> tuple[float, float]:
    link = ctx.link(a, b)
    if link is None:
        return (0.0, -1e9)
    return (link.bandwidth_bytes_s, -link.latency_s)


def _sequences(ctx: CostContext, max_exhaustive: int) -> list[tuple[str, ...]]:
    ids = sorted(ctx.rates)
    limit = min(len(ids), ctx.card.num_layers)
    if len(ids) <= max_exhaustive:
        return [p for m in range(1, limit + 1) for p in itertools.permutations(ids, m)]
    seqs: set[tuple[str, ...]] = set()
    total_mem = ctx.card.weight_bytes

    def chain(start: str, pool: list[str]) -> list[str]:
        out, left = [start], [n for n in pool if n != start]
        while left:
            nxt = max(left, key=lambda n: (_link_score(ctx, out[-1], n), ctx.rates[n].memory_bytes, n))
            out.append(nxt)
            left.remove(nxt)
        return out

    def prefixes(order: list[str]) -> None:
        held = 0
        first_fit = None
        for m in range(1, limit + 1):
            held += ctx.rates[order[m - 1]].memory_bytes
            if first_fit is None and held >= total_mem:
                first_fit = m
            seqs.add(tuple(order[:m]))
            if first_fit is not None and m >= first_fit + 3:
                break

    for start in ids:
        prefixes(chain(start, ids))
    by_mem = sorted(ids, key=lambda n: (-ctx.rates[n].memory_bytes, n))
    by_speed = sorted(ids, key=lambda n: (-ctx.layers_per_s(n, ctx.card.dtype), n))
    for ranked in (by_mem, by_speed):
        for m in range(1, limit + 1):
            subset = ranked[:m]
            seqs.add(tuple(chain(subset[0], subset)))
            if sum(ctx.rates[n].memory_bytes for n in subset) >= total_mem * 1.5 and m > 4:
                break
    return sorted(seqs)


def _candidates(ctx: CostContext, max_exhaustive: int) -> list[list[Stage]]:
    ks = [k for k in TENSOR_SIZES if ctx.card.can_split_tensor(k)]
    out: list[list[Stage]] = []
    for seq in _sequences(ctx, max_exhaustive):
        out.append([Stage((n,)) for n in seq])
        local = []
        for n in seq:
            r = ctx.rates[n]
            fit = [k for k in ks if k <= r.cores] if not r.gpu else []
            if len(seq) > 1:
                fit = [k for k in fit if k <= 2]  # inside a pipeline a stage's tensor group is a pair
            local.append(Stage((n,), max(fit)) if fit else Stage((n,)))
        if any(s.k > 1 for s in local):
            out.append(local)
    ids = sorted(ctx.rates)
    for k in ks:
        if k > len(ids):
            continue
        if len(ids) <= max_exhaustive:
            groups = itertools.combinations(ids, k)
        else:
            groups = {tuple(sorted(_greedy_group(ctx, s, k))) for s in ids}
        for g in groups:
            out.append([Stage(tuple(g), k)])
    for k in TENSOR_SIZES:  # one candidate per size the model cannot be split over: infeasible, with the reason
        if k not in ks and k <= len(ids):
            out.append([Stage(tuple(ids[:k]), k)])
    return out


def _greedy_group(ctx: CostContext, start: str, k: int) -> list[str]:
    out = [start]
    left = [n for n in ctx.rates if n != start]
    while len(out) < k and left:
        nxt = max(left, key=lambda n: (min(_link_score(ctx, m, n) for m in out), n))
        out.append(nxt)
        left.remove(nxt)
    return out


def plan(
    topology: Topology,
    card: ModelCard,
    context: int = 4096,
    prompt_tokens: int = 512,
    batch: int = 1,
    objective: str = "decode",
    max_exhaustive: int = 6,
    lossy: bool = False,
) -> Plans:
    """Ranked plans (best first) to run ``card`` on ``topology``'s live nodes.

    ``lossy``: nodes may also compute in formats that change the generated tokens (q8, q4, a
    downcast; :mod:`exo_lab.models.formats`) where they decode faster (measured); by default
    weights stay exact (the checkpoint's dtype or fp32)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if prompt_tokens < 1 or context < prompt_tokens or batch < 1:
        raise ValueError("need 1 <= prompt_tokens <= context and batch >= 1")
    ctx = CostContext(topology, card, context, prompt_tokens, batch, lossy=lossy)
    if not ctx.nodes:
        return Plans([], [], objective, card.name)
    feasible: dict[tuple, Plan] = {}
    infeasible: dict[tuple, Plan] = {}
    for stages in _candidates(ctx, max_exhaustive):
        for split in _splits(ctx, stages):
            for native in (False, True):
                p = _evaluate(ctx, stages, native, split)
                bucket = feasible if p.feasible else infeasible
                if p.key not in bucket:
                    bucket[p.key] = p
    ranked = sorted(feasible.values(), key=lambda p: _rank_key(p, objective))
    _explain(ranked, objective)
    bad = sorted(infeasible.values(), key=lambda p: (p.num_nodes, p.describe()))
    return Plans(ranked, bad, objective, card.name)


def _splits(ctx: CostContext, stages: list[Stage]) -> tuple[str, ...]:
    """How a plan over ``stages`` may split the layers: in proportion to the stages' speeds (with several sequences,
    the head's reads balanced in: decode), fastest first, and with several sequences the layers alone (prompts)."""
    if len(stages) == 1:
        return ("proportional",)
    return ("proportional", "fastest", "layers") if ctx.batch > 1 else ("proportional", "fastest")


def _decode_rate(p: Plan) -> float:
    """What the decode objective ranks by: the tokens/s of all the sequences planned for, decoding together (one
    sequence's own rate when planned for one)."""
    return p.batched_decode_tps(p.batch) if p.batch > 1 else p.decode_tps


def _rank_key(p: Plan, objective: str) -> tuple:
    """Objective first; ties go to plans whose nodes already hold the files, then to fewer nodes."""
    if objective == "ttft":
        return (_sig(p.ttft_s), len(p.fetch_nodes), p.num_nodes, len(p.ranks), -_decode_rate(p), p.describe())
    return (-_sig(_decode_rate(p)), len(p.fetch_nodes), p.num_nodes, len(p.ranks), p.ttft_s, p.describe())


def _explain(plans: list[Plan], objective: str) -> None:
    if not plans:
        return
    best = plans[0]
    metric = _decode_rate if objective == "decode" else (lambda p: 1 / p.ttft_s)
    batch = f" ({best.batch} sequences)" if best.batch > 1 else ""
    unit = f"decode tok/s{batch}" if objective == "decode" else "TTFT"
    for i, p in enumerate(plans):
        where = f"{p.num_nodes} node{'s' if p.num_nodes > 1 else ''}"
        if i == 0:
            p.explanation = f"Best {unit} on {where}; limited by {p.bottleneck}."
            continue
        ratio = metric(p) / metric(best)
        if ratio >= 0.999:
            p.explanation = f"As fast as #0 but uses more nodes or ranks ({where})."
        else:
            extra = ""
            links = sum(v for k, v in p.breakdown.items() if not k.startswith("compute"))
            best_links = sum(v for k, v in best.breakdown.items() if not k.startswith("compute"))
            if links > best_links * 1.2 and links > 0.1 / max(p.decode_tps, 1e-9) * 0.1:
                extra = f"; spends {1000 * links:.2f} ms per token on links and all-reduces"
            p.explanation = f"{100 * (1 - ratio):.0f}% slower than #0 ({where}); limited by {p.bottleneck}{extra}."
