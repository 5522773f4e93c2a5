"""A node without the model fetches only its shard's tensors from a peer, once, and keeps them apart.

Node 0 (``local-0``) holds the model; node 1 (``local-1``) has a store of its own. What node 1 fetches
stays in its store's partial area: never listed, served or checksummed as its model, and loaded
only by the fetch's manifest, until every byte is there and the copy becomes a complete model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import exo_lab
from exo_lab.cluster.fetch import MANIFEST
from exo_lab.cluster.http import RequestError, SignedClient
from exo_lab.models import synthetic
from exo_lab.models.card import read_tensor_index

pytestmark = pytest.mark.slow

PROMPT = "def main():"
NAME = "tiny-shared"


@dataclass
class Stores:
    cluster: exo_lab.Cluster
    holder: Path  # node 0's copy
    want: str  # the tokens one process gives
    ids: dict[str, str]  # node name -> id

    def agent(self, node: str) -> SignedClient:
        return SignedClient(self.cluster.address_of(self.ids[node]), self.cluster.cluster_key)

    def plan(self, model: Path, first: str):
        """The proportional two-stage pipeline whose first stage (layers 0-1) is on ``first``."""
        return next(
            p
            for p in self.cluster.preview(model, context=1024, prompt_tokens=32)
            if p.strategy == "pipeline" and p.split == "proportional" and p.ranks[0].node_id == self.ids[first]
        )

    def generate(self, plan) -> str:
        inst = plan.launch()
        try:
            return inst.generate(PROMPT, max_tokens=16, temperature=0).text()
        finally:
            inst.delete()


@pytest.fixture(scope="module")
def stores():
    with exo_lab.local_cluster(2, separate_stores=True) as cluster:
        holder = cluster.stores[0] / NAME
        synthetic.create(holder, "tiny")  # only node 0 has the files
        with exo_lab.Engine(holder) as eng:
            want = eng.generate(PROMPT, max_tokens=16, temperature=0).text()
        yield Stores(cluster, holder, want, {n.name: n.id for n in cluster.nodes})


@pytest.fixture(scope="module")
def first_launch(stores: Stores):
    """Layers 0-1 on node 0, 2-3 on node 1: node 1 fetches the last stage's tensors."""
    plan = stores.plan(stores.holder, "local-0")
    return plan, stores.generate(plan)


def _refused(call) -> int:
    with pytest.raises(RequestError) as err:
        call()
    return err.value.status or 0


def test_a_fetched_shard_is_used_but_never_listed_served_or_checksummed(stores: Stores, first_launch):
    plan, text = first_launch
    assert text == stores.want
    b = stores.agent("local-1")
    assert NAME not in b.json("GET", "/models")["models"]
    assert _refused(lambda: b.json("GET", f"/models/{NAME}")) == 404
    for fname in ("config.json", "model.safetensors"):
        assert _refused(lambda f=fname: b.read_range(f"/models/{NAME}/files/{f}", 0, 8)) == 404
    ranges = {"ranges": [["model.safetensors", 0, 1024]]}
    assert _refused(lambda: b.json("POST", f"/models/{NAME}/checksums", ranges)) == 404
    assert not (stores.cluster.stores[1] / NAME).exists()

    area = stores.cluster.stores[1] / ".partial" / NAME
    manifest = json.loads((area / MANIFEST).read_text())
    start, end = next(r.layers for r in plan.ranks if r.node_id == stores.ids["local-1"])
    fetched = set(manifest["tensors"])
    assert fetched and all(
        (n.startswith("model.layers.") and start <= int(n.split(".")[2]) < end)
        or n.startswith(("lm_head", "model.norm"))
        for n in fetched
    )
    assert not any("embed_tokens" in n for n in fetched)  # the first stage's, not ours
    total = sum(t.nbytes for t in read_tensor_index(stores.holder))
    assert manifest["bytes_fetched"] < total * 0.75
    # the sparse copy takes only the fetched bytes on disk
    used = sum(p.stat().st_blocks * 512 for p in area.glob("*.safetensors"))
    assert used < total * 0.75

    assert stores.generate(plan) == stores.want  # the same placement again: nothing is fetched twice
    assert json.loads((area / MANIFEST).read_text())["bytes_fetched"] == manifest["bytes_fetched"]


def test_a_replacement_onto_a_partial_copy_fetches_what_it_lacks(stores: Stores, first_launch):
    """Node 1 now runs layers 0-1, which it never fetched: it fetches them (no zeros), and then holds it all."""
    assert stores.generate(stores.plan(stores.holder, "local-1")) == stores.want
    copy = stores.cluster.stores[1] / NAME
    assert not (copy.parent / ".partial" / NAME).exists() and not (copy / MANIFEST).exists()  # promoted: a model now
    b, a = stores.agent("local-1"), stores.agent("local-0")
    assert NAME in b.json("GET", "/models")["models"]
    size = (stores.holder / "model.safetensors").stat().st_size
    ranges = {"ranges": [["model.safetensors", 0, size]]}
    assert b.json("POST", f"/models/{NAME}/checksums", ranges) == a.json("POST", f"/models/{NAME}/checksums", ranges)


KILLED_FETCH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from exo_lab.cluster.fetch import fetch_tensors

    def die(done, total):
        os.kill(os.getpid(), signal.SIGKILL)  # killed as soon as the first tensor is written

    fetch_tensors(sys.argv[1], os.environ["KEY"], sys.argv[2], Path(sys.argv[3]), lambda n: True, die)
    """
)


def test_a_fetch_killed_half_way_is_not_a_model_and_the_next_one_resumes(stores: Stores):
    name = "tiny-killed"
    model = stores.cluster.stores[0] / name
    shutil.copytree(stores.holder, model)
    copy = stores.cluster.stores[1] / name
    source = stores.cluster.address_of(stores.ids["local-0"])
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_FETCH, source, name, str(copy)],
        env={**os.environ, "KEY": stores.cluster.cluster_key},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    b = stores.agent("local-1")
    assert name not in b.json("GET", "/models")["models"]
    assert _refused(lambda: b.read_range(f"/models/{name}/files/config.json", 0, 8)) == 404
    assert stores.generate(stores.plan(model, "local-1")) == stores.want  # resumes, loads no zeros


def test_model_files_need_a_signature(stores: Stores):
    import urllib.error
    import urllib.request

    addr = stores.cluster.address_of(stores.ids["local-0"])
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{addr}/models/{NAME}/files/config.json", timeout=10)
    assert err.value.code == 401
