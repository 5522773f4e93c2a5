"""Spans, their alignment and their sums: :mod:`exo_lab.engine.trace` on known timelines, and an Engine's
own trace (one process)."""

from __future__ import annotations

import json
import time

import pytest

from exo_lab.engine.trace import TRACER, RankInfo, Trace, Tracer, assemble, estimate_offset

MS = 1_000_000


def pipeline2(steps: int = 4, compute=(3, 2), hop=5, reduce_=1, slow: frozenset[int] = frozenset()) -> Trace:
    """Two stages (ranks 0 and 1), ``steps`` decode steps after one admission step, times in ms; in the steps in
    ``slow`` the first stage computes 20 ms longer."""
    raw: dict[int, list] = {0: [], 1: []}
    t = 0
    raw[0].append(("admit", t, t + 10 * MS, 0, {}))
    raw[1].append(("admit", t, t + 10 * MS, 0, {}))
    t = 10 * MS
    for k in range(steps + 1):
        if k:
            first = compute[0] + (20 if k in slow else 0)
            raw[0].append(("compute", t, t + first * MS, k, {}))
            raw[0].append(("send", t + first * MS, t + first * MS + MS // 10, k, {}))
            raw[1].append(("recv", t, t + (first + hop) * MS, k, {}))
            c1 = t + (first + hop) * MS
            raw[1].append(("compute", c1, c1 + compute[1] * MS, k, {}))
            raw[1].append(("sample", c1 + compute[1] * MS, c1 + compute[1] * MS, k, {}))
            t = c1 + compute[1] * MS
        end = t + reduce_ * MS
        raw[0].append(("all_sum", t - (compute[1] + hop) * MS if k else t, end, k, {}))  # rank 0 waits in it
        raw[1].append(("all_sum", t, end, k, {}))
        t = end
    infos = [RankInfo(0, 0, "a"), RankInfo(1, 1, "b", offset_ns=7 * MS, uncertainty_ns=MS // 2)]
    shifted = [(name, s + 7 * MS, e + 7 * MS, k, a) for name, s, e, k, a in raw[1]]  # rank 1's clock is ahead
    predicted = {"compute a": 0.003, "compute b": 0.002, "link a->b": 0.004, "link b->a (token)": 0.001}
    return assemble("0123456789abcdef", "m", 0, t + MS, [(infos[0], raw[0]), (infos[1], shifted)], predicted=predicted)


def test_spans_move_onto_the_coordinators_clock_and_sum_per_token():
    tr = pipeline2()
    assert tr.decode_steps() == [1, 2, 3, 4]
    (send,) = [s for s in tr.of(0, "send") if s.step == 2]
    (recv,) = [s for s in tr.of(1, "recv") if s.step == 2]
    assert (recv.end_ns - send.start_ns) / MS == pytest.approx(5.0)  # the offset was taken out
    rows = {r["component"]: r for r in tr.breakdown()}
    assert rows["compute"]["measured_ms"] == pytest.approx(5.0)
    assert rows["link"]["measured_ms"] == pytest.approx(5.0)
    assert rows["all-reduce"]["measured_ms"] == pytest.approx(1.0)
    assert rows["token"]["measured_ms"] == pytest.approx(11.0)
    assert rows["idle"]["measured_ms"] == pytest.approx(0.0, abs=1e-6)
    assert rows["compute"]["predicted_ms"] == pytest.approx(5.0)
    assert rows["link"]["predicted_ms"] == pytest.approx(4.0)
    assert rows["all-reduce"]["predicted_ms"] == pytest.approx(1.0)  # the token's way back rides the all_sum
    assert tr.link_waits(0) == pytest.approx([0.005] * 4)
    assert "measured ms" in tr.table()
    assert "token spread: p10 11.000, median 11.000, p90 11.000 ms over 4 steps" in tr.table()


def test_the_table_shows_how_far_the_slow_steps_are_from_the_fast_ones():
    tr = pipeline2(steps=10, slow=frozenset({2, 5, 9}))
    assert "token spread: p10 11.000, median 11.000, p90 31.000 ms over 10 steps" in tr.table()


def test_chrome_export_has_one_track_per_rank_and_round_trips():
    tr = pipeline2()
    chrome = json.loads(json.dumps(tr.to_chrome()))
    tracks = {e["pid"] for e in chrome["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert tracks == {0, 1}
    spans = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(tr.spans) and all(e["dur"] >= 0 and "step" in e["args"] for e in spans)
    again = Trace.from_json(json.loads(json.dumps(tr.to_json())))
    assert again.breakdown() == tr.breakdown() and again.ranks == tr.ranks


def test_an_offset_is_found_within_its_stated_uncertainty():
    true_offset = 123 * MS

    def probe() -> int:  # a remote clock ahead by true_offset, read after an uneven delay
        time.sleep(0.0005)
        reading = time.perf_counter_ns() + true_offset
        time.sleep(0.002)
        return reading

    offset, uncertainty = estimate_offset(probe, rounds=5)
    assert abs(offset - true_offset) <= uncertainty and uncertainty >= 1 * MS


def test_a_tracer_that_is_off_records_nothing():
    t = Tracer()
    with t.span("compute"):
        pass
    assert t.ready("recv", 3) == 3 and not t.spans
    t.enable()
    with t.span("compute", rows=2):
        pass
    assert [s[0] for s in t.spans] == ["compute"] and t.spans[0][4] == {"rows": 2}
    assert not t.detail  # a tensor group's in-layer all-reduces only when asked for
    t.enable(True, detail=True)
    assert t.detail and t.spans  # already on: kept
    t.enable(False)
    assert not t.on and not t.detail


def test_an_engine_traces_its_steps(engine):
    gen = engine.generate([5, 6, 7, 8], max_tokens=6, ignore_eos=True, trace=True)
    tr = gen.trace
    assert tr is not None and tr in engine.traces and engine.find_trace(tr.id) is tr
    names = [s.name for s in tr.spans]
    assert names.count("admit") == 1 and names.count("step") >= 6
    assert len(tr.decode_steps()) >= 4
    with engine.trace("block") as rec:
        engine.generate([5, 6], max_tokens=3, ignore_eos=True).text()
    assert rec.trace is engine.last_trace and rec.trace.label == "block"
    assert not TRACER.on  # off again once no recording is left


def test_a_trace_draws_as_a_timeline_with_its_breakdown():
    from bokeh.embed import components

    from exo_lab.ui.display import HOOKS
    from exo_lab.ui.trace_view import timeline, trace_mimebundle

    tr = pipeline2(steps=8)
    fig = timeline(tr)
    script, div = components(fig)  # serialises the model: invalid properties fail here
    assert "exo-trace-timeline" in script and div
    lanes = list(fig.y_range.factors)
    assert len(lanes) == 2 and all("rank" in lane for lane in lanes)  # one lane per rank
    assert fig.x_range.end < tr.duration_ns / 1e6  # a few steps in view, the rest a zoom away
    data, _ = trace_mimebundle(tr)
    assert data["text/html"].startswith("<iframe srcdoc=") and "measured ms" in data["text/html"]
    assert ("exo_lab.engine.trace", "Trace", trace_mimebundle) in HOOKS


def test_the_dashboard_shows_the_last_trace(engine):
    from exo_lab.ui.dashboard.instances_view import InstancesView

    view = InstancesView()
    with engine.trace("dashboard") as rec:
        engine.generate([3, 4, 5], max_tokens=4, ignore_eos=True).text()
    view.last_trace.update([("tiny", engine)])
    assert view.last_trace.pane.visible and view.last_trace.shown == rec.trace.id
    assert "measured ms" in view.last_trace.table.object and view.last_trace.chart.object is not None
