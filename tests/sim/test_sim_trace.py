"""A traced pipeline-3 on a simulated cluster whose cables are delayed: the spans tell where time goes.

Three hosts joined by three cables (a triangle: every pair of ranks has a path, as MLX's ring needs),
each cable delayed differently. A pipeline over the three is traced while it generates; in every decode
step, a stage starts computing only after the previous stage sent (within the clocks' stated
uncertainty); each hop's measured link time (the lower quartile of the steps in which its receiver waited,
where it waited in 3 or more) is within 30% of its cable's shaped one-way delay, and never 30% under it; the
trace loads as Chrome trace JSON. The per-component calibration (:mod:`exo_lab.bench.components`)
fits the cables' latencies from the same trace.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics

import pytest

from exo_lab.bench.components import fit_components, store_components
from exo_lab.models import synthetic
from exo_lab.placement.preview import model_card
from exo_lab.sim.cluster import SimCluster
from exo_lab.sim.spec import SimSpec
from tests.helpers.caches import private_cache

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 ('ip') is not installed"),
]

DELAY_MS = {frozenset("ab"): 50.0, frozenset("bc"): 30.0, frozenset("ca"): 40.0}
SPEC = {
    "name": "trace3",
    "hosts": ["a", "b", "c"],
    "links": [
        {"a": a, "b": b, "rate": "1gbit", "delay": f"{DELAY_MS[frozenset(a + b)]}ms"} for a, b in ("ab", "bc", "ca")
    ],
}


@pytest.fixture(scope="module")
def traced(tmp_path_factory, models_cache):
    """One pipeline-3 instance on the sim, traced over a short generation: (trace, plan, the components fitted
    to the trace and stored on the nodes, the nodes' calibrations read back)."""
    model = synthetic.create(models_cache / "trace-tiny", "tiny")
    # the fitted components are stored in the nodes' profiles: a private cache keeps them from the user's
    with private_cache(tmp_path_factory.mktemp("trace-cache")):
        sim = SimCluster(SimSpec.from_json(SPEC))
        sim.up(wait=120)
        cluster = None
        try:
            cluster = sim.cluster()
            cluster.wait_for(3, links=True, timeout=90)
            plans = cluster.preview(model, context=512, prompt_tokens=16)
            plan = next(p for p in plans if p.strategy == "pipeline" and p.num_stages == 3)
            inst = cluster.launch(model, plan=plan)
            try:
                inst.wait_ready(timeout=180, progress=False)
                # 24 tokens: enough steps in which a stage waited for its input that their lower quartile is not
                # one descheduled step (10 gave a hop 3 such steps, all slow, in one CI run; 24 gave it 13)
                gen = inst.generate(list(range(5, 25)), max_tokens=24, ignore_eos=True, trace=True)
                assert len(gen.text()) > 0 or gen.finish_reason == "length"
                trace = gen.trace
            finally:
                inst.delete()
            fit = fit_components([(trace, plan)], cluster.topology, model_card(model))
            assert fit is not None
            store_components(cluster, fit)
            stored = {n: cluster.topology.nodes[n].profile.get("calibration") or {} for n in plan.nodes}
            yield trace, plan, fit, stored
        finally:
            if cluster is not None:
                cluster.close()
            sim.down()


def test_a_stage_starts_a_step_only_after_its_input_arrived(traced):
    trace = traced[0]
    steps = trace.decode_steps()
    assert len(steps) >= 8, steps
    tol = trace.uncertainty_ns
    for info in trace.ranks.values():
        assert info.uncertainty_ns < 50e6, info  # the probes' round trips bound the offsets
    stages = sorted(trace.ranks.values(), key=lambda r: r.stage)
    checked = 0
    for k in steps:
        for src, dst in zip(stages, stages[1:]):
            (send,) = [s for s in trace.of(src.rank, "send") if s.step == k]
            (recv,) = [s for s in trace.of(dst.rank, "recv") if s.step == k]
            (compute,) = [s for s in trace.of(dst.rank, "compute") if s.step == k]
            (before,) = [s for s in trace.of(src.rank, "compute") if s.step == k]
            assert before.end_ns <= send.start_ns  # on one rank: computed, then sent
            assert recv.end_ns >= send.start_ns - tol, (k, send, recv, tol)
            assert compute.start_ns >= recv.end_ns and compute.start_ns >= send.start_ns - tol, (k, send, compute)
            checked += 1
    assert checked == 2 * len(steps)


def test_the_measured_link_wait_is_the_shaped_delay(traced):
    trace, plan = traced[:2]
    host = {i: name.split("-")[0] for i, name in plan.node_names.items()}
    by_rank = {r.rank: host[next(x.node_id for x in plan.ranks if x.rank == r.rank)] for r in trace.ranks.values()}
    stages = sorted(trace.ranks.values(), key=lambda r: r.stage)
    rows = []
    for src, dst in zip(stages, stages[1:]):
        shaped = DELAY_MS[frozenset(by_rank[src.rank] + by_rank[dst.rank])]
        waits = sorted(trace.link_waits(src.rank))  # the steps where the receiver waited for the data
        if waits:
            quartile = waits[(len(waits) - 1) // 4]
            rows.append(
                (by_rank[src.rank], by_rank[dst.rank], shaped, 1e3 * quartile, [round(1e3 * w, 1) for w in waits])
            )
    print("\nhop  shaped one-way ms  measured lower quartile ms  every wait ms")
    for a, b, shaped, measured, waits in rows:
        print(f"{a}->{b}  {shaped:17.1f}  {measured:26.2f}  {waits}")
    assert any(len(row[4]) >= 3 for row in rows), "in no hop did a stage wait for its input in 3 steps"
    # the lower quartile: a cable is a Python forwarder on a 2-core machine running three hosts, and a step that
    # found it (or the receiver) descheduled waits longer (CI measured medians of 54.6 and 64.2 ms on the 40 ms
    # cable, the hop's other steps at its shape); a trace that misplaced the spans would be off in every step.
    # A hop whose receiver waited in only one or two steps (every one may have been descheduled: 66.9, 74.9 and
    # 123.8 ms on the 50 ms cable in one CI run of 10 tokens) is held to the lower bound alone: no shorter than
    # its cable allows
    for a, b, shaped, measured, waits in rows:
        if len(waits) >= 3:
            assert abs(measured - shaped) <= 0.3 * shaped, (a, b, shaped, measured, waits)
        else:
            assert measured >= 0.7 * shaped, (a, b, shaped, measured, waits)
    print(trace.table())


def test_the_trace_loads_as_chrome_trace_json(traced, tmp_path):
    trace = traced[0]
    path = trace.save(tmp_path / "trace.json")
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == len(trace.spans) > 0
    for e in spans:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names) == sorted(trace.ranks)  # one track per rank
    assert {"recv", "compute", "send", "all_sum", "sample", "prefill"} <= {e["name"] for e in spans}


def test_components_are_fitted_separately_stored_and_predict_better(traced):
    trace, plan, fit, stored = traced
    names = plan.node_names
    print(f"\n{fit.table()}")
    hops = [(a, b, v["latency_s"]) for a, peers in fit.links.items() for b, v in peers.items()]
    node_of = {r.rank: r.node_id for r in plan.ranks}
    waited = {
        (node_of[s[-1]], node_of[t[0]]): trace.link_waits(s[-1]) for s, t in zip(trace.stages(), trace.stages()[1:])
    }
    for a, b, latency in hops:
        shaped = DELAY_MS[frozenset(names[a] + names[b])] / 1e3
        median = statistics.median(waited[a, b])
        print(
            f"link {names[a]}->{names[b]}: fitted latency {1e3 * latency:.1f} ms (shaped {1e3 * shaped:.0f} ms, "
            f"the trace's median wait {1e3 * median:.1f} ms)"
        )
        # the fit separates the hop's latency from the rest: what its receiver waited for, at least the shape (how
        # far the waits themselves stay from the shape on a busy machine: test_the_measured_link_wait_is_the_shaped_delay)
        assert latency >= 0.7 * shaped and abs(latency - median) <= 0.3 * shaped
    # a hop is fitted from the steps where its receiver waited for the data (not every hop has them: a
    # stage still in the previous step's all-reduce when its input arrives waits for none)
    assert 1 <= len(hops) <= 2 and set(fit.compute) == set(plan.nodes) and len(fit.all_reduce) == 1
    # the error after is measured on the same trace: compute and the step all-reduce become what was measured
    assert fit.after["compute"] < 5 and fit.after["all-reduce"] < 5
    # the whole token: within 5% after (before, compensating errors can land near 0 by chance: not a bound)
    assert fit.after["token"] < max(fit.before["token"], 5.0)
    for a, b, latency in hops:  # stored with the nodes' calibration, read back from their agents
        assert stored[a]["links"][b]["latency_s"] == pytest.approx(latency)
    assert all(stored[n]["decode_efficiency"] == pytest.approx(fit.compute[n]) for n in plan.nodes)
