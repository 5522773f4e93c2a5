"""Benchmarks: measured against predicted, across plans (``exo-lab bench``, ``cluster.bench``).

For each plan: launch it, warm up, then run prompts of exactly ``pp`` tokens
(after the chat template) that generate exactly ``tg`` tokens (EOS ignored),
``repeat`` times one at a time and ``repeat`` times ``c`` at once for every
concurrency level ``c``; read the engine's usage (TTFT, prompt and generation
tokens/s), each node's peak worker memory, and delete the instance. Beside
every measurement stands the cost model's prediction for the same request
shape (:func:`predict`), so the ratio says how good the model is.

What is measured and how:

- ``ttft_s``, ``decode_tps``, ``engine_prompt_tps``: rank 0's own timings
  (``Usage``): from the start of the request on rank 0 to its first token,
  and ``(tg - 1) / time of the remaining tokens``; medians over ``repeat``
  runs with min, max and standard deviation beside them.
- ``prefill_tps``: ``pp / (TTFT - one decode step)``: the planner's
  definition (prefill without the first token's step), so ratios compare like
  with like; the engine's ``pp / TTFT`` is ``engine_prompt_tps``.
- concurrency: ``c`` requests submitted at once; aggregate tokens/s is every
  completion token over the wall time from submit to the last token. An
  instance runs requests one after another in lock step, so its predicted
  aggregate is ``tg / (TTFT + (tg - 1) / decode tok/s)`` at every ``c``.
- memory: each worker's peak resident set (the node agent reads ``VmHWM``),
  summed per node, beside the plan's reservation.
- bytes per link: computed from the plan, not measured (loopback and veth
  counters mix every process's traffic): a pipeline hop carries
  ``hidden * act_bytes`` per token (``pp`` of them at prefill, one per
  generated token after); a tensor group's ring all-reduce sends
  ``2 (k - 1) / k * hidden * act_bytes`` per all-reduce, two per layer.

Calibration (``calibrate=True``) fits three constants of the cost model per
host: an efficiency factor on the decode weight-read rate, one on prefill
FLOP/s, and a per-message overhead added to every hop and all-reduce step
(framework and scheduling time the link probes do not see). The fit minimises
the mean absolute percentage error of decode tok/s and TTFT over the plans that
ran, the error before and after is reported on the same measurements, and the
constants are stored with each node's profile (``POST /node/calibration``),
from where the planner's :class:`~exo_lab.placement.cost.NodeRates` and
:func:`~exo_lab.placement.cost.calibrated_link` apply them. Nodes with the same
host name and profile cache key (one machine's agents) share one set.

Sweeps (:mod:`exo_lab.bench.sweep`): ``pp``, ``tg`` and ``concurrency`` each take a list, and every
combination runs on every plan (``points``, with median, p10/p90 and stdev over the requests).
The same sweep measures what already runs: an instance of the cluster (:func:`bench_instance`,
``exo-lab bench --instance ID``; peak memory per node from its agents) or any OpenAI-compatible
server (:func:`bench_url`, ``exo-lab bench --url``: exo_lab, mlx_lm.server, exo, llama.cpp's server
on the same prompts; timings from the streamed chunks, :mod:`exo_lab.bench.endpoint`).

The JSON document (``BenchResult.to_json``) carries ``"schema": "exo_lab.bench/2"`` (``/1``
documents, from before sweeps, are still read), what was measured (``target``), the sizes swept
(``sweep``), and the topology, node profiles and model card, so a result can be compared with a
later one or re-predicted offline; :data:`JSON_SCHEMA` describes it.
"""

from exo_lab.bench.calibrate import fit_calibration, store_calibration
from exo_lab.bench.prompts import exact_prompt
from exo_lab.bench.results import (
    JSON_SCHEMA,
    METRICS,
    SCHEMA,
    BenchError,
    BenchResult,
    Calibration,
    ConcurrencyPoint,
    LinkTraffic,
    PlanBench,
    SweepPoint,
    validate,
)
from exo_lab.bench.runner import link_traffic, run
from exo_lab.bench.sweep import bench_instance, bench_url
from exo_lab.placement.predict import Predictor, aggregate_tps, decode_aggregate_tps, predict

__all__ = [
    "JSON_SCHEMA",
    "METRICS",
    "SCHEMA",
    "BenchError",
    "BenchResult",
    "Calibration",
    "ConcurrencyPoint",
    "LinkTraffic",
    "PlanBench",
    "Predictor",
    "SweepPoint",
    "aggregate_tps",
    "decode_aggregate_tps",
    "bench_instance",
    "bench_url",
    "exact_prompt",
    "fit_calibration",
    "link_traffic",
    "predict",
    "run",
    "store_calibration",
    "validate",
]
