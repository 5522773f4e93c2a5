"""A node without the model fetches only its shard's tensors from a peer, once."""

from __future__ import annotations

import json

import pytest

import exo_lab
from exo_lab.cluster.fetch import MANIFEST
from exo_lab.models import synthetic
from exo_lab.models.card import read_tensor_index

pytestmark = pytest.mark.slow


def test_shard_tensors_are_fetched_from_the_peer_that_has_them():
    with exo_lab.local_cluster(2, separate_stores=True) as cluster:
        holder = cluster.stores[0] / "tiny-shared"
        synthetic.create(holder, "tiny")  # only node 0 has the files
        node_ids = {n.name: n.id for n in cluster.nodes}
        plans = cluster.preview(holder, context=1024, prompt_tokens=32)
        plan = next(
            p
            for p in plans
            if p.strategy == "pipeline" and p.split == "proportional" and p.ranks[0].node_id == node_ids["local-0"]
        )
        inst = plan.launch()
        try:
            with exo_lab.Engine(holder) as eng:
                want = eng.generate("def main():", max_tokens=16, temperature=0).text()
            assert inst.generate("def main():", max_tokens=16, temperature=0).text() == want
        finally:
            inst.delete()
        copy = cluster.stores[1] / "tiny-shared"
        manifest = json.loads((copy / MANIFEST).read_text())
        start, end = next(r.layers for r in plan.ranks if r.node_id == node_ids["local-1"])
        fetched = set(manifest["tensors"])
        assert fetched and all(
            (n.startswith("model.layers.") and start <= int(n.split(".")[2]) < end)
            or n.startswith(("lm_head", "model.norm"))
            for n in fetched
        )
        assert not any("embed_tokens" in n for n in fetched)  # the first stage's, not ours
        total = sum(t.nbytes for t in read_tensor_index(holder))
        assert manifest["bytes_fetched"] < total * 0.75
        # the sparse copy takes only the fetched bytes on disk
        used = sum(p.stat().st_blocks * 512 for p in copy.glob("*.safetensors"))
        assert used < total * 0.75

        inst = plan.launch()  # the same placement again: nothing is fetched twice
        try:
            assert inst.generate("def main():", max_tokens=16, temperature=0).text() == want
        finally:
            inst.delete()
        assert json.loads((copy / MANIFEST).read_text())["bytes_fetched"] == manifest["bytes_fetched"]


def test_model_files_need_a_signature(tiny_model):
    with exo_lab.local_cluster(1) as cluster:
        addr = cluster.address_of(cluster.nodes[0].id)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{addr}/models/demo/files/config.json", timeout=10)
        assert err.value.code == 401
