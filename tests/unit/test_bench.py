"""``exo-lab bench`` / ``cluster.bench``: exact request shapes, the JSON document, calibration, plots, the CLI."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest

import exo_lab
from exo_lab.bench import (
    SCHEMA,
    BenchError,
    BenchResult,
    PlanBench,
    Predictor,
    aggregate_tps,
    decode_aggregate_tps,
    exact_prompt,
    fit_calibration,
    link_traffic,
    validate,
)
from exo_lab.bench.results import ConcurrencyPoint, stat
from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
from exo_lab.models.card import card_from_config
from exo_lab.placement import plan as make_plans
from exo_lab.placement.cost import LinkCost, NodeRates, calibrated_link
from exo_lab.placement.plan import Plan
from tests.helpers.caches import private_cache

REPO = Path(__file__).resolve().parents[2]
PP, TG, REPEAT, CONCURRENCY = 64, 16, 2, (1, 2)


# ----------------------------------------------------------------------------- without a cluster


def _node(i: int, calibration: dict | None = None) -> NodeInfo:
    return NodeInfo(
        f"n{i}",
        f"node{i}",
        [f"10.0.0.{i + 1}"],
        profile={
            "memory_total_bytes": 64 * 2**30,
            "memory_available_bytes": 64 * 2**30,
            "cpu_count": 4,
            "hostname": f"host{i}",
            "mlx_devices": ["cpu"],
            "memory_bandwidth_gb_per_s": 50.0 + 30 * i,
            "matmul_gflops": {
                "bfloat16_m1": 40.0,
                "bfloat16_m512": 800.0 + 300 * i,
                "float32_m1": 20.0,
                "float32_m512": 400.0,
            },
            **({"calibration": calibration} if calibration else {}),
        },
    )


def _topology(calibrations: tuple[dict | None, dict | None] = (None, None)) -> Topology:
    a, b = _node(0, calibrations[0]), _node(1, calibrations[1])
    links = [
        LinkProfile(x.id, y.id, x.addresses[0], y.addresses[0], 0.4, 0.5, 5000.0, 5000.0) for x, y in ((a, b), (b, a))
    ]
    return Topology({a.id: a, b.id: b}, links)


def _card():
    return card_from_config(
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            model_type="llama",
            tie_word_embeddings=False,
        ),
        "m",
        "bfloat16",
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.mark.parametrize("pp", [16, 17, 31, 64, 100, 257])
def test_prompts_have_exactly_pp_tokens_after_the_chat_template(tokenizer, pp):
    from exo_lab.engine.chat import chat_prompt_tokens

    ids, info = exact_prompt(tokenizer, pp)
    assert len(ids) == pp
    assert info["tokens"] == pp and info["template_tokens"] < pp
    if info["method"] == "search":  # the ids are the chat template applied to a real message
        assert ids == chat_prompt_tokens(tokenizer, [{"role": "user", "content": info["text"]}])


class _TwoTokensPerChar:
    """A tokenizer without a chat template that spends two tokens on every character: odd lengths are unreachable."""

    def encode(self, text: str) -> list[int]:
        return [t for c in text for t in (ord(c), 0)]


def test_a_length_no_text_reaches_is_filled_inside_the_message():
    tok = _TwoTokensPerChar()
    ids, info = exact_prompt(tok, 61)
    assert len(ids) == 61 and info["method"] == "splice"
    assert ids[-24:] == tok.encode("\nassistant: ")  # the generation prompt stays last
    assert ids[:12] == tok.encode("user: ")


def test_a_prompt_shorter_than_the_template_is_refused(tokenizer):
    with pytest.raises(BenchError, match="chat template alone"):
        exact_prompt(tokenizer, 1)


def test_link_bytes_are_computed_from_the_plan():
    card = _card()
    plans = make_plans(_topology(), card, context=1024, prompt_tokens=PP)
    pipe = next(p for p in plans if p.strategy == "pipeline")
    hop = link_traffic(pipe, card, PP, TG)
    act = 4 if pipe.ranks[0].dtype == "float32" else 2
    assert [x.kind for x in hop] == ["pipeline hop"]
    assert hop[0].prefill_bytes == PP * 2048 * act
    assert hop[0].decode_bytes_per_token == 2048 * act
    assert hop[0].bytes_per_request == (PP + TG - 1) * 2048 * act
    assert hop[0].source == "computed-from-plan"
    tensor = next(p for p in plans if p.strategy == "tensor" and p.num_nodes == 2)
    ar = link_traffic(tensor, card, PP, TG)
    assert {x.kind for x in ar} == {"tensor all-reduce"} and len(ar) == 2  # each rank sends to the other
    act = 4 if tensor.ranks[0].dtype == "float32" else 2
    assert ar[0].decode_bytes_per_token == 2 * 16 * 2 * (2 - 1) / 2 * 2048 * act


def test_node_rates_and_links_apply_a_calibration():
    profile = _node(0).profile
    plain = NodeRates.from_profile("n0", profile)
    cal = NodeRates.from_profile(
        "n0",
        {**profile, "calibration": {"decode_efficiency": 0.5, "prefill_efficiency": 0.25, "hop_overhead_s": 0.002}},
    )
    assert cal.decode_read_rate("bfloat16", False, 2) == pytest.approx(
        0.5 * plain.decode_read_rate("bfloat16", False, 2)
    )
    assert cal.prefill_flops("bfloat16", False) == pytest.approx(0.25 * plain.prefill_flops("bfloat16", False))
    link = LinkCost(0.001, 1e9)
    assert calibrated_link(link, cal, plain).latency_s == pytest.approx(0.002)  # mean of 2 ms and 0 ms, plus 1 ms
    assert calibrated_link(link, plain, plain) is link
    junk = NodeRates.from_profile("n0", {**profile, "calibration": {"decode_efficiency": -1, "hop_overhead_s": "x"}})
    assert junk.decode_efficiency == 1.0 and junk.hop_overhead_s == 0.0
    # uncalibrated, each message costs what the profile measured MLX's ring adding; a fitted overhead wins
    measured = {**profile, "message_overhead_s": 6e-5}
    assert NodeRates.from_profile("n0", measured).hop_overhead_s == pytest.approx(6e-5)
    zero = NodeRates.from_profile("n0", {**measured, "calibration": {"hop_overhead_s": 0.0}})
    assert zero.hop_overhead_s == 0.0
    assert calibrated_link(link, NodeRates.from_profile("n0", measured), plain).latency_s == pytest.approx(0.00103)
    # the planner uses them: slower nodes, slower predictions
    card = _card()
    before = make_plans(_topology(), card, context=1024, prompt_tokens=PP).best
    after = make_plans(
        _topology(({"decode_efficiency": 0.5}, {"decode_efficiency": 0.5})), card, context=1024, prompt_tokens=PP
    ).best
    assert after.decode_tps < before.decode_tps * 0.75


def test_calibration_recovers_known_factors_and_lowers_the_error():
    """Measurements made by a cost model with known constants: the fit finds constants that explain them."""
    card = _card()
    truth = (
        {"decode_efficiency": 0.3, "prefill_efficiency": 0.5, "hop_overhead_s": 0.002},
        {"decode_efficiency": 0.6, "prefill_efficiency": 0.2, "hop_overhead_s": 0.001},
    )
    plain, real = _topology(), _topology(truth)
    plans = make_plans(plain, card, context=1024, prompt_tokens=PP)
    chosen = [p for p in plans if p.strategy in ("single", "pipeline", "tensor")][:6]
    assert {p.strategy for p in chosen} >= {"single", "pipeline"}
    guess, actual = Predictor(plain, card, PP, TG), Predictor(real, card, PP, TG)
    benches = []
    for i, p in enumerate(chosen):
        pred, meas = guess.predict(p), actual.predict(p)
        benches.append(
            PlanBench(
                i,
                p.describe(),
                p.strategy,
                "ok",
                p.to_json(),
                predicted=pred,
                measured={m: stat([meas[m]]) for m in ("decode_tps", "prefill_tps", "ttft_s")},
            )
        )
    result = BenchResult("m", "m", PP, TG, 1, 0, [1], benches, topology=plain.to_json(), card=card.to_json())
    cal = fit_calibration(result)
    print(f"\nknown constants: MAPE before {cal.before['mape']:.1f}%, after {cal.after['mape']:.2f}%")
    assert cal.before["mape"] > 50
    assert cal.after["mape"] < 2.0
    assert set(cal.constants) == {"n0", "n1"}


def test_calibration_fits_each_batch_rows_cost_from_concurrent_requests():
    """A machine whose batched rows cost 4x the microbenchmarks' (row_efficiency 0.25): measured aggregate
    tok/s at 4 concurrent requests make the fit find it; without them it is left as it was."""
    card = _card()
    truth = ({"row_efficiency": 0.25}, {"row_efficiency": 0.25})
    plain, real = _topology(), _topology(truth)
    plans = make_plans(plain, card, context=1024, prompt_tokens=PP)
    chosen = [p for p in plans if p.strategy in ("single", "pipeline", "tensor")][:4]
    guess, actual = Predictor(plain, card, PP, TG), Predictor(real, card, PP, TG)

    def bench(with_batches: bool) -> BenchResult:
        benches = []
        for i, p in enumerate(chosen):
            pred, meas = guess.predict(p), actual.predict(p)
            assert pred is not None and meas is not None
            points = [ConcurrencyPoint(1, stat([aggregate_tps(meas, TG)]), stat([]), stat([]))]
            if with_batches:
                points.append(ConcurrencyPoint(4, stat([aggregate_tps(meas, TG, 4)]), stat([]), stat([])))
            measured = {m: stat([meas[m]]) for m in ("decode_tps", "prefill_tps", "ttft_s")}
            benches.append(PlanBench(i, p.describe(), p.strategy, "ok", p.to_json(), predicted=pred, measured=measured))
            benches[-1].concurrency = points
        return BenchResult("m", "m", PP, TG, 1, 0, [1, 4], benches, topology=plain.to_json(), card=card.to_json())

    cal = fit_calibration(bench(True))
    assert cal is not None
    assert cal.before["per_metric"]["aggregate_tps"] > 10 and cal.after["mape"] < 1.0
    assert all(c["row_efficiency"] == pytest.approx(0.25, rel=0.05) for c in cal.constants.values())
    assert any(k.startswith("aggregate_tps@4") for k in cal.after["per_plan"]["0"])
    alone = fit_calibration(bench(False))
    assert alone is not None and "aggregate_tps" not in alone.after["per_metric"]
    assert all(c["row_efficiency"] == 1.0 for c in alone.constants.values())  # nothing measured it


def _bench_made_by(truth: tuple[dict, dict], card, plans, pp: int = PP) -> BenchResult:
    """Measurements made by the cost model with the constants ``truth``, of ``plans``, as a bench result."""
    plain, real = _topology(), _topology(truth)
    guess, actual = Predictor(plain, card, pp, TG), Predictor(real, card, pp, TG)
    benches = []
    for i, p in enumerate(plans):
        pred, meas = guess.predict(p), actual.predict(p)
        assert pred is not None and meas is not None
        measured = {m: stat([meas[m]]) for m in ("decode_tps", "prefill_tps", "ttft_s")}
        benches.append(PlanBench(i, p.describe(), p.strategy, "ok", p.to_json(), predicted=pred, measured=measured))
    return BenchResult("m", "m", pp, TG, 1, 0, [1], benches, topology=plain.to_json(), card=card.to_json())


def test_a_small_models_fixed_costs_are_fitted_as_overheads_and_leave_the_rates_alone():
    """A small model's tokens are mostly each step's and each request's own cost. Fitted on it, those costs
    come out as overheads, not as slower rates: the calibration then still predicts a large model right."""
    from exo_lab.models.presets import PRESETS

    small = card_from_config({**PRESETS["tiny"].config, "model_type": "llama"}, "tiny", "float32")
    truth = ({"step_overhead_s": 0.003, "request_overhead_s": 0.012},) * 2
    plans = [p for p in make_plans(_topology(), small, context=1024, prompt_tokens=PP)][:6]
    cal = fit_calibration(_bench_made_by(truth, small, plans))
    assert cal is not None and cal.before["mape"] > 50 and cal.after["mape"] < 2.0
    for const in cal.constants.values():  # its weights fit in the caches: nothing said about memory reads
        assert const["decode_efficiency"] == const["prefill_efficiency"] == const["row_efficiency"] == 1.0
        assert const["step_overhead_s"] == pytest.approx(0.003, rel=0.1)
        assert const["request_overhead_s"] == pytest.approx(0.012, rel=0.1)
    large = _card()
    fitted = _topology(tuple({k: v for k, v in c.items() if k != "group"} for c in cal.constants.values()))
    for p in make_plans(_topology(), large, context=1024, prompt_tokens=PP).plans[:4]:
        want, got = Predictor(_topology(truth), large, PP, TG).predict(p), Predictor(fitted, large, PP, TG).predict(p)
        assert want is not None and got is not None
        assert got["decode_tps"] == pytest.approx(want["decode_tps"], rel=0.02)
        assert got["ttft_s"] == pytest.approx(want["ttft_s"], rel=0.02)


# ----------------------------------------------------------------------------- on a local cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two local agents with their own profile cache, so calibrations stay out of the user's cache."""
    with private_cache(tmp_path_factory.mktemp("bench-cache")):
        c = exo_lab.local_cluster(2)
        yield c
        c.close()


@pytest.fixture(scope="module")
def plans(cluster, tiny_model):
    return cluster.preview(tiny_model, context=PP + TG, prompt_tokens=PP)


def _two_plans(plans):
    """A tensor group and a pipeline, both across the two nodes (every link kind, two ranks each)."""
    tensor = next(p for p in plans if p.strategy == "tensor" and p.num_nodes == 2)
    pipe = next(p for p in plans if p.strategy == "pipeline")
    return [tensor, pipe]


@pytest.fixture(scope="module")
def result(cluster, plans):
    res = cluster.bench(
        _two_plans(plans), pp=PP, tg=TG, repeat=REPEAT, concurrency=CONCURRENCY, calibrate=True, progress=False
    )
    print()
    print(res.table())
    for p in res.plans:
        print(
            f"#{p.index} {p.description}: measured/predicted " + ", ".join(f"{m} {r:.3g}" for m, r in p.ratios.items())
        )
    return res


@pytest.mark.slow
def test_the_json_document_has_every_field_and_validates(result, cluster):
    doc = result.to_json()
    validate(doc)
    assert doc["schema"] == SCHEMA
    assert BenchResult.from_json(json.loads(json.dumps(doc))).to_json() == doc
    assert {n["id"] for n in doc["topology"]["nodes"]} == {n.id for n in cluster.nodes} == set(doc["profiles"])
    assert all(p.get("matmul_gflops") for p in doc["profiles"].values())
    assert doc["card"]["hidden_size"] == 128 and doc["prompt"]["tokens"] == PP
    assert [p["status"] for p in doc["plans"]] == ["ok", "ok"], [p["reason"] for p in doc["plans"]]
    for p in doc["plans"]:
        for m in ("decode_tps", "prefill_tps", "ttft_s"):
            assert p["measured"][m]["n"] == REPEAT and p["measured"][m]["median"] > 0
            assert p["predicted"][m] > 0 and p["ratios"][m] == pytest.approx(
                p["measured"][m]["median"] / p["predicted"][m]
            )
        assert [c["concurrency"] for c in p["concurrency"]] == list(CONCURRENCY)
        assert all(c["aggregate_tps"]["median"] > 0 for c in p["concurrency"])
        assert len(p["memory"]) == 2
        assert all(m["peak_rss_bytes"] > 10 * 2**20 and m["ranks"] == 1 for m in p["memory"].values())
        assert p["links"] and all(x["source"] == "computed-from-plan" for x in p["links"])
        assert p["launch_s"] > 0
    with pytest.raises(ValueError, match="schema"):
        validate({**doc, "schema": "exo_lab.bench/0"})
    broken = json.loads(json.dumps(doc))
    del broken["plans"][0]["measured"]["decode_tps"]
    with pytest.raises(ValueError, match="decode_tps"):
        validate(broken)


@pytest.mark.slow
def test_exact_token_counts_are_honoured(result):
    for p in result.plans:
        assert p.measured["prompt_tokens"] == [PP] * REPEAT
        assert p.measured["completion_tokens"] == [TG] * REPEAT


@pytest.mark.slow
def test_calibration_lowers_the_error_and_the_planner_uses_it(result, cluster, tiny_model):
    from exo_lab.bench import predict
    from exo_lab.placement.preview import model_card

    cal = result.calibration
    print(f"\n{cal.summary()}; constants {next(iter(cal.constants.values()))}")
    assert cal.after["mape"] < cal.before["mape"]
    assert set(cal.constants) == {n.id for n in cluster.nodes}
    assert all(cal.stored.values()), cal.stored  # written into the (test's own) cached profile
    card = model_card(tiny_model)
    for node in cluster.nodes:  # the agents report it in /node ...
        stored = node.profile["calibration"]
        for key in ("decode_efficiency", "prefill_efficiency", "hop_overhead_s"):
            assert stored[key] == pytest.approx(cal.constants[node.id][key])
    # ... and predictions made now use it (rel 1e-3: the agents may have probed the links again since the fit)
    for p in result.ok:
        now = predict(cluster.topology, card, Plan.from_json(p.plan), PP, TG)
        for m in ("decode_tps", "ttft_s"):
            assert now[m] == pytest.approx(cal.predicted_after[str(p.index)][m], rel=1e-3)


@pytest.mark.slow
def test_plots_tables_and_the_plan_comparison(result, plans):
    from bokeh.embed import components
    from bokeh.models import LayoutDOM

    from exo_lab.ui.plan_comparison import PlanComparison

    layout = result.plot()
    assert isinstance(layout, LayoutDOM)
    script, div = components(layout)  # serialises every model: invalid properties fail here
    assert "exo-bench-scatter" in script and "exo-bench-concurrency" in script and div
    page = result._repr_html_()
    assert all(html.escape(p.description) in page for p in result.plans)
    measured = result.measured_for(plans)
    keys = {p.key for p in _two_plans(plans)}
    assert {plans[i].key for i in measured} == keys
    widget = PlanComparison(plans)
    result.show_in(widget)
    assert set(widget.measured) == set(measured)
    widget.close()


@pytest.mark.slow
def test_the_cli_writes_the_json(cluster, tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    addresses = [cluster.address_of(n.id) for n in cluster.nodes]
    cmd = [
        sys.executable,
        "-m",
        "exo_lab.cli",
        "bench",
        str(tiny_model),
        "--connect",
        *addresses,
        f"--cluster-key={cluster.cluster_key}",
        "--plans",
        "best",
        "--strategy",
        "pipeline",
        "--pp",
        "32",
        "--tg",
        "4",
        "--repeat",
        "1",
        "--concurrency",
        "1",
        "--json",
        str(out),
        "--no-progress",
        "--trace",
        str(tmp_path / "traces"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "decode tok/s" in proc.stdout and f"wrote {out}" in proc.stdout
    doc = json.loads(out.read_text())
    validate(doc)
    (written,) = (tmp_path / "traces").glob("trace-plan*.json")  # the traced request, as Chrome trace JSON
    events = json.loads(written.read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}  # both ranks
    assert "per token" in proc.stdout and doc["plans"][0]["trace"]["predicted"]
    assert [p["strategy"] for p in doc["plans"]] == ["pipeline"]
    assert doc["plans"][0]["measured"]["completion_tokens"] == [4]
    assert doc["plans"][0]["measured"]["prompt_tokens"] == [32]


def test_predicted_decode_aggregate_has_no_prefill_and_a_pipeline_is_bound_by_its_slowest_stage():
    pred = {"decode_tps": 10.0, "ttft_s": 0.6, "decode_row_s": 0.02}
    assert decode_aggregate_tps(pred, 1) == pytest.approx(10.0)
    assert decode_aggregate_tps(pred, 4) == pytest.approx(4 / (0.1 + 3 * 0.02))
    piped = {**pred, "stage_decode_s": [0.05, 0.06], "stage_row_s": [0.01, 0.01], "tick_exchange_s": 0.001}
    # 8 rows in two groups of 4, one per stage: each tick lasts its slower stage, a token for all every 2 ticks
    assert decode_aggregate_tps(piped, 8) == pytest.approx(8 / (2 * (0.06 + 3 * 0.01 + 0.001)))


def test_predicted_aggregate_rate_counts_sequential_prefills_and_batched_steps():
    pred = {"decode_tps": 10.0, "ttft_s": 0.6, "decode_row_s": 0.02}  # prefill 0.5 s, a step 0.1 s
    assert aggregate_tps(pred, 20) == pytest.approx(20 / (0.5 + 20 * 0.1))
    assert aggregate_tps(pred, 20, 4) == pytest.approx(4 * 20 / (4 * 0.5 + 20 * (0.1 + 3 * 0.02)))
    assert aggregate_tps(pred, 20) < aggregate_tps(pred, 20, 4) < aggregate_tps(pred, 20, 8)
