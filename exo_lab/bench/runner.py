"""Running a bench of plans: launch each in turn, sweep it, predictions for the same request shapes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from exo_lab._version import __version__
from exo_lab.bench.calibrate import fit_calibration, store_calibration
from exo_lab.bench.components import fit_components, store_components
from exo_lab.bench.endpoint import Sample
from exo_lab.bench.prompts import exact_prompt
from exo_lab.bench.results import (
    LINKS_SOURCE,
    METRICS,
    BenchError,
    BenchResult,
    ConcurrencyPoint,
    LinkTraffic,
    PlanBench,
    SweepPoint,
    stat,
)
from exo_lab.bench.sweep import ENGINE_NOTE, HeldTarget, node_memory, predictor_for, sizes, sweep
from exo_lab.bench.sweep import steps as sweep_steps
from exo_lab.engine.trace import Trace
from exo_lab.models.card import ModelCard
from exo_lab.models.store import resolve
from exo_lab.placement.cost import DTYPE_BYTES
from exo_lab.placement.plan import Plan, Plans, RankSpec
from exo_lab.placement.predict import Predictor, aggregate_tps
from exo_lab.placement.preview import model_card

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- predictions


def link_traffic(plan: Plan, card: ModelCard, pp: int, tg: int) -> list[LinkTraffic]:
    """Bytes each rank sends another for one request, computed from the plan (see the module doc)."""
    hidden = card.hidden_size
    names = plan.node_names
    by_stage: dict[int, list[RankSpec]] = {}
    for r in plan.ranks:
        by_stage.setdefault(r.stage, []).append(r)
    stages = [sorted(by_stage[s], key=lambda r: r.tensor_index) for s in sorted(by_stage)]
    tokens = pp + tg - 1  # forwards carry pp prompt tokens, then one token per step after the first
    out: list[LinkTraffic] = []

    def add(a: RankSpec, b: RankSpec, kind: str, per_token: float) -> None:
        out.append(
            LinkTraffic(
                a.node_id,
                b.node_id,
                names.get(a.node_id, a.node_name),
                names.get(b.node_id, b.node_name),
                kind,
                a.rank,
                b.rank,
                pp * per_token,
                per_token,
                tokens * per_token,
            )
        )

    for a, b in zip(stages, stages[1:]):
        for ra in a:
            add(ra, b[ra.tensor_index % len(b)], "pipeline hop", hidden * DTYPE_BYTES.get(ra.dtype, 2))
    for st in stages:
        k = len(st)
        if k > 1:
            layers = st[0].layers[1] - st[0].layers[0]
            for i, r in enumerate(st):
                per_token = 2 * layers * 2 * (k - 1) / k * hidden * DTYPE_BYTES.get(r.dtype, 2)
                add(r, st[(i + 1) % k], "tensor all-reduce", per_token)
    return out


# ----------------------------------------------------------------------------- running


def _select(
    cluster: Any, plans: Any, pp: int, tg: int, select: str | int, strategies: Iterable[str] | None
) -> list[tuple[int, Plan]]:
    if isinstance(plans, (str, Path)):
        plans = cluster.preview(plans, context=pp + tg, prompt_tokens=pp)
    if isinstance(plans, Plan):
        seq = [plans]
    elif isinstance(plans, Plans):
        seq = list(plans.plans)
    else:
        seq = list(plans)
    if not seq:
        raise BenchError("no plans to benchmark")
    wanted = set(strategies) if strategies else None
    indexed = [(i, p) for i, p in enumerate(seq) if p.feasible and (wanted is None or p.strategy in wanted)]
    if not indexed:
        raise BenchError(f"no feasible plan with strategy in {sorted(wanted or [])}")
    if select == "all":
        return indexed
    n = 1 if select == "best" else int(select)
    if n < 1:
        raise BenchError(f"--plans takes all, best or a count >= 1, not {select!r}")
    out, launchable = [], 0
    for i, p in indexed:
        if launchable >= n:
            break
        out.append((i, p))
        launchable += p.strategy != "pipeline-tensor"
    return out


def _bench_plan(
    cluster: Any,
    index: int,
    plan: Plan,
    cfg: dict[str, Any],
    predictor: Predictor,
    card: ModelCard,
    bar: Any,
) -> PlanBench:
    """Launch ``plan``, sweep every combination on it, delete it. The per-plan fields of the result
    (``measured``, ``concurrency``, ``ratios``) are the first ``pp`` and ``tg``'s; ``points`` has them all."""
    pps, tgs, levels, repeat = cfg["pps"], cfg["tgs"], cfg["concurrency"], cfg["repeat"]
    pp, tg = pps[0], tgs[0]
    res = PlanBench(index, plan.describe(), plan.strategy, "ok", plan.to_json())
    pred = predictor.predict(plan)
    if pred is not None:
        pred["aggregate_tps"] = aggregate_tps(pred, tg)
        res.predicted = pred
    res.links = link_traffic(plan, card, pp, tg)
    if plan.strategy == "pipeline-tensor":
        res.status, res.reason = "skipped", "pipeline-tensor plans cannot be launched yet"
        bar.update(cfg["steps_per_plan"])
        return res
    if pred is None:
        res.status, res.reason = "skipped", "a node of this plan is gone or has no profile"
        bar.update(cfg["steps_per_plan"])
        return res
    bar.set_postfix_str(f"#{index} launching")
    start = time.perf_counter()
    done = [0]
    inst = None

    class _Bar:  # counts what the sweep advances, so a failure fills the rest of this plan's share
        def update(self, n: int) -> None:
            done[0] += n
            bar.update(n)

        def set_postfix_str(self, text: str) -> None:
            bar.set_postfix_str(f"#{index} {text}")

    first: dict[int, tuple[SweepPoint, list[Sample]]] = {}

    def keep_first(point: SweepPoint, samples: list[Sample]) -> None:
        if point.pp == pp and point.tg == tg:
            first[point.concurrency] = (point, samples)

    try:
        inst = cluster.launch(
            plan.model_ref or plan.model, plan=plan, name=f"bench-{index}", auto_replace=False, wait=False
        )
        inst.wait_ready(timeout=cfg["launch_timeout"], progress=False)
        res.launch_s = time.perf_counter() - start
        _Bar().update(1)
        res.points, _ = sweep(
            HeldTarget(inst, cfg["tokenizer"]),
            pps,
            tgs,
            levels,
            repeat,
            warmup=cfg["warmup"],
            bar=_Bar(),
            predict=predictor_for(cfg["topology"], card, plan),
            prompts=cfg["prompts"],
            on_point=keep_first,
        )
        _Bar().update(1)  # the warm-up's step
        failed = next((p for p in res.points if not p.ok), None)
        if failed is not None:
            raise BenchError(f"pp={failed.pp} tg={failed.tg} c={failed.concurrency}: {failed.reason}")
        for p in res.points:
            if any(n != p.tg for n in p.completion_tokens) or any(n != p.pp for n in p.prompt_tokens):
                raise BenchError(
                    f"asked for {p.pp} prompt and {p.tg} generated tokens, got {p.prompt_tokens[0]} "
                    f"and {min(p.completion_tokens)}"
                )
        one, samples = first[1]
        res.measured = _measured([s.usage for s in samples], [s.client_ttft_s for s in samples], pp)
        res.concurrency = [
            ConcurrencyPoint(
                c,
                point.aggregate_tps,
                point.client_ttft_s,
                point.wall_s,
                aggregate_tps(pred, tg, c),
            )
            for c, (point, _) in sorted(first.items())
        ]
        if cfg.get("trace"):  # one more request, traced on every rank, set against the bench's own prediction
            bar.set_postfix_str(f"#{index} trace")
            tokens, _ = exact_prompt(cfg["tokenizer"], pp, seed=1_000_003 + index)  # a prompt no cache holds
            gen = inst.generate(tokens, max_tokens=tg, ignore_eos=True, trace=True)
            trace = gen.trace
            if trace is not None:
                trace.predicted = dict(pred.get("breakdown") or {})
                res.trace = trace.to_json()
        res.memory = node_memory(cluster, inst.id, plan.nodes, plan)
        res.ratios = {m: res.median(m) / pred[m] for m in METRICS if res.median(m) and pred.get(m)}
    except (TimeoutError, BenchError, RuntimeError, OSError) as exc:  # a LaunchError is a RuntimeError
        log.warning("bench of plan #%d (%s) failed: %s", index, plan.describe(), exc)
        res.status, res.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        if inst is not None:
            inst.delete()
            if inst in getattr(cluster, "instances", []):
                cluster.instances.remove(inst)
        bar.update(cfg["steps_per_plan"] - done[0])
    return res


def _measured(usages: list[Any], firsts: list[float], pp: int) -> dict[str, Any]:
    decode = [u.generation_tps for u in usages]
    prefill = []
    for u in usages:
        step = 1.0 / u.generation_tps if u.generation_tps else 0.0
        prefill.append(pp / (u.ttft_s - step) if u.ttft_s > step else u.prompt_tps)
    return {
        "prompt_tokens": [u.prompt_tokens for u in usages],
        "completion_tokens": [u.completion_tokens for u in usages],
        "ttft_s": stat([u.ttft_s for u in usages]),
        "decode_tps": stat(decode),
        "prefill_tps": stat(prefill),
        "engine_prompt_tps": stat([u.prompt_tps for u in usages]),
        "total_s": stat([u.total_s for u in usages]),
        "client_ttft_s": stat(firsts),
    }


def run(
    cluster: Any,
    plans: Any,
    pp: Sequence[int] | int | str = 512,
    tg: Sequence[int] | int | str = 128,
    repeat: int = 3,
    concurrency: Sequence[int] | int | str = (1,),
    *,
    select: str | int = "all",
    strategies: Iterable[str] | None = None,
    warmup: int = 1,
    calibrate: bool = False,
    progress: bool = True,
    widget: Any = None,
    launch_timeout: float = 300.0,
    trace: bool = False,
) -> BenchResult:
    """Benchmark ``plans`` on ``cluster`` (see the module doc); what ``cluster.bench`` does.

    ``plans``: a :class:`Plans`, a list of plans, one plan, or a model (previewed for ``pp``);
    ``pp``, ``tg``: a size or several (every combination with every ``concurrency`` runs on each plan;
    the per-plan table, ratios and calibration use the first ``pp`` and ``tg``);
    ``select``: ``"all"``, ``"best"`` or a count of launchable plans, best first; ``strategies``
    keeps only those strategies; ``widget``: a plan comparison widget to show the measurements in;
    ``trace``: one more request per plan traced on every rank (``PlanBench.trace``; with ``calibrate``, the
    traces also fit the cost model per component, see :mod:`exo_lab.bench.components`).
    """
    from mlx_lm.utils import load_tokenizer  # MLX loads only when a bench runs, not with the package

    pps, tgs = sizes(pp, "pp"), sizes(tg, "tg")
    levels = _levels(concurrency)
    if repeat < 1 or warmup < 0:
        raise BenchError("need pp >= 1, tg >= 1, repeat >= 1 and warmup >= 0")
    pp0, tg0 = pps[0], tgs[0]
    chosen = _select(cluster, plans, max(pps), max(tgs), select, strategies)
    refs = {p.model_ref or p.model for _, p in chosen}
    if len(refs) > 1:
        raise BenchError(f"the plans are for different models: {sorted(refs)}")
    model_ref = refs.pop()
    card = model_card(model_ref)
    path = resolve(model_ref)
    config = json.loads((path / "config.json").read_text())
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    prompts = {p: exact_prompt(tokenizer, p) for p in pps}
    cluster.refresh()
    topology = cluster.topology
    predictor = Predictor(topology, card, pp0, tg0)
    steps = 2 + sweep_steps(pps, tgs, levels, repeat)
    cfg = {
        "pps": pps,
        "tgs": tgs,
        "repeat": repeat,
        "warmup": warmup,
        "concurrency": levels,
        "launch_timeout": launch_timeout,
        "steps_per_plan": steps,
        "prompts": prompts,
        "tokenizer": tokenizer,
        "topology": topology,
        "trace": trace,
    }
    results = []
    with tqdm(total=steps * len(chosen), desc=f"bench {card.name}", unit="step", disable=not progress) as bar:
        for index, plan in chosen:
            results.append(_bench_plan(cluster, index, plan, cfg, predictor, card, bar))
    prompt_info = dict(prompts[pp0][1])
    if len(pps) > 1:
        prompt_info["sweep"] = {
            str(p): {k: v for k, v in info.items() if k != "text"} for p, (_, info) in prompts.items()
        }
    result = BenchResult(
        model=card.name,
        model_ref=str(model_ref),
        pp=pp0,
        tg=tg0,
        repeat=repeat,
        warmup=warmup,
        concurrency=levels,
        plans=results,
        topology=topology.to_json(),
        profiles={n.id: n.profile for n in topology.nodes.values()},
        card=card.to_json(),
        prompt=prompt_info,
        exo_lab_version=__version__,
        notes={
            "links": f"bytes per link are {LINKS_SOURCE}: hidden * activation bytes per token per pipeline hop "
            "(pp tokens at prefill), 2 ring all-reduces per layer in tensor groups; not measured",
            "concurrency": "an instance runs requests one after another in lock step: aggregate tokens/s "
            "against concurrency shows the queueing, not batching",
            "prefill_tps": "pp / (TTFT - one decode step), as the planner predicts it; engine_prompt_tps "
            "is the engine's pp / TTFT",
            "timing": ENGINE_NOTE,
        },
        sweep={"pp": pps, "tg": tgs, "concurrency": levels},
    )
    if calibrate:
        result.calibration = fit_calibration(result, topology, card)
        if result.calibration is not None:
            result.calibration.stored = store_calibration(cluster, result.calibration, result)
        traced = [(Trace.from_json(p.trace), Plan.from_json(p.plan)) for p in result.ok if p.trace]
        fit = fit_components(traced, topology, card) if traced else None  # per component, from the traces
        if fit is not None:
            store_components(cluster, fit)
            result.components = fit.to_json()
    if widget is not None:
        result.show_in(widget)
    return result


def _levels(concurrency: Sequence[int] | int | str) -> list[int]:
    if isinstance(concurrency, str):
        concurrency = [int(x) for x in concurrency.split(",") if x.strip()]
    elif isinstance(concurrency, int):
        concurrency = [concurrency]
    levels = sorted({1, *sizes(concurrency, "concurrency")})
    if levels[0] < 1:
        raise BenchError(f"concurrency levels must be >= 1, got {list(concurrency)}")
    return levels
