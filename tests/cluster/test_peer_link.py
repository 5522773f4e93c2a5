"""A pair's own socket (``exo_lab.engine.peer_link``): two real ranks form an MLX ring on loopback, connect
their link, and sum, gather and send over it: the ring's bits, for small and large messages; a rank that wants no link
leaves both on the ring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.net import free_port

pytestmark = pytest.mark.slow

RANK = """
import json
import exo_lab
import mlx.core as mx
from exo_lab.engine.group import form_group
from exo_lab.engine.peer_link import open_link
group = form_group("ring")
rank = group.rank()
link = open_link(group, 1 - rank)
same = []
for shape, dtype in [((1, 2048), mx.float32), ((3, 5, 64), mx.bfloat16), ((7, 33), mx.float16), ((1024, 1024), mx.float32)]:
    mx.random.seed(rank)
    x = (mx.random.normal(shape) * 50).astype(dtype)
    ring = mx.distributed.all_sum(x, group=group)
    mine = link.sum(x) if link is not None else ring
    same.append(bool(mx.array_equal(mine, ring).item()) and mine.dtype == dtype)
strided = mx.arange(24, dtype=mx.float32).reshape(4, 6).T * (rank + 1)  # not row-contiguous
if link is not None:
    same.append(bool(mx.array_equal(link.sum(strided), mx.distributed.all_sum(strided, group=group)).item()))
gathered = []  # the pair's gather over the link: the ring's bytes, in rank order (a view and 4 MB included)
if link is not None:
    for shape, dtype in [((1, 64128), mx.float32), ((2, 3, 5), mx.int32), ((1024, 1024), mx.float32)]:
        mx.random.seed(rank + 7)
        x = (mx.random.normal(shape) * 50).astype(dtype)
        gathered.append(bool(mx.array_equal(link.gather(x, rank == 0), mx.distributed.all_gather(x, group=group)).item()))
    gathered.append(bool(mx.array_equal(link.gather(strided, rank == 0), mx.distributed.all_gather(strided, group=group)).item()))
moved = []  # rank 0 sends over the link and over the ring, rank 1 receives both: the same bytes
if link is not None:
    for shape, dtype in [((1, 1, 2048), mx.float32), ((2, 9, 64), mx.bfloat16), ((1024, 1024), mx.float32)]:
        mx.random.seed(99)
        x = (mx.random.normal(shape) * 50).astype(dtype)
        if rank == 0:
            mx.eval(link.send(x.T))  # a strided view goes in row order
            mx.eval(mx.distributed.send(x.T, 1, group=group))
        else:
            over_link = link.recv(x.T.shape, dtype)
            mx.eval(over_link)
            over_ring = mx.distributed.recv(x.T.shape, dtype, 0, group=group)
            moved.append(bool(mx.array_equal(over_link, over_ring).item() and mx.array_equal(over_link, x.T).item()))
print(json.dumps({"link": link is not None, "same": same, "gathered": gathered, "moved": moved}))
"""


CHAIN = """
import json
import exo_lab
import mlx.core as mx
from exo_lab.engine.group import form_group
from exo_lab.engine.peer_link import chain_sum, open_chain
group = form_group("ring")
rank, world = group.rank(), group.size()
chain = [2, 0, 1][:world]  # a pipeline's stages need not be in rank order
links = open_chain(group, chain)
i = chain.index(rank)
before = links.get(chain[i - 1]) if i > 0 else None
after = links.get(chain[i + 1]) if i + 1 < world else None
sums = []
for n in (1, 7, 4096):
    x = mx.arange(n, dtype=mx.int32) * (rank + 3) + (2**31 - 1 - 5 * n)  # sums that wrap
    got = chain_sum(x, before, after) if links else mx.distributed.all_sum(x, group=group)
    sums.append(bool(mx.array_equal(got, mx.distributed.all_sum(x, group=group)).item()))
# a hidden state down the chain: each stage adds its rank and passes it on; the last compares with the ring
h = mx.zeros((1, 3, 64)) if before is None else before.recv((1, 3, 64), mx.float32)
h = h + rank
if after is not None:
    mx.eval(after.send(h))
total = mx.distributed.all_sum(mx.array([float(rank)]), group=group).item()
passed = after is not None or bool(mx.array_equal(h, mx.full((1, 3, 64), total)).item())
print(json.dumps({"links": sorted(links), "sums": sums, "passed": passed}))
"""


TENSOR_CHAIN = """
import hashlib, json
import exo_lab
import mlx.core as mx
import mlx.nn.layers.distributed as layers
from exo_lab import defaults
from exo_lab.engine.group import form_group
from exo_lab.engine.peer_link import ChainLinks, open_chain, route_tensor_all_reduces
group = form_group("ring")
rank, world = group.rank(), group.size()
chain = list(range(world))
links = open_chain(group, chain)
route_tensor_all_reduces(ChainLinks.of(links, chain, rank))
d = layers.mx.distributed  # what the sharded linears call
def part(r, shape, dtype):
    return (mx.random.normal(shape, key=mx.random.key(r)) * 30).astype(dtype)
out = {"links": sorted(links), "exact": [], "ring": [], "gather": [], "digests": []}
for shape, dtype in [((1, 2048), mx.float32), ((4, 1, 2048), mx.bfloat16), ((3, 8), mx.float16)]:
    got = d.all_sum(part(rank, shape, dtype), group=group)
    along = part(0, shape, dtype)
    for r in range(1, world):
        along = along + part(r, shape, dtype)  # the chain's order: rank 0's, plus rank 1's, ...
    out["exact"].append(bool(mx.array_equal(got, along).item()))
    out["digests"].append(hashlib.sha256(bytes(memoryview(mx.contiguous(got.astype(mx.float32))))).hexdigest())
    gathered = d.all_gather(part(rank, shape, dtype), group=group)
    ring = mx.distributed.all_gather(part(rank, shape, dtype), group=group)
    out["gather"].append(bool(mx.array_equal(gathered, ring).item()) and gathered.shape == ring.shape)
n = defaults.CHAIN_MAX_BYTES // 4 + 1  # past the chain's limit: MLX's ring, as it sums
big = part(rank, (n,), mx.float32)
out["ring"].append(bool(mx.array_equal(d.all_sum(big, group=group), mx.distributed.all_sum(big, group=group)).item()))
ints = mx.arange(5, dtype=mx.int32) * (rank + 1)
out["ring"].append(bool(mx.array_equal(d.all_sum(ints, group=group), mx.distributed.all_sum(ints, group=group)).item()))
# one graph with sums along the chain and round the ring, each depending on the one before (int32: exact either way)
def ipart(r, size, salt):
    return mx.arange(size, dtype=mx.int32) * (r + 1) + salt
a = d.all_sum(ipart(rank, 8, 1), group=group)
b = d.all_sum(ipart(rank, n, 0) + a[0], group=group)
c = d.all_sum(ipart(rank, 8, 2) + b[-1], group=group)
k = sum(r + 1 for r in range(world))
a0 = world * 1
b_last = k * (n - 1) + world * a0
out["mixed"] = c.tolist() == [k * i + world * (2 + b_last) for i in range(8)]
print(json.dumps(out))
"""


def ranks(tmp_path, envs, script=RANK, world=2):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(world)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts), **envs[r]},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        return [json.loads(p.communicate(timeout=90)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_pair_sums_and_sends_over_its_link_with_the_rings_bits(tmp_path):
    outs = ranks(tmp_path, [{}, {}])
    for out in outs:
        assert out["link"], out
        assert out["same"] == [True] * 5, out
        assert out["gathered"] == [True] * 4, out
    assert [o["moved"] for o in outs] == [[], [True] * 3], outs


def test_a_rank_that_wants_no_link_keeps_both_on_the_ring(tmp_path):
    outs = ranks(tmp_path, [{}, {"EXO_LAB_PEER_LINK": "0"}])
    assert [o["link"] for o in outs] == [False, False]
    assert all(o["same"] == [True] * 4 for o in outs), outs


def test_a_chain_of_stages_links_neighbours_and_sums_along_it(tmp_path):
    outs = ranks(tmp_path, [{}] * 3, script=CHAIN, world=3)
    assert [o["links"] for o in outs] == [[1, 2], [0], [0]]  # the chain 2 - 0 - 1
    assert all(o["sums"] == [True] * 3 and o["passed"] for o in outs), outs


def test_a_chain_where_one_rank_wants_no_link_stays_on_the_ring(tmp_path):
    outs = ranks(tmp_path, [{}, {}, {"EXO_LAB_PEER_LINK": "0"}], script=CHAIN, world=3)
    assert [o["links"] for o in outs] == [[], [], []]


def test_a_tensor_group_of_three_sums_and_gathers_along_its_chain(tmp_path):
    """Beyond a pair, a tensor group's small all-reduces go along a chain of sockets: in rank order, the same
    bits on every rank; gathers give the ring's; sums past CHAIN_MAX_BYTES go round the ring."""
    outs = ranks(tmp_path, [{}] * 3, script=TENSOR_CHAIN, world=3)
    assert [o["links"] for o in outs] == [[1], [0, 2], [1]]
    for o in outs:
        assert o["exact"] == [True] * 3 and o["gather"] == [True] * 3 and o["ring"] == [True] * 2 and o["mixed"], o
    assert len({tuple(o["digests"]) for o in outs}) == 1, outs
