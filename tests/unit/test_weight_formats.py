"""Weight formats: the format table, loading a shard in each format (real MLX), the multi-core
quantized matmul, and the planner choosing each node's format from measured speeds."""

from __future__ import annotations

from pathlib import Path

import pytest

import exo_lab  # noqa: F401  (OpenBLAS before MLX)

# isort: split

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from exo_lab.cluster.topology import NodeInfo, Topology
from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import formats, halfmatmul, kernels, qmatmul, synthetic
from exo_lab.models.card import card_from_config
from exo_lab.placement import plan
from exo_lab.placement.predict import CostContext

GB = 2**30
LAYERS = synthetic.PRESETS["tiny"].config["num_hidden_layers"]


def test_format_table():
    assert formats.get("q4").bytes_per_weight() == 0.5 + 8 / 64  # fp32 scale and bias per group of 64
    assert formats.get("q8").bytes_per_weight() == 1 + 8 / 64
    assert formats.get("bfloat16").bytes_per_weight() == 2
    assert formats.activation_dtype("q4") == "float32" and formats.activation_dtype("float16") == "float16"
    assert formats.exact_formats("bfloat16") == ["bfloat16", "float32", "bf16w"]
    assert formats.exact_formats("float32") == ["float32"]
    assert formats.lossy_formats("float32") == ["float32", "bfloat16", "float16", "q8", "q4", "bf16w", "fp16w"]
    assert formats.exact_formats("float16") == ["float16", "float32", "fp16w"]
    assert formats.get("bf16w").bytes_per_weight() == 2 and formats.activation_dtype("bf16w") == "float32"
    with pytest.raises(ValueError, match="q4"):
        formats.get("q3")


# --- the multi-core quantized matmul (real MLX) --------------------------------


def test_core_matmul_is_plain_quantized_matmul_at_decode_and_close_at_prefill():
    w = mx.random.normal((520, 256), key=mx.random.key(3)) * 0.05  # rows split unevenly over streams
    q = mx.quantize(w, group_size=64, bits=4)
    for m, exact in ((1, True), (qmatmul.SMALL_M, True), (40, False)):
        x = mx.random.normal((1, m, 256), key=mx.random.key(m))
        plain = mx.quantized_matmul(x, *q, transpose=True, group_size=64, bits=4)
        for streams in (1, 2, 3):
            mine = qmatmul.matmul(x, *q, 64, 4, streams=streams, native=False)
            assert mine.shape == plain.shape
            if exact:  # the same dot products, split by output rows: bit-identical
                assert mx.array_equal(mine, plain).item()
            else:  # dequantize + BLAS: another summation order
                assert mx.allclose(mine, plain, atol=1e-4, rtol=1e-4).item()


needs_kernels = pytest.mark.skipif(kernels.module() is None, reason="exo_lab's weight_matmul extension is not built")


def _integer_activations_product(
    x: np.ndarray, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """``quant_matmul`` with 16-bit integer activations, in numpy: each group of a row of x scaled to a largest
    magnitude of 32767 and rounded half to even; its integer dot products with the codes scaled by both scales,
    plus each group's bias times x's exact sum; and how far that may be from the fp32 product (each rounded
    element is off by at most half a step)."""
    m, k = x.shape
    g = k // group_size
    s, b = np.array(scales, dtype=np.float64), np.array(biases, dtype=np.float64)
    full = np.array(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits), dtype=np.float64)
    codes = np.rint((full - b.repeat(group_size, 1)) / s.repeat(group_size, 1)).reshape(-1, g, group_size)
    xg = x.astype(np.float32).reshape(m, g, group_size)
    top = np.abs(xg).max(-1)
    xq = np.rint(xg * np.where(top > 0, np.float32(32767) / top, np.float32(0))[..., None]).astype(np.float64)
    step = (top / np.float32(32767)).astype(np.float64)
    last = step
    dots = np.einsum("mgk,ngk->mng", xq, codes)
    rounded = (dots * s[None] * step[:, None]).sum(-1) + (b[None] * xg.astype(np.float64).sum(-1)[:, None]).sum(-1)
    bound = (np.abs(full).reshape(-1, g, group_size).sum(-1)[None] * last[:, None] / 2).sum(-1)
    return rounded, bound


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("group_size", "k"), [(32, 384), (64, 384), (64, 448), (64, 640), (128, 384)])
def test_native_quant_matmul_is_the_dequantized_product_and_batch_invariant(bits, group_size, k):
    """k=384 in groups of 64: 4 bits two groups at a time (PAIRED); 448: an odd number of groups, one at a time;
    640: the biases of a block of 8 groups, then of the 2 left (AVX2: plain loads, then masked ones)."""
    n = 259  # rows in whole blocks of 4 and a tail; prefill: a block of 256 rows and a tail
    w = mx.random.normal((n, k), key=mx.random.key(bits)) * 0.05
    q = mx.quantize(w, group_size=group_size, bits=bits)
    full = np.array(mx.dequantize(*q, group_size=group_size, bits=bits)).astype(np.float64)
    x = mx.random.normal((2, 8, k), key=mx.random.key(group_size))  # 16 rows: up to SMALL_M
    got = qmatmul.matmul(x, *q, group_size, bits)
    assert got.dtype == mx.float32 and got.shape == (2, 8, n)
    want = np.array(x).astype(np.float64) @ full.T
    plain = mx.quantized_matmul(x, *q, transpose=True, group_size=group_size, bits=bits)
    if kernels.module().integer_activations() and group_size % 64 == 0:  # x rounded to 16 bits per group
        rounded, bound = _integer_activations_product(np.array(x).reshape(16, k), *q, group_size, bits)
        assert np.abs(np.array(got).reshape(16, n) - rounded).max() < 1e-5  # the same integers, fp32 sums
        error = np.abs(np.array(got).reshape(16, n) - want.reshape(16, n))
        assert (error <= bound + 1e-5).all()  # x's rounding, and no more than it
        assert error.max() > 1e-5  # it does round
    else:
        assert np.abs(np.array(got) - want).max() < 1e-4  # fp32 sums of ~400 products of size ~1
        assert np.abs(np.array(got) - np.array(plain)).max() < 1e-4
    for row in (0, 5, 15):  # a row alone gives the bits it gives in the batch
        alone = qmatmul.matmul(x.reshape(16, k)[row], *q, group_size, bits)
        assert np.array_equal(np.array(alone), np.array(got).reshape(16, n)[row])
    strided = x.reshape(16, k)[::2]  # a strided view computes what its copy computes
    assert np.array_equal(np.array(qmatmul.matmul(strided, *q, group_size, bits)), np.array(got).reshape(16, n)[::2])
    columns = mx.contiguous(x.reshape(16, k).T).T  # column-major: read through its strides, no copy in the graph
    assert np.array_equal(np.array(qmatmul.matmul(columns, *q, group_size, bits)), np.array(got).reshape(16, n))
    prompt = mx.random.normal((300, k), key=mx.random.key(7))  # prefill
    big = qmatmul.matmul(prompt, *q, group_size, bits)
    if kernels.module().integer_activations() and group_size % 64 == 0:  # 4 rows of x at once
        rounded, _ = _integer_activations_product(np.array(prompt), *q, group_size, bits)
        assert np.abs(np.array(big) - rounded).max() < 1e-5
        for row in (0, 5, 299):  # the bits of the decode path: a row alone, and in a prompt
            assert np.array_equal(np.array(qmatmul.matmul(prompt[row], *q, group_size, bits)), np.array(big)[row])
    else:  # dequantized blocks of rows and the BLAS
        assert np.abs(np.array(big) - np.array(prompt).astype(np.float64) @ full.T).max() < 1e-4


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_native_quant_matmul_on_every_core_gives_a_row_the_bits_of_its_prompt(bits):
    """A matrix past PARALLEL_WEIGHTS: decode (up to 4 rows) splits the weight rows over the threads, each
    thread's as 4 (one row of x) or 2 interleaved parts decoded side by side (1026 rows: the last parts a row
    short, their rows one at a time); a prompt goes over tiles."""
    n, k = 2053, 2048
    q = mx.quantize(mx.random.normal((n, k), key=mx.random.key(11)) * 0.05, group_size=64, bits=bits)
    prompt = mx.random.normal((24, k), key=mx.random.key(12))
    big = np.array(qmatmul.matmul(prompt, *q, 64, bits))
    if kernels.module().integer_activations():
        rounded, _ = _integer_activations_product(np.array(prompt), *q, 64, bits)
        assert np.abs(big - rounded).max() < 1e-4  # sums of 2048 products: fp32 chains
    else:
        full = np.array(mx.dequantize(*q, group_size=64, bits=bits), dtype=np.float64)
        assert np.abs(big - np.array(prompt, dtype=np.float64) @ full.T).max() < 1e-3
    for rows in (slice(0, 1), slice(3, 5), slice(20, 24)):
        assert np.array_equal(np.array(qmatmul.matmul(prompt[rows], *q, 64, bits)), big[rows])


@needs_kernels
def test_quant_matmul_multiplies_16_bit_activations_exactly_where_the_cpu_has_vnni():
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    ext = kernels.module()
    assert ext.integer_activations() == ({"avx512_vnni", "avx512bw"}.issubset(flags) or {"avx2", "fma"}.issubset(flags))
    # integers up to 32767 in every group round to themselves: the product is the exact one
    w = mx.random.normal((33, 256), key=mx.random.key(1)) * 0.05
    x = mx.array(np.random.default_rng(0).integers(-32767, 32768, (3, 256)).astype(np.float32))
    x[:, ::64] = 32767.0
    for bits in (8, 4):
        q = mx.quantize(w, group_size=64, bits=bits)
        full = np.array(mx.dequantize(*q, group_size=64, bits=bits), dtype=np.float64)
        got = np.array(ext.quant_matmul(x, *q, 64, bits))
        want = np.array(x, dtype=np.float64) @ full.T
        assert np.abs(got - want).max() < 1e-6 * np.abs(want).max()  # fp32 sums of ~256 products ~1e3


@needs_kernels
def test_native_quant_matmul_refuses_what_it_cannot_compute_and_matmul_falls_back():
    ext = kernels.module()
    w = mx.random.normal((8, 128), key=mx.random.key(0))
    q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.ones((1, 128))
    for args, match in (
        ((x, q, scales, biases, 64, 3), "bits"),
        ((x, q, scales, biases, 60, 4), "group_size"),
        ((x.astype(mx.bfloat16), q, scales, biases, 64, 4), "float32"),
        ((mx.ones((1, 64)), q, scales, biases, 64, 4), "K codes"),
        ((x, q, scales[:, :1], biases, 64, 4), r"\[N, K / group_size\]"),
    ):
        with pytest.raises(ValueError, match=match):
            ext.quant_matmul(*args)
    # 16-bit scales (a stored quantized checkpoint) and 2-bit codes: MLX's own kernel, its bits exactly
    for s, b, bits in ((scales.astype(mx.bfloat16), biases.astype(mx.bfloat16), 4), (None, None, 2)):
        if s is None:
            q, s, b = mx.quantize(w, group_size=64, bits=bits)
        plain = mx.quantized_matmul(x.astype(s.dtype), q, s, b, transpose=True, group_size=64, bits=bits)
        mine = qmatmul.matmul(x.astype(s.dtype), q, s, b, 64, bits, streams=1)
        assert mx.array_equal(mine, plain).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_tensor_sharded_linears_quantize_to_what_one_process_holds(bits):
    """MLX's tensor-sharded linears cannot quantize themselves (``nn.quantize`` skips them): ``quantize_sharded``
    quantizes a slice to the whole weight's groups and computes with the same kernel, so each slice's product
    is one process's, bit for bit (here over a group of one: the slice is the whole weight)."""
    from mlx.nn.layers.distributed import shard_linear

    group = mx.distributed.init()
    linear = nn.Linear(256, 96, bias=True)
    model = nn.Sequential(
        shard_linear(linear, "all-to-sharded", group=group), shard_linear(linear, "sharded-to-all", group=group)
    )
    whole = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    qmatmul.use_cores(whole)
    assert qmatmul.quantize_sharded(model, 64, bits) == 2
    assert [type(m) for m in model.layers] == [
        qmatmul.CoreQuantizedAllToShardedLinear,
        qmatmul.CoreQuantizedShardedToAllLinear,
    ]
    x = mx.random.normal((3, 256), key=mx.random.key(1))
    for sliced in model.layers:
        assert sliced["scales"].dtype == mx.float32 and mx.array_equal(sliced["weight"], whole["weight"]).item()
        assert mx.array_equal(sliced(x), whole(x)).item()
    assert qmatmul.quantize_sharded(model, 64, bits) == 0  # already quantized: left alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.create(tmp_path_factory.mktemp("formats") / "tiny", "tiny", dtype="float32")


def _logits(shard, prompt: list[int]) -> mx.array:
    return shard(mx.array(prompt)[None], shard.make_cache())[0].astype(mx.float32)


def test_shard_loads_in_every_format_and_stays_close(tiny):
    spec = lambda fmt: ShardSpec(0, LAYERS, LAYERS, fmt)  # noqa: E731
    prompt = [(i * 37) % 500 + 5 for i in range(24)]
    ref, _ = load_shard(tiny, spec(None))
    want = _logits(ref, prompt)
    for fmt in formats.FORMATS:
        shard, _ = load_shard(tiny, spec(fmt))
        linears = [m for _, m in shard.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
        assert linears
        if formats.get(fmt).quantized:
            assert all(isinstance(m, qmatmul.CoreQuantizedLinear) and m.bits == formats.get(fmt).bits for m in linears)
            assert shard.embed_tokens is not None and type(shard.embed_tokens) is qmatmul.CoreQuantizedEmbedding
            assert shard.embed_tokens["scales"].dtype == mx.float32  # fp32 scales: fp32 activations
        elif formats.get(fmt).widened:
            held = getattr(mx, formats.get(fmt).held)
            assert all(type(m) is halfmatmul.HalfLinear and m.weight.dtype == held for m in linears)
            assert type(shard.embed_tokens) is halfmatmul.HalfEmbedding and shard.embed_tokens.weight.dtype == held
            assert shard.norm.weight.dtype == mx.float32  # norms stay fp32: fp32 activations
        else:
            assert all(m.weight.dtype == getattr(mx, fmt) for m in linears)
        if fmt == "q4":  # on random weights 4 bits change the logits too much to compare (see the next test)
            continue
        got = _logits(shard, prompt)
        agree = (mx.argmax(got, -1) == mx.argmax(want, -1)).mean().item()
        cos = ((got * want).sum(-1) / (mx.linalg.norm(got, axis=-1) * mx.linalg.norm(want, axis=-1))).min().item()
        # measured on the 4-layer tiny model (top-1 agreement / worst cosine of 24 positions' logits):
        # bf16 0.83 / 0.992, fp16 1.0 / 0.9998, q8 0.83 / 0.975; random weights amplify every rounding
        # bf16w / fp16w: the same weights as bf16 / fp16, fp32 activations: closer than those
        floor = {
            "float32": (1.0, 0.99999),
            "bfloat16": (0.7, 0.98),
            "float16": (0.95, 0.999),
            "q8": (0.7, 0.95),
            "bf16w": (0.7, 0.98),
            "fp16w": (0.95, 0.999),
        }
        assert agree >= floor[fmt][0] and cos >= floor[fmt][1], (fmt, agree, cos)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_format_is_mlx_lm_quantization_and_generates(tiny, tmp_path, bits):
    """A shard loaded from fp32 in q4/q8 holds the weights ``mlx_lm`` quantization of the same fp32
    checkpoint holds, decodes the same greedy tokens with the same kernel (M=1: bit-identical matmuls), and
    logits close to MLX's own kernel's (which keeps x in fp32 where exo_lab's may round it to 16-bit integers)."""
    stored = synthetic.create(tmp_path / f"q{bits}", "tiny", dtype="float32", quantize=bits)
    mine, _ = load_shard(tiny, ShardSpec(0, LAYERS, LAYERS, f"q{bits}"))
    theirs, _ = load_shard(stored, ShardSpec(0, LAYERS, LAYERS, None))
    assert mx.array_equal(mine.layers[0].mlp.up_proj["weight"], theirs.layers[0].mlp.up_proj["weight"]).item()
    assert mx.array_equal(mine.layers[1].self_attn.q_proj["scales"], theirs.layers[1].self_attn.q_proj["scales"]).item()

    def greedy(shard, n: int = 12) -> list[int]:
        cache = shard.make_cache()
        token, out = 17, []
        for _ in range(n):
            token = mx.argmax(shard(mx.array([[token]]), cache)[0, -1]).item()
            out.append(int(token))
        return out

    step = mx.array([[17]])
    ours, mlx = mine(step, mine.make_cache())[0, -1], theirs(step, theirs.make_cache())[0, -1]  # MLX's kernel
    # measured 0.999999 for either with x in two 8-bit parts and in 16-bit integers (one 8-bit part: 0.991); q8 against fp32 weights: 0.975
    assert (ours * mlx).sum().item() / (mx.linalg.norm(ours) * mx.linalg.norm(mlx)).item() > 0.9999
    tokens = greedy(mine)
    qmatmul.use_cores(theirs)
    assert tokens == greedy(theirs) and len(set(tokens)) > 1


# --- the planner's choice --------------------------------------------------------


def _card(dtype: str = "bfloat16", **extra):
    return card_from_config(
        dict(
            hidden_size=512,
            num_hidden_layers=8,
            intermediate_size=1536,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=32000,
            model_type="llama",
            tie_word_embeddings=False,
            **extra,
        ),
        "m",
        dtype,
    )


def _node(i: int, reads: dict[str, float], cores: int = 1) -> NodeInfo:
    """A node whose profile says how fast each format reads its weights at M=1 (GB/s)."""
    return NodeInfo(
        f"n{i}",
        f"node{i}",
        [f"10.0.0.{i + 1}"],
        profile={
            "memory_total_bytes": 16 * GB,
            "memory_available_bytes": 16 * GB,
            "cpu_count": cores,
            "hostname": f"host{i}",
            "mlx_devices": ["cpu"],
            "memory_bandwidth_gb_per_s": 20.0,
            "matmul_gflops": {**{f"{k}_m1": v for k, v in reads.items()}, **{f"{k}_m512": 50.0 for k in reads}},
            "matmul_weight_read_gb_per_s": {f"{k}_m1": v for k, v in reads.items()},
        },
    )


def _dtypes(topology: Topology, card, **kw) -> dict[str, str]:
    best = plan(topology, card, context=1024, prompt_tokens=64, **kw).best
    return {r.node_name: r.dtype for r in best.ranks}


def test_default_keeps_weights_exact_and_lossy_takes_the_fastest_measured():
    # q4 reads 6 GB/s at 0.625 B/weight (9.6 G weights/s) against fp32's 12 GB/s at 4 B (3 G weights/s)
    reads = {"float32": 12.0, "bfloat16": 3.0, "float16": 2.0, "q8": 7.0, "q4": 6.0}
    topo = Topology({"n0": _node(0, reads)}, [])
    assert _dtypes(topo, _card()) == {"node0": "float32"}  # exact: bf16 stored, fp32 faster
    p = plan(topo, _card(), context=1024, prompt_tokens=64, lossy=True).best
    assert {r.dtype for r in p.ranks} == {"q4"} and p.lossy
    assert "q4 decodes" in p.dtype_reasons["n0"] and "lossy" in p.dtype_reasons["n0"]
    assert " q4" in p.describe()
    # memory follows the format: q4 of a bf16 checkpoint takes 0.3x its bytes
    exact = plan(topo, _card(), context=1024, prompt_tokens=64).best
    assert p.memory_bytes["n0"] < exact.memory_bytes["n0"]
    # where fp32 decodes fastest, lossy changes nothing
    slow_q = {**reads, "q8": 1.0, "q4": 0.5}
    assert _dtypes(Topology({"n0": _node(0, slow_q)}, []), _card(), lossy=True) == {"node0": "float32"}
    # a format the profile did not measure is never chosen
    unmeasured = {"float32": 12.0, "bfloat16": 3.0}
    assert _dtypes(Topology({"n0": _node(0, unmeasured)}, []), _card(), lossy=True) == {"node0": "float32"}
    # a quantized checkpoint keeps its own format
    assert _dtypes(topo, _card(quantization={"group_size": 64, "bits": 4}), lossy=True) == {"node0": "bfloat16"}


def test_stages_agree_on_the_activation_dtype():
    """A node fastest in bf16 next to one fastest in q4 (fp32 activations)."""
    from exo_lab.cluster.topology import LinkProfile

    a = _node(0, {"float32": 1.0, "bfloat16": 9.0, "q4": 1.0})
    b = _node(1, {"float32": 2.0, "bfloat16": 1.0, "q4": 6.0})
    links = [LinkProfile("n0", "n1", "10.0.0.1", "10.0.0.2", 0.2, 0.3, 10000, 10000)]
    topo = Topology({"n0": a, "n1": b}, links)
    card = _card()
    plans = plan(topo, card, context=1024, prompt_tokens=64, lossy=True).plans
    tensor = [p for p in plans if p.strategy == "tensor" and p.num_nodes == 2]
    pipes = [p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2]
    assert tensor and pipes
    for p in tensor:  # one group summing partial results: one activation dtype
        assert len({formats.activation_dtype(r.dtype) for r in p.ranks}) == 1, p.describe()
    # a pipeline stage receives in its previous stage's dtype (the worker's act_dtypes): each node its fastest
    assert any({r.dtype for r in p.ranks} == {"bfloat16", "q4"} for p in pipes)
    ctx = CostContext(topo, card, 1024, 64, 1, lossy=True)
    assert ctx.fastest_dtype("n0")[0] == "bfloat16"
    assert ctx.fastest_dtype("n0", activations="float32")[0] in ("float32", "q4")


def test_q8_q4_everywhere_prefills_in_finer_chunks_and_the_prediction_follows(monkeypatch):
    """Every rank in q8/q4 on a CPU: chunks of 64 tokens (``quant_matmul`` is as fast on 64 rows as on 256), so a
    pipeline's last stage waits for a quarter of the last chunk; a mixed or float plan keeps 256."""
    from exo_lab import defaults
    from exo_lab.cluster.topology import LinkProfile

    assert formats.all_quantized(["q4", "q8"])
    assert not formats.all_quantized(["q4", "float32"]) and not formats.all_quantized(["q4", None])
    assert not formats.all_quantized([])
    assert defaults.prefill_step(2, False, quantized=True) == defaults.CPU_QUANTIZED_PREFILL_STEP == 64
    assert defaults.prefill_step(2, False) == defaults.CPU_PREFILL_STEP == 256
    assert defaults.prefill_step(2, True, quantized=True) == defaults.GPU_PIPELINE_PREFILL_STEP
    reads = {"float32": 1.0, "bfloat16": 1.0, "q4": 6.0}
    links = [LinkProfile("n0", "n1", "10.0.0.1", "10.0.0.2", 0.2, 0.3, 10000, 10000)]
    topo = Topology({"n0": _node(0, reads), "n1": _node(1, reads)}, links)

    def pipeline_ttft() -> float:
        plans = plan(topo, _card(), context=4096, prompt_tokens=2048, lossy=True).plans
        pipe = next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)
        assert {r.dtype for r in pipe.ranks} == {"q4"}, pipe.describe()
        return pipe.ttft_s

    fine = pipeline_ttft()
    monkeypatch.setattr(defaults, "CPU_QUANTIZED_PREFILL_STEP", 256)
    assert pipeline_ttft() > fine


def test_planner_choice_from_a_real_profile():
    """Measured here (small budget): the chosen format is the one whose measured M=1 rate decodes fastest."""
    from exo_lab.cluster.profile import measure_profile

    prof = measure_profile(budget_s=2.0).to_json()
    here = [f for f in formats.FORMATS if not formats.get(f).widened or halfmatmul.available()]
    assert halfmatmul.available()  # this project's machines build the kernel (make setup)
    assert {f"{f}_m1" for f in here} == set(prof["matmul_weight_read_gb_per_s"])
    topo = Topology({"n0": NodeInfo("n0", "here", ["127.0.0.1"], profile=prof)}, [])
    # Llama-1B-sized, so reading the weights outweighs each step's fixed costs (on a small card two formats'
    # decode can tie, and then the exact one, prefilling faster, ranks first)
    card = card_from_config(synthetic.PRESETS["llama-1b"].config, "m", "float32")
    ctx = CostContext(topo, card, 1024, 64, 1, lossy=True)
    speeds = {f: ctx.layers_per_s("n0", f) for f in here}
    chosen = _dtypes(topo, card, lossy=True)["here"]
    assert speeds[chosen] == max(speeds.values()), speeds
    assert _dtypes(topo, card)["here"] == "float32"  # exact by default
