"""``exo-lab bench`` sweeps: every combination on a launched plan, an instance already running (``--instance``),
and any OpenAI-compatible server (``--url``: here a second exo_lab server, over real HTTP)."""

from __future__ import annotations

import http.server
import itertools
import json
import os
import shutil
import socket
import threading

import pytest

import exo_lab
from exo_lab import paths
from exo_lab.bench import SCHEMA, BenchError, BenchResult, bench_url, validate

KEY = "sweep-test-api-key"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``exo-lab bench ARGS`` (the command line's own code, in this process: it has no state of its own to share)."""
    from exo_lab.cli import main

    capsys.readouterr()
    rc = main(["bench", *args, "--no-progress"])
    out, err = capsys.readouterr()
    print(out)
    return rc, out, err


def _combinations(doc: dict) -> list[tuple[int, int, int]]:
    return [(p["pp"], p["tg"], p["concurrency"]) for p in doc["plans"][0]["points"]]


@pytest.fixture(scope="module")
def server(tiny_model):
    """A second exo_lab server (one process, an API key): what ``--url`` measures."""
    srv = exo_lab.serve(tiny_model, port=0, name="tiny", api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local agent with its own profile cache; the kernel serves what it launches."""
    cache = tmp_path_factory.mktemp("sweep-cache")
    profiles = paths.cache_dir() / "profiles"
    if profiles.is_dir():  # reuse this machine's measured profile (saves the microbenchmarks)
        shutil.copytree(profiles, cache / "profiles", ignore=shutil.ignore_patterns("*.tmp"))
    old = os.environ.get("EXO_LAB_CACHE_DIR")
    os.environ["EXO_LAB_CACHE_DIR"] = str(cache)
    c = exo_lab.local_cluster(1)
    yield c
    c.close()
    if old is None:
        os.environ.pop("EXO_LAB_CACHE_DIR", None)
    else:
        os.environ["EXO_LAB_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def instance(cluster, tiny_model):
    """An instance already running in the cluster, served by its owner's (this kernel's) API."""
    inst = cluster.launch(tiny_model, name="running", wait=False)
    inst.wait_ready(progress=False)
    yield inst
    inst.delete()


# ----------------------------------------------------------------------------- --url


@pytest.mark.slow
def test_url_sweeps_every_combination_of_a_second_server(server, tiny_model, tmp_path, capsys):
    out, page = tmp_path / "url.json", tmp_path / "url.html"
    rc, stdout, stderr = _cli(
        capsys,
        "--url",
        f"{server.url}/v1",
        "--api-key",
        KEY,
        "--tokenizer",
        str(tiny_model),
        "--pp",
        "16,32",
        "--tg",
        "2,3",
        "--concurrency",
        "1,2",
        "--repeat",
        "2",
        "--json",
        str(out),
        "--plot",
        str(page),
    )
    assert rc == 0, stdout + stderr
    doc = json.loads(out.read_text())
    validate(doc)
    assert doc["schema"] == SCHEMA and doc["target"]["kind"] == "url" and doc["target"]["model"] == "tiny"
    assert sorted(_combinations(doc)) == sorted(itertools.product([16, 32], [2, 3], [1, 2]))
    for p in doc["plans"][0]["points"]:
        assert p["status"] == "ok" and p["timing"] == "stream"
        n = 2 * p["concurrency"]  # every request of every repeat
        assert p["prompt_tokens"] == [p["pp"]] * n  # the tokenizer is known here: exact prompts
        assert p["completion_tokens"] == [p["tg"]] * n  # ignore_eos honoured
        assert p["ttft_s"]["n"] == n and p["ttft_s"]["p10"] <= p["ttft_s"]["median"] <= p["ttft_s"]["p90"]
        assert p["decode_tps"]["median"] > 0 and p["prompt_tps"]["median"] > 0 and p["aggregate_tps"]["n"] == 2
    assert doc["plans"][0]["memory"] == {}
    assert doc["prompt"]["16"]["distinct"] == 1 + 2 * (2 * 1 + 2 * 2)  # the warm-up, then a prompt per request
    assert doc["prompt"]["32"]["distinct"] == 2 * (2 * 1 + 2 * 2)
    rows = [line for line in stdout.splitlines() if line.startswith("tiny at ")]
    assert len(rows) == 8 and all(line.rstrip().endswith("n/a") for line in rows)
    html = page.read_text()
    assert "exo-bench-sweep-prompt" in html and "exo-bench-sweep-concurrency" in html
    assert BenchResult.from_json(doc).to_json() == doc
    from exo_lab.ui.dashboard.bench_view import bench_module_charts

    charts = bench_module_charts(doc)  # the dashboard draws the same document
    assert charts is not None and [c.object.name for c in charts] == [
        "exo-bench-sweep-prompt",
        "exo-bench-sweep-concurrency",
    ]


@pytest.mark.slow
def test_url_without_a_tokenizer_sizes_prompts_with_the_servers_counts(server):
    res = bench_url(server.url, api_key=KEY, pp=40, tg=2, repeat=1, warmup=0, progress=False)
    (point,) = res.plans[0].points
    assert res.prompt["40"]["method"] == "probe" and res.target["model"] == "tiny"  # the first of /v1/models
    assert abs(point.prompt_tokens[0] - 40) <= 2, res.prompt


def test_no_two_requests_share_a_prompt_prefix():
    from exo_lab.bench.prompts import words

    starts = {words(3, seed) for seed in range(512)}
    assert len(starts) == 512  # a prefix cache cannot serve one request's prompt from another's
    assert words(4) == "the quick brown fox"  # seed 0: the text prompts always had


class _NotOpenAI(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_bad_urls_are_clear_errors(server):
    with pytest.raises(BenchError, match="not an http"):
        bench_url("localhost:8080", progress=False)
    with pytest.raises(BenchError, match="not a valid URL"):
        bench_url("http://127.0.0.1:99999/v1", progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(BenchError, match=f"cannot reach http://127.0.0.1:{closed}/v1"):
        bench_url(f"http://127.0.0.1:{closed}", progress=False)
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotOpenAI)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(BenchError, match="is it an OpenAI-compatible API"):
            bench_url(f"http://127.0.0.1:{web.server_address[1]}/", progress=False)
    finally:
        web.shutdown()
        web.server_close()
    with pytest.raises(BenchError, match=r"HTTP 401 \(give --api-key\)"):
        bench_url(server.url, progress=False)
    with pytest.raises(BenchError, match="HTTP 404"):
        bench_url(server.url, model="no-such-model", api_key=KEY, pp=20, tg=2, progress=False)


def test_the_cli_says_why_a_url_cannot_be_measured(capsys):
    rc, _, err = _cli(capsys, "--url", "http://127.0.0.1:9/v1", "--model", "m", "--pp", "16", "--tg", "2")
    assert rc == 2 and "exo-lab: error: cannot reach http://127.0.0.1:9/v1" in err, err
    rc, _, err = _cli(capsys, "--pp", "16")
    assert rc == 2 and "needs a model to launch, --instance ID or --url URL" in err
    rc, _, err = _cli(capsys, "--url", "http://127.0.0.1:9/v1", "--pp", "16,x")
    assert rc == 2 and "comma-separated integers" in err


# ----------------------------------------------------------------------------- --instance


@pytest.mark.slow
def test_instance_is_measured_through_its_owners_api_by_another_coordinator(cluster, instance, tmp_path, capsys):
    out = tmp_path / "inst.json"
    rc, stdout, stderr = _cli(
        capsys,
        "--instance",
        instance.id,
        "--connect",
        *[cluster.address_of(n.id) for n in cluster.nodes],
        f"--cluster-key={cluster.cluster_key}",
        "--pp",
        "16,24",
        "--tg",
        "2",
        "--concurrency",
        "1,2",
        "--repeat",
        "1",
        "--json",
        str(out),
    )
    assert rc == 0, stdout + stderr
    doc = json.loads(out.read_text())
    validate(doc)
    target = doc["target"]
    assert target["kind"] == "instance" and target["id"] == instance.id and target["name"] == "running"
    assert target["held"] is False and target["api"] == cluster.server.url
    assert sorted(_combinations(doc)) == sorted(itertools.product([16, 24], [2], [1, 2]))
    entry = doc["plans"][0]
    for p in entry["points"]:
        assert p["status"] == "ok" and p["timing"] == "stream"
        assert p["prompt_tokens"] == [p["pp"]] * p["concurrency"] and p["completion_tokens"] == [2] * p["concurrency"]
        assert p["predicted"]["decode_tps"] > 0  # the cost model's, for the instance's plan
    (mem,) = entry["memory"].values()
    assert mem["peak_rss_bytes"] > 10 * 2**20 and mem["ranks"] == len(instance.plan.ranks)
    assert instance.state == "ready"  # measured, not touched


@pytest.mark.slow
def test_a_held_instance_is_measured_with_rank_0s_timings(cluster, instance):
    res = cluster.bench(instance=instance.id, pp=[16], tg=[2, 3], concurrency=1, repeat=1, warmup=0, progress=False)
    assert res.target["held"] is True and res.target["id"] == instance.id
    assert [(p.pp, p.tg, p.concurrency) for p in res.plans[0].points] == [(16, 2, 1), (16, 3, 1)]
    assert all(p.ok and p.timing == "engine" and p.completion_tokens == [p.tg] for p in res.plans[0].points)
    validate(res.to_json())
    assert "running" in res.table()
    with pytest.raises(BenchError, match="no instance 'nope' in the cluster"):
        cluster.bench(instance="nope", progress=False)


# ----------------------------------------------------------------------------- plans launched in turn


@pytest.mark.slow
def test_a_plan_sweep_runs_every_combination_and_old_documents_still_load(cluster, tiny_model):
    from bokeh.embed import components

    res = cluster.bench(tiny_model, pp=[16, 24], tg=[2, 3], concurrency=[1, 2], repeat=1, select="best", progress=False)
    (plan,) = res.plans
    assert plan.ok, plan.reason
    assert sorted((p.pp, p.tg, p.concurrency) for p in plan.points) == sorted(
        itertools.product([16, 24], [2, 3], [1, 2])
    )
    for p in plan.points:
        assert p.prompt_tokens == [p.pp] * p.concurrency and p.completion_tokens == [p.tg] * p.concurrency
        assert p.predicted["decode_tps"] > 0 and p.predicted["aggregate_tps"] > 0
    assert plan.measured["prompt_tokens"] == [16] and plan.measured["completion_tokens"] == [2]  # the first sizes
    assert [c.concurrency for c in plan.concurrency] == [1, 2] and plan.memory
    doc = res.to_json()
    validate(doc)
    assert doc["sweep"] == {"pp": [16, 24], "tg": [2, 3], "concurrency": [1, 2]} and doc["target"] == {"kind": "plans"}
    assert "every combination" in res.table()
    script, _ = components(res.plot())
    assert "exo-bench-scatter" in script and "exo-bench-sweep-prompt" in script

    old = json.loads(json.dumps(doc))  # the same run as exo_lab.bench/1 wrote it
    old["schema"] = "exo_lab.bench/1"
    for key in ("sweep", "target"):
        del old[key]
    for p in old["plans"]:
        del p["points"]
        for m in ("decode_tps", "prefill_tps", "ttft_s"):
            for k in ("p10", "p90"):
                del p["measured"][m][k]
    back = BenchResult.from_json(old)
    assert back.schema == SCHEMA and back.sweep == {"pp": [16], "tg": [2], "concurrency": [1, 2]}
    assert back.plans[0].points == [] and back.plans[0].median("decode_tps") == plan.median("decode_tps")
    validate(back.to_json())
    with pytest.raises(ValueError, match="reads exo_lab.bench/1, exo_lab.bench/2"):
        BenchResult.from_json({**doc, "schema": "exo_lab.bench/0"})
