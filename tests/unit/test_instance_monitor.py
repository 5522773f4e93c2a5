"""InstanceMonitor: snapshots of an instance, the sampler that pushes changes, and the notebook hook."""

from __future__ import annotations

import time

import pytest

from exo_lab.instance import Instance
from exo_lab.ui import InstanceMonitor
from exo_lab.ui import instance_monitor as im
from exo_lab.ui import topology_widget as tw
from tests.helpers.display import notebook_display
from tests.helpers.monitor_harness import FakeInstance, busy_history
from tests.helpers.polling import poll


def test_snapshot_of_a_loading_pipeline():
    inst = FakeInstance()
    inst.load(0.5)
    summary = im.instance_summary(inst)
    assert summary["state"] == "loading" and summary["error"] == "" and not summary["busy"]
    assert summary["plan"]["strategy"] == "pipeline" and summary["plan"]["nodes"] == [
        "workstation",
        "macbook-pro-m4-max",
    ]
    assert summary["plan"]["decode_tps"] == pytest.approx(inst.plan.decode_tps)
    progress = im.loading_progress(inst)
    assert progress["total"] == 32 and 0 < progress["done"] < 32
    assert [r["layers"] for r in progress["ranks"]] == [list(r.layers) for r in inst.plan.ranks]
    assert im.request_rows(inst) == [] and im.request_stats([])["last_decode_tps"] is None
    inst.pending = 3  # requests decoding together (continuous batching) or waiting
    summary = im.instance_summary(inst)
    assert summary["busy"] and summary["pending"] == 3


def test_request_rows_and_stats():
    inst = FakeInstance()
    busy_history(inst, n=60, start=time.time() - 2000)
    inst.finish_request(time.time(), 1, 1.0, 0.3)  # one token: no decode speed
    rows = im.request_rows(inst)
    assert len(rows) == im.RECENT_REQUESTS and rows[-1]["completion_tokens"] == 1
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
    stats = im.request_stats(rows)
    decoded = [r for r in rows if r["completion_tokens"] > 1]
    assert stats["requests"] == im.RECENT_REQUESTS
    assert stats["last_decode_tps"] == decoded[-1]["generation_tps"]
    assert stats["mean_decode_tps"] == pytest.approx(sum(r["generation_tps"] for r in decoded) / len(decoded))
    assert stats["last_ttft_s"] == pytest.approx(0.3)


def test_an_engine_reads_as_a_ready_single_process_model(engine):
    gen = engine.generate("hello there", max_tokens=6, temperature=0, ignore_eos=True)
    gen.text()
    t, usage = engine.usage_history[-1]
    assert usage is gen.usage and abs(t - time.time()) < 60
    summary = im.instance_summary(engine)
    assert summary["state"] == "ready" and summary["plan"] is None and summary["model"].endswith("tiny")
    assert im.loading_progress(engine)["ranks"] == []
    assert im.request_rows(engine)[-1]["completion_tokens"] == 6


def test_the_sampler_pushes_only_changes_and_stops_with_the_instance():
    inst = FakeInstance()
    w = InstanceMonitor(inst, interval_s=0.02)
    try:
        assert w.live and w.summary["state"] == "loading" and w.requests == []
        pushed: list[str] = []
        w.observe(lambda change: pushed.append(change["name"]), names=["summary", "progress", "requests", "stats"])
        time.sleep(0.1)
        assert pushed == []  # nothing changed: nothing sent
        inst.load(1.0)
        assert poll(lambda: w.progress["done"] == 32)
        assert pushed == ["progress"]
        inst.state = "ready"
        inst.finish_request(time.time(), 50, 20.0, 0.4)
        assert poll(lambda: len(w.requests) == 1 and w.summary["state"] == "ready")
        assert w.stats["last_decode_tps"] == 20.0
        inst.state = "stopped"
        assert poll(lambda: not w.live)
        assert w.summary["state"] == "stopped"
    finally:
        w.close()


def test_close_stops_the_sampler():
    w = InstanceMonitor(FakeInstance(), interval_s=0.02)
    assert w.live
    w.close()
    assert not w.live


def bare_instance() -> Instance:
    """An Instance with the attributes its displays read, without launching anything."""
    fake = FakeInstance()
    inst = object.__new__(Instance)
    inst.__dict__.update(vars(fake))
    return inst


def test_instance_mimebundle_is_a_live_monitor(monkeypatch):
    monkeypatch.setattr(tw, "in_widget_kernel", lambda: True)
    inst = bare_instance()
    data, _metadata = notebook_display(inst)
    view = data[tw.WIDGET_VIEW_MIME]
    assert data["text/plain"] == repr(inst) and "llama-3.1-8b" in data["text/html"]
    from ipywidgets.widgets.widget import _instances

    widget = _instances[view["model_id"]]
    try:
        assert isinstance(widget, InstanceMonitor) and widget.live
        assert widget.summary["name"] == "llama-3.1-8b"
    finally:
        widget.close()
    assert not widget.live


def test_instance_mimebundle_falls_back_outside_a_kernel():
    inst = bare_instance()
    data, _metadata = notebook_display(inst)  # outside a kernel: the HTML summary, no widget
    assert tw.WIDGET_VIEW_MIME not in data
    assert "0/32 layers" in data["text/html"]


def test_esm_contract():
    js = (im._STATIC / "instance_monitor.js").read_text()
    assert "export default { render }" in js
    for trait in ("summary", "progress", "requests", "stats"):
        assert f'"change:{trait}"' in js
    assert "setInterval" not in js and "fetch(" not in js  # Python pushes; the view never polls
