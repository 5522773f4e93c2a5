"""Running a bench: exact-length prompts, predictions for the same request shape, one plan at a time."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from exo_lab._version import __version__
from exo_lab.bench.calibrate import fit_calibration, store_calibration
from exo_lab.bench.components import fit_components, store_components
from exo_lab.bench.results import (
    LINKS_SOURCE,
    METRICS,
    BenchError,
    BenchResult,
    ConcurrencyPoint,
    LinkTraffic,
    PlanBench,
    stat,
)
from exo_lab.engine.chat import chat_prompt_tokens
from exo_lab.engine.generator import GenerationRequest
from exo_lab.engine.sampling import SamplingParams
from exo_lab.engine.trace import Trace
from exo_lab.models.card import ModelCard
from exo_lab.models.store import resolve
from exo_lab.placement.cost import DTYPE_BYTES
from exo_lab.placement.plan import Plan, Plans, RankSpec
from exo_lab.placement.predict import Predictor, aggregate_tps
from exo_lab.placement.preview import model_card

log = logging.getLogger(__name__)

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "curious",
    "engineers",
    "measure",
    "tokens",
    "per",
    "second",
    "across",
    "every",
    "node",
    "of",
    "the",
    "cluster",
    "and",
    "write",
    "down",
    "what",
    "they",
    "see",
    "in",
    "their",
    "notebooks",
]


# ----------------------------------------------------------------------------- prompts


def exact_prompt(tokenizer: Any, pp: int, seed: int = 0) -> tuple[list[int], dict[str, Any]]:
    """Prompt token ids of one user message whose chat-templated length is exactly ``pp``.

    Searches the message's length in words (the template's own tokens count); if no text lands
    exactly, the last content token is repeated to fill the gap (``method: "splice"``).
    """

    def tokens(text: str) -> list[int]:
        return chat_prompt_tokens(tokenizer, [{"role": "user", "content": text}])

    def text_of(n: int) -> str:
        return " ".join(_WORDS[(seed + i) % len(_WORDS)] for i in range(n))

    empty = len(tokens(""))
    if empty > pp:
        raise BenchError(f"the chat template alone takes {empty} tokens; use pp >= {empty}")
    lo, hi = 0, 1
    while len(tokens(text_of(hi))) <= pp:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokens(text_of(mid))) <= pp:
            lo = mid
        else:
            hi = mid
    text = text_of(lo)
    ids = tokens(text)
    while len(ids) < pp:  # close the gap with short pieces
        for extra in (" a", " I", ".", ",", "a", " of", "!", "s"):
            trial = tokens(text + extra)
            if len(ids) < len(trial) <= pp:
                text, ids = text + extra, trial
                break
        else:
            break
    info = {"tokens": pp, "template_tokens": empty, "method": "search", "text": text}
    if len(ids) < pp:
        if not text:
            raise BenchError(f"cannot build a {pp}-token prompt with this tokenizer")
        a, b = tokens("x"), tokens("y z")
        suffix = 0
        while suffix < min(len(a), len(b)) and a[-1 - suffix] == b[-1 - suffix]:
            suffix += 1
        cut = len(ids) - suffix
        ids = ids[:cut] + [ids[cut - 1]] * (pp - len(ids)) + ids[cut:]
        info["method"] = "splice"
    return ids, info


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


def _request(inst: Any, tokens: list[int], tg: int, count: int) -> tuple[list[Any], list[float], float]:
    """Submit ``count`` requests at once; (usages, submit-to-first-token times, wall seconds)."""
    t0 = time.perf_counter()
    gens = [
        inst.submit(GenerationRequest(tuple(tokens), tg, SamplingParams(temperature=0.0), ignore_eos=True))
        for _ in range(count)
    ]
    firsts: list[float | None] = [None] * count
    ends: list[float] = [t0] * count
    errors: list[str] = []

    def consume(i: int) -> None:
        last = None
        for chunk in gens[i]:
            if chunk.tokens and firsts[i] is None:
                firsts[i] = time.perf_counter() - t0
            last = chunk
        ends[i] = time.perf_counter()
        if last is None or last.error or last.finish_reason not in ("length", "stop"):
            errors.append(
                last.error if last is not None and last.error else f"finish {getattr(last, 'finish_reason', None)}"
            )

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(1, count)]
    for t in threads:
        t.start()
    consume(0)
    for t in threads:
        t.join()
    if errors:
        raise BenchError(f"generation failed: {errors[0]}")
    return [g.usage for g in gens], [f for f in firsts if f is not None], max(ends) - t0


def _memory(cluster: Any, inst: Any, plan: Plan) -> dict[str, dict[str, Any]]:
    out = {}
    for node in plan.nodes:
        entry: dict[str, Any] = {
            "name": plan.node_names.get(node, node),
            "predicted_bytes": plan.memory_bytes.get(node),
            "rss_bytes": None,
            "peak_rss_bytes": None,
            "ranks": 0,
        }
        try:
            data = cluster.request(cluster.address_of(node), "GET", f"/instances/{inst.id}", timeout=5)
        except Exception as exc:
            log.debug("memory of %s: %s", node, exc)
            out[node] = entry
            continue
        ranks = data.get("ranks", [])
        entry["ranks"] = len(ranks)
        for key in ("rss_bytes", "peak_rss_bytes"):
            vals = [r[key] for r in ranks if r.get(key) is not None]
            entry[key] = sum(vals) if vals else None
        out[node] = entry
    return out


def _bench_plan(
    cluster: Any,
    index: int,
    plan: Plan,
    tokens: list[int],
    cfg: dict[str, Any],
    predictor: Predictor,
    card: ModelCard,
    bar: Any,
) -> PlanBench:
    pp, tg, repeat = cfg["pp"], cfg["tg"], cfg["repeat"]
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
    done = 0
    inst = None
    try:
        inst = cluster.launch(
            plan.model_ref or plan.model, plan=plan, name=f"bench-{index}", auto_replace=False, wait=False
        )
        inst.wait_ready(timeout=cfg["launch_timeout"], progress=False)
        res.launch_s = time.perf_counter() - start
        bar.update(1)
        done += 1
        bar.set_postfix_str(f"#{index} warm-up")
        for _ in range(cfg["warmup"]):
            _request(inst, tokens, tg, 1)
        bar.update(1)
        done += 1
        usages, firsts, walls = [], [], []
        bar.set_postfix_str(f"#{index} c=1")
        for _ in range(repeat):
            u, f, w = _request(inst, tokens, tg, 1)
            usages += u
            firsts += f
            walls.append(w)
            bar.update(1)
            done += 1
        res.measured = _measured(usages, firsts, pp)
        bad = [u for u in usages if u.prompt_tokens != pp or u.completion_tokens != tg]
        if bad:
            raise BenchError(
                f"asked for {pp} prompt and {tg} generated tokens, got {bad[0].prompt_tokens} "
                f"and {bad[0].completion_tokens}"
            )
        points = {1: ConcurrencyPoint(1, stat([tg / w for w in walls]), stat(firsts), stat(walls))}
        for c in cfg["concurrency"]:
            if c == 1:
                continue
            bar.set_postfix_str(f"#{index} c={c}")
            aggs, cf, cw = [], [], []
            for _ in range(repeat):
                u, f, w = _request(inst, tokens, tg, c)
                if any(x.completion_tokens != tg for x in u):
                    raise BenchError(
                        f"a concurrent request generated {min(x.completion_tokens for x in u)} tokens, not {tg}"
                    )
                aggs.append(sum(x.completion_tokens for x in u) / w)
                cf += f
                cw.append(w)
                bar.update(1)
                done += 1
            points[c] = ConcurrencyPoint(c, stat(aggs), stat(cf), stat(cw))
        for c, p in points.items():
            p.predicted_aggregate_tps = aggregate_tps(pred, tg, c) if pred else None
        res.concurrency = [points[c] for c in sorted(points)]
        if cfg.get("trace"):  # one more request, traced on every rank, set against the bench's own prediction
            bar.set_postfix_str(f"#{index} trace")
            gen = inst.generate(tokens, max_tokens=tg, ignore_eos=True, trace=True)
            trace = gen.trace
            if trace is not None:
                trace.predicted = dict(pred.get("breakdown") or {})
                res.trace = trace.to_json()
        res.memory = _memory(cluster, inst, plan)
        res.ratios = {m: res.median(m) / pred[m] for m in METRICS if res.median(m) and pred.get(m)}
    except (TimeoutError, BenchError, RuntimeError, OSError) as exc:  # a LaunchError is a RuntimeError
        log.warning("bench of plan #%d (%s) failed: %s", index, plan.describe(), exc)
        res.status, res.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        if inst is not None:
            inst.delete()
            if inst in getattr(cluster, "instances", []):
                cluster.instances.remove(inst)
        bar.update(cfg["steps_per_plan"] - done)
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
    pp: int = 512,
    tg: int = 128,
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
    ``select``: ``"all"``, ``"best"`` or a count of launchable plans, best first; ``strategies``
    keeps only those strategies; ``widget``: a plan comparison widget to show the measurements in;
    ``trace``: one more request per plan traced on every rank (``PlanBench.trace``; with ``calibrate``, the
    traces also fit the cost model per component, see :mod:`exo_lab.bench.components`).
    """
    from mlx_lm.utils import load_tokenizer  # MLX loads only when a bench runs, not with the package

    levels = _levels(concurrency)
    if pp < 1 or tg < 1 or repeat < 1 or warmup < 0:
        raise BenchError("need pp >= 1, tg >= 1, repeat >= 1 and warmup >= 0")
    chosen = _select(cluster, plans, pp, tg, select, strategies)
    refs = {p.model_ref or p.model for _, p in chosen}
    if len(refs) > 1:
        raise BenchError(f"the plans are for different models: {sorted(refs)}")
    model_ref = refs.pop()
    card = model_card(model_ref)
    path = resolve(model_ref)
    config = json.loads((path / "config.json").read_text())
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    tokens, prompt_info = exact_prompt(tokenizer, pp)
    cluster.refresh()
    topology = cluster.topology
    predictor = Predictor(topology, card, pp, tg)
    steps = 2 + repeat + repeat * len([c for c in levels if c != 1])
    cfg = {
        "pp": pp,
        "tg": tg,
        "repeat": repeat,
        "warmup": warmup,
        "concurrency": levels,
        "launch_timeout": launch_timeout,
        "steps_per_plan": steps,
        "trace": trace,
    }
    results = []
    with tqdm(total=steps * len(chosen), desc=f"bench {card.name}", unit="step", disable=not progress) as bar:
        for index, plan in chosen:
            results.append(_bench_plan(cluster, index, plan, tokens, cfg, predictor, card, bar))
    result = BenchResult(
        model=card.name,
        model_ref=str(model_ref),
        pp=pp,
        tg=tg,
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
        },
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
    levels = sorted({1, *(int(c) for c in concurrency)})
    if levels[0] < 1:
        raise BenchError(f"concurrency levels must be >= 1, got {list(concurrency)}")
    return levels
