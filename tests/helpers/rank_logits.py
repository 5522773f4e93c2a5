"""Run as one MLX rank: print the last stage's logits for a prompt (for bit-exactness tests).

Usage: MLX_RANK=r MLX_HOSTFILE=hosts.json python tests/rank_logits.py MODEL_DIR SPLITS_JSON PROMPT_JSON OUT.npy [N]

With N > 0 the ranks then generate N greedy tokens in lock step (``Lockstep.generate``) and the
sampling rank writes them to OUT with the suffix ``.tokens.json``. A tensor pair sums over its own socket
(:mod:`exo_lab.engine.peer_link`), a larger tensor group along a chain of them, and a pipeline's
neighbouring stages hand hidden states over them, unless ``EXO_LAB_PEER_LINK=0``.
"""

import json
import sys
from pathlib import Path

import exo_lab  # noqa: F401  (first: it preloads OpenBLAS before mlx is imported)

# isort: split

import mlx.core as mx
import numpy as np

from exo_lab.engine.lockstep import Layout, Lockstep
from exo_lab.engine.peer_link import ChainLinks, open_chain, open_link, route_tensor_all_reduces
from exo_lab.engine.shard import ShardSpec, load_shard


def main() -> None:
    model_dir, splits, prompt, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    n_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    links = {}
    if splits == "tensor":  # every rank holds every layer, split by heads and MLP
        ranks = list(range(group.size()))
        link = open_link(group, 1 - rank) if group.size() == 2 else None
        if link is not None:  # a pair sums over its own socket, as a worker's does
            route_tensor_all_reduces(link)
        elif group.size() > 2:  # more ranks sum a step's small all-reduces along a chain of sockets, as workers do
            links = open_chain(group, ranks)
            if links:
                route_tensor_all_reduces(ChainLinks.of(links, ranks, rank))
        spec = ShardSpec(0, cfg["num_hidden_layers"], cfg["num_hidden_layers"])
        shard, _ = load_shard(model_dir, spec, tensor_group=group)
        layout = Layout(rank, (tuple(ranks),))
    else:
        start = sum(splits[:rank])
        spec = ShardSpec(start, start + splits[rank], cfg["num_hidden_layers"])
        shard, _ = load_shard(model_dir, spec)
        layout = Layout(rank, tuple((i,) for i in range(group.size())))
        links = open_chain(group, list(range(group.size())))  # neighbours hand hidden states over, as workers do
    act = getattr(mx, cfg["torch_dtype"])
    ls = Lockstep(shard, group, layout, cfg["hidden_size"], act, prefill_step_size=64, links=links)
    cache = shard.make_cache()
    tokens = mx.array(prompt, mx.int32)
    pos = 0
    while len(prompt) - pos > 1:  # the same chunking as generate_step
        n = min(64, len(prompt) - pos - 1)
        o = ls._forward(tokens[pos : pos + n][None], cache, logits=False)
        mx.eval(o, [c.state for c in cache])
        pos += n
    o = ls._forward(tokens[pos:][None], cache, logits=True)
    mx.eval(o)
    samples = layout.last and rank == layout.stages[-1][0]
    if samples:
        np.save(out, np.array(o[:, -1, :].astype(mx.float32)))
    if n_tokens:
        tokens = list(ls.generate(prompt, n_tokens, lambda lp: mx.argmax(lp, axis=-1), lambda: False, greedy=True))
        if samples:
            Path(out).with_suffix(".tokens.json").write_text(json.dumps(tokens))
    ls.barrier()


if __name__ == "__main__":
    main()
