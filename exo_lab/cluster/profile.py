"""DeviceProfile: what a node reports about its machine, measured where it matters.

Static facts (CPU, cores, MLX devices, BLAS) are read; memory is read live and
honours cgroups (v1 and v2), so a simulated node reports its own limit; matmul
throughput and memory bandwidth are measured with MLX microbenchmarks on the
default device, within a time budget (~5 s on a 2-core CPU).

How the microbenchmarks stay real and bounded:

- Each matmul is ``x @ W.T`` (as ``nn.Linear`` does) with K=2048 (Llama-1B
  hidden) in every weight format of :mod:`exo_lab.models.formats`: float32,
  bfloat16 and float16 (activations in the same dtype), q8 and q4
  (group 64, fp32 activations and scales, computed as the ranks do: :mod:`exo_lab.models.qmatmul`,
  ``quantized_matmul`` split over one CPU stream per core at M=1, dequantize + BLAS at M=512), bf16w and
  fp16w (16-bit weights, fp32 activations: :mod:`exo_lab.models.halfmatmul`; only where its kernel
  works). M=512 is
  prompt-like, M=1 decode-like; the planner picks each node's fastest format
  from these numbers.
- N (the number of weight rows) is sized per variant: a small probe (N=128)
  gives the rate, then N is the largest power of two whose iteration takes
  about a quarter of the variant's time slice, capped at 2048 for M=512; M=8 takes every row of the
  *stream* when that fits half the slice, M=1 whenever one pass takes at most 0.15 s (every format that
  reads rather than computes: a slice cut short by other work once left fp32's GEMV 128 MB, in the cache,
  and bf16w 16 MB, and a bf16 checkpoint went to fp32). The stream is one buffer of :func:`uncached_bytes`
  (twice the CPU's last-level cache, at least 256 MB, at most 1/8 of the available memory) that the
  M=1 and M=8 weights of every format are views of (a constant fill: no NaNs or subnormals in any
  format), so their weights come from memory, as a decode over many layers reads them: on a cloud host
  with a 480 MiB L3 the 32 MB of q4 weights these products read before sat in the cache and read at
  ~40 GB/s where a model's read at ~25. The shapes used are recorded in
  ``matmul_shapes`` ([M, K, N]); GFLOP/s = 2·M·K·N / t.
- Each variant gets an equal share of what is left of 90% of the budget: one
  warm-up, then the timed iterations that fit in its slice (at least 1, at
  most 10); the best iteration counts. On this project's 2-core CPU, bfloat16
  and q4 at M=512 end up at N=256..512 (~6 and ~3 GFLOP/s). The M=1 variants, which choose
  each node's format, are timed a second time after all the others (in reverse order) and
  keep the faster run: a burst of other work during one slice no longer decides a format.
- Weight-read bandwidth (M=1) = weight bytes (with q4 scales and biases) / t.
  ``memory_read_gb_per_s_reduce`` is ``mx.sum`` over the stream as fp32 (MLX
  CPU: one core); ``memory_read_gb_per_s_parallel`` the same sum split over one CPU stream
  per core (each stream has its own thread); ``memory_read_gb_per_s_gemv`` is the fp32 M=1
  rate (OpenBLAS may use every core); ``memory_bandwidth_gb_per_s`` is the largest.

- ``message_overhead_s``: what one message between two ranks costs beyond a plain socket exchange
  (:mod:`exo_lab.cluster.collective`: one ring rank against a peer that is never late, about 1 s).
- ``layer_overhead_s``: what one decoder layer costs per decoded token beyond its weights
  (:mod:`exo_lab.cluster.layer_overhead`: a stack of Llama layers of hidden 64, about 0.2 s).
- ``step_overhead_s``: what a decode step costs beyond its layers (the same small model whole against its
  layers alone, about 0.2 s); measured when a cached profile lacks it.

Bandwidth measured while other work runs comes out low (a node once reported 6.5 GB/s where
decode alone implied more), and a low number sticks in the per-hardware cache. So the bandwidth
is the best of every run kept for this hardware, with the time of the run that gave it
(``memory_bandwidth_measured_at``) and of the last run (``memory_bandwidth_checked_at``), and it
is measured again (:func:`check_bandwidth`, about 0.3 s a run) when a cached profile is loaded
whose bandwidth was last measured over an hour ago, and whenever it looks far off: a format's M=1 read rate or a measured decode speed
(:func:`implied_bandwidth`) beyond ``OFF_FACTOR`` times the profile's bandwidth. The matmuls, measured
under load, stick the same way: when the best bandwidth run reads ``OFF_FACTOR`` times faster than any read
of the run that measured them (:func:`matmuls_look_low`), the microbenchmarks run again (at most once an
hour) and each figure keeps the best of the runs (:func:`best_of`; ``matmul_runs`` counts them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from filelock import FileLock
from tqdm.auto import tqdm

from exo_lab import _blas, native, paths
from exo_lab.cluster.collective import measure_message_overhead
from exo_lab.cluster.layer_overhead import measure_layer_overhead, measure_step_overhead
from exo_lab.cluster.machine import (  # noqa: F401  (re-exported: the profile's facts without MLX)
    DeviceProfile,
    _cgroup_memory,
    boot_id,
    cpu_count,
    cpu_model,
    last_level_cache_bytes,
    memory_now,
)
from exo_lab.models import formats, halfmatmul, kernels, qmatmul

log = logging.getLogger(__name__)

_SCHEMA = 11  # bump when the microbenchmarks change, so old caches are not reused (11: q4 in lane order)
_K = 2048
_N_PROMPT_MAX = 2048
#: bytes a read of memory covers at least, whatever the caches say (Apple's system-level caches reach 96 MB)
_UNCACHED_MIN = 256 * 2**20
#: ... and at least this on a node with little memory (2048 rows of fp32)
_UNCACHED_FLOOR = 2048 * 2048 * 4
_N_PROBE = 128
_N_STREAM_PROBE = 4096
#: an M=1 product reads the whole stream when one pass takes at most this (formats that read, not compute)
_WHOLE_STREAM_S = 0.15
_MAX_ITERS = 10
_Q_GROUP = formats.GROUP_SIZE
OFF_FACTOR = 1.2  #: a read rate this much above the profile's bandwidth means the bandwidth is off
RECHECK_S = 0.3  #: time budget of one bandwidth run
RECHECK_AFTER_S = 3600.0  #: a cached profile whose bandwidth was last measured longer ago is measured again


def mlx_devices() -> list[str]:
    """MLX devices usable here: ``["cpu"]`` or ``["cpu", "gpu"]``."""
    gpu = False
    for backend in ("metal", "cuda"):
        module = getattr(mx, backend, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            gpu = True
    return ["cpu", "gpu"] if gpu else ["cpu"]


def gpu_info() -> tuple[str | None, int | None]:
    """(name, usable memory bytes) of the GPU, or (None, None) without one."""
    if "gpu" not in mlx_devices():
        return None, None
    info: dict[str, Any] = {}
    if hasattr(mx, "device_info"):
        info = dict(mx.device_info(mx.gpu))
    elif hasattr(mx, "metal") and hasattr(mx.metal, "device_info"):
        info = dict(mx.metal.device_info())
    name = info.get("device_name") or info.get("architecture")
    memory = next(
        (info[k] for k in ("max_recommended_working_set_size", "memory_size", "total_memory") if info.get(k)), None
    )
    return (str(name) if name else None), (int(memory) if memory else None)


def _static_facts() -> dict[str, Any]:
    gpu_name, gpu_memory = gpu_info()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "system": platform.system(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "boot_id": boot_id(),
        "mlx_version": mx.__version__,  # pyright: ignore[reportAttributeAccessIssue]  # in mlx.core, not its stub
        "mlx_devices": mlx_devices(),
        "blas": _blas.name(),
        "kernels": native.sources_digest(),
        "decode_rows_per_pass": kernels.decode_rows_per_pass(),
        "gpu_name": gpu_name,
        "gpu_memory_bytes": gpu_memory,
    }


def cache_key(facts: dict[str, Any] | None = None) -> str:
    """Hash of what decides the microbenchmark numbers on this machine."""
    facts = facts or _static_facts()
    keys = ("cpu_model", "cpu_count", "machine", "mlx_version", "blas", "kernels", "mlx_devices", "gpu_name")
    blob = json.dumps([_SCHEMA, *(facts[k] for k in keys)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- microbenchmarks ---------------------------------------------------------


def _seconds(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def _best_seconds(fn: Callable[[], mx.array], slice_s: float, warm: bool = False, best: float = math.inf) -> float:
    """The best of timed iterations of ``fn`` that fit in ``slice_s`` (at least one
    unless ``best`` is given; after a warm-up unless ``warm``)."""
    start = time.perf_counter()
    if not warm:
        _seconds(fn)
    for _ in range(_MAX_ITERS):
        if best < math.inf and time.perf_counter() - start + best > slice_s:
            break  # the next iteration would overrun the slice
        best = min(best, _seconds(fn))
    return best


def _sized_matmul(
    make: Callable[[int], tuple[Callable[[], mx.array], int]],
    n_max: int,
    slice_s: float,
    probe_rows: int = _N_PROBE,
    whole_s: float = 0.0,
) -> tuple[int, float, int]:
    """Probe with N=``probe_rows``, pick N for ~slice/4 per iteration (N=``n_max`` when that takes at most half the
    slice, or at most ``whole_s``), time it: (N, seconds, weight bytes)."""
    start = time.perf_counter()
    n = min(probe_rows, n_max)
    fn, nbytes = make(n)
    _seconds(fn)  # warm-up (first-call costs)
    probe = _seconds(fn)
    per_row = probe / n
    target = max(n, min(n_max, 2 ** int(math.log2(max(1.0, slice_s / 4 / max(per_row, 1e-12))))))
    if n_max * per_row <= max(slice_s / 2, whole_s):
        target = n_max  # every row the variant has (a decode-like product: all of the stream)
    remaining = lambda: max(0.0, slice_s - (time.perf_counter() - start))  # noqa: E731
    if target == n:
        return n, _best_seconds(fn, remaining(), warm=True, best=probe), nbytes
    fn, nbytes = make(target)
    # views of the stream have no first-call costs the probe did not pay: no warm-up pass over all of it
    return target, _best_seconds(fn, remaining(), warm=whole_s > 0), nbytes


def uncached_bytes(available_bytes: int, cache_bytes: int | None = None) -> int:
    """Bytes a read must cover to time memory rather than the caches: twice the last-level cache
    (``cache_bytes``, default this machine's), at least 256 MB, at most 1/8 of ``available_bytes`` (a small
    simulated node) but at least 16 MB; a multiple of one fp32 row of K=2048."""
    cache = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    wanted = max(_UNCACHED_MIN, 2 * cache)
    size = max(_UNCACHED_FLOOR, min(wanted, available_bytes // 8))
    return size - size % (_K * 4)


def _stream_rows(fmt: formats.Format) -> tuple[int, list[tuple[mx.Dtype, int]]]:
    """32-bit words one weight row of ``fmt`` takes, and its arrays as (dtype, elements per row): the weight,
    or a quantized format's codes, scales and biases."""
    if fmt.bits:
        parts = [(mx.uint32, _K * fmt.bits // 32), (mx.float32, _K // _Q_GROUP), (mx.float32, _K // _Q_GROUP)]
    else:
        parts = [(getattr(mx, fmt.held), _K)]
    return sum(n * d.size // 4 for d, n in parts), parts


def stream_capacity(stream: mx.array, fmt: formats.Format) -> int:
    """How many weight rows of ``fmt`` :func:`stream_weights` can lay over ``stream``."""
    return stream.size // _stream_rows(fmt)[0]


def stream_weights(stream: mx.array, fmt: formats.Format, n: int) -> list[mx.array]:
    """``n`` rows of ``fmt``'s weights (K=2048) as views of ``stream``'s bytes (fp32, row-contiguous; no copy):
    ``[weight]``, or a quantized format's ``[codes, scales, biases]``, one after the other in the stream."""
    _, parts = _stream_rows(fmt)
    flat = stream.reshape(-1)
    out, word = [], 0
    for dtype, per_row in parts:
        words = n * per_row * dtype.size // 4
        out.append(flat[word : word + words].view(dtype).reshape(n, per_row))
        word += words
    mx.eval(out)  # views now (~0.2 ms); evaluated inside a product's graph they were copied (0.7 s for 1 GB)
    return out


def _read_rates(weights: mx.array, slice_s: float) -> tuple[float, float]:
    """GB/s of ``mx.sum`` over ``weights`` on one stream, and split over one CPU stream per core."""
    parts = max(1, min(cpu_count(), weights.shape[0]))
    rows = weights.shape[0] // parts
    streams = qmatmul.cpu_streams(parts)
    blocks = [weights[i * rows : (i + 1) * rows] for i in range(parts)]
    one = _best_seconds(lambda: mx.sum(weights), slice_s / 2)
    every = _best_seconds(lambda: mx.stack([mx.sum(b, stream=s) for b, s in zip(blocks, streams)]).sum(), slice_s / 2)
    return weights.nbytes / one / 1e9, rows * parts * weights.shape[1] * weights.itemsize / every / 1e9


def measure_bandwidth(budget_s: float = RECHECK_S, rows: int | None = None) -> float:
    """Memory read GB/s now: the best of ``mx.sum`` on one stream, on one stream per core, and an
    fp32 M=1 matmul (the BLAS's GEMV, on every core), over ``rows`` x 2048 fp32 (default:
    :func:`uncached_bytes`)."""
    rows = rows or uncached_bytes(memory_now()[1]) // (_K * 4)
    weights = mx.full((rows, _K), 0.5, mx.float32)  # its pages written now, so the runs read memory
    x = mx.full((1, _K), 0.5, mx.float32)
    mx.eval(weights, x)
    gemv = weights.nbytes / _best_seconds(lambda: x @ weights.T, budget_s / 3) / 1e9
    best = max(*_read_rates(weights, budget_s * 2 / 3), gemv)
    weights = x = mx.zeros((0,))  # drop the test matrix before clearing MLX's cache
    mx.clear_cache()
    return best


def implied_bandwidth(weight_bytes_per_token: float, decode_tokens_per_s: float) -> float:
    """GB/s a measured decode read its weights at (a lower bound of the machine's bandwidth)."""
    return weight_bytes_per_token * decode_tokens_per_s / 1e9


def looks_off(profile: DeviceProfile, implied_gb_s: float = 0.0) -> bool:
    """Whether ``profile``'s bandwidth is below what was seen reading memory: a format's M=1 read
    rate, or ``implied_gb_s`` (:func:`implied_bandwidth` of a measured decode), beyond
    :data:`OFF_FACTOR` times it (or no bandwidth at all)."""
    seen = max([implied_gb_s, profile.memory_read_gb_per_s_gemv, *profile.matmul_weight_read_gb_per_s.values()])
    return profile.memory_bandwidth_gb_per_s <= 0 or seen > OFF_FACTOR * profile.memory_bandwidth_gb_per_s


def remeasured(profile: DeviceProfile, measured_gb_s: float, now: float | None = None) -> DeviceProfile:
    """``profile`` after one more bandwidth run giving ``measured_gb_s``: the best run kept, with its time."""
    now = time.time() if now is None else now
    runs = max(1, profile.memory_bandwidth_runs) + 1
    if measured_gb_s > profile.memory_bandwidth_gb_per_s:
        return replace(
            profile,
            memory_bandwidth_gb_per_s=measured_gb_s,
            memory_bandwidth_measured_at=now,
            memory_bandwidth_checked_at=now,
            memory_bandwidth_runs=runs,
        )
    return replace(profile, memory_bandwidth_checked_at=now, memory_bandwidth_runs=runs)


def check_bandwidth(
    profile: DeviceProfile, implied_gb_s: float = 0.0, budget_s: float = RECHECK_S, runs: int = 1
) -> DeviceProfile:
    """``profile`` with its bandwidth measured again (``runs`` runs, more when it :func:`looks_off`),
    keeping the best of every run."""
    if looks_off(profile, implied_gb_s):
        runs = max(runs, 3)
    for _ in range(runs):
        profile = remeasured(profile, measure_bandwidth(budget_s))
    if looks_off(profile, implied_gb_s):
        log.warning(
            "memory bandwidth %.1f GB/s is below what reads reached here (%.1f GB/s): measured under load?",
            profile.memory_bandwidth_gb_per_s,
            max([implied_gb_s, *profile.matmul_weight_read_gb_per_s.values()]),
        )
    return profile


def measure_profile(budget_s: float = 7.0, progress: bool = False) -> DeviceProfile:
    """Measure this machine now: static facts, live memory and the MLX microbenchmarks."""
    facts = _static_facts()
    start = time.perf_counter()
    deadline = start + 0.9 * budget_s
    arrays = {
        "weights": mx.random.uniform(-1.0, 1.0, (_N_PROMPT_MAX, _K), key=mx.random.key(0)),  # the M=512 products'
        # the M=1 and M=8 products' weights: their pages written now, so the runs read memory
        "stream": mx.full((uncached_bytes(memory_now()[1]) // (_K * 4), _K), 0.5, mx.float32),
        "x1": mx.random.uniform(-1.0, 1.0, (1, _K), key=mx.random.key(1)),
        "x8": mx.random.uniform(-1.0, 1.0, (8, _K), key=mx.random.key(3)),
        "x512": mx.random.uniform(-1.0, 1.0, (512, _K), key=mx.random.key(2)),
    }
    mx.eval(*arrays.values())
    log.debug("setup %.2f s", time.perf_counter() - start)

    def plain(dtype: mx.Dtype, x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            w = arrays["weights"][:n] if dtype == arrays["weights"].dtype else arrays["weights"][:n].astype(dtype)
            xs = x.astype(dtype)
            mx.eval(w, xs)
            return (lambda: xs @ w.T), w.nbytes

        return make

    def quantized(bits: int, x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            wq, scales, biases = mx.quantize(arrays["weights"][:n], group_size=_Q_GROUP, bits=bits)
            lanes = qmatmul.lanes_for(_K, _Q_GROUP, bits)  # laid out as the ranks hold it
            wq = qmatmul.to_lanes(wq) if lanes else wq
            mx.eval(wq, scales, biases)
            fn = lambda: qmatmul.matmul(x, wq, scales, biases, _Q_GROUP, bits, lanes=lanes)  # noqa: E731  (as the ranks do)
            return fn, wq.nbytes + scales.nbytes + biases.nbytes

        return make

    def widened(held: mx.Dtype, x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            w = arrays["weights"][:n].astype(held)
            mx.eval(w)
            return (lambda: halfmatmul.matmul(x, w)), w.nbytes  # as the bf16w/fp16w ranks do

        return make

    def streamed(fmt: formats.Format, x: mx.array) -> Callable[[int], tuple[Callable[[], mx.array], int]]:
        """A decode-like product: ``n`` rows of the stream's weights in ``fmt``, computed as the ranks do."""

        def make(n: int) -> tuple[Callable[[], mx.array], int]:
            ws = stream_weights(arrays["stream"], fmt, n)
            nbytes = sum(w.nbytes for w in ws)
            if bits := fmt.bits:
                wq, scales, biases = ws  # a constant fill: the same in lane order (where the ranks use it)
                lanes = qmatmul.lanes_for(_K, _Q_GROUP, bits)
                return (lambda: qmatmul.matmul(x, wq, scales, biases, _Q_GROUP, bits, lanes=lanes)), nbytes
            if fmt.widened:
                return (lambda: halfmatmul.matmul(x, ws[0])), nbytes  # as the bf16w/fp16w ranks do
            xs = x.astype(ws[0].dtype)
            mx.eval(xs)
            return (lambda: xs @ ws[0].T), nbytes

        return make

    variants = []
    for fmt in formats.FORMATS.values():
        if fmt.widened and not halfmatmul.available():
            continue  # no kernel on this machine: the planner never picks the format here
        rows = stream_capacity(arrays["stream"], fmt)
        variants.append((f"{fmt.name}_m1", streamed(fmt, arrays["x1"]), rows))
        variants.append((f"{fmt.name}_m8", streamed(fmt, arrays["x8"]), rows))
        if fmt.bits:
            prompt = quantized(fmt.bits, arrays["x512"])
        elif fmt.widened:
            prompt = widened(getattr(mx, fmt.held), arrays["x512"])
        else:
            prompt = plain(getattr(mx, fmt.name), arrays["x512"])
        variants.append((f"{fmt.name}_m512", prompt, _N_PROMPT_MAX))
    # the M=1 products choose each node's format: a burst of other work in one slice would keep a format off
    # the plans until the next run (a bf16w read at 3.8 GB/s beside fp16w's 30.9 once put a bf16 checkpoint in
    # fp32), so each is measured again after all the others, in reverse order, and keeps the faster run
    again = [v for v in reversed(variants) if v[0].endswith("_m1")]
    bar = _progress_bar(len(variants) + len(again) + 1) if progress else None
    steps_left = len(variants) + len(again) + 1

    def slice_s() -> float:
        return max(0.0, deadline - time.perf_counter()) / steps_left

    message = measure_message_overhead() or {}  # first: the matmuls' slices share what it leaves of the budget
    layer_s = _overhead(measure_layer_overhead, "per-layer")
    step_s = _overhead(measure_step_overhead, "per-step")
    reduce_gb_s, parallel_gb_s = _read_rates(arrays["stream"], slice_s())
    steps_left -= 1
    if bar:
        bar.update()

    gflops: dict[str, float] = {}
    read: dict[str, float] = {}
    shapes: dict[str, list[int]] = {}
    for name, make, n_max in [*variants, *again]:
        m = int(name.rsplit("_m", 1)[1])
        t0 = time.perf_counter()
        # a decode-like product is probed on 4096 rows (128 time the call more than its reads); an M=1 product
        # reads the whole stream unless that is slow (then the format computes, not reads): in a slice cut short
        # by other work, fewer rows sat in the cache and their format read faster than the others
        probe, whole = (_N_PROBE, 0.0) if m == 512 else (_N_STREAM_PROBE, _WHOLE_STREAM_S if m == 1 else 0.0)
        n, seconds, nbytes = _sized_matmul(make, n_max, slice_s(), probe, whole)
        log.debug("%s: N=%d, %.3f s per iteration, step %.2f s", name, n, seconds, time.perf_counter() - t0)
        if 2 * m * _K * n / seconds / 1e9 > gflops.get(name, 0.0):
            gflops[name] = 2 * m * _K * n / seconds / 1e9
            shapes[name] = [m, _K, n]
            if m == 1:
                read[name] = nbytes / seconds / 1e9
        steps_left -= 1
        if bar:
            bar.update()
    if bar:
        bar.close()
    arrays.clear()  # free the test matrices before clearing MLX's cache
    mx.clear_cache()
    elapsed = time.perf_counter() - start

    total, available = memory_now()
    facts = {**facts, "cache_key": cache_key(facts)}
    now = time.time()
    profile = DeviceProfile(
        memory_total_bytes=total,
        memory_available_bytes=available,
        benchmark_device=mx.default_device().type.name,
        matmul_gflops=gflops,
        matmul_weight_read_gb_per_s=read,
        matmul_shapes=shapes,
        memory_read_gb_per_s_reduce=reduce_gb_s,
        memory_read_gb_per_s_parallel=parallel_gb_s,
        memory_read_gb_per_s_gemv=read["float32_m1"],
        memory_bandwidth_gb_per_s=max(reduce_gb_s, parallel_gb_s, read["float32_m1"]),
        memory_bandwidth_measured_at=now,
        memory_bandwidth_checked_at=now,
        memory_bandwidth_runs=1,
        message_overhead_s=float(message.get("message_overhead_s", 0.0)),
        layer_overhead_s=layer_s,
        step_overhead_s=step_s,
        measured_at=now,
        matmul_runs=1,
        measure_seconds=elapsed,
        **facts,
    )
    log.info(
        "measured %s in %.1f s: %s GFLOP/s, %.1f GB/s",
        profile.cpu_model,
        elapsed,
        {k: round(v, 1) for k, v in gflops.items()},
        profile.memory_bandwidth_gb_per_s,
    )
    return profile


def _overhead(measure: Callable[[], float], what: str) -> float:
    """``measure()`` (:mod:`exo_lab.cluster.layer_overhead`), or 0 (not measured) when it fails."""
    try:
        return measure()
    except Exception as exc:  # mlx_lm missing or changed: the cost model goes without the term
        log.warning("could not measure the %s overhead: %s", what, exc)
        return 0.0


def matmuls_look_low(profile: DeviceProfile) -> bool:
    """Whether ``profile``'s microbenchmarks were taken under load: its best bandwidth run read memory
    :data:`OFF_FACTOR` times faster than any read of the run that measured the matmuls (whose own reads gave
    the bandwidth then; a 1-core node once kept bf16w decode at 7.7 GB/s where it reads 19 alone)."""
    reads = max(
        profile.memory_read_gb_per_s_gemv, profile.memory_read_gb_per_s_reduce, profile.memory_read_gb_per_s_parallel
    )
    return reads > 0 and profile.memory_bandwidth_gb_per_s > OFF_FACTOR * reads


def best_of(old: DeviceProfile, new: DeviceProfile) -> DeviceProfile:
    """Two microbenchmark runs of one machine as one profile: per matmul the faster (with its shape), the
    faster reads, the lower overheads, the best bandwidth (:func:`remeasured`); a calibration is dropped
    when a rate changed (it was fitted against the old ones)."""
    gflops, read, shapes = dict(old.matmul_gflops), dict(old.matmul_weight_read_gb_per_s), dict(old.matmul_shapes)
    for key, value in new.matmul_gflops.items():
        if value > gflops.get(key, 0.0):
            gflops[key] = value
            if key in new.matmul_shapes:
                shapes[key] = new.matmul_shapes[key]
            if key in new.matmul_weight_read_gb_per_s:
                read[key] = new.matmul_weight_read_gb_per_s[key]

    def lower(a: float, b: float) -> float:
        return min(v for v in (a, b) if v > 0) if a > 0 or b > 0 else 0.0

    merged = replace(
        old,
        matmul_gflops=gflops,
        matmul_weight_read_gb_per_s=read,
        matmul_shapes=shapes,
        memory_read_gb_per_s_reduce=max(old.memory_read_gb_per_s_reduce, new.memory_read_gb_per_s_reduce),
        memory_read_gb_per_s_gemv=max(old.memory_read_gb_per_s_gemv, new.memory_read_gb_per_s_gemv),
        memory_read_gb_per_s_parallel=max(old.memory_read_gb_per_s_parallel, new.memory_read_gb_per_s_parallel),
        message_overhead_s=lower(old.message_overhead_s, new.message_overhead_s),
        layer_overhead_s=lower(old.layer_overhead_s, new.layer_overhead_s),
        step_overhead_s=lower(old.step_overhead_s, new.step_overhead_s),
        memory_total_bytes=new.memory_total_bytes,
        memory_available_bytes=new.memory_available_bytes,
        measured_at=new.measured_at,
        measure_seconds=new.measure_seconds,
        matmul_runs=max(1, old.matmul_runs) + 1,
    )
    merged = remeasured(merged, new.memory_bandwidth_gb_per_s, new.measured_at)
    if merged.calibration and (gflops != old.matmul_gflops or read != old.matmul_weight_read_gb_per_s):
        log.info("the microbenchmarks changed: dropping the calibration fitted against the old ones")
        merged = replace(merged, calibration={})
    return merged


def _progress_bar(total: int) -> Any:
    return tqdm(total=total, desc="profiling", unit="step")


# --- cache -------------------------------------------------------------------


def save_calibration(calibration: dict[str, Any], key: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """Store ``calibration`` in the cached profile ``key`` (default: this machine's); returns its path.

    None when there is no cached profile to store it with (the caller keeps it in memory only).
    Takes the profiles lock the node agents take, so a profile being measured is never overwritten.
    """
    directory = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "profiles"
    path = directory / f"{key or cache_key()}.json"
    if not path.exists():
        return None
    with FileLock(str(directory.parent / "profiles.lock")):
        data = json.loads(path.read_text())
        data["calibration"] = dict(calibration)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    return path


def load_or_measure(refresh: bool = False, cache_dir: Path | None = None, recheck: bool = True) -> DeviceProfile:
    """This machine's profile: microbenchmarks from the per-hardware cache (unless
    ``refresh`` or missing), memory and the hostname always read live; a cached profile's bandwidth is
    measured again (``recheck``, :func:`check_bandwidth`) when it :func:`looks_off` or was last
    measured over ``RECHECK_AFTER_S`` ago, and the best run kept in the cache."""
    directory = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "profiles"
    path = directory / f"{cache_key()}.json"
    cached: DeviceProfile | None = None
    if not refresh and path.exists():
        try:
            raw = json.loads(path.read_text())
            profile = DeviceProfile.from_json(raw)
        except (OSError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable profile cache %s (%s); measuring again", path, err)
        else:
            total, available = memory_now()
            # the hardware's figures come from the cache; which machine this is never does (two simulated
            # hosts, or two machines of one kind sharing a cache, are two hosts to the planner)
            profile = replace(
                profile,
                memory_total_bytes=total,
                memory_available_bytes=available,
                hostname=socket.gethostname(),
                boot_id=boot_id(),
            )
            if recheck and (looks_off(profile) or time.time() - profile.memory_bandwidth_checked_at > RECHECK_AFTER_S):
                try:
                    profile = check_bandwidth(profile)
                except Exception as exc:  # a re-check is a refinement: the cached profile still answers
                    log.warning("could not measure the memory bandwidth again (%s): keeping the cached one", exc)
                else:
                    _store_fields(path, profile, _BANDWIDTH_FIELDS)
            # cached before it was measured (a measured 0, a step no slower than its layers under load, stays:
            # measured again on every load, it cost each preview a model built and stepped)
            if recheck and "step_overhead_s" not in raw:
                profile = replace(profile, step_overhead_s=_overhead(measure_step_overhead, "per-step"))
                _store_fields(path, profile, ("step_overhead_s",))
            if not (recheck and matmuls_look_low(profile) and time.time() - profile.measured_at > RECHECK_AFTER_S):
                return profile
            log.warning(
                "the cached microbenchmarks (%s) read memory at %.1f GB/s where this machine reads %.1f: measured"
                " under load? measuring again, keeping the best of each",
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(profile.measured_at)),
                profile.memory_read_gb_per_s_gemv,
                profile.memory_bandwidth_gb_per_s,
            )
            cached = profile
    profile = measure_profile()
    if cached is not None:
        profile = replace(best_of(cached, profile), hostname=profile.hostname, boot_id=profile.boot_id)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1))
    os.replace(tmp, path)
    return profile


_BANDWIDTH_FIELDS = (
    "memory_bandwidth_gb_per_s",
    "memory_bandwidth_measured_at",
    "memory_bandwidth_checked_at",
    "memory_bandwidth_runs",
)


def _store_fields(path: Path, profile: DeviceProfile, fields: tuple[str, ...]) -> None:
    """Write ``profile``'s ``fields`` into the cached profile at ``path``. No lock here: the agent calls
    :func:`load_or_measure` holding the profiles lock already; the file is replaced whole, never written in
    place. A better bandwidth run another process stored meanwhile wins over this one's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    mine = profile.to_json()
    if float(data.get("memory_bandwidth_gb_per_s") or 0) > profile.memory_bandwidth_gb_per_s:
        mine = {**mine, **{k: data[k] for k in _BANDWIDTH_FIELDS[:2] if k in data}}
    data.update({k: mine[k] for k in fields})
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
