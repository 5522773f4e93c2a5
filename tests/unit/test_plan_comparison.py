"""PlanComparison: synced table data, selection -> plans and highlight, measured overlay, launch, notebook hook."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import traitlets

from exo_lab.cluster.topology import Topology
from exo_lab.models.card import card_from_config
from exo_lab.placement import Plan, Plans, RankSpec, plan
from exo_lab.ui import PlanComparison, TopologyWidget
from exo_lab.ui import plan_comparison as pc
from exo_lab.ui import topology_widget as tw
from exo_lab.ui.plan_comparison import NO_LAUNCH
from tests.helpers.cards import LLAMA_8B, LLAMA_70B
from tests.helpers.display import notebook_display
from tests.helpers.paths import SPECS
from tests.helpers.polling import poll


@pytest.fixture(scope="module")
def home_lab() -> Topology:
    return Topology.load(SPECS / "home-lab-mixed.json")


def plans_for(topo: Topology, config: dict, name: str) -> Plans:
    return plan(topo, card_from_config(config, name))


@pytest.fixture
def plans(home_lab: Topology) -> Plans:
    return plans_for(home_lab, LLAMA_8B, "llama-3.1-8b-shaped")


@pytest.fixture
def widgets() -> Iterator[list[PlanComparison]]:
    made: list[PlanComparison] = []
    yield made
    for w in made:
        w.close()


def test_table_rows_are_the_ranked_plans(plans, home_lab, widgets):
    w = PlanComparison(plans, home_lab)
    widgets.append(w)
    assert len(plans) > 10
    rows = w.table.rows
    assert [r["index"] for r in rows] == list(range(10)), "the top 10 by default"
    for r, p in zip(rows, plans):
        assert r["description"] == p.describe() and r["strategy"] == p.strategy
        assert (r["ttft_s"], r["prefill_tps"], r["decode_tps"]) == (p.ttft_s, p.prefill_tps, p.decode_tps)
        assert r["bottleneck"] == p.bottleneck and r["explanation"] == p.explanation
        assert [m["node_id"] for m in r["memory"]] == p.nodes
        for m in r["memory"]:
            assert m["name"] == p.node_names[m["node_id"]]
            assert m["used_bytes"] == p.memory_bytes[m["node_id"]]
            assert m["capacity_bytes"] == p.memory_capacity_bytes[m["node_id"]]
            assert m["frac"] == pytest.approx(m["used_bytes"] / m["capacity_bytes"])
        assert " -> ".join(s["text"] for s in r["stages"]) in r["description"]
        assert sum(b["frac"] for b in r["breakdown"]) == pytest.approx(1.0)
        assert r["launchable"] is False and r["measured"] == {}
    assert rows[0]["decode_rel"] == 1.0
    assert all(0 < r["decode_rel"] <= 1 for r in rows)
    assert rows[3]["decode_rel"] == pytest.approx(plans[3].decode_tps / plans[0].decode_tps)
    s = w.table.summary
    assert (s["model"], s["objective"], s["count"], s["infeasible"]) == ("llama-3.1-8b-shaped", "decode", len(plans), 0)
    assert (s["context"], s["prompt_tokens"], s["batch"], s["initial_limit"]) == (4096, 512, 1, 10)
    assert s["no_launch"] == NO_LAUNCH
    assert w.table.infeasible == []
    assert w.children == (w.table, w.topology_widget)


def test_showing_more_rows(plans, home_lab, widgets):
    w = PlanComparison(plans, home_lab, limit=3)
    widgets.append(w)
    assert len(w.table.rows) == 3
    w.table.set_state({"limit": len(plans)})  # "Show all" in the browser
    assert len(w.table.rows) == len(plans)
    w.table.set_state({"limit": 3})
    w.selected = 7  # selected from Python, below the fold: the table grows to show it
    assert len(w.table.rows) == 8 and w.table.selected == 7


def test_stage_labels_colours_and_highlight():
    def rank(i: int, node: str, stage: int, layers: tuple[int, int], tp: int = 1, ti: int = 0, dtype: str = "bfloat16"):
        return RankSpec(i, node, node.upper(), stage, layers, tensor_index=ti, tensor_size=tp, dtype=dtype)

    ranks = [
        rank(0, "a", 0, (0, 16), 2, 0, "float32"),
        rank(1, "b", 0, (0, 16), 2, 1, "float32"),
        rank(2, "c", 1, (16, 31)),
        rank(3, "d", 2, (31, 32)),
    ]
    p = Plan("m", "pipeline-tensor", ranks, model_dtype="bfloat16")
    stages = pc.plan_stages(p)
    assert [s["node_ids"] for s in stages] == [["a", "b"], ["c"], ["d"]]
    assert [s["text"] for s in stages] == ["A+B x2[0:16] fp32", "C[16:31]", "D[31:32]"]
    assert " -> ".join(s["text"] for s in stages) in p.describe()
    hi = pc.plan_highlight(p)
    assert hi["nodes"]["a"] == {"label": "stage 0 · layers 0-15 · x2 fp32", "color": pc.STAGE_COLORS[0]}
    assert hi["nodes"]["b"]["label"] == "stage 0 · layers 0-15 · x2 fp32"
    assert hi["nodes"]["c"] == {"label": "stage 1 · layers 16-30", "color": pc.STAGE_COLORS[1]}
    assert hi["nodes"]["d"] == {"label": "stage 2 · layer 31", "color": pc.STAGE_COLORS[2]}
    # the tensor group's all-reduce link, then consecutive stages; never a stage 0 -> stage 2 shortcut
    assert hi["edges"] == [["a", "b"], ["a", "c"], ["b", "c"], ["c", "d"]]
    single = Plan("m", "single", [rank(0, "a", 0, (0, 32))], model_dtype="bfloat16")
    assert pc.plan_highlight(single) == {
        "nodes": {"a": {"label": "stage 0 · layers 0-31", "color": pc.STAGE_COLORS[0]}},
        "edges": [],
    }


def test_selecting_a_row_updates_plans_and_the_highlight(plans, home_lab, widgets):
    w = PlanComparison(plans, home_lab)
    widgets.append(w)
    assert isinstance(w.topology_widget, TopologyWidget)
    assert w.selected == 0 and w.selected_plan is plans[0]
    assert w.topology_widget.highlight == pc.plan_highlight(plans[0])
    seen: list[int] = []
    w.observe(lambda change: seen.append(change["new"]), names="selected")
    w.table.set_state({"selected": 2})  # as a click in the browser arrives
    assert seen == [2] and w.selected == 2 and plans.selected == 2
    assert w.selected_plan is plans[2]
    hi = w.topology_widget.highlight
    assert hi == pc.plan_highlight(plans[2])
    assert set(hi["nodes"]) == set(plans[2].nodes) and hi["edges"] == [["workstation", "mbp"]]
    assert hi["nodes"]["workstation"]["label"] == "stage 0 · layer 0 · x2"
    assert hi["nodes"]["mbp"]["label"] == "stage 1 · layers 1-31"
    assert hi["nodes"]["workstation"]["color"] != hi["nodes"]["mbp"]["color"]
    assert w.topology_widget.title == "Plan #2 on the cluster"
    w.selected = 1  # from Python: the table follows
    assert w.table.selected == 1 and plans.selected == 1 and seen == [2, 1]
    assert w.topology_widget.highlight["nodes"]["workstation"]["label"] == "stage 0 · layer 0 · x2 fp32"
    with pytest.raises(traitlets.TraitError, match="plan rank from 0 to"):
        w.selected = len(plans)


def test_starts_at_plans_selected_and_works_without_a_topology(plans, widgets):
    plans.selected = 4
    w = PlanComparison(plans)
    widgets.append(w)
    assert w.selected == 4 and w.table.selected == 4 and w.topology_widget is None
    assert w.children == (w.table,)


def test_measured_next_to_predicted(plans, home_lab, widgets):
    w = PlanComparison(plans, home_lab)
    widgets.append(w)
    w.measured = {0: {"decode_tps": 30.0, "ttft_s": 0.5}, "2": {"prefill_tps": 300.0}}
    assert w.table.measured == w.measured
    m0 = w.table.rows[0]["measured"]
    assert set(m0) == {"decode_tps", "ttft_s"}
    assert m0["decode_tps"] == {
        "measured": 30.0,
        "predicted": plans[0].decode_tps,
        "ratio": pytest.approx(30.0 / plans[0].decode_tps),
    }
    assert m0["ttft_s"]["ratio"] == pytest.approx(0.5 / plans[0].ttft_s)
    assert w.table.rows[1]["measured"] == {}
    assert w.table.rows[2]["measured"]["prefill_tps"]["ratio"] == pytest.approx(300.0 / plans[2].prefill_tps)
    state = w.table.get_state()["measured"]
    assert state[0]["decode_tps"] == 30.0
    with pytest.raises(traitlets.TraitError, match="may only hold"):
        w.measured = {0: {"tokens": 3}}
    with pytest.raises(traitlets.TraitError, match="plan ranks"):
        w.measured = {"best": {"decode_tps": 3}}
    w.measured = {}
    assert all(r["measured"] == {} for r in w.table.rows)


def test_infeasible_candidates_with_reasons(home_lab, widgets):
    plans = plans_for(home_lab, LLAMA_70B, "llama-70b-shaped")
    assert plans.infeasible
    w = PlanComparison(plans, home_lab)
    widgets.append(w)
    assert w.table.summary["infeasible"] == len(plans.infeasible)
    assert [i["description"] for i in w.table.infeasible] == [p.describe() for p in plans.infeasible]
    assert all(re.match(r"needs [\d.]+ GB on \S+, has [\d.]+ GB", i["reason"]) for i in w.table.infeasible)


def test_no_feasible_plan(home_lab, widgets):
    plans = plans_for(home_lab, LLAMA_70B, "llama-70b-shaped")
    none = Plans([], plans.infeasible, model="llama-70b-shaped")
    w = PlanComparison(none, home_lab)
    widgets.append(w)
    assert w.selected == -1 and w.selected_plan is None and w.table.rows == []
    assert w.topology_widget.highlight == {} and w.table.summary["count"] == 0


def test_launch_is_disabled_until_plans_can_launch(plans, home_lab, widgets):
    assert getattr(plans[0], "_cluster", None) is None  # planned on a what-if topology: nothing to launch on
    w = PlanComparison(plans, home_lab)
    widgets.append(w)
    assert not any(r["launchable"] for r in w.table.rows)
    w.table._handle_custom_msg({"event": "launch", "index": 0}, [])  # a click that slipped through
    assert w.launch(0) is None and w.table.launch == {}


def test_launch_shows_the_result_or_the_error(plans, home_lab, widgets):
    calls: list[int] = []

    def ok() -> str:
        calls.append(1)
        return "Instance(llama-3.1-8b-shaped, 2 ranks)"

    def boom() -> None:
        raise RuntimeError("node mbp refused: out of memory")

    plans[3].launch = ok  # type: ignore[method-assign]  (stand-ins for cluster launches)
    plans[4].launch = boom  # type: ignore[method-assign]
    plans[3]._cluster = plans[4]._cluster = object()
    w = PlanComparison(plans, home_lab)
    widgets.append(w)
    assert [r["launchable"] for r in w.table.rows[:5]] == [False, False, False, True, True]  # no cluster: no launch
    w.table._handle_custom_msg({"event": "launch", "index": 3}, [])  # the Launch button
    assert poll(lambda: w.table.launch.get("state") == "done")
    assert w.table.launch == {"index": 3, "state": "done", "text": "'Instance(llama-3.1-8b-shaped, 2 ranks)'"}
    assert calls == [1]
    thread = w.launch(4)
    assert thread is not None
    thread.join(5)
    assert w.table.launch == {"index": 4, "state": "error", "text": "RuntimeError: node mbp refused: out of memory"}


def test_esm_contract():
    source = (pc._STATIC / "plan_comparison.js").read_text()
    assert str(pc.PlanTable._esm) == source
    assert re.search(r"export\s+default\s*\{\s*render\s*\}", source)
    assert not re.search(r"https?://", source), "the front end must not fetch anything"
    css = (pc._STATIC / "plan_comparison.css").read_text()
    assert "var(--jp-layout-color1" in css and "@import" not in css and "url(" not in css


class FakeCluster:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology


def test_plans_mimebundle_is_the_widget_in_a_kernel(plans, home_lab, monkeypatch):
    monkeypatch.setattr(tw, "in_widget_kernel", lambda: True)
    plans.cluster = FakeCluster(home_lab)
    data, _metadata = notebook_display(plans)
    view = data[tw.WIDGET_VIEW_MIME]
    assert view["version_major"] == 2
    assert data["text/plain"] == repr(plans)
    assert data["text/html"] == plans._repr_html_()
    from ipywidgets.widgets.widget import _instances

    widget = _instances[view["model_id"]]
    try:
        assert isinstance(widget, PlanComparison) and widget.plans is plans
        assert widget.topology_widget is not None
        assert [n["id"] for n in widget.topology_widget.topology["nodes"]] == list(home_lab.nodes)
        assert widget.topology_widget.highlight == pc.plan_highlight(plans[0])
    finally:
        widget.close()


def test_plans_mimebundle_falls_back_outside_a_kernel(plans):
    data, _metadata = notebook_display(plans)  # outside a kernel: the tables, no widget
    assert tw.WIDGET_VIEW_MIME not in data
    assert "<table>" in data["text/html"] and data["text/html"] == plans._repr_html_()
    assert repr(plans).startswith("Plans for llama-3.1-8b-shaped")
