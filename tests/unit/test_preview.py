"""Where users meet the planner: cluster.preview, exo-lab preview, GET /instance/previews."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import exo_lab
from exo_lab.placement import Plan
from tests.helpers.paths import SPECS

LLAMA_405B = {
    "hidden_size": 16384,
    "num_hidden_layers": 126,
    "intermediate_size": 53248,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "model_type": "llama",
    "torch_dtype": "bfloat16",
}


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_cluster_preview_on_a_local_cluster(tiny_model):
    with exo_lab.local_cluster(2) as cluster:
        plans = cluster.preview(tiny_model, context=1024, prompt_tokens=64)
        assert len(plans) > 0 and plans.cluster is cluster
        kinds = {p.strategy for p in plans}
        assert {"single", "pipeline"} <= kinds
        for p in plans:
            assert set(p.nodes) <= {n.id for n in cluster.nodes}
            assert p.ranks[0].address == "127.0.0.1"
        assert "Plans for" in plans._repr_html_()


def test_cli_preview_what_if(tmp_path):
    cfg = tmp_path / "llama-405b" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(LLAMA_405B))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "preview",
            str(cfg),
            "--topology",
            str(SPECS / "m3-ultra-4x-tb5.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    best = Plan.from_json(data["plans"][0])
    assert best.backend == "jaccl" and best.num_nodes == 4
    assert all("needs" in p["reason"] for p in data["infeasible"])
    table = subprocess.run(
        [sys.executable, "-m", "exo_lab.cli", "preview", str(cfg), "--topology", str(SPECS / "m3-ultra-4x-tb5.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "decode tok/s" in table.stdout and "infeasible" in table.stdout


@pytest.mark.slow
def test_previews_endpoint_and_its_errors(server):
    status, data = get(f"{server.url}/instance/previews?model_id=tiny&context=2048&prompt_tokens=128")
    assert status == 200 and data["plans"] and data["plans"][0]["decode_tps"] > 0  # the served model
    assert get(f"{server.url}/instance/previews?model_id=demo")[0] == 200  # any model the store resolves
    status, data = get(f"{server.url}/instance/previews?model_id=no-such-model")
    assert status == 404 and data["error"]["code"] == "model_not_found"
    for query, param in [
        ("", "model_id"),
        ("model_id=demo&context=abc", "context"),
        ("model_id=demo&context=0", "context"),
        ("model_id=demo&objective=fast", "objective"),
        ("model_id=demo&context=100&prompt_tokens=200", "prompt_tokens"),
    ]:
        status, data = get(f"{server.url}/instance/previews?{query}")
        assert status == 400 and data["error"]["param"] == param, (query, data)
    assert get(f"{server.url}/health")[0] == 200


def test_cli_preview_of_a_shipped_what_if_model():
    """``exo-lab preview deepseek-v3@4bit --topology ...``: the shipped config, 4-bit, planned per layer."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "preview",
            "deepseek-v3@4bit",
            "--topology",
            str(SPECS / "m3-ultra-2x-tb5.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    plans = [Plan.from_json(p) for p in data["plans"]]
    assert plans[0].model == "deepseek-v3@4bit"
    single = next(p for p in plans if p.strategy == "single")
    assert 370e9 < max(single.memory_bytes.values()) < 400e9  # ~378 GB of weights and a small MLA cache
    assert {"single", "pipeline", "tensor"} <= {p.strategy for p in plans}


def test_model_card_reads_what_if_names_and_not_unknown_ones():
    from exo_lab.models import ModelNotFoundError
    from exo_lab.placement.preview import model_card

    assert model_card("what-if:glm-4.6@8bit").architecture == "glm4_moe"
    assert model_card("kimi-k2").num_experts == 384
    with pytest.raises(ModelNotFoundError):
        model_card("kimi-k2@3bit")  # not a quantization the what-if names know: resolved as a model, not found


def test_an_unbuilt_presets_card_is_the_built_ones(tiny_model):
    """Previews plan for a synthetic preset from its shape, building nothing: the card is the built model's."""
    from dataclasses import replace

    from exo_lab.models.card import ModelCard, card_from_config
    from exo_lab.models.presets import PRESETS, card_config

    shaped = card_from_config(card_config(PRESETS["tiny"]), "synthetic:tiny")
    assert replace(ModelCard.from_dir(tiny_model, name="synthetic:tiny"), path="") == shaped
