"""Ports and environment variables: every default port and every ``EXO_LAB_*`` variable, in one place.

Code reads an ``EXO_LAB_*`` variable only through its accessor here, so this module is the list
of what the environment can change. Each accessor takes an optional ``env`` mapping (default:
``os.environ``), which is how a child process's environment is checked before it starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

API_PORT = 52415  #: OpenAI / Anthropic / Ollama API (``exo-lab up``, ``exo-lab serve``, ``exo_lab.serve``)
AGENT_PORT = 52416  #: node agent (``exo-lab node``)
PROBE_PORT = 52417  #: a node agent's link probes (its port + 1 unless told otherwise)
DASHBOARD_PORT = 52418  #: Panel dashboard (``exo-lab dashboard``)

#: prefill chunk (tokens): a long prompt runs through the layers in chunks this long, and streams through a
#: pipeline's stages in them (:mod:`exo_lab.engine.pipeline`: stage 2 works on chunk 1 while stage 1 works on chunk
#: 2); the cost model predicts TTFT with the same chunks. On a CPU 256 whatever the stages: MLX's CPU attention
#: materializes each chunk's query-by-key scores, and a 2048-token llama-1b prompt on this project's 2-core machine
#: prefilled in 65.2 s at once, 53.0 in chunks of 512, 52.3 of 256, 54.3 of 128 (fp32), and a pipeline's first and
#: last chunks cross the stages alone (8 chunks of a 2048-token prompt, not 4). On a GPU, mlx_lm's 2048 for one
#: stage and 512 for a pipeline.
CPU_PREFILL_STEP = 256
#: the chunk where every rank computes in q8/q4 on a CPU: exo_lab's ``quant_matmul`` is as fast on 64 rows of x as
#: on 256 (llama-1b q4, a 2048-token prompt on one core: 43.9 tok/s in chunks of 64, 42.4 of 256; fp32 and bf16w
#: lose 22% at 64), and a pipeline's last stage computes the last chunk after the other stages are done: a quarter
#: of the chunk, a quarter of that wait
CPU_QUANTIZED_PREFILL_STEP = 64
GPU_PREFILL_STEP = 2048
GPU_PIPELINE_PREFILL_STEP = 512


def prefill_step(stages: int, gpu: bool, quantized: bool = False) -> int:
    """Tokens per prefill chunk of an instance of ``stages`` stages computing on a GPU (else a CPU);
    ``quantized``: every rank computes in q8/q4 (``exo_lab.models.formats.all_quantized``)."""
    if not gpu:
        return CPU_QUANTIZED_PREFILL_STEP if quantized else CPU_PREFILL_STEP
    return GPU_PIPELINE_PREFILL_STEP if stages > 1 else GPU_PREFILL_STEP


#: on a CPU, a one-stage instance decodes a step ahead only where building a step's graph takes at least this
#: share of the step (:mod:`exo_lab.engine.lookahead`; the cost model predicts with the same rule). Measured on
#: two cores, served, ahead / not: llama-1b fp32 (a share of ~0.004) 0.95x, q8 (0.036-0.049) 0.97x, q4
#: (0.051-0.073) 1.08x and 1.13x, the tiny models (0.16-0.18) 1.11-1.31x. On an AVX2 host (benchmarks/lookahead.py
#: --dtype, six rounds): q8 (0.034-0.061, so 0.05 was a coin toss) 1.14x, fp32 (0.011-0.015) 1.01x (0.98x in a
#: step loop); bf16w's share there 0.016-0.024
LOOKAHEAD_MIN_BUILD_SHARE = 0.03
#: the largest all-reduce (or gather, all ranks' parts together) a tensor group of more than two ranks sends
#: along a chain of its own sockets (:mod:`exo_lab.engine.peer_link`; a decode step's: up to 32 rows of a
#: 2048-wide model in fp32); larger ones go round MLX's ring, whose hops carry a k-th of the bytes each, not all
#: of them. The cost model predicts with the same rule.
CHAIN_MAX_BYTES = 256 * 1024

# the variables (names, so that code starting a process can set them)
CLUSTER_KEY = "EXO_LAB_CLUSTER_KEY"
API_KEY = "EXO_LAB_API_KEY"
CACHE_DIR = "EXO_LAB_CACHE_DIR"
MODELS_DIR = "EXO_LAB_MODELS_DIR"
RUNTIME_DIR = "EXO_LAB_RUNTIME_DIR"
STATE_DIR = "EXO_LAB_STATE_DIR"
BLAS = "EXO_LAB_BLAS"
SMALL_GEMM = "EXO_LAB_SMALL_GEMM"
LOOKAHEAD = "EXO_LAB_LOOKAHEAD"
PEER_LINK = "EXO_LAB_PEER_LINK"
WORKER_BATCH = "EXO_LAB_WORKER_BATCH"
ROW_POOL = "EXO_LAB_ROW_POOL"
POOL_CHUNKS = "EXO_LAB_POOL_CHUNKS"
LANES = "EXO_LAB_LANES"
WORKER_LOG = "EXO_LAB_WORKER_LOG"
DASHBOARD_CONNECT = "EXO_LAB_DASHBOARD_CONNECT"
DASHBOARD_BENCH = "EXO_LAB_DASHBOARD_BENCH"
DASHBOARD_URL = "EXO_LAB_DASHBOARD_URL"
SIM = "EXO_LAB_SIM"
SIM_HOST = "EXO_LAB_SIM_HOST"
SIM_RUN_DIR = "EXO_LAB_SIM_RUN_DIR"

#: every variable with what it does (ARCHITECTURE.md and ``exo-lab --help`` can list them)
VARIABLES: dict[str, str] = {
    CLUSTER_KEY: "shared secret of the cluster (default: the node state dir's cluster.key)",
    API_KEY: "key API clients must send (default: none; loopback only)",
    CACHE_DIR: "root of the cache (default: $XDG_CACHE_HOME/exo_lab)",
    MODELS_DIR: "model store (default: <cache>/models)",
    RUNTIME_DIR: "coordinator registrations (default: <cache>/run)",
    STATE_DIR: "node agent state: id, key, profile (default: $XDG_STATE_HOME/exo_lab/node)",
    BLAS: "'reference' keeps MLX's bundled BLAS instead of OpenBLAS",
    SMALL_GEMM: "'0' sends decode-sized fp32 matmuls to OpenBLAS too (default: exo_lab's kernel, exo_lab/native)",
    LOOKAHEAD: "one-stage instances build each decode step while the one before computes: 'auto' (default: where "
    "it pays), 'always', '0' (never; nor do a pipeline's stages build a step before its input comes)",
    PEER_LINK: "'0' sends a tensor pair's all-reduces and a pipeline's hidden states through MLX's ring "
    "(default: sockets of their own, exo_lab/native/peer_sum.cpp)",
    WORKER_BATCH: "'0' leaves a shard worker's threads under the default scheduling policy (default: SCHED_BATCH, "
    "so that on a shared core they take turns by time slice: exo_lab/engine/thread_policy.py)",
    ROW_POOL: "'0' splits a decode product's weight rows over OpenMP's threads in fixed halves (default: chunks the "
    "calling thread and helper threads claim as they come, exo_lab/native/weight_matmul.cpp's RowPool)",
    POOL_CHUNKS: "chunks to each thread's even share of a decode product in the RowPool (default: 3); '0': chunks of "
    "128 KB whatever the product (the split before)",
    LANES: "'0' keeps q4 weights in MLX's order (default: where exo_lab's AVX2 kernel has it, each block of 8 groups "
    "of a row laid out a group a lane at load, exo_lab/models/qmatmul.py's use_lanes)",
    WORKER_LOG: "log level of shard workers (default: INFO)",
    DASHBOARD_CONNECT: "agents (host:port,...) the dashboard app connects to",
    DASHBOARD_BENCH: "a bench result JSON the dashboard app shows",
    DASHBOARD_URL: "URL of a running dashboard, linked from the JupyterLab panel",
    SIM: "set by a sim in its nodes' environment: the sim's name",
    SIM_HOST: "set by a sim in its nodes' environment: the simulated host",
    SIM_RUN_DIR: "where sims record what they created (default: /run/exo_lab/sim or $XDG_RUNTIME_DIR)",
}


def _get(name: str, env: Mapping[str, str] | None) -> str | None:
    value = (os.environ if env is None else env).get(name)
    return value or None  # set but empty means unset


def cluster_key(env: Mapping[str, str] | None = None) -> str | None:
    return _get(CLUSTER_KEY, env)


def api_key(env: Mapping[str, str] | None = None) -> str | None:
    return _get(API_KEY, env)


def cache_dir(env: Mapping[str, str] | None = None) -> str | None:
    return _get(CACHE_DIR, env)


def models_dir(env: Mapping[str, str] | None = None) -> str | None:
    return _get(MODELS_DIR, env)


def runtime_dir(env: Mapping[str, str] | None = None) -> str | None:
    return _get(RUNTIME_DIR, env)


def state_dir(env: Mapping[str, str] | None = None) -> str | None:
    return _get(STATE_DIR, env)


def blas(env: Mapping[str, str] | None = None) -> str:
    """``openblas`` (the default) or ``reference``."""
    return (_get(BLAS, env) or "openblas").lower()


def small_gemm(env: Mapping[str, str] | None = None) -> bool:
    """Whether decode-sized fp32 matmuls use exo_lab's kernel (:mod:`exo_lab.native`); ``0`` turns it off."""
    return (_get(SMALL_GEMM, env) or "1") not in ("0", "off", "false", "no")


def lanes(env: Mapping[str, str] | None = None) -> bool:
    """Whether q4 weights are laid out in lane order at load where exo_lab's kernel has it
    (:func:`exo_lab.models.qmatmul.use_lanes`); ``0`` keeps MLX's order."""
    return (_get(LANES, env) or "1") not in ("0", "off", "false", "no")


def peer_link(env: Mapping[str, str] | None = None) -> bool:
    """Whether a tensor pair, and a pipeline's neighbouring one-rank stages, send over sockets of their own
    (:mod:`exo_lab.engine.peer_link`); ``0`` keeps MLX's ring."""
    return (_get(PEER_LINK, env) or "1") not in ("0", "off", "false", "no")


def worker_batch(env: Mapping[str, str] | None = None) -> bool:
    """Whether a shard worker's threads run under ``SCHED_BATCH`` (:mod:`exo_lab.engine.thread_policy`); ``0``
    keeps the default policy."""
    return (_get(WORKER_BATCH, env) or "1") not in ("0", "off", "false", "no")


def lookahead(env: Mapping[str, str] | None = None) -> str:
    """Whether one-stage instances decode a step ahead (:mod:`exo_lab.engine.lookahead`): ``auto`` (the default:
    where a rank has a core to spare), ``always``, or ``off`` (``0``; a pipeline's stages then also wait for a
    step's input before they build it: :mod:`exo_lab.engine.pipeline`). Read by each worker at its start."""
    value = (_get(LOOKAHEAD, env) or "auto").lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "always" if value == "always" else "auto"


def worker_log_level(env: Mapping[str, str] | None = None) -> str:
    return (_get(WORKER_LOG, env) or "INFO").upper()


def dashboard_connect(env: Mapping[str, str] | None = None) -> list[str]:
    """Agent addresses from ``host:port,host:port``."""
    return [a.strip() for a in (_get(DASHBOARD_CONNECT, env) or "").split(",") if a.strip()]


def dashboard_bench(env: Mapping[str, str] | None = None) -> str | None:
    return _get(DASHBOARD_BENCH, env)


def dashboard_url(env: Mapping[str, str] | None = None) -> str | None:
    return _get(DASHBOARD_URL, env)


def sim(env: Mapping[str, str] | None = None) -> str | None:
    return _get(SIM, env)


def sim_host(env: Mapping[str, str] | None = None) -> str | None:
    return _get(SIM_HOST, env)


def sim_run_dir(env: Mapping[str, str] | None = None) -> str | None:
    return _get(SIM_RUN_DIR, env)
