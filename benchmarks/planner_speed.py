"""How long the planner takes on 16- and 64-node clusters (target: < 1 s and < 5 s).

Run: .venv/bin/python benchmarks/planner_speed.py
"""

from __future__ import annotations

import random
import time

import exo_lab  # noqa: F401
from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
from exo_lab.models.card import card_from_config
from exo_lab.placement import plan

LLAMA_70B = dict(
    hidden_size=8192,
    num_hidden_layers=80,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    model_type="llama",
    tie_word_embeddings=False,
)


def random_cluster(n: int, seed: int = 0) -> Topology:
    """``n`` nodes of mixed size on a LAN, with a few fast cables."""
    rng = random.Random(seed)
    nodes = {}
    for i in range(n):
        mem = rng.choice([16, 32, 64, 128, 192]) * 2**30
        bw = rng.choice([50, 100, 400, 800])
        gpu = bw >= 400
        nodes[f"n{i}"] = NodeInfo(
            f"n{i}",
            f"node-{i}",
            [f"10.0.{i // 250}.{i % 250 + 1}"],
            profile={
                "memory_total_bytes": mem,
                "memory_available_bytes": int(mem * 0.9),
                "cpu_count": 8,
                "hostname": f"h{i}",
                "mlx_devices": ["cpu", "gpu"] if gpu else ["cpu"],
                "memory_bandwidth_gb_per_s": bw,
                "matmul_gflops": {
                    "bfloat16_m1": bw,
                    "bfloat16_m512": bw * 30,
                    "float32_m1": bw / 2,
                    "float32_m512": bw * 15,
                },
            },
        )
    links = []
    ids = list(nodes)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            fast = rng.random() < 0.1
            rtt = 0.05 if fast else rng.uniform(0.2, 2.0)
            mbit = 40000 if fast else rng.choice([1000, 2500, 10000])
            links.append(LinkProfile(a, b, nodes[a].addresses[0], nodes[b].addresses[0], rtt, rtt * 1.3, mbit, mbit))
    return Topology(nodes, links)


def main() -> None:
    card = card_from_config(LLAMA_70B, "llama-70b-shaped", "bfloat16")
    print(f"model: {card.name}, {card.weight_bytes / 1e9:.0f} GB of weights")
    for n, target in ((16, 1.0), (64, 5.0)):
        topo = random_cluster(n)
        t = time.perf_counter()
        plans = plan(topo, card)
        dt = time.perf_counter() - t
        verdict = "ok" if dt < target else "SLOWER THAN TARGET"
        print(
            f"{n:3d} nodes: {dt:6.3f} s (target < {target:.0f} s: {verdict}); {len(plans)} feasible, "
            f"{len(plans.infeasible)} infeasible; best: {plans.best.describe()} -> "
            f"{plans.best.decode_tps:.2f} tok/s"
        )


if __name__ == "__main__":
    main()
