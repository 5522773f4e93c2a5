"""Sweeps: every combination of prompt length, generation length and concurrency, on any target.

A target is what requests go to: an instance this process holds (:class:`HeldTarget`: exact prompt
token ids, rank 0's own timings), or an HTTP server (:class:`HttpTarget`: an OpenAI-compatible
URL, or the API of the coordinator that owns a cluster instance; prompts are text, timings this
client's, see :mod:`exo_lab.bench.endpoint`). :func:`measure_point` runs one combination ``repeat``
times and :func:`sweep` every one of them. :func:`bench_url` and :func:`bench_instance` wrap a
sweep of a server or of an instance already running in the cluster into a :class:`BenchResult`
(``exo-lab bench --url`` / ``--instance``); :func:`exo_lab.bench.runner.run` sweeps each plan it
launches.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from exo_lab._version import __version__
from exo_lab.bench.endpoint import Endpoint, Sample
from exo_lab.bench.prompts import exact_prompt, words
from exo_lab.bench.results import BenchError, BenchResult, PlanBench, SweepPoint, stat
from exo_lab.cluster import instances as cluster_instances
from exo_lab.engine.generator import GenerationRequest
from exo_lab.engine.sampling import SamplingParams
from exo_lab.placement.plan import Plan
from exo_lab.placement.predict import Predictor, aggregate_tps

log = logging.getLogger(__name__)


def sizes(value: Sequence[int] | int | str, what: str) -> list[int]:
    """``"128,512"``, ``[128, 512]`` or ``128`` -> ``[128, 512]`` (order kept, duplicates dropped; all >= 1)."""
    if isinstance(value, str):
        try:
            items = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise BenchError(f"--{what} takes comma-separated integers, not {value!r}") from None
    elif isinstance(value, int):
        items = [value]
    else:
        items = [int(x) for x in value]
    out = list(dict.fromkeys(items))
    if not out or min(out) < 1:
        raise BenchError(f"{what} sizes must be integers >= 1, got {value!r}")
    return out


class Target(Protocol):
    timing: str  # "engine" or "stream" (see SweepPoint)

    def prompt(self, pp: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
        """What to send for a ``pp``-token prompt (each ``seed`` another text), and how it was built."""
        ...

    def request(self, prompts: Sequence[Any], tg: int) -> tuple[list[Sample], float]:
        """One request per prompt, all at once; their samples and the wall time from submitting to the last token."""
        ...


class Prompts:
    """A fresh prompt for every request (seed 0, 1, 2, ... per length), built before the requests are timed:
    no two requests of a sweep share a prompt, so a prefix cache on the server cannot make one look faster."""

    def __init__(self, target: Target, first: dict[int, tuple[Any, dict[str, Any]]] | None = None) -> None:
        self.target = target
        self.made: dict[tuple[int, int], tuple[Any, dict[str, Any]]] = {(pp, 0): v for pp, v in (first or {}).items()}
        self.used: dict[int, int] = {}

    def info(self, pp: int) -> dict[str, Any]:
        """How the ``pp``-token prompts were built (the first one's description)."""
        return {**self.get(pp, 0)[1], "distinct": self.used.get(pp, 0)}

    def get(self, pp: int, seed: int) -> tuple[Any, dict[str, Any]]:
        if (pp, seed) not in self.made:
            self.made[pp, seed] = self.target.prompt(pp, seed)
        return self.made[pp, seed]

    def take(self, pp: int, count: int) -> list[Any]:
        """``count`` prompts of ``pp`` tokens no request has had yet."""
        start = self.used.get(pp, 0)
        self.used[pp] = start + count
        return [self.get(pp, seed)[0] for seed in range(start, start + count)]


def _at_once(count: int, one: Callable[[int], Sample]) -> tuple[list[Sample], float]:
    """Run ``one(i)`` for ``i < count`` on threads started together; (samples, wall seconds)."""
    out: list[Sample | None] = [None] * count
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def run(i: int) -> None:
        try:
            out[i] = one(i)
        except BaseException as exc:  # reported below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, count)]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0] if isinstance(errors[0], BenchError) else BenchError(f"generation failed: {errors[0]}")
    return [s for s in out if s is not None], wall


class HeldTarget:
    """An instance (or any Backend) this process holds: exact prompt token ids, rank 0's own timings."""

    timing = "engine"

    def __init__(self, backend: Any, tokenizer: Any) -> None:
        self.backend = backend
        self.tokenizer = tokenizer

    def prompt(self, pp: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
        return exact_prompt(self.tokenizer, pp, seed)

    def request(self, prompts: Sequence[Any], tg: int) -> tuple[list[Sample], float]:
        count = len(prompts)
        t0 = time.perf_counter()
        gens = [
            self.backend.submit(GenerationRequest(tuple(p), tg, SamplingParams(temperature=0.0), ignore_eos=True))
            for p in prompts
        ]

        def one(i: int) -> Sample:
            first = None
            last = None
            for chunk in gens[i]:
                if chunk.tokens and first is None:
                    first = time.perf_counter() - t0
                last = chunk
            end = time.perf_counter() - t0
            if last is None or last.error or last.finish_reason not in ("length", "stop"):
                raise BenchError(
                    f"generation failed: {last.error if last is not None and last.error else 'finish ' + str(getattr(last, 'finish_reason', None))}"
                )
            u = gens[i].usage
            return Sample(
                u.prompt_tokens, u.completion_tokens, u.ttft_s, u.generation_tps or None, first or end, end, usage=u
            )

        samples, _ = _at_once(count, one)
        return samples, max(s.end_s for s in samples)


class HttpTarget:
    """An OpenAI-compatible server: prompts are text (exactly ``pp`` tokens when the tokenizer is known here,
    else sized by asking the server how many tokens a text is), timings from the streamed chunks."""

    timing = "stream"

    def __init__(self, endpoint: Endpoint, tokenizer: Any = None) -> None:
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self._probed: dict[int, tuple[int, dict[str, Any]]] = {}  # pp -> (words, how)

    def prompt(self, pp: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
        if self.tokenizer is not None:
            _, info = exact_prompt(self.tokenizer, pp, seed)
            return info["text"], info
        if pp not in self._probed:
            self._probed[pp] = self._probe(pp)
        n, info = self._probed[pp]
        return words(n, seed), {**info, "text": words(n, seed)}

    def _probe(self, pp: int) -> tuple[int, dict[str, Any]]:
        """A text of about ``pp`` tokens on this server: word counts refined on its own usage counts
        (the chat template's tokens measured with an empty message; a few requests of one token)."""
        seen: dict[int, int] = {}

        def count(n: int) -> int:
            if n not in seen:
                seen[n] = self.endpoint.complete(words(n), 1).prompt_tokens
            return seen[n]

        base = count(0)
        if not base:  # no usage from this server: about 1.3 tokens a word
            return max(1, int(pp / 1.3)), {"tokens": None, "asked": pp, "method": "estimate"}
        n = max(1, pp - base)
        for _ in range(4):
            got = count(n)
            if got == pp:
                break
            per_word = max(0.2, (got - base) / n)
            step = round((pp - got) / per_word) or (1 if got < pp else -1)
            n = max(1, n + step)
            if n in seen:
                break
        n = min(seen, key=lambda k: (abs(seen[k] - pp), seen[k] > pp))  # the closest, shorter on a tie
        return n, {"tokens": seen[n], "asked": pp, "template_tokens": base, "method": "probe"}

    def request(self, prompts: Sequence[Any], tg: int) -> tuple[list[Sample], float]:
        return _at_once(len(prompts), lambda i: self.endpoint.complete(prompts[i], tg))


def measure_point(
    target: Target, prompts: Prompts, pp: int, tg: int, concurrency: int, repeat: int, bar: Any = None
) -> tuple[SweepPoint, list[Sample]]:
    """One combination, ``repeat`` times: a :class:`SweepPoint` (failed, with the reason, if a request failed);
    ``bar`` advances once per repeat."""
    point = SweepPoint(pp, tg, concurrency, timing=target.timing)
    samples: list[Sample] = []
    aggs: list[float] = []
    walls: list[float] = []
    try:
        for _ in range(repeat):
            got, wall = target.request(prompts.take(pp, concurrency), tg)
            samples += got
            walls.append(wall)
            aggs.append(sum(s.completion_tokens for s in got) / wall)
            if bar is not None:
                bar.update(1)
    except BenchError as exc:
        point.status, point.reason = "failed", str(exc)
        log.warning("pp=%d tg=%d c=%d failed: %s", pp, tg, concurrency, exc)
        if bar is not None:
            bar.update(repeat - len(walls))
        return point, samples
    point.ttft_s = stat([s.ttft_s for s in samples])
    point.prompt_tps = stat([v for s in samples if (v := s.prompt_tps) is not None])
    point.decode_tps = stat([s.decode_tps for s in samples if s.decode_tps is not None])
    point.client_ttft_s = stat([s.client_ttft_s for s in samples])
    point.aggregate_tps = stat(aggs)
    point.wall_s = stat(walls)
    point.prompt_tokens = [s.prompt_tokens for s in samples]
    point.completion_tokens = [s.completion_tokens for s in samples]
    server = [s.server for s in samples if s.server]
    if server:
        point.server = {k: stat([d[k] for d in server if isinstance(d.get(k), (int, float))]) for k in server[0]}
    return point, samples


def sweep(
    target: Target,
    pps: Sequence[int],
    tgs: Sequence[int],
    levels: Sequence[int],
    repeat: int,
    *,
    warmup: int = 1,
    bar: Any = None,
    predict: Callable[[int, int, int], dict[str, Any]] | None = None,
    prompts: dict[int, tuple[Any, dict[str, Any]]] | None = None,
    on_point: Callable[[SweepPoint, list[Sample]], None] | None = None,
) -> tuple[list[SweepPoint], dict[int, dict[str, Any]]]:
    """Every ``(pp, tg, concurrency)`` in that order (``warmup`` unmeasured requests first), each request with
    a prompt of its own (:class:`Prompts`; ``prompts``: the first of each length, made already); the points and
    how the prompts were built. ``predict(pp, tg, c)``: the cost model's numbers for a point, if any."""
    source = Prompts(target, prompts)
    if bar is not None:
        bar.set_postfix_str("warm-up")
    for _ in range(warmup):
        target.request(source.take(pps[0], 1), min(tgs))
    points = []
    for pp, tg, c in itertools.product(pps, tgs, levels):
        if bar is not None:
            bar.set_postfix_str(f"pp={pp} tg={tg} c={c}")
        point, samples = measure_point(target, source, pp, tg, c, repeat, bar)
        if predict is not None:
            point.predicted = predict(pp, tg, c)
        if on_point is not None:
            on_point(point, samples)
        points.append(point)
    return points, {pp: source.info(pp) for pp in pps}


def steps(pps: Sequence[int], tgs: Sequence[int], levels: Sequence[int], repeat: int) -> int:
    """Progress steps of a sweep: one per repeat of every combination."""
    return len(pps) * len(tgs) * len(levels) * repeat


def predictor_for(topology: Any, card: Any, plan: Plan) -> Callable[[int, int, int], dict[str, Any]]:
    """``predict(pp, tg, c)`` for ``plan`` on ``topology`` (empty when a node has no profile)."""
    cache: dict[tuple[int, int], dict[str, Any] | None] = {}

    def predict(pp: int, tg: int, c: int) -> dict[str, Any]:
        if (pp, tg) not in cache:
            cache[pp, tg] = Predictor(topology, card, pp, tg).predict(plan)
        pred = cache[pp, tg]
        if not pred:
            return {}
        return {
            "decode_tps": pred["decode_tps"],
            "prefill_tps": pred["prefill_tps"],
            "ttft_s": pred["ttft_s"],
            "aggregate_tps": aggregate_tps(pred, tg, c),
        }

    return predict


def _result(
    model: str,
    model_ref: str,
    pps: list[int],
    tgs: list[int],
    levels: list[int],
    repeat: int,
    warmup: int,
    entry: PlanBench,
    target: dict[str, Any],
    prompts: dict[int, dict[str, Any]],
    notes: dict[str, str],
    **extra: Any,
) -> BenchResult:
    return BenchResult(
        model=model,
        model_ref=model_ref,
        pp=pps[0],
        tg=tgs[0],
        repeat=repeat,
        warmup=warmup,
        concurrency=levels,
        plans=[entry],
        prompt={str(pp): {k: v for k, v in info.items() if k != "text"} for pp, info in prompts.items()},
        exo_lab_version=__version__,
        notes=notes,
        sweep={"pp": pps, "tg": tgs, "concurrency": levels},
        target=target,
        **extra,
    )


STREAM_NOTE = (
    "this client's clock over the streamed chunks: TTFT from sending the request to the first chunk with text, "
    "decode (completion tokens - 1) / (last chunk - first chunk), prompt tok/s = prompt tokens / TTFT"
)
ENGINE_NOTE = "rank 0's own timings (TTFT from the request's start on rank 0; decode over the tokens after the first)"


def bench_url(
    url: str,
    model: str | None = None,
    api_key: str | None = None,
    pp: Sequence[int] | int | str = 512,
    tg: Sequence[int] | int | str = 128,
    concurrency: Sequence[int] | int | str = (1,),
    repeat: int = 3,
    *,
    warmup: int = 1,
    tokenizer: Any = None,
    progress: bool = True,
    timeout: float = 300.0,
) -> BenchResult:
    """Sweep an OpenAI-compatible server (``exo-lab bench --url``); ``model``: the id it serves (default:
    the first of its ``/v1/models``); ``tokenizer``: the model's, for prompts of exactly ``pp`` tokens
    (else sized with the server's own counts). Memory is not known for a server: ``n/a``."""
    pps, tgs, levels = sizes(pp, "pp"), sizes(tg, "tg"), sizes(concurrency, "concurrency")
    _check(repeat, warmup)
    endpoint = Endpoint(url, model, api_key, timeout=timeout)
    target = HttpTarget(endpoint, tokenizer)
    entry = PlanBench(0, f"{endpoint.model} at {endpoint.display_url}", "url", "ok", {})
    with tqdm(
        total=steps(pps, tgs, levels, repeat), desc=f"bench {endpoint.model}", unit="step", disable=not progress
    ) as bar:
        entry.points, prompts = sweep(target, pps, tgs, levels, repeat, warmup=warmup, bar=bar)
    _settle(entry)
    notes = {"timing": STREAM_NOTE, "memory": "n/a: a server at a URL does not say"}
    if not endpoint.ignore_eos:
        notes["ignore_eos"] = "the server refused ignore_eos: requests may end at EOS before tg tokens"
    return _result(
        endpoint.model,
        endpoint.model,
        pps,
        tgs,
        levels,
        repeat,
        warmup,
        entry,
        {"kind": "url", "url": endpoint.display_url, "model": endpoint.model, "ignore_eos": endpoint.ignore_eos},
        prompts,
        notes,
    )


def bench_instance(
    cluster: Any,
    instance: Any,
    pp: Sequence[int] | int | str = 512,
    tg: Sequence[int] | int | str = 128,
    concurrency: Sequence[int] | int | str = (1,),
    repeat: int = 3,
    *,
    warmup: int = 1,
    progress: bool = True,
    timeout: float = 300.0,
    ready_timeout: float = 60.0,
) -> BenchResult:
    """Sweep an instance already running in ``cluster`` (``exo-lab bench --instance ID``); nothing is launched.

    ``instance``: an :class:`~exo_lab.Instance` this process holds (requests go to its ranks; rank 0's own
    timings), or the id of any instance of the cluster (requests go to its owner's API, signed with the
    cluster key; timings from the stream; one still loading is waited for up to ``ready_timeout`` s). Peak memory per node comes from the agents that hold its ranks,
    predictions from the cost model for its plan when this machine has the model's config.
    """
    pps, tgs, levels = sizes(pp, "pp"), sizes(tg, "tg"), sizes(concurrency, "concurrency")
    _check(repeat, warmup)
    held = _held(cluster, instance)
    target: Target
    if held is not None:
        if held.state != "ready":
            raise BenchError(f"instance {held.id} is {held.state}, not ready")
        target = HeldTarget(held, held.tokenizer)
        inst_id, name, model_ref, plan_json, nodes = (
            held.id,
            held.name,
            str(held.model),
            held.plan.to_json(),
            held.plan.nodes,
        )
        described = {"kind": "instance", "id": inst_id, "name": name, "api": None, "held": True}
    else:
        found = _ready(cluster, str(instance), ready_timeout)
        if not found.api:
            raise BenchError(
                f"instance {found.id} ({found.name}) has no API to send requests to: its owner "
                f"({found.owner.get('label', '?')}) does not serve one; serve it there (cluster.serve()), or bench it "
                "from the notebook that holds it (cluster.bench(instance=inst))"
            )
        endpoint = Endpoint(found.api, found.name, cluster_key=cluster.cluster_key, timeout=timeout)
        target = HttpTarget(endpoint, _tokenizer(found.model))
        inst_id, name, model_ref, plan_json, nodes = found.id, found.name, found.model, found.plan, found.nodes
        described = {"kind": "instance", "id": inst_id, "name": name, "api": found.api, "held": False}
    plan = Plan.from_json(plan_json) if plan_json.get("ranks") else None
    card, predict = None, None
    if plan is not None:
        try:
            from exo_lab.placement.preview import model_card

            card = model_card(model_ref)
            predict = predictor_for(cluster.topology, card, plan)
        except Exception as exc:  # no config here: measure without predictions
            log.info("no predictions for %s: %s", model_ref, exc)
    entry = PlanBench(
        0,
        f"{name} ({plan.describe() if plan else inst_id})",
        plan.strategy if plan else "",
        "ok",
        plan_json,
    )
    with tqdm(total=steps(pps, tgs, levels, repeat), desc=f"bench {name}", unit="step", disable=not progress) as bar:
        entry.points, prompts = sweep(target, pps, tgs, levels, repeat, warmup=warmup, bar=bar, predict=predict)
    entry.memory = node_memory(cluster, inst_id, nodes, plan)
    _settle(entry)
    topology = cluster.topology
    return _result(
        card.name if card else name,
        model_ref,
        pps,
        tgs,
        levels,
        repeat,
        warmup,
        entry,
        described,
        prompts,
        {"timing": ENGINE_NOTE if target.timing == "engine" else STREAM_NOTE},
        topology=topology.to_json(),
        profiles={n.id: n.profile for n in topology.nodes.values()},
        card=card.to_json() if card else {},
    )


def node_memory(cluster: Any, instance_id: str, nodes: Sequence[str], plan: Plan | None) -> dict[str, dict[str, Any]]:
    """Each node's worker memory for an instance, as its agent reads it (peak: the workers' ``VmHWM``)."""
    out = {}
    names = plan.node_names if plan is not None else {}
    for node in nodes:
        entry: dict[str, Any] = {
            "name": names.get(node) or _node_name(cluster, node),
            "predicted_bytes": plan.memory_bytes.get(node) if plan is not None else None,
            "rss_bytes": None,
            "peak_rss_bytes": None,
            "ranks": 0,
        }
        try:
            data = cluster.request(cluster.address_of(node), "GET", f"/instances/{instance_id}", timeout=5)
        except Exception as exc:  # a node gone: its memory is unknown
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


def _ready(cluster: Any, instance_id: str, timeout: float) -> cluster_instances.ClusterInstance:
    """The cluster's instance ``instance_id`` once its owner reports it ready (BenchError if it is not, in time)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = cluster_instances.find(cluster, instance_id)
        except KeyError as exc:
            raise BenchError(str(exc.args[0])) from None
        if found.state == "ready":
            return found
        if found.state not in ("launching", "loading") or time.monotonic() > deadline:
            why = f": {found.error}" if found.error else ""
            raise BenchError(f"instance {found.id} ({found.name}) is {found.state}, not ready{why}")
        time.sleep(0.5)


def _node_name(cluster: Any, node: str) -> str:
    try:
        return cluster.node(node).name
    except Exception:
        return node


def _held(cluster: Any, instance: Any) -> Any:
    """The Instance this process holds for ``instance`` (an Instance or an id), else None."""
    if not isinstance(instance, str):
        return instance
    return next((i for i in getattr(cluster, "instances", []) if i.id == instance), None)


def _tokenizer(model_ref: str) -> Any:
    """The model's tokenizer when this machine has it (for exact prompts), else None."""
    try:
        from mlx_lm.utils import load_tokenizer

        from exo_lab.models.store import resolve

        path = resolve(model_ref)
        config = json.loads((path / "config.json").read_text())
        return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as exc:
        log.info("no tokenizer for %s here (%s): prompts are sized by the server", model_ref, exc)
        return None


def _settle(entry: PlanBench) -> None:
    """The entry's status from its points, and its ``measured`` from the first point that ran (what
    readers of the per-plan fields, such as the dashboard, show)."""
    ok = [p for p in entry.points if p.ok]
    if entry.points and not ok:
        entry.status, entry.reason = "failed", entry.points[0].reason
    if ok:
        first = ok[0]
        entry.measured = {
            "pp": first.pp,
            "tg": first.tg,
            "concurrency": first.concurrency,
            "ttft_s": first.ttft_s,
            "prompt_tps": first.prompt_tps,
            "decode_tps": first.decode_tps,
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": first.completion_tokens,
        }


def _check(repeat: int, warmup: int) -> None:
    if repeat < 1 or warmup < 0:
        raise BenchError("need repeat >= 1 and warmup >= 0")
