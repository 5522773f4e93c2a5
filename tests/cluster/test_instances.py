"""Instances: plans launched as real MLX distributed ranks (separate processes), exact and resilient."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import openai
import psutil
import pytest

import exo_lab
from exo_lab.cluster.auth import rank_target, sign_headers
from exo_lab.cluster.http import split_address
from exo_lab.instance import PORT_RELAUNCHES, Instance
from exo_lab.models import synthetic
from tests.helpers.net import free_port
from tests.helpers.ranks import ranks_logits, single_process_logits

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    c = exo_lab.local_cluster(3)
    yield c
    c.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inst-models")
    return {p: synthetic.create(root / p, p) for p in ("tiny", "qwen2-tiny", "qwen3-tiny")}


def reference(path: Path, prompt: list[int], n: int) -> list[int]:
    with exo_lab.Engine(path) as eng:
        gen = eng.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
        return [t for c in gen for t in c.tokens]


def tokens_of(inst: Instance, prompt: list[int], n: int) -> list[int]:
    gen = inst.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
    chunks = list(gen)
    assert chunks[-1].error is None, chunks[-1].error
    return [t for c in chunks for t in c.tokens]


def pick(plans, strategy: str, nodes: int, split: str | None = None):
    for p in plans:
        if p.strategy == strategy and p.num_nodes == nodes and (split is None or p.split == split):
            return p
    raise AssertionError(f"no {strategy} plan over {nodes} nodes in {[p.describe() for p in plans]}")


def no_pids_left(pids: dict[str, list[int]]) -> bool:
    return not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for ps in pids.values() for p in ps
    )


SHORT = list(range(5, 60))
LONG = [(i * 7919) % 8000 + 10 for i in range(2300)]  # longer than one 2048-token prefill chunk


@pytest.mark.parametrize("nodes", [2, 3])
def test_pipeline_gives_the_same_tokens_as_one_process(cluster, models, nodes):
    path = models["tiny"]
    plans = cluster.preview(path, context=4096, prompt_tokens=64)
    plan = pick(plans, "pipeline", nodes)
    inst = plan.launch()
    try:
        assert inst.state == "ready"
        assert len({r.layers for r in inst.plan.ranks}) == nodes
        for prompt in (SHORT, LONG):
            assert tokens_of(inst, prompt, 24) == reference(path, prompt, 24)
        # rows at once: a group per stage, each tick's tokens shared (along the chain of stages, with three)
        prompts = [SHORT, SHORT[7:], LONG[:300], SHORT[::2], SHORT[3:40]]
        gens = [inst.generate(p, max_tokens=12 + 3 * i, temperature=0, ignore_eos=True) for i, p in enumerate(prompts)]
        together = [[t for c in g for t in c.tokens] for g in gens]
        assert together == [reference(path, p, 12 + 3 * i) for i, p in enumerate(prompts)]
        assert inst.stats["peak_batch"] >= 2
        # neighbouring stages hand their hidden states over sockets of their own, not MLX's ring
        assert all(inst._worker(r.rank, "GET", "/status", timeout=5)["peer_link"] for r in inst.plan.ranks)
        # and every thread of every rank takes turns by time slice (engine/thread_policy.py)
        assert thread_policies(inst.pids()) == {os.SCHED_BATCH}
    finally:
        pids = inst.pids()
        inst.delete()
    assert inst.state == "stopped"
    deadline = time.monotonic() + 10
    while not no_pids_left(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert no_pids_left(pids), pids


def thread_policies(pids: dict) -> set[int]:
    """The scheduling policies of every thread of the processes ``pids`` (by node)."""
    found = set()
    for p in (p for ps in pids.values() for p in ps):
        for tid in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that ended meanwhile
                found.add(os.sched_getscheduler(int(tid)))
    return found


def test_uneven_layer_ranges_and_other_architectures(cluster, models):
    for name in ("qwen2-tiny", "qwen3-tiny"):
        path = models[name]
        plans = cluster.preview(path, context=2048, prompt_tokens=64)
        plan = pick(plans, "pipeline", 2, split="fastest")  # an uneven split: 3 + 1 layers
        assert sorted(r.layers[1] - r.layers[0] for r in plan.ranks) == [1, 3]
        inst = cluster.launch(path, plan=plan)
        try:
            assert tokens_of(inst, SHORT, 16) == reference(path, SHORT, 16), name
        finally:
            inst.delete()


def test_tensor_parallel_fp32_gives_the_same_tokens(cluster, models):
    path = models["tiny"]  # float32
    plan = pick(cluster.preview(path, context=2048, prompt_tokens=64), "tensor", 2)
    inst = plan.launch()
    try:
        assert {r.tensor_size for r in inst.plan.ranks} == {2}
        assert tokens_of(inst, SHORT, 24) == reference(path, SHORT, 24)
        assert all(inst._worker(r.rank, "GET", "/status", timeout=5)["peer_link"] for r in inst.plan.ranks)
    finally:
        inst.delete()


@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_logits_on_bf16_agree_within_tolerance(tmp_path, ranks):
    """Tensor ranks sum partial products in another order: bf16 logits differ by rounding only."""
    path = synthetic.create(tmp_path / "bf16", "tiny-mha", dtype="bfloat16")
    prompt = [(i * 31) % 8000 + 3 for i in range(50)]
    ref = single_process_logits(path, prompt)
    got = ranks_logits(path, tmp_path, "tensor", ranks, prompt)
    # stated tolerance: |diff| <= 0.05 * max|logit| (a few bf16 ulps at the logits' scale)
    assert np.max(np.abs(got - ref)) <= 0.05 * np.max(np.abs(ref))
    assert np.argmax(got) == np.argmax(ref)


def test_tensor_over_four_ranks_gives_the_same_tokens(cluster, models, tmp_path):
    from exo_lab.placement.plan import Plan, RankSpec

    path = synthetic.create(tmp_path / "mha", "tiny-mha")  # fp32, 4 KV heads
    nodes = cluster.nodes[:2]
    base = cluster.preview(path, context=2048, prompt_tokens=64).best
    ranks = [
        RankSpec(i, nodes[i // 2].id, nodes[i // 2].name, 0, (0, 4), i, 4, "127.0.0.1", "float32") for i in range(4)
    ]
    plan = Plan(
        model=base.model,
        strategy="tensor",
        ranks=ranks,
        memory_bytes={n.id: 0 for n in nodes},
        memory_capacity_bytes={n.id: n.memory_total_bytes for n in nodes},
        model_dtype="float32",
        node_names={n.id: n.name for n in nodes},
    )
    inst = cluster.launch(path, plan=plan)
    try:
        for prompt in (SHORT, LONG[:300]):  # the longer prompt in two chunks
            assert tokens_of(inst, prompt, 16) == reference(path, prompt, 16)
        # a step's sums go along a chain of the ranks' own sockets, not round MLX's ring (engine/peer_link.py)
        assert all(inst._worker(r.rank, "GET", "/status", timeout=5)["peer_link"] for r in inst.plan.ranks)
    finally:
        inst.delete()


@pytest.mark.parametrize("splits,prompt_len", [([2, 2], 40), ([1, 2, 1], 150)])
def test_pipeline_logits_are_bit_identical(models, tmp_path, splits, prompt_len):
    path = models["tiny"]
    prompt = [(i * 31) % 8000 + 3 for i in range(prompt_len)]
    ref = single_process_logits(path, prompt)
    got = ranks_logits(path, tmp_path, splits, len(splits), prompt)
    assert got.shape == ref.shape and np.array_equal(got, ref)  # bit-identical, not merely close


@pytest.fixture(scope="module")
def pipeline2(cluster, models):
    """The tiny model as a two-stage pipeline (rank 0 streams, rank 1 samples)."""
    path = models["tiny"]
    inst = cluster.launch(
        path, plan=pick(cluster.preview(path, context=2048, prompt_tokens=64), "pipeline", 2), name="tiny-pipe2"
    )
    yield inst
    inst.delete()


def test_streaming_cancel_and_stop_strings(pipeline2, models):
    path, inst = models["tiny"], pipeline2
    full = "".join(inst.stream("def main():", max_tokens=30, temperature=0))
    with exo_lab.Engine(path) as eng:
        assert full == eng.generate("def main():", max_tokens=30, temperature=0).text()
    stop = full[12:16]
    gen = inst.generate("def main():", max_tokens=30, temperature=0, stop=[stop])
    assert gen.text() == full[: full.index(stop)] and gen.finish_reason == "stop"
    gen = inst.generate("x", max_tokens=100_000, temperature=0, ignore_eos=True)
    it = iter(gen)
    next(it)
    gen.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled"
    assert tokens_of(inst, SHORT, 5) == reference(path, SHORT, 5)  # still in step after a cancel


def test_a_job_that_fails_on_the_sampling_rank_fails_alone(pipeline2, models):
    """The sampling rank (rank 1) cannot build one job's grammar (a prefix no UTF-8 can hold): that job ends
    with the error on every rank; the job decoding beside it, and the next ones, are untouched."""
    from exo_lab.engine.generation import GenerationRequest
    from exo_lab.engine.guided import SchemaGrammar, json_object

    path, inst = models["tiny"], pipeline2
    g = json_object()
    broken = SchemaGrammar(g.schema, g.grammar, "\ud800", g.suffix, g.empty)
    beside = inst.generate(SHORT, max_tokens=40, temperature=0, ignore_eos=True)
    it = iter(beside)
    first = next(it)  # decoding: the bad job joins its batch
    bad = list(inst.submit(GenerationRequest(tuple(SHORT), 20, grammar=broken)))
    assert bad[-1].finish_reason == "error" and "UnicodeEncodeError" in (bad[-1].error or ""), bad[-1]
    assert "instance" not in (bad[-1].error or "") and inst.state == "ready"  # the job failed, not the instance
    assert [*first.tokens, *tokens([*it])] == reference(path, SHORT, 40)
    assert inst.state == "ready"
    server = exo_lab.serve(inst, port=free_port())
    try:  # the request of the report: a seed of -1 used to fail rank 1 and lose the instance
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "hello"}]
        r = client.chat.completions.create(model="tiny-pipe2", messages=msgs, max_tokens=8, temperature=1, seed=-1)
        assert r.usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.chat.completions.create(model="tiny-pipe2", messages=msgs, max_tokens=8, seed=2**64)
    finally:
        server.stop()
    assert tokens_of(inst, SHORT, 12) == reference(path, SHORT, 12)
    assert inst.state == "ready"


def tokens(chunks) -> list[int]:
    assert chunks[-1].error is None, chunks[-1].error
    return [t for c in chunks for t in c.tokens]


def test_a_rank_refuses_a_request_signed_for_another_rank(pipeline2):
    """The coordinator signs each request for one rank of one launch: replayed to another rank, it is a 401."""
    inst = pipeline2
    key = inst.cluster.cluster_key

    def status_of(rank: int, headers: dict[str, str]) -> int:
        host, port = split_address(inst.controls[rank])
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", "/status", headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()

    for_rank1 = sign_headers(key, "GET", "/status", target=rank_target(inst.launch_id, 1), source="coordinator")
    assert status_of(0, for_rank1) == 401  # a relay passing rank 1's request on to rank 0
    assert status_of(1, for_rank1) == 200
    assert status_of(1, for_rank1) == 401  # and only once
    assert status_of(0, sign_headers(key, "GET", "/status")) == 401  # signed for no rank in particular
    other_launch = sign_headers(key, "GET", "/status", target=rank_target("another", 0))
    assert status_of(0, other_launch) == 401
    assert inst._worker(0, "GET", "/status")["state"] == "ready"  # what the instance sends is signed for rank 0
    # an unsigned job announcing 10 MB is refused from its headers, before its body is read
    host, port = split_address(inst.controls[0])
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10000000\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 401")


def test_served_through_the_openai_api(cluster, models):
    path = models["tiny"]
    inst = cluster.launch(
        path, plan=pick(cluster.preview(path, context=2048, prompt_tokens=64), "pipeline", 2), name="tiny-pipe"
    )
    server = exo_lab.serve(inst, port=free_port())
    try:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "hello"}]
        r = client.chat.completions.create(model="tiny-pipe", messages=msgs, max_tokens=12, temperature=0)
        with exo_lab.Engine(path) as eng:
            assert r.choices[0].message.content == eng.chat(msgs, max_tokens=12, temperature=0).text()
        assert r.usage.completion_tokens == 12
    finally:
        server.stop()
        inst.delete()


def test_reservations_refuse_overcommit(cluster, models):
    node = cluster.nodes[0]
    addr = cluster.address_of(node.id)
    too_much = node.memory_total_bytes * 2
    before = cluster.request(addr, "GET", "/instances")["reserved_bytes"]  # the module's pipeline may hold some
    with pytest.raises(exo_lab.ClusterError, match="409"):
        cluster.request(
            addr,
            "POST",
            "/instances/bogus1/prepare",
            {"ranks": [{"rank": 0, "address": "127.0.0.1"}], "reserve_bytes": too_much},
        )
    assert cluster.request(addr, "GET", "/instances")["reserved_bytes"] == before


@pytest.mark.parametrize("bad", [-1, -(1 << 40), 1.5, "1024", True, None])
def test_a_reservation_is_a_count_of_bytes(cluster, bad):
    """A negative reservation would free others' memory on paper; it and anything but a count is a 400."""
    addr = cluster.address_of(cluster.nodes[0].id)
    with pytest.raises(exo_lab.ClusterError, match="400.*reserve_bytes"):
        cluster.request(
            addr,
            "POST",
            "/instances/bogus2/prepare",
            {"ranks": [{"rank": 0, "address": "127.0.0.1"}], "reserve_bytes": bad},
        )
    assert "bogus2" not in json.dumps(cluster.request(addr, "GET", "/instances"))


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])  # tensor: the peer dies under a pair's own socket
def test_a_dead_worker_fails_fast_then_the_instance_is_replaced(cluster, models, strategy):
    path = models["tiny"]
    plan = pick(cluster.preview(path, context=2048, prompt_tokens=64), strategy, 2)
    inst = cluster.launch(path, plan=plan, name="resilient")
    server = exo_lab.serve(inst, port=free_port())
    try:
        old_pids, iid = inst.pids(), inst.id
        gen = inst.generate("x", max_tokens=100_000, temperature=0, ignore_eos=True)
        it = iter(gen)
        next(it)
        victim = old_pids[plan.nodes[1]][0]
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        rest = list(it)
        assert rest[-1].finish_reason == "error" and time.monotonic() - t < 5
        # meanwhile the API says "retry later"
        import urllib.error
        import urllib.request

        # one token: a request that lands just after the replacement is served whole within the timeout
        body = json.dumps({"model": "resilient", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        body = body.encode()
        saw_503 = False
        deadline = time.monotonic() + 60
        while not (inst.state == "ready" and inst.replacements == 1) and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(
                    urllib.request.Request(
                        server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
                    ),
                    timeout=5,
                )
            except urllib.error.HTTPError as e:
                if e.code == 503:
                    saw_503 = saw_503 or e.headers.get("Retry-After") is not None
            time.sleep(0.1)
        assert inst.state == "ready" and inst.replacements == 1
        assert inst.id == iid and inst.launch_id == f"{iid}-r1"  # the same public id; the agents know the new launch
        deadline = time.monotonic() + 10
        while not no_pids_left(old_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert no_pids_left(old_pids)  # the surviving worker of the old placement was stopped too
        assert tokens_of(inst, SHORT, 8) == reference(path, SHORT, 8)
        assert saw_503 or inst.state == "ready"
    finally:
        server.stop()
        inst.delete()


def test_a_rank_whose_port_was_taken_is_launched_again_with_new_ports(cluster, models, monkeypatch):
    """Another process binds a rank's ring port between the agent choosing it and the rank binding it (here the
    test, right after the prepare): the rank fails to bind, and the instance launches the same plan again with
    new ports instead of failing (a failure of any other kind while loading still fails it: test_leases.py)."""
    path = models["tiny"]
    plan = pick(cluster.preview(path, context=2048, prompt_tokens=64), "pipeline", 2)
    held: list[socket.socket] = []
    real = Instance._agent

    def agent(self: Instance, node_id: str, method: str, route: str, body=None):
        resp = real(self, node_id, method, route, body)
        if route.endswith("/prepare") and not held:
            host, port = split_address(next(iter(resp["ranks"].values()))["ring"])
            taker = socket.socket()
            taker.bind((host, port))
            taker.listen()
            held.append(taker)
        return resp

    monkeypatch.setattr(Instance, "_agent", agent)
    inst = cluster.launch(path, plan=plan, name="port-taken")
    try:
        # the relaunch's ports can be taken too: each agent picks its own, and agents sharing a host cannot see
        # the ports the others handed out before their workers bind them (CI once saw it: launched a third time)
        assert held and inst.state == "ready" and 1 <= inst.replacements <= PORT_RELAUNCHES
        assert inst.plan is plan and inst.launch_id == f"{inst.id}-r{inst.replacements}"
        assert tokens_of(inst, SHORT, 8) == reference(path, SHORT, 8)
    finally:
        inst.delete()
        for s in held:
            s.close()


def test_pipeline_of_tensor_pairs_gives_the_same_tokens(cluster, models):
    path = models["tiny"]
    plans = cluster.preview(path, context=2048, prompt_tokens=64)
    plan = next(
        p
        for p in plans
        if p.strategy == "pipeline-tensor" and p.num_nodes == 2 and all(r.tensor_size == 2 for r in p.ranks)
    )
    inst = plan.launch()
    try:
        assert len(inst.plan.ranks) == 4
        for prompt in (SHORT, LONG[:300]):
            assert tokens_of(inst, prompt, 16) == reference(path, prompt, 16)
        assert all(inst._worker(r.rank, "GET", "/status", timeout=5)["peer_link"] for r in inst.plan.ranks)
    finally:
        inst.delete()


def test_a_single_node_plan_launches(cluster, models):
    path = models["tiny"]
    plan = pick(cluster.preview(path, context=2048, prompt_tokens=64), "single", 1)
    inst = plan.launch()
    try:
        assert len(inst.plan.ranks) == 1
        assert tokens_of(inst, SHORT, 12) == reference(path, SHORT, 12)
    finally:
        inst.delete()
