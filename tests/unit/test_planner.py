"""The planner: properties over random clusters and models, and scenarios."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
from exo_lab.models.card import card_from_config
from exo_lab.placement import plan
from exo_lab.placement.cost import NodeRates
from exo_lab.placement.planner import _sig, _split_layers
from tests.helpers.family_configs import FAMILY_CONFIGS
from tests.helpers.paths import SPECS

GB = 2**30


def node(
    i: int, mem_gb: float, bw: float = 100.0, cores: int = 8, gpu: bool = False, host: str | None = None
) -> NodeInfo:
    return NodeInfo(
        f"n{i}",
        f"node{i}",
        [f"10.0.0.{i + 1}"],
        profile={
            "memory_total_bytes": int(mem_gb * GB),
            "memory_available_bytes": int(mem_gb * GB),
            "cpu_count": cores,
            "hostname": host or f"host{i}",
            "mlx_devices": ["cpu", "gpu"] if gpu else ["cpu"],
            "memory_bandwidth_gb_per_s": bw,
            "matmul_gflops": {
                "bfloat16_m1": bw,
                "bfloat16_m512": bw * 20,
                "float32_m1": bw / 2,
                "float32_m512": bw * 10,
            },
        },
    )


def link(a: NodeInfo, b: NodeInfo, rtt_ms: float, mbit: float) -> LinkProfile:
    return LinkProfile(a.id, b.id, a.addresses[0], b.addresses[0], rtt_ms, rtt_ms * 1.2, mbit, mbit)


def cluster(nodes: list[NodeInfo], rtt_ms: float = 0.3, mbit: float = 10000, overrides: dict | None = None) -> Topology:
    links = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            r, m = (overrides or {}).get((a.id, b.id), (rtt_ms, mbit))
            links.append(link(a, b, r, m))
    return Topology({n.id: n for n in nodes}, links)


def model(
    layers: int = 32,
    hidden: int = 4096,
    heads: int = 32,
    kv: int = 8,
    inter: int = 14336,
    dtype: str = "bfloat16",
    name: str = "m",
):
    return card_from_config(
        dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=inter,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=32000,
            model_type="llama",
            tie_word_embeddings=False,
        ),
        name,
        dtype,
    )


LLAMA_405B = dict(
    hidden_size=16384,
    num_hidden_layers=126,
    intermediate_size=53248,
    num_attention_heads=128,
    num_key_value_heads=8,
    vocab_size=128256,
    model_type="llama",
    tie_word_embeddings=False,
    max_position_embeddings=131072,
)

# --- properties ------------------------------------------------------------------------------------

clusters = st.lists(
    st.tuples(st.floats(4, 64), st.floats(20, 400), st.integers(1, 8), st.booleans()), min_size=1, max_size=4
)
models = st.tuples(st.integers(2, 40), st.sampled_from([(1024, 8, 8), (2048, 16, 4), (4096, 32, 8), (1536, 12, 2)]))
# 20 examples: planning up to 5 nodes with a weight format per node takes ~0.5 s an example on this CPU
settings_ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(spec, mspec, rtt=0.5, mbit=5000):
    nodes = [node(i, m, bw, c, g) for i, (m, bw, c, g) in enumerate(spec)]
    layers, (hidden, heads, kv) = mspec
    return cluster(nodes, rtt, mbit), model(layers, hidden, heads, kv, hidden * 3)


@given(clusters, models)
@settings_
def test_every_feasible_plan_fits_and_covers_each_layer_once(spec, mspec):
    topo, card = build(spec, mspec)
    plans = plan(topo, card, context=2048, prompt_tokens=256)
    for p in plans:
        for n in p.nodes:
            assert p.memory_bytes[n] <= p.memory_capacity_bytes[n]
        stages = {}
        for r in p.ranks:
            stages.setdefault(r.stage, set()).add(r.layers)
            if r.tensor_size > 1:
                assert card.num_attention_heads % r.tensor_size == 0
                assert card.num_key_value_heads % r.tensor_size == 0
        covered = sorted(next(iter(v)) for v in stages.values())
        assert all(len(v) == 1 for v in stages.values())  # tensor ranks of a stage share its layers
        assert covered[0][0] == 0 and covered[-1][1] == card.num_layers
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(covered, covered[1:]))
        assert p.decode_tps > 0 and p.ttft_s > 0
        # batched decoding: more sequences give more tokens/s in all, each of them fewer
        rates = [p.batched_decode_tps(b) for b in (1, 2, 8)]
        assert rates[0] == pytest.approx(p.decode_tps) and rates[0] < rates[1] < rates[2] < 8 * rates[0]
        assert p.decode_row_s > 0
    for p in plans.infeasible:
        assert p.reason


@given(clusters, models, st.floats(1.5, 20))
@settings_
def test_a_faster_link_never_slows_a_plan(spec, mspec, factor):
    topo, card = build(spec, mspec)
    plans = plan(topo, card, context=2048, prompt_tokens=256)
    faster = copy.deepcopy(topo)
    target = faster.links[0] if faster.links else None
    if target is None:
        return
    target.rtt_ms_median /= factor
    target.send_mbit_per_s *= factor
    target.recv_mbit_per_s *= factor
    again = {p.key: p for p in plan(faster, card, context=2048, prompt_tokens=256)}
    for p in plans:
        if p.key in again:
            assert again[p.key].decode_tps >= p.decode_tps * (1 - 1e-9)
            assert again[p.key].ttft_s <= p.ttft_s * (1 + 1e-9)


@given(clusters, models, st.tuples(st.floats(4, 64), st.floats(20, 400), st.integers(1, 8), st.booleans()))
@settings_
def test_adding_a_node_never_makes_the_best_worse(spec, mspec, extra):
    topo, card = build(spec, mspec)
    before = plan(topo, card, context=2048, prompt_tokens=256)
    bigger, _ = build([*spec, extra], mspec)
    after = plan(bigger, card, context=2048, prompt_tokens=256)
    if before.plans:
        # plans rank by decode to 3 significant digits, then by fewer nodes and ranks: a plan that far off is a tie
        assert after.plans and _sig(after.best.decode_tps) >= _sig(before.best.decode_tps)


def family_model(family: str, layers: int, hidden: int, experts: int, dense: int, quant_bits: int):
    """A family's card (MoE, MLA, sliding, hybrid) at sizes that need one to several of the random nodes."""
    c = dict(FAMILY_CONFIGS[family])
    c.update(num_hidden_layers=layers, hidden_size=hidden, vocab_size=32000, intermediate_size=hidden * 3)
    if "moe_intermediate_size" in c:
        c["moe_intermediate_size"] = hidden // 2
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if key in c:
            c[key] = experts
    if family == "gpt_oss":
        c["intermediate_size"] = hidden // 2
        c["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (
            layers % 2
        )
    if family == "deepseek_v3":
        c.update(first_k_dense_replace=dense, kv_lora_rank=hidden // 4, q_lora_rank=hidden // 2)
    if family in ("qwen3_moe", "qwen3_next"):
        c["mlp_only_layers"] = list(range(dense))
    if quant_bits:
        c["quantization"] = {"group_size": 64, "bits": quant_bits}
    return card_from_config(c, f"{family}-{layers}x{hidden}", "bfloat16")


family_models = st.builds(
    family_model,
    st.sampled_from(["deepseek_v3", "qwen3_moe", "glm4_moe", "gpt_oss", "gemma3_text", "qwen3_next"]),
    st.integers(2, 24),
    st.sampled_from([1024, 2048]),
    st.sampled_from([8, 16, 64]),
    st.integers(0, 2),
    st.sampled_from([0, 4, 8]),
)


@given(clusters, family_models)
@settings_
def test_moe_mla_and_hybrid_plans_fit_exactly_and_split_as_mlx_lm_does(spec, card):
    nodes = [node(i, m, bw, c, g) for i, (m, bw, c, g) in enumerate(spec)]
    plans = plan(cluster(nodes, 0.5, 5000), card, context=2048, prompt_tokens=256)
    for p in plans:
        held = dict.fromkeys(p.nodes, 0.0)
        for r in p.ranks:
            assert r.tensor_size == 1 or card.tensor_split_problem(r.tensor_size) is None
            held[r.node_id] += card.weight_bytes_of(*r.layers) / r.tensor_size
            held[r.node_id] += card.kv_bytes(2048, *r.layers) / (r.tensor_size if card.kv_splits_with_tensor else 1)
        for n in p.nodes:  # the exact bytes of the layers each rank holds, and its share of their caches
            assert held[n] <= p.memory_bytes[n] <= p.memory_capacity_bytes[n]
        covered = sorted({r.layers for r in p.ranks})
        assert covered[0][0] == 0 and covered[-1][1] == card.num_layers
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        assert p.decode_tps > 0 and p.ttft_s > 1 / p.decode_tps
    for p in plans.infeasible:
        assert p.reason
        if any(r.tensor_size > 1 for r in p.ranks) and "no tensor split" in p.reason:
            assert card.tensor_split_problem(max(r.tensor_size for r in p.ranks)) is not None


@given(clusters, family_models)
@settings_
def test_moe_decode_is_bounded_by_the_active_bytes_not_the_held_ones(spec, card):
    """One node's plan reads the active bytes per token: faster than reading every expert would be,
    and never faster than reading the active bytes at the node's full bandwidth."""
    nodes = [node(i, m, bw, c, g) for i, (m, bw, c, g) in enumerate(spec)]
    plans = plan(cluster(nodes, 0.5, 5000), card, context=2048, prompt_tokens=256)
    for p in plans:
        if p.strategy != "single" or p.dtypes[p.nodes[0]] != card.dtype:
            continue
        bw = next(n for n in nodes if n.id == p.nodes[0]).profile["memory_bandwidth_gb_per_s"] * 1e9
        assert p.decode_tps <= bw / card.active_bytes_per_token * (1 + 1e-9)
        assert card.active_bytes() <= sum(card.layer_bytes)
        if card.layer_active_bytes != card.layer_bytes:  # some layer routes over experts
            assert card.active_bytes() < sum(card.layer_bytes)


def test_a_family_without_shard_gets_no_tensor_plan_and_says_why():
    a, b = node(0, 64, 100, cores=1), node(1, 64, 100, cores=1)
    card = family_model("qwen3_next", 8, 1024, 16, 0, 0)
    plans = plan(cluster([a, b], rtt_ms=0.02, mbit=80000), card)
    assert plans.plans and not any(p.strategy == "tensor" for p in plans)
    why = [p.reason for p in plans.infeasible if any(r.tensor_size == 2 for r in p.ranks)]
    assert why and "no shard()" in (why[0] or "")


def test_deepseek_dense_layers_make_the_first_stage_lighter():
    """A rank holding layers 0-2 of a DeepSeek-style model holds dense layers: fewer bytes than the same count later."""
    card = family_model("deepseek_v3", 12, 2048, 64, 3, 0)
    assert card.layer_bytes[0] < card.layer_bytes[3]
    a, b = node(0, 64, 100, cores=1), node(1, 64, 100, cores=1)
    plans = plan(cluster([a, b], rtt_ms=0.2, mbit=10000), card, context=1024)
    pipe = next(p for p in plans if p.strategy == "pipeline" and p.split == "proportional")
    first, second = sorted(pipe.ranks, key=lambda r: r.stage)
    assert first.layers[1] - first.layers[0] == second.layers[1] - second.layers[0] == 6
    assert pipe.memory_bytes[first.node_id] < pipe.memory_bytes[second.node_id]


def test_deepseek_v3_4bit_what_if_on_two_and_four_m3_ultras():
    """The what-if study: 671B at 4 bits (~378 GB) fits one 512 GB M3 Ultra; tensor groups halve or quarter
    the bytes per node and the bytes each node reads per token (~20.8 GB active of 378 GB held)."""
    from exo_lab.models.whatif import what_if_card

    card = what_if_card("deepseek-v3@4bit")
    assert 370e9 < card.weight_bytes < 385e9 and 19e9 < card.active_bytes_per_token < 22e9
    four = plan(Topology.load(SPECS / "m3-ultra-4x-tb5.json"), card, context=4096)
    two = plan(Topology.load(SPECS / "m3-ultra-2x-tb5.json"), card, context=4096)
    single = next(p for p in two if p.strategy == "single")
    assert 378e9 < max(single.memory_bytes.values()) < 400e9
    tp2 = next(p for p in two if p.strategy == "tensor")
    tp4 = next(p for p in four if p.strategy == "tensor" and p.num_nodes == 4)
    assert max(tp4.memory_bytes.values()) < max(tp2.memory_bytes.values()) / 1.8
    assert tp2.decode_tps > single.decode_tps and tp4.ttft_s < tp2.ttft_s
    pipe = next(p for p in two if p.strategy == "pipeline" and p.split == "proportional")
    assert pipe.decode_tps == pytest.approx(single.decode_tps, rel=0.02)  # one token at a time: stages take turns


@given(st.integers(1, 200), st.lists(st.floats(0.1, 10), min_size=1, max_size=8), st.integers(1, 100))
@example(9, [1.0, 1.0, 4.0, 4.0, 4.0, 4.0], 2)  # the fast stages capped left the slow ones too few layers
@settings(max_examples=200, deadline=None)
def test_layer_split_respects_caps_and_total(total, speeds, cap):
    caps = [cap] * len(speeds)
    alloc = _split_layers(total, speeds, caps)
    if alloc is None:
        assert sum(caps) < total or total < len(speeds)
    else:
        assert sum(alloc) == total and all(1 <= a <= c for a, c in zip(alloc, caps))


# --- scenarios -------------------------------------------------------------------------------------


def test_fits_on_one_node_stays_there_when_links_are_slow():
    a, b = node(0, 64, 100, cores=1), node(1, 64, 100, cores=1)
    plans = plan(cluster([a, b], rtt_ms=5.0, mbit=100), model(32))
    assert plans.best.strategy == "single" and plans.best.num_nodes == 1


def test_tensor_over_a_fast_link_wins_when_it_predicts_faster():
    a, b = node(0, 64, 100, cores=1), node(1, 64, 100, cores=1)
    plans = plan(cluster([a, b], rtt_ms=0.02, mbit=80000), model(32))
    assert plans.best.strategy == "tensor" and plans.best.num_nodes == 2
    single = next(p for p in plans if p.strategy == "single")
    assert plans.best.decode_tps > single.decode_tps


def test_a_slow_wifi_link_is_avoided_when_a_cable_path_exists():
    a, b, c = node(0, 12, 100), node(1, 12, 100), node(2, 12, 100)
    wifi = {("n0", "n2"): (8.0, 200)}
    topo = cluster([a, b, c], rtt_ms=0.2, mbit=10000, overrides=wifi)
    plans = plan(topo, model(32, dtype="bfloat16"), context=1024)  # ~14 GB: needs two nodes
    best = plans.best
    assert best.num_nodes == 2 and set(best.nodes) != {"n0", "n2"}
    for p in plans[:3]:
        stages = [r.node_id for r in p.ranks]
        assert ("n0", "n2") not in zip(stages, stages[1:]) and ("n2", "n0") not in zip(stages, stages[1:])


def test_too_big_for_any_node_is_pipelined_over_the_fewest_large_nodes_in_proportion():
    nodes = [node(0, 64, 120, cores=1), node(1, 64, 100, cores=1), node(2, 16, 100, cores=1), node(3, 16, 100, cores=1)]
    card = model(48, hidden=8192, heads=64, kv=8, inter=28672)  # ~ 83 GB in bf16
    # 10 ms links: 96 all-reduces per token (a pair's: one 5 ms crossing each) would cost more than splitting
    # layers saves
    plans = plan(cluster(nodes, rtt_ms=10.0, mbit=1000), card, context=1024)
    assert not any(p.num_nodes == 1 for p in plans)
    best = plans.best
    assert best.strategy == "pipeline" and set(best.nodes) == {"n0", "n1"}
    balanced = next(p for p in plans if p.split == "proportional" and set(p.nodes) == {"n0", "n1"})
    layers = {r.node_id: r.layers[1] - r.layers[0] for r in balanced.ranks}
    assert abs(layers["n0"] / card.num_layers - 120 / 220) < 0.05  # in proportion to speed
    assert any("needs" in (p.reason or "") for p in plans.infeasible)


def test_405b_on_four_m3_ultras():
    card = card_from_config(LLAMA_405B, "llama-3.1-405b-shaped", "bfloat16")
    assert 790e9 < card.weight_bytes < 830e9
    topo = Topology.load(SPECS / "m3-ultra-4x-tb5.json")
    plans = plan(topo, card, context=8192)
    assert all("needs" in p.reason for p in plans.infeasible if p.num_nodes == 1)
    pipelines = [p for p in plans if p.strategy == "pipeline"]
    assert pipelines[0].num_nodes == 2  # the fewest nodes that hold ~810 GB
    # over RDMA Thunderbolt 5, splitting every layer four ways reads a quarter of the weights per node:
    assert plans.best.strategy == "tensor" and plans.best.backend == "jaccl"
    # the same Macs on Wi-Fi (5 ms): 252 all-reduces per token cost more than they save; a 2-node pipeline wins
    slow = copy.deepcopy(topo)
    for lk in slow.links:
        lk.rtt_ms_median, lk.send_mbit_per_s, lk.recv_mbit_per_s, lk.rdma = 5.0, 400.0, 400.0, False
    best = plan(slow, card, context=8192).best
    assert best.strategy == "pipeline" and best.num_nodes == 2 and best.backend == "ring"


def test_cpu_node_uses_its_cores_as_a_tensor_group():
    a = node(0, 64, 20, cores=2)
    plans = plan(cluster([a]), model(16, hidden=2048, heads=32, kv=8, inter=8192))
    assert plans.best.strategy == "tensor" and len(plans.best.ranks) == 2
    single = next(p for p in plans if p.strategy == "single")
    assert 1.3 < plans.best.decode_tps / single.decode_tps < 1.5  # the measured 1.39x


def test_every_tensor_rank_pays_each_layers_overhead_in_full():
    """llama-1b-shaped, as measured on two one-core hosts: one process 150 ms per token, 11 of them the
    16 layers' operations (0.7 ms each); a tensor rank reads half the weights but runs every operation."""
    card = model(16, hidden=2048, heads=32, kv=8, inter=8192)
    plain = [node(0, 64, 20, cores=1), node(1, 64, 20, cores=1)]
    costly = copy.deepcopy(plain)
    for n in costly:
        n.profile["layer_overhead_s"] = 7e-4
    free, paid = (plan(cluster(c, rtt_ms=0.02, mbit=80000), card) for c in (plain, costly))

    def single_and_tensor(plans):
        return (
            next(p for p in plans if p.strategy == "single"),
            next(p for p in plans if p.strategy == "tensor" and p.num_nodes == 2),
        )

    (free_single, free_tensor), (paid_single, paid_tensor) = single_and_tensor(free), single_and_tensor(paid)
    assert 1 / paid_single.decode_tps == pytest.approx(1 / free_single.decode_tps + 16 * 7e-4)
    compute = next(v for k, v in paid_tensor.breakdown.items() if k.startswith("compute"))
    assert compute == pytest.approx(0.5 / free_single.decode_tps + 16 * 7e-4, rel=0.02)
    assert paid_tensor.decode_tps / paid_single.decode_tps < free_tensor.decode_tps / free_single.decode_tps
    shared = [node(0, 64, 20, cores=1, host="h"), node(1, 64, 20, cores=1, host="h")]
    for n in shared:
        n.profile["layer_overhead_s"] = 7e-4
    both = next(p for p in plan(cluster(shared, rtt_ms=0.02, mbit=80000), card) if p.strategy == "tensor")
    compute = next(v for k, v in both.breakdown.items() if k.startswith("compute"))
    assert compute > 2 * 16 * 7e-4  # two ranks on one core: each gets half its time for its operations


def test_each_step_costs_its_own_work_once_and_a_step_ahead_hides_it(monkeypatch):
    """A 4-layer model of hidden 128 (the demo's shape): each decode step of a rank costs its own work
    (``step_overhead_s``: sampling, landing the tokens) beside its layers. One process with cores to spare
    steps ahead (exo_lab.engine.lookahead), so the two overlap; a tensor pair on the same two cores does not,
    and neither does a process told not to (EXO_LAB_LOOKAHEAD=0)."""
    card = model(4, hidden=128, heads=4, kv=2, inter=512)
    layer_s, step_s = 4e-4, 3e-3
    nodes = [node(0, 64, 20, cores=4)]
    for n in nodes:
        n.profile["layer_overhead_s"], n.profile["step_overhead_s"] = layer_s, step_s

    def single(topo):
        return next(p for p in plan(topo, card) if p.strategy == "single")

    ahead = single(cluster(nodes))
    assert 1 / ahead.decode_tps == pytest.approx(step_s, rel=0.01)  # longer than the compute: all that shows
    monkeypatch.setenv("EXO_LAB_LOOKAHEAD", "0")
    behind = single(cluster(nodes))
    compute_s = 1 / behind.decode_tps - step_s  # its layers' operations and its reads, then its own work
    assert 4 * layer_s < compute_s < step_s
    monkeypatch.delenv("EXO_LAB_LOOKAHEAD")
    two = [node(0, 64, 20, cores=2)]
    for n in two:
        n.profile["layer_overhead_s"], n.profile["step_overhead_s"] = layer_s, step_s
    pair = next(p for p in plan(cluster(two), card) if p.strategy == "tensor")
    compute = next(v for k, v in pair.breakdown.items() if k.startswith("compute"))
    assert compute > step_s + 4 * layer_s  # both ranks' cores busy: no step ahead


def test_tensor_ranks_on_one_physical_machine_share_its_memory_bus():
    """Two one-core simulated hosts (one kernel: one boot id) read memory at once in a tensor group, each
    slower than alone; a pipeline's stages take turns at one sequence and are not slowed."""
    card = model(16, hidden=2048, heads=32, kv=8, inter=8192)
    apart = [node(0, 64, 20, cores=1), node(1, 64, 20, cores=1)]
    together = copy.deepcopy(apart)
    for n in together:
        n.profile["boot_id"] = "same-kernel"
    by = {}
    for name, nodes in (("apart", apart), ("together", together)):
        plans = plan(cluster(nodes, rtt_ms=0.02, mbit=80000), card)
        by[name] = {p.strategy: p for p in plans if p.num_nodes == 2 or p.strategy == "single"}
    assert by["together"]["single"].decode_tps == pytest.approx(by["apart"]["single"].decode_tps)
    assert by["together"]["pipeline"].decode_tps == pytest.approx(by["apart"]["pipeline"].decode_tps)
    tensor_apart, tensor_together = by["apart"]["tensor"], by["together"]["tensor"]
    read_apart = next(v for k, v in tensor_apart.breakdown.items() if k.startswith("compute"))
    read_together = next(v for k, v in tensor_together.breakdown.items() if k.startswith("compute"))
    assert read_together == pytest.approx(read_apart * 2**0.5, rel=0.05)  # share(2 ranks, 2 cores) = 0.71
    assert tensor_together.decode_row_s == pytest.approx(tensor_apart.decode_row_s)  # rows: FLOPs, not the bus
    # with many sequences a pipeline's stages compute at once (a group each): then they share the bus too
    piped_apart, piped_together = by["apart"]["pipeline"], by["together"]["pipeline"]
    assert piped_apart.stage_bus_s == [0.0, 0.0] and all(t > 0 for t in piped_together.stage_bus_s)
    assert piped_together.batched_decode_tps(1) == pytest.approx(piped_apart.batched_decode_tps(1))
    ratio = piped_together.batched_decode_tps(8) / piped_apart.batched_decode_tps(8)
    read_share = sum(piped_together.stage_bus_s) / sum(piped_together.stage_decode_s)
    assert 1 / (1 + read_share) - 0.01 < ratio < 0.99  # each stage's reads slow down by its share of the bus


def test_a_compute_bound_kernel_hardly_slows_on_a_shared_bus():
    """The bus slows only the part of a rank's reading that waits on memory, told by the profile's M=8 rate
    against its M=1 read: a kernel whose 8 rows take ~5.7x one row's time (q4 on one core here) is mostly
    computing, one whose 8 rows take ~2.4x (fp32) mostly waiting on memory."""
    card = model(16, hidden=2048, heads=32, kv=8, inter=8192)
    slowdown = {}
    for name, m8 in (("memory", 66.7), ("compute", 27.1)):  # 20 GFLOP/s at M=1: 20 GB/s of bf16 weights
        apart = [node(0, 64, 20, cores=1), node(1, 64, 20, cores=1)]
        for n in apart:
            n.profile["matmul_gflops"]["bfloat16_m8"] = m8
        together = copy.deepcopy(apart)
        for n in together:
            n.profile["boot_id"] = "same-kernel"
        reads = []
        for nodes in (apart, together):
            tensor = next(p for p in plan(cluster(nodes, rtt_ms=0.02, mbit=80000), card) if p.strategy == "tensor")
            reads.append(next(v for k, v in tensor.breakdown.items() if k.startswith("compute")))
        bound = NodeRates.from_profile("n0", apart[0].profile).bus_bound("bfloat16", False, 2.0)
        assert bound == pytest.approx({"memory": 0.8, "compute": 0.3}[name], abs=0.01)
        slowdown[name] = reads[1] / reads[0]
        assert slowdown[name] == pytest.approx(bound * 2**0.5 + 1 - bound, rel=0.05)  # only the waiting slows
    assert slowdown["compute"] < 1.15 < 1.3 < slowdown["memory"] < 2**0.5


def test_each_more_row_of_a_batch_carries_its_hidden_state_over_the_links():
    card = model(16, hidden=2048, heads=32, kv=8, inter=8192)
    nodes = [node(0, 64, 20, cores=1), node(1, 64, 20, cores=1)]
    fast, slow = (plan(cluster(nodes, rtt_ms=0.02, mbit=mbit), card) for mbit in (80000, 100))
    hidden_s = {mbit: 2048 * 2 * 8 / (mbit * 1e6) for mbit in (80000, 100)}  # one bf16 row over the link
    for strategy, per_row in (("tensor", 2 * 16), ("pipeline", 1)):  # a pair's all-reduce moves the row twice
        f, sl = (next(p for p in plans if p.strategy == strategy and p.num_nodes == 2) for plans in (fast, slow))
        extra = per_row * (hidden_s[100] - hidden_s[80000])
        assert sl.decode_row_s - f.decode_row_s == pytest.approx(extra, rel=0.05)


def test_hidden_states_travel_in_the_senders_activations():
    """A bf16 checkpoint computed in bf16w sends fp32 hidden states: twice the bytes on every hop."""
    from dataclasses import replace

    from exo_lab.placement.predict import Predictor

    card = model(16, hidden=2048, heads=32, kv=8, inter=8192)
    nodes = [node(0, 64, 20, cores=1), node(1, 64, 20, cores=1)]
    topo = cluster(nodes, rtt_ms=0.02, mbit=100)
    piped = next(p for p in plan(topo, card) if p.strategy == "pipeline" and p.num_nodes == 2)
    assert set(piped.dtypes.values()) == {"bfloat16"}
    widened = replace(piped, dtypes={n: "bf16w" for n in piped.dtypes})
    predictor = Predictor(topo, card, 512, 128)
    hop = {
        name: next(v for k, v in predictor.predict(p)["breakdown"].items() if k == "link node0->node1")
        for name, p in (("bf16", piped), ("bf16w", widened))
    }
    one_row = 2048 * 2 * 8 / 100e6  # seconds for one bf16 row at 100 Mbit/s
    assert hop["bf16w"] - hop["bf16"] == pytest.approx(one_row, rel=0.05)


def test_fp32_chosen_on_cpu_when_it_decodes_faster_and_fits():
    a = node(0, 64, 20, cores=1)
    a.profile["matmul_gflops"].update({"float32_m1": 8.5, "bfloat16_m1": 3.0})
    a.profile["matmul_weight_read_gb_per_s"] = {"float32_m1": 17.0, "bfloat16_m1": 3.1}
    best = plan(cluster([a]), model(16, hidden=2048, heads=32, kv=8, inter=8192)).best
    assert best.dtypes["n0"] == "float32" and "faster" in best.dtype_reasons["n0"]
    tight = node(0, 3.5, 20, cores=1)
    tight.profile["matmul_weight_read_gb_per_s"] = {"float32_m1": 17.0, "bfloat16_m1": 3.1}
    best = plan(cluster([tight]), model(16, hidden=2048, heads=32, kv=8, inter=8192), context=1024).best
    assert best.dtypes["n0"] == "bfloat16"  # fp32 would not fit


def test_nodes_sharing_a_host_share_its_speed():
    alone = plan(cluster([node(0, 32, 100, cores=1)]), model(16)).best
    shared = [node(0, 32, 100, cores=1, host="same"), node(1, 32, 100, cores=1, host="same")]
    plans = plan(cluster(shared, rtt_ms=0.05, mbit=40000), model(16))
    two = next(p for p in plans if p.num_nodes == 2)
    assert two.decode_tps <= alone.decode_tps  # two processes on one core are no faster


def test_ttft_objective_and_json_round_trip():
    from exo_lab.placement import Plan

    topo = Topology.load(SPECS / "home-lab-mixed.json")
    plans = plan(topo, model(32), objective="ttft")
    assert [p.ttft_s for p in plans[:5]] == sorted(p.ttft_s for p in plans[:5])
    p = plans.best
    again = Plan.from_json(p.to_json())
    assert again.key == p.key and again.decode_tps == p.decode_tps
    assert "<table>" in plans._repr_html_() and "TTFT" in repr(plans)
    with pytest.raises(ValueError):
        plan(topo, model(32), objective="speed")


def test_ties_go_to_nodes_that_already_hold_the_files():
    a, b = node(0, 64, 100, cores=1), node(1, 64, 100, cores=1)
    card = model(16)
    object.__setattr__(card, "path", "/models/m")
    b.models = ["m"]  # only b has the files; a and b are otherwise identical
    plans = plan(cluster([a, b], rtt_ms=5.0, mbit=100), card)
    assert plans.best.nodes == ["n1"] and plans.best.fetch_nodes == []
    other = next(p for p in plans if p.nodes == ["n0"])
    assert other.fetch_nodes == ["n0"] and other.decode_tps == plans.best.decode_tps


def test_tensor_pairs_inside_a_pipeline_are_offered_for_dense_models_only():
    """Pairs inside a pipeline stage split dense layers only (engine/pairs.py): an MoE model gets none, with why."""
    nodes = [node(i, 64, 100, cores=2) for i in range(2)]  # two cores each: a local pair per pipeline stage
    topo = cluster(nodes, rtt_ms=0.02, mbit=80000)

    def pipeline_of_pairs(plans) -> list:
        return [
            p
            for p in [*plans, *plans.infeasible]
            if len({r.stage for r in p.ranks}) > 1 and any(r.tensor_size > 1 for r in p.ranks)
        ]

    dense = pipeline_of_pairs(plan(topo, model(layers=8, hidden=1024)))
    assert any(p.feasible for p in dense)
    moe = pipeline_of_pairs(plan(topo, family_model("qwen3_moe", 8, 1024, 16, 0, 0)))
    assert moe and not any(p.feasible for p in moe)
    assert all("tensor pairs inside a pipeline" in (p.reason or "") for p in moe)


def test_several_sequences_rank_by_their_aggregate_and_prompts_get_a_split_of_their_own():
    """llama-1b's shape (a head of ~4 layers' bytes) on two equal one-core nodes, planned for 8 sequences: decode
    balances the head into the last stage (a[0:10] -> b[10:16], the group schedule runs at the slowest stage's
    pace), a prompt's chunks never meet the head (a[0:8] -> b[8:16]); each objective ranks its own split first."""
    from exo_lab.models.presets import PRESETS, card_config

    card = card_from_config(card_config(PRESETS["llama-1b"]), "llama-1b", "float32")
    topo = cluster([node(0, 64, 100, cores=1), node(1, 64, 100, cores=1)])

    def pipelines(objective: str) -> list:
        plans = plan(topo, card, context=4096, prompt_tokens=2048, batch=8, objective=objective)
        return [p for p in plans if p.strategy == "pipeline"]

    decode, ttft = pipelines("decode"), pipelines("ttft")
    assert [r.layers for r in decode[0].ranks] == [(0, 10), (10, 16)] and decode[0].split == "proportional"
    assert [r.layers for r in ttft[0].ranks] == [(0, 8), (8, 16)] and ttft[0].split == "layers"
    assert "balanced for prompts" in ttft[0].describe()
    # the same plans, ranked by the objective's figure: 8 sequences' tokens/s, or the TTFT
    assert decode[0].batched_decode_tps(8) > ttft[0].batched_decode_tps(8)
    assert ttft[0].ttft_s < decode[0].ttft_s
    assert decode[0].decode_tps == pytest.approx(ttft[0].decode_tps, rel=0.01)  # one sequence: the stages in turn
    # one sequence: no head to balance, so no split of its own
    assert {p.split for p in plan(topo, card, batch=1)} <= {"whole", "proportional", "fastest"}
