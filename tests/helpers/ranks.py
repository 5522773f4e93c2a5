"""Run a model as real MLX ranks (one process each, ring backend on loopback) and as one process.

:func:`ranks_run` starts ``tests/helpers/rank_logits.py`` once per rank and returns the last
stage's logits for a prompt (and, when asked, the greedy tokens the ranks generate in lock
step); :func:`single_process_logits` and :func:`single_process_tokens` are the references, with
the same prefill chunking, from ``mlx_lm`` alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from tests.helpers.net import free_port

RANK_SCRIPT = Path(__file__).resolve().parent / "rank_logits.py"
CHUNK = 64  # prefill chunk of both sides (rank_logits.py uses the same)


def single_process_logits(path: Path, prompt: list[int]) -> np.ndarray:
    """The last position's logits of the whole model in one process (``mlx_lm.load``, chunked prefill)."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model = load(str(path))[0]
    cache = make_prompt_cache(model)
    toks = mx.array(prompt)
    pos = 0
    while len(prompt) - pos > 1:
        n = min(CHUNK, len(prompt) - pos - 1)
        model(toks[pos : pos + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        pos += n
    return np.array(model(toks[pos:][None], cache=cache)[:, -1, :].astype(mx.float32))


def single_process_tokens(path: Path, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of the whole model in one process (``mlx_lm``'s ``generate_step``)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model = load(str(path))[0]
    out = generate_step(mx.array(prompt), model, max_tokens=n, prefill_step_size=CHUNK)
    return [int(t) for t, _ in out]


def ranks_run(
    path: Path, tmp_path: Path, splits, n: int, prompt: list[int], tokens: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Logits from ``n`` rank processes (``splits``: layers per stage, or ``"tensor"``); and ``tokens`` greedy tokens."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n)]))
    out = tmp_path / "logits.npy"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(RANK_SCRIPT),
                str(path),
                json.dumps(splits),
                json.dumps(prompt),
                str(out),
                str(tokens),
            ],
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
        )
        for r in range(n)
    ]
    try:
        assert [p.wait(120) for p in procs] == [0] * n
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    generated = json.loads(out.with_suffix(".tokens.json").read_text()) if tokens else []
    return np.load(out), generated


def ranks_logits(path: Path, tmp_path: Path, splits, n: int, prompt: list[int]) -> np.ndarray:
    """Only the logits of :func:`ranks_run`."""
    return ranks_run(path, tmp_path, splits, n, prompt)[0]
