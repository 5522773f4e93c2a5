#!/usr/bin/env python
"""Weight formats on the CPU path: decode and prefill tok/s of one model held in each format.

One synthetic model (default: the ``llama-1b`` preset, the shape of Llama-3.2-1B, stored in fp32)
is loaded the way a shard worker loads it (:func:`exo_lab.engine.shard.load_shard` with the rank's
weight format, :mod:`exo_lab.models.formats`) in each of

- ``float32``: fp32 weights and activations, MLX matmuls on OpenBLAS (the baseline);
- ``bfloat16``, ``float16``: MLX's own CPU kernels, activations in the same dtype;
- ``q8``, ``q4``: ``mx.quantize`` (group 64) of the fp32 weights: ``nn.QuantizedLinear`` /
  ``nn.QuantizedEmbedding`` with fp32 scales, biases and activations, computed by exo_lab's kernel
  (:mod:`exo_lab.models.qmatmul`);
- ``bf16w``, ``fp16w``: the 16-bit weights computed with fp32 activations by exo_lab's kernel
  (:mod:`exo_lab.models.halfmatmul`);

alternating the order of the formats between repeats, one format in memory at a time. For each
format it prints decode tok/s (greedy, M=1) as exo_lab's one-process instance decodes on this machine: a step
ahead (each step built while the one before computes, :mod:`exo_lab.engine.lookahead`) where the instance
would, else in lock step (both are measured and printed, and must give the same tokens), the bytes one decode
step reads (every weight the step uses: all layers and the head, the tied embedding once, plus the KV cache),
the memory-bandwidth limit for that format (bandwidth / bytes per token, bandwidth measured here before and
after, the best run), decode as a fraction of that limit (target >= 0.7), prefill tok/s and the ratios to fp32.

llama.cpp on the same weights: when ``gguf`` imports and either ``--llama-bench PATH`` (llama.cpp's
``llama-bench``, built from source) is given or ``llama_cpp`` (llama-cpp-python) imports, the fp32
weights are written as GGUF (F32, BF16, F16, Q8_0, Q4_0 by the ``gguf`` package; bf16w/fp16w use the
BF16/F16 files) and decoded and prefilled with ``n_threads`` = the CPU count, interleaved with the MLX
runs; the ratio MLX / llama.cpp is printed per format. Without them the output says so.

    python benchmarks/weight_formats.py                                   # llama-1b, all formats
    python benchmarks/weight_formats.py --preset tiny --tg 8 --pp 32 --repeat 1
    python benchmarks/weight_formats.py --formats float32,bf16w,fp16w --llama-bench ~/llama.cpp/build/bin/llama-bench
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import exo_lab  # noqa: F401  (first: it preloads OpenBLAS before mlx is imported)

# isort: split

import mlx.core as mx
from mlx.utils import tree_flatten

from exo_lab import _blas, defaults
from exo_lab.cluster import profile
from exo_lab.engine import lookahead
from exo_lab.engine.shard import ShardSpec, load_shard
from exo_lab.models import formats, synthetic
from exo_lab.paths import models_dir

TARGET_FRACTION = 0.7
GGUF_TYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "q8": "Q8_0",
    "q4": "Q4_0",
    "bf16w": "BF16",  # the same weights as bfloat16 (llama.cpp computes BF16 with fp32 activations too)
    "fp16w": "F16",
}


@dataclass
class Run:
    """One format, one repeat."""

    engine: str  # mlx | llama.cpp
    fmt: str
    decode_tps: float
    prefill_tps: float
    weight_bytes: float  # read per decode step
    kv_bytes: float  # KV cache read per decode step (mean over the decode)
    first_token: int
    lock_tps: float = 0.0  # mlx: decode in lock step (each step built after the last one's token was read)
    ahead_tps: float = 0.0  # mlx: decode one step ahead (built on the last step's lazy token)
    ahead: bool = False  # mlx: whether exo_lab's one-process instance decodes a step ahead here (decode_tps is that)


def ensure_model(root: Path, preset: str) -> Path:
    """The synthetic ``preset`` in fp32 under ``root`` (made once, shared with other benchmarks)."""
    from filelock import FileLock

    from exo_lab.models.store import is_model_dir

    path = root / f"{preset}-fp32"
    meta = path / "exo_lab_synthetic.json"

    def current() -> bool:
        if not (is_model_dir(path) and meta.is_file()):
            return False
        m = json.loads(meta.read_text())
        return m.get("preset") == preset and m.get("dtype") == "float32" and not m.get("quantize")

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not current():
            print(f"creating {path} ...", flush=True)
            synthetic.create(path, preset, dtype="float32", overwrite=True)
            gc.collect()
            mx.clear_cache()
    return path


def prompt_tokens(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % min(vocab, 32000) + 1 for i in range(n)]


def decode_lock_step(shard: Any, cache: Any, token: int, tg: int) -> tuple[float, int]:
    """``tg`` greedy steps, each built once the last one's token is read; (seconds, last token)."""
    start = time.perf_counter()
    for _ in range(tg):
        token = int(mx.argmax(shard(mx.array([[token]]), cache)[0, -1]).item())
    return time.perf_counter() - start, token


def decode_ahead(shard: Any, cache: Any, token: int, tg: int) -> tuple[float, int]:
    """``tg`` greedy steps one ahead, as exo_lab's one-stage instances decode where it pays
    (:mod:`exo_lab.engine.lookahead`): step ``t + 1`` is built on step ``t``'s lazy token and queued before that
    token is read, so building a step runs while the one before computes; (seconds, last token)."""
    start = time.perf_counter()
    step = mx.argmax(shard(mx.array([[token]], mx.int32), cache)[:, -1], axis=-1)
    mx.async_eval(step)
    for i in range(tg):
        after = None
        if i + 1 < tg:
            after = mx.argmax(shard(step[:, None].astype(mx.int32), cache)[:, -1], axis=-1)
            mx.async_eval(after)
        token = int(step.item())
        step = after
    return time.perf_counter() - start, token


def mlx_run(path: Path, config: dict[str, Any], fmt: str, pp: int, tg: int) -> Run:
    """Load ``path`` in ``fmt``, prefill ``pp`` tokens, then decode ``tg`` (greedy) in lock step, and after the
    same prompt again ``tg`` one step ahead; timed. Its decode figure is what exo_lab's one-process instance would do
    on this machine (:func:`exo_lab.engine.lookahead.pays`: ahead where a core is spare and building a step is a
    big enough share of it), both kept."""
    layers = int(config["num_hidden_layers"])
    shard, _ = load_shard(path, ShardSpec(0, layers, layers, fmt))
    params = dict(tree_flatten(shard.parameters()))
    weight_bytes = float(sum(v.nbytes for v in params.values()))  # tied: the table is read once, as the head
    if shard.lm_head is not None and shard.embed_tokens is not None:  # untied: the embedding reads one row
        weight_bytes -= sum(v.nbytes for k, v in params.items() if k.startswith("embed_tokens."))
    ids = prompt_tokens(pp, int(config["vocab_size"]))
    # warm-up (first-call costs, kernel set-up), not timed; then whether the instance would step ahead
    cache = shard.make_cache()
    mx.eval(shard(mx.array(ids[:8])[None], cache))
    for _ in range(2):
        mx.eval(shard(mx.array([[1]]), cache))
    mode = defaults.lookahead()
    ahead = mode == "always" or (mode == "auto" and lookahead.pays(mx.distributed.init(), shard))
    cache = shard.make_cache()
    start = time.perf_counter()
    logits = shard(mx.array(ids)[None], cache)
    token = mx.argmax(logits[0, -1]).item()
    prefill_s = time.perf_counter() - start
    first = int(token)
    lock_s, last = decode_lock_step(shard, cache, first, tg)
    kv = sum(float(c.nbytes) for c in cache) * (pp + tg / 2) / (pp + tg)
    cache = shard.make_cache()  # the same prompt again (untimed), then the same decode a step ahead
    mx.eval(shard(mx.array(ids)[None], cache))
    ahead_s, last_ahead = decode_ahead(shard, cache, first, tg)
    if last_ahead != last:
        raise RuntimeError(f"{fmt}: decoding a step ahead gave other tokens ({last_ahead} != {last})")
    del shard, params, cache, logits
    gc.collect()
    mx.clear_cache()
    lock_tps, ahead_tps = tg / lock_s, tg / ahead_s
    decode = ahead_tps if ahead else lock_tps
    return Run("mlx", fmt, decode, pp / prefill_s, weight_bytes, kv, first, lock_tps, ahead_tps, ahead)


# --- llama.cpp ---------------------------------------------------------------


def llama_cpp_available(bench: Path | None) -> str | None:
    """None when llama.cpp can be used here (``bench``: its ``llama-bench`` program, else llama-cpp-python),
    else why not."""
    try:
        import gguf  # noqa: F401

        if bench is None:
            import llama_cpp  # noqa: F401
    except ImportError as exc:
        return (
            f"llama.cpp not measured: {exc.name} is not installed (pip install gguf, and llama-cpp-python or "
            "--llama-bench PATH: llama.cpp's llama-bench, built from source)"
        )
    if bench is not None and not os.access(bench, os.X_OK):
        return f"llama.cpp not measured: {bench} is not an executable llama-bench"
    return None


def llama_bench_run(bench: Path, gguf_path: Path, fmt: str, pp: int, tg: int, threads: int) -> Run:
    """llama.cpp's ``llama-bench`` on ``gguf_path``: its prompt (``pp`` tokens) and generation (``tg``) tests."""
    out = subprocess.run(
        [str(bench), "-m", str(gguf_path), "-p", str(pp), "-n", str(tg), "-t", str(threads), "-r", "1", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tests = json.loads(out)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return Run("llama.cpp", fmt, float(decode), float(prefill), float(gguf_path.stat().st_size), 0.0, -1)


def write_gguf(path: Path, config: dict[str, Any], out: Path, fmt: str) -> Path:
    """The fp32 checkpoint at ``path`` as a llama GGUF in ``fmt``'s GGML type (norms stay F32)."""
    import gguf
    import numpy as np

    from exo_lab.models.tensors import read_tensors

    target = out / f"{path.name}-{GGUF_TYPES[fmt]}.gguf"
    if target.exists():
        return target
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[fmt])
    w = gguf.GGUFWriter(str(target) + ".partial", "llama")
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_file_type(
        {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}[GGUF_TYPES[fmt]]  # llama_ftype
    )
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = int(config["vocab_size"])
    tokens = [b""] * vocab
    for text, i in tok["model"]["vocab"].items():
        if i < vocab:
            tokens[i] = text.encode()
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab:
            tokens[added["id"]] = added["content"].encode()
    tokens = [t or f"[PAD{i}]".encode() for i, t in enumerate(tokens)]
    merges = tok["model"].get("merges", [])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(int(config.get("bos_token_id") or 1))
    eos = config.get("eos_token_id") or 2
    w.add_eos_token_id(int(eos[0] if isinstance(eos, list) else eos))
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }

    def permute(x: np.ndarray, n_head: int) -> np.ndarray:  # HF rotate-half -> GGML interleaved RoPE rows
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    def add(name: str, arr: mx.array) -> None:
        data = np.array(arr.astype(mx.float32))
        if data.ndim == 1:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
            return
        if GGUF_TYPES[fmt] == "F32":
            w.add_tensor(name, data)
        elif GGUF_TYPES[fmt] == "F16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    from exo_lab.models.card import read_tensor_index

    index = [t.name for t in read_tensor_index(path)]
    weights = read_tensors(path, index)
    add("token_embd.weight", weights["model.embed_tokens.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:
        add("output.weight", weights["lm_head.weight"])
    for i in range(int(config["num_hidden_layers"])):
        for hf, gg in names.items():
            arr = weights[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                arr = mx.array(permute(np.array(arr), heads))
            elif hf == "self_attn.k_proj":
                arr = mx.array(permute(np.array(arr), kv_heads))
            add(f"blk.{i}.{gg}.weight", arr)
    del weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(target) + ".partial", target)
    return target


def llama_cpp_run(gguf_path: Path, fmt: str, pp: int, tg: int, vocab: int, threads: int) -> Run:
    """llama.cpp on ``gguf_path``: prefill ``pp`` tokens, decode ``tg`` (greedy); timed."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(gguf_path),
        n_ctx=pp + tg + 16,
        n_batch=max(pp, 8),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ids = prompt_tokens(pp, vocab)

    def last_token() -> int:  # greedy on the last evaluated token's logits (llama.cpp's own buffer: later
        # llama-cpp-python versions keep no ``scores`` without ``logits_all``, which would compute every row's)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    llm.eval(ids[:8])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    token = last_token()
    prefill_s = time.perf_counter() - start
    first = token
    start = time.perf_counter()
    for _ in range(tg):
        llm.eval([token])
        token = last_token()
    decode_s = time.perf_counter() - start
    size = gguf_path.stat().st_size
    llm.close()
    return Run("llama.cpp", fmt, tg / decode_s, pp / prefill_s, float(size), 0.0, first)


# --- report ------------------------------------------------------------------


def _median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def report(runs: list[Run], fmts: list[str], bandwidth: float, llama_note: str | None) -> list[dict[str, Any]]:
    by = {(r.engine, r.fmt): [x for x in runs if (x.engine, x.fmt) == (r.engine, r.fmt)] for r in runs}
    base = by.get(("mlx", "float32"))
    base_dec = _median(base, "decode_tps") if base else 0.0
    base_pre = _median(base, "prefill_tps") if base else 0.0
    rows = []
    print(
        f"\nmemory bandwidth (best of mx.sum on 1 and {os.cpu_count()} CPU streams and an fp32 GEMV): {bandwidth:.1f} GB/s"
    )
    head = (
        f"{'format':9s} {'decode tok/s':>12s} {'lock step':>9s} {'ahead':>7s} {'MB/token':>9s} {'limit tok/s':>11s} {'of limit':>8s} "
        f"{'prefill tok/s':>13s} {'dec/fp32':>8s} {'pre/fp32':>8s} {'llama.cpp dec':>13s} {'pre':>7s} "
        f"{'mlx/llama dec':>13s} {'pre':>5s}"
    )
    print(head)
    print("-" * len(head))
    for fmt in fmts:
        mine = by.get(("mlx", fmt))
        if not mine:
            continue
        dec, pre = _median(mine, "decode_tps"), _median(mine, "prefill_tps")
        per_token = _median(mine, "weight_bytes") + _median(mine, "kv_bytes")
        limit = bandwidth * 1e9 / per_token
        lock, ahead = _median(mine, "lock_tps"), _median(mine, "ahead_tps")
        row: dict[str, Any] = {
            "format": fmt,
            "decode_tps": dec,
            "decode_lock_step_tps": lock,
            "decode_ahead_tps": ahead,
            "steps_ahead": sum(r.ahead for r in mine) / len(mine),  # the repeats whose instance would step ahead
            "prefill_tps": pre,
            "bytes_per_token": per_token,
            "limit_tps": limit,
            "fraction_of_limit": dec / limit,
            "decode_vs_fp32": dec / base_dec if base_dec else None,
            "prefill_vs_fp32": pre / base_pre if base_pre else None,
        }
        lc = by.get(("llama.cpp", fmt))
        lc_cells = f"{'-':>13s} {'-':>7s} {'-':>13s} {'-':>5s}"
        if lc:
            ld, lp = _median(lc, "decode_tps"), _median(lc, "prefill_tps")
            row.update(llama_cpp_decode_tps=ld, llama_cpp_prefill_tps=lp, vs_llama_cpp_decode=dec / ld)
            row["vs_llama_cpp_prefill"] = pre / lp
            lc_cells = f"{ld:13.2f} {lp:7.1f} {dec / ld:13.2f} {pre / lp:5.2f}"
        rows.append(row)
        print(
            f"{fmt:9s} {dec:11.2f}{'*' if row['steps_ahead'] >= 0.5 else ' '} {lock:9.2f} {ahead:7.2f} {per_token / 1e6:9.0f} {limit:11.2f} {dec / limit:8.2f} {pre:13.1f} "
            f"{row['decode_vs_fp32'] or 0:8.2f} {row['prefill_vs_fp32'] or 0:8.2f} {lc_cells}"
        )
    print(
        "decode tok/s: as exo_lab's one-process instance decodes here, in lock step or a step ahead (*: ahead, in "
        "most repeats: a core to spare and the graph's building a big enough share of a step)"
    )
    below = [r["format"] for r in rows if r["fraction_of_limit"] < TARGET_FRACTION]
    print(f"\ntarget: decode >= {TARGET_FRACTION} of the bandwidth limit; below it: {', '.join(below) or 'none'}")
    fastest = max(rows, key=lambda r: r["decode_tps"])["format"] if rows else "-"
    print(f"fastest decode here: {fastest}")
    if llama_note:
        print(llama_note)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--formats", default=",".join(formats.FORMATS), help="comma-separated weight formats")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--tg", type=int, default=16, help="decode steps")
    ap.add_argument("--repeat", type=int, default=2, help="runs per format (order alternates)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    ap.add_argument(
        "--llama-bench",
        type=Path,
        default=os.environ.get("LLAMA_BENCH") or None,
        help="llama.cpp's llama-bench program (instead of llama-cpp-python); env LLAMA_BENCH",
    )
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    args = ap.parse_args(argv)
    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in fmts:
        formats.get(f)
    root = args.models_dir or models_dir() / "bench"
    path = ensure_model(root, args.preset)
    config = json.loads((path / "config.json").read_text())
    print(
        f"{args.preset} ({path}), pp={args.pp}, tg={args.tg}, repeat={args.repeat}, blas={_blas.name()}, "
        f"cpus={os.cpu_count()}, mlx {mx.__version__}"  # pyright: ignore[reportAttributeAccessIssue]
    )
    llama_note = (
        "llama.cpp not measured (--no-llama-cpp)" if args.no_llama_cpp else llama_cpp_available(args.llama_bench)
    )
    ggufs: dict[str, Path] = {}
    if llama_note is None:
        for f in fmts:
            print(f"writing GGUF {GGUF_TYPES[f]} ...", flush=True)
            ggufs[f] = write_gguf(path, config, root, f)
            gc.collect()
            mx.clear_cache()
    bandwidths = [profile.measure_bandwidth(1.0) for _ in range(3)]
    print(f"memory bandwidth before: {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s", flush=True)
    runs: list[Run] = []
    for rep in range(args.repeat):
        order = fmts if rep % 2 == 0 else fmts[::-1]
        for f in order:
            engines = ["mlx", "llama.cpp"] if f in ggufs else ["mlx"]
            for engine in engines if rep % 2 == 0 else engines[::-1]:
                if engine == "mlx":
                    r = mlx_run(path, config, f, args.pp, args.tg)
                elif args.llama_bench is not None:
                    r = llama_bench_run(args.llama_bench, ggufs[f], f, args.pp, args.tg, os.cpu_count() or 1)
                else:
                    r = llama_cpp_run(ggufs[f], f, args.pp, args.tg, int(config["vocab_size"]), os.cpu_count() or 1)
                runs.append(r)
                per_token = r.weight_bytes + r.kv_bytes
                print(
                    f"  [{rep}] {engine:9s} {f:9s} decode {r.decode_tps:7.2f} tok/s"
                    + (f" (lock step {r.lock_tps:.2f}, ahead {r.ahead_tps:.2f})" if engine == "mlx" else "")
                    + f"  prefill {r.prefill_tps:7.1f} tok/s"
                    f"  {per_token / 1e6:6.0f} MB/token  {r.decode_tps * per_token / 1e9:5.2f} GB/s read"
                    f"  {r.decode_tps * per_token / 1e9 / max(bandwidths):.2f} of the bandwidth so far",
                    flush=True,
                )
    bandwidths += [profile.measure_bandwidth(1.0) for _ in range(3)]
    bandwidth = max(bandwidths)
    rows = report(runs, fmts, bandwidth, llama_note)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "bandwidth_gb_s": bandwidth,
                    "bandwidth_runs": bandwidths,
                    "rows": rows,
                    "runs": [asdict(r) for r in runs],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
