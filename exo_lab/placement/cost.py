"""Cost model: predicted time of each stage, hop and all-reduce of a plan.

Notation: a plan is an ordered list of *stages*; a stage is a tensor group of
``k`` ranks (``k = 1`` for a plain pipeline stage) holding layers ``[a, b)``.
For a node ``n`` computing in dtype ``d``:

- ``R_dec(n, d)``: weight bytes read per second at decode (M = 1). From the
  profile's ``matmul_weight_read_gb_per_s[d_m1]``, else
  ``min(memory_bandwidth, GFLOP/s[d_m1] * bytes_per_weight / 2)``.
- ``F_pre(n, d)``: GFLOP/s at prompt-like M = 512 (``matmul_gflops[d_m512]``); each more row of a
  decode batch costs at the rate implied by M = 1 and M = 8 (``d_m8``), and where a kernel computes a few
  rows per pass over its weights, each more pass too (:meth:`NodeRates.decode_row_costs`).
- ``d`` is a weight format (:mod:`exo_lab.models.formats`: float32, bfloat16, float16, q8, q4);
  the profile measures each one (``<format>_m1``, ``<format>_m512``). Models stored quantized
  use the ``q8_*`` entries at 8 bits, else the ``q4_*`` ones.

Ranks that share a host share its cores and memory bandwidth. MLX's CPU
backend runs one core per process; ``r`` ranks on a host with ``c`` cores run
``min(r, c) ** HOST_SCALING`` times as fast in aggregate as one (fitted:
tensor-2 on one 2-core host measured 1.39x, ``2 ** 0.5 = 1.41``), so each rank
gets ``s(r) = min(r, c) ** HOST_SCALING / r`` of the single-process rates.
GPU nodes host one rank. CPU nodes on one physical machine (the same kernel boot id: simulated hosts,
containers) share its memory bus though not their cores: a tensor group's ranks there, which always
compute at once, each read at ``s`` over the group's ranks on that machine and their hosts' cores
(:func:`~exo_lab.placement.predict.bus_shares`); pipeline stages take turns at one sequence and are not
slowed.

Per token of decode, at context length ``T``:

    stage time  = (A[a:b] / k) / (R_dec * s) + KV[a:b](T) / k' / (R_dec * s)
                + [last stage] head bytes / (R_dec * s) + ((b - a) * L_op + S_op) / c_s

where ``A[a:b]`` is the card's *active* bytes of layers ``[a, b)`` (what one token reads: attention,
dense MLPs, shared experts and ``experts_per_token / experts`` of the routed ones), ``KV[a:b](T)`` the
card's cache bytes of those layers at ``T`` tokens (sliding layers stop at their window, linear-attention
layers hold a constant state), and ``k' = k`` unless every tensor rank keeps the whole cache (MLA: 1).
``L_op`` is the profile's ``layer_overhead_s`` (or the calibration's, fitted from traces with the stage's
compute: :mod:`exo_lab.bench.components`): what one layer's ~60 MLX operations cost to build and
dispatch whatever their size (:mod:`exo_lab.cluster.layer_overhead`; ~0.13 ms on one core here,
~2 ms of llama-1b's ~57 per q4 token): every tensor rank pays it in full, so a tensor pair's token takes
more than half of one process's, and a small model's decode is mostly this. ``S_op`` is what each step
costs a rank once beyond its layers: the profile's ``step_overhead_s`` (embedding, norm, head, sampling,
reading the tokens back; ~0.13 ms here), or the calibration's, which also holds the serving around it
(landing and streaming the tokens; :mod:`exo_lab.bench.calibrate`). ``c_s`` is the rank's share
of one core (:func:`cpu_share`: 1 while its host has a core per rank).
    all-reduce  = 2 per layer for k > 1:  2 (k - 1) * lat + 2 (k - 1) / k * H * act / BW
    hop         = lat + H * act / BW                (between consecutive stages)
    (each more row of a batch adds its FLOPs, and its H * act bytes to every all-reduce and hop)
    decode s/token = sum(stage times) + sum(all-reduces) + sum(hops) + S * return hop (token ids, latency only)

A pipeline of ``S`` stages decodes in the group schedule (:mod:`exo_lab.engine.pipeline`): ``n`` sequences
in ``S`` groups, each stage computing one group per tick; a tick lasts as long as its slowest busy stage
(with its ``ceil(n / S)`` rows) plus the return hop, and each group gets a token every ``S`` ticks
(:func:`pipelined_round_s`): throughput is bounded by the slowest stage, not the sum of the stages. One
sequence goes through the stages one tick each (the sum above; each tick pays the return hop).

Prefill of ``P`` prompt tokens (a pipeline streams it through the stages in ``c`` chunks of
``exo_lab.defaults.prefill_step`` tokens, :func:`streamed_prefill_s`: the first chunk crosses every stage, each later
one adds the slowest stage's share ``max(stage time / c + hop of a chunk)``):

    stage time  = (P * FLOPs[a:b] + attention[a:b](P)) / k / (F_pre * s) + chunks * (b - a) * L_op / c_s
    hop         = lat + P * H * act / BW
    all-reduce  = 2 per layer with P * H * act bytes
    TTFT        = R_op + the streamed stages and hops (+ one decode step for the first token)

(each prefill chunk runs every operation of the stage's layers once; ``R_op`` is the first stage's
calibrated ``request_overhead_s``: handing the request to the ranks, admitting it and streaming the first
token back, 0 until fitted).

where ``FLOPs[a:b]`` is the card's matmul FLOPs per token of those layers (2 per active weight) and
``attention[a:b](P)`` 4 FLOPs per causal (query, key) pair and unit of attention width, sliding layers
seeing at most their window and linear-attention layers none (``ModelCard.attention_flops``).

Calibration: a node profile's ``calibration`` dict (fitted from measurements by
``exo-lab bench --calibrate``, see :mod:`exo_lab.bench`) holds ``decode_efficiency``
and ``prefill_efficiency``, which :class:`NodeRates` multiplies ``R_dec`` and
``F_pre`` by (and ``row_efficiency``, on the rate of each more row of a decode batch: the difference of
the M=8 and M=1 microbenchmarks, taken moments apart on a machine whose speed drifts, is the noisiest
figure here; ``benchmarks/distributed.py`` fits it on one process's batched decode), and ``hop_overhead_s``, the time every message between ranks costs
beyond the link's latency (framework and scheduling); :func:`calibrated_link` adds
the mean of the two ends' overheads to a link's ``lat``, so each hop pays it once
and each ring all-reduce ``2 (k - 1)`` times. Without a calibration the factors are
1 (the microbenchmarks and probes taken as they are) and the overhead is the profile's
``message_overhead_s``: what MLX's ring backend adds to a plain socket exchange, measured on the
node (:mod:`exo_lab.cluster.collective`; ~75 us on this project's 2-core VM, where the link probes
see 28 us one way, so a tensor pair's 32 all-reduces per token of a 16-layer model cost ~7 ms, not
~2). A calibration per
component (fitted from traces, see :mod:`exo_lab.bench.components`) adds ``links`` (a link's fitted
latency and bandwidth, used instead of the probes' and the overhead) and ``all_reduce`` (the
measured seconds of a pipeline step's token all-reduce over a group of nodes, used instead of one
latency back to the first stage).

``lat`` is the one-way latency (half the measured median RTT), ``BW`` the
link's slower direction; ranks on the same node talk over loopback
(``LOOPBACK_LAT_S``, ``LOOPBACK_BW``). Memory per node: the card's bytes of exactly
the layers its ranks hold (their share of them) in the compute dtype, the caches of
those layers for ``batch`` sequences of ``context`` tokens, and ``RANK_OVERHEAD_BYTES``
plus prefill activations per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from exo_lab import defaults
from exo_lab.models import formats
from exo_lab.models.card import ModelCard

HOST_SCALING = 0.5
LOOPBACK_LAT_S = 0.0001
LOOPBACK_BW_BYTES_S = 4e9
RANK_OVERHEAD_BYTES = 300 * 2**20
#: the longest prefill chunk (a one-stage GPU instance's): what the activation memory is planned for
PREFILL_CHUNK = 2048
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class NodeRates:
    """What the cost model needs from one node's profile."""

    node_id: str
    host: str
    cores: int
    gpu: bool
    memory_bytes: int
    bandwidth_bytes_s: float
    gflops: dict[str, float]
    weight_read_bytes_s: dict[str, float]
    decode_efficiency: float = 1.0  # calibration: measured / microbenchmarked decode read rate
    prefill_efficiency: float = 1.0  # calibration: measured / microbenchmarked prefill FLOP/s
    row_efficiency: float = 1.0  # calibration: microbenchmarked / measured cost of each more row of a decode batch
    hop_overhead_s: float = 0.0  # seconds each message to or from this node costs beyond latency (measured or fitted)
    layer_overhead_s: float = 0.0  # seconds each decoder layer costs a rank per decode step beyond its reads
    step_overhead_s: float = 0.0  # seconds each decode step costs a rank beyond its layers (measured or fitted)
    request_overhead_s: float = 0.0  # seconds a request costs before its first token beyond its compute (fitted)
    # calibration per component (fitted from traces, exo_lab.bench.components): peer node -> (latency_s,
    # bandwidth_bytes_s) of the link from this node, and the step's all-reduce seconds per group of nodes
    links: dict[str, tuple[float, float]] = field(default_factory=dict, hash=False, compare=False)
    all_sum_s: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    bus: str = ""  # the physical machine whose memory bus the node shares (its boot id), "" for its host alone
    #: per weight format: rows of a decode batch one pass over the weights computes (absent: all of them)
    rows_per_pass: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_profile(cls, node_id: str, profile: dict[str, Any]) -> NodeRates:
        devices = profile.get("mlx_devices") or ["cpu"]
        gpu = "gpu" in devices
        mem = int(profile.get("memory_available_bytes") or profile.get("memory_total_bytes") or 0)
        if gpu and profile.get("gpu_memory_bytes"):
            mem = min(mem, int(profile["gpu_memory_bytes"])) if mem else int(profile["gpu_memory_bytes"])
        reads = {k: v * 1e9 for k, v in (profile.get("matmul_weight_read_gb_per_s") or {}).items()}
        cal = profile.get("calibration") or {}
        return cls(
            node_id=node_id,
            host=str(profile.get("hostname") or node_id),
            bus=str(profile.get("boot_id") or ""),
            rows_per_pass={str(k): int(v) for k, v in (profile.get("decode_rows_per_pass") or {}).items()},
            cores=int(profile.get("cpu_count") or 1),
            gpu=gpu,
            memory_bytes=mem,
            bandwidth_bytes_s=float(profile.get("memory_bandwidth_gb_per_s") or 1.0) * 1e9,
            gflops={k: float(v) for k, v in (profile.get("matmul_gflops") or {}).items()},
            weight_read_bytes_s=reads,
            decode_efficiency=_factor(cal.get("decode_efficiency")),
            prefill_efficiency=_factor(cal.get("prefill_efficiency")),
            row_efficiency=_factor(cal.get("row_efficiency")),
            hop_overhead_s=_seconds(
                cal["hop_overhead_s"] if "hop_overhead_s" in cal else profile.get("message_overhead_s")
            ),
            layer_overhead_s=_seconds(
                cal["layer_overhead_s"] if "layer_overhead_s" in cal else profile.get("layer_overhead_s")
            ),
            step_overhead_s=_seconds(
                cal["step_overhead_s"] if "step_overhead_s" in cal else profile.get("step_overhead_s")
            ),
            request_overhead_s=_seconds(cal.get("request_overhead_s")),
            links={
                str(peer): (float(v["latency_s"]), float(v["bandwidth_bytes_s"]))
                for peer, v in (cal.get("links") or {}).items()
                if _seconds(v.get("latency_s")) > 0 and _factor(v.get("bandwidth_bytes_s")) > 1.0
            },
            all_sum_s={str(k): _seconds(v) for k, v in (cal.get("all_reduce") or {}).items() if _seconds(v) > 0},
        )

    def kernel(self, dtype: str, quantized: bool) -> str:
        """The profile's key prefix for computing in ``dtype`` (a weight format; ``quantized``: the
        checkpoint's own quantization, measured as q4 unless ``dtype`` names q8)."""
        if quantized:
            return dtype if dtype in formats.QUANTIZED else "q4"
        return dtype

    def decode_read_rate(self, dtype: str, quantized: bool, bytes_per_weight: float) -> float:
        """Weight bytes per second one process reads at decode (times the calibrated efficiency)."""
        key = f"{self.kernel(dtype, quantized)}_m1"
        if key in self.weight_read_bytes_s:
            rate = self.weight_read_bytes_s[key]
        elif not (gf := self.gflops.get(key)):
            rate = self.bandwidth_bytes_s * (0.1 if dtype != "float32" else 0.5)
        else:
            rate = min(self.bandwidth_bytes_s, gf * 1e9 * bytes_per_weight / 2)
        return rate * self.decode_efficiency

    def decode_row_costs(self, dtype: str, quantized: bool, bytes_per_weight: float) -> tuple[float, float, int]:
        """What more rows of a decode batch add: ``(row, pass, rows_per_pass)``, the FLOP/s at which each more
        row adds time and at which each more pass over the weights does (both times the calibrated decode and
        row efficiencies), and how many rows one pass computes (0: all of them).

        A kernel that computes ``R`` rows per pass over its weights (the profile's ``decode_rows_per_pass``;
        exo_lab's q8/q4 kernel: 4, where unpacking the codes is most of its work) takes ``P p + M c`` for
        ``M`` rows in ``P = ceil(M / R)`` passes, one row ``p + c``: from the profile's M=1 read rate and M=8
        rate, ``c = (t8 - P8 t1) / (8 - P8)``. Elsewhere 8 rows take what one takes plus 7 more rows' cost (a
        decode kernel is read-bound at one row and compute-bound at several, where it runs below the prompt
        GEMM's rate). A row never costs less than at the prompt rate. Without an M=8 measurement: the prompt
        rate, in one pass.
        """
        kernel = self.kernel(dtype, quantized)
        prompt = self.gflops.get(f"{kernel}_m512", 1.0) * 1e9
        gf8 = self.gflops.get(f"{kernel}_m8")
        scale = self.decode_efficiency * self.row_efficiency
        if not gf8:
            return prompt * self.prefill_efficiency * self.row_efficiency, math.inf, 0
        t8 = 16.0 / (gf8 * 1e9)  # seconds per weight for 8 rows (2 FLOP per weight and row)
        t1 = bytes_per_weight / (self.decode_read_rate(dtype, quantized, bytes_per_weight) / self.decode_efficiency)
        per_pass = self.rows_per_pass.get(dtype, 0) if not quantized else 0
        passes = -(-8 // per_pass) if per_pass else 1
        if passes == 1:
            per_pass = 0
        row = max((t8 - passes * t1) / (8 - passes), 2.0 / prompt)
        again = max(t1 - row, 0.0) if per_pass else 0.0  # a pass's own cost beyond its rows'
        return 2.0 / row * scale, (2.0 / again * scale if again else math.inf), per_pass

    def bus_bound(self, dtype: str, quantized: bool, bytes_per_weight: float) -> float:
        """The share of a one-row decode product's time spent waiting on memory, the rest computing: what a
        memory bus shared with other readers slows (1 where the profile has no M=8 measurement).

        From the profile's M=1 read rate and M=8 rate, a row's time taken as its read plus its compute: 8 rows
        add 7 rows' compute. Measured on one core here: fp32 ~0.8 (two one-core fp32 processes at once each
        read at 0.78-0.83 of the speed alone), q4 ~0.3 (two q4 processes each decode as fast as alone).
        """
        gf8 = self.gflops.get(f"{self.kernel(dtype, quantized)}_m8")
        if not gf8:
            return 1.0
        t1 = bytes_per_weight / (self.decode_read_rate(dtype, quantized, bytes_per_weight) / self.decode_efficiency)
        compute = (16.0 / (gf8 * 1e9) - t1) / 7  # one more row's seconds per weight
        return min(1.0, max(0.0, 1.0 - compute / t1))

    def prefill_flops(self, dtype: str, quantized: bool) -> float:
        """FLOP/s of one process at prompt-like shapes (times the calibrated efficiency)."""
        key = f"{self.kernel(dtype, quantized)}_m512"
        return self.gflops.get(key, 1.0) * 1e9 * self.prefill_efficiency

    def has(self, dtype: str, quantized: bool) -> bool:
        return f"{self.kernel(dtype, quantized)}_m1" in self.gflops


def _factor(value: Any) -> float:
    """A calibration factor from a profile: positive and finite, else 1."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 1.0
    return f if 0.0 < f < float("inf") else 1.0


def _seconds(value: Any) -> float:
    """A calibrated overhead from a profile: finite and >= 0, else 0."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        return 0.0
    return s if 0.0 <= s < float("inf") else 0.0


def share(ranks_on_host: int, cores: int, gpu: bool) -> float:
    """Fraction of single-process speed each of ``ranks_on_host`` ranks gets."""
    if gpu:
        return 1.0 / ranks_on_host
    return min(ranks_on_host, cores) ** HOST_SCALING / ranks_on_host


def cpu_share(ranks_on_host: int, cores: int, gpu: bool) -> float:
    """Fraction of a core's time each of ``ranks_on_host`` ranks gets for what it runs on one thread (MLX
    building and dispatching its operations): all of one while there is a core per rank."""
    if gpu:
        return 1.0
    return min(1.0, cores / ranks_on_host)


@dataclass(frozen=True)
class LinkCost:
    """One-way latency (s) and bandwidth (bytes/s) between two ranks."""

    latency_s: float
    bandwidth_bytes_s: float

    def transfer(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_s

    def all_reduce(self, nbytes: float, k: int) -> float:
        """Seconds to sum ``nbytes`` over ``k`` ranks: a pair sends its bytes both ways at once over a socket of
        its own (:mod:`exo_lab.engine.peer_link`); more ranks send a decode step's sums (up to
        ``CHAIN_MAX_BYTES``) along a chain of such sockets and back, every hop carrying all of them, and larger
        ones round MLX's ring (there and back again, a hop carrying a k-th)."""
        if k <= 1:
            return 0.0
        if k == 2:
            return self.latency_s + nbytes / self.bandwidth_bytes_s
        if nbytes <= defaults.CHAIN_MAX_BYTES:
            return 2 * (k - 1) * (self.latency_s + nbytes / self.bandwidth_bytes_s)
        return 2 * (k - 1) * self.latency_s + 2 * (k - 1) / k * nbytes / self.bandwidth_bytes_s


LOOPBACK = LinkCost(LOOPBACK_LAT_S, LOOPBACK_BW_BYTES_S)


def calibrated_link(link: LinkCost, a: NodeRates | None, b: NodeRates | None) -> LinkCost:
    """``link`` with the mean calibrated per-message overhead of its ends added to its latency."""
    extra = ((a.hop_overhead_s if a else 0.0) + (b.hop_overhead_s if b else 0.0)) / 2
    return LinkCost(link.latency_s + extra, link.bandwidth_bytes_s) if extra > 0 else link


def rows_extra_s(rows: int, row_s: float, pass_s: float = 0.0, rows_per_pass: int = 0) -> float:
    """What ``rows`` decoding together add to one row's step: ``row_s`` for each more row, and ``pass_s`` for
    each more pass over the weights where a pass computes ``rows_per_pass`` rows (0: all of them)."""
    passes = -(-rows // rows_per_pass) if rows_per_pass else 1
    return (rows - 1) * row_s + (passes - 1) * pass_s


def pipelined_round_s(
    stage_s: list[float],
    stage_row_s: list[float],
    exchange_s: float,
    sequences: int,
    stage_bus_s: list[float] | None = None,
    stage_pass_s: list[float] | None = None,
    rows_per_pass: int = 0,
) -> float:
    """Seconds for each of ``sequences`` decoding sequences to get one token under the group schedule.

    ``stage_s``: each stage's time for one row (its compute and all-reduces, and its hand-off to the next
    stage); ``stage_row_s``: what each more row adds to it (``stage_pass_s``: each more pass over its weights,
    of ``rows_per_pass`` rows each: :func:`rows_extra_s`); ``exchange_s``: what each tick adds (the shared
    tokens' ``all_sum``); ``stage_bus_s``: what each stage's reads take longer in a tick where other stages
    compute too (stages on one machine share its memory bus). The rows are split into ``G`` balanced groups,
    one per stage; in tick ``t`` stage ``s`` computes group ``(t - s) mod G``, so a tick lasts as long as its
    slowest busy stage, and every group gets a token every ``G`` ticks: a pipeline's throughput is bounded by
    its slowest stage, not the sum of its stages. One sequence goes through the stages one tick each (the sum).
    """
    stages = len(stage_s)
    bus = stage_bus_s or [0.0] * stages
    again = stage_pass_s or [0.0] * stages
    sizes = [sequences // stages + (1 if g < sequences % stages else 0) for g in range(stages)]
    total = 0.0
    for tick in range(stages):
        active = [(s, n) for s in range(stages) if (n := sizes[(tick - s) % stages]) > 0]
        shared = len(active) > 1
        busy = [
            stage_s[s] + rows_extra_s(n, stage_row_s[s], again[s], rows_per_pass) + (bus[s] if shared else 0.0)
            for s, n in active
        ]
        total += max(busy, default=0.0) + exchange_s
    return total


def streamed_prefill_s(stage_s: list[float], hop_s: list[float], chunks: int) -> float:
    """Seconds to prefill a prompt streamed through the stages in ``chunks`` equal chunks.

    ``stage_s``: each stage's time for the whole prompt; ``hop_s``: each stage's time to hand one chunk on
    (0 for the last). The first chunk crosses every stage, each later one adds the slowest stage's share.
    """
    per = [t / chunks + h for t, h in zip(stage_s, hop_s)]
    return sum(per) + (chunks - 1) * max(per)


def bytes_per_weight(card: ModelCard, dtype: str) -> float:
    """Bytes one weight takes computing in ``dtype`` (a weight format; a quantized checkpoint: its own)."""
    if card.quantization:
        bits, group = card.quantization.get("bits", 4), card.quantization.get("group_size", 64)
        return bits / 8 + 2 * DTYPE_BYTES.get(card.dtype, 2) / group
    if dtype in formats.FORMATS:
        return formats.get(dtype).bytes_per_weight()
    return DTYPE_BYTES.get(dtype, 2)


def weight_scale(card: ModelCard, dtype: str) -> float:
    """Bytes in ``dtype`` per stored byte (upcasting bf16 to fp32 doubles them, q4 of fp32 takes 0.16)."""
    if card.quantization:
        return 1.0
    return bytes_per_weight(card, dtype) / DTYPE_BYTES.get(card.dtype, 2)
