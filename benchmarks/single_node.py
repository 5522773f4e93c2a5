#!/usr/bin/env python
"""Single-node benchmark: exo_lab against plain mlx_lm on the same model.

For each synthetic model variant (bf16, fp32, 4-bit quantized from fp32) it
measures prompt and generation tokens/s of

- ``mlx_lm``: ``mlx_lm.stream_generate`` with the greedy sampler (baseline);
- ``exo in-proc``: ``exo_lab.Engine(path).generate(...)``;
- ``exo API``: the same engine behind ``exo_lab.serve`` through the official
  ``openai`` client (streaming, timed on the client side);

all in this one process, on one loaded model (the Engine's, loaded by
``mlx_lm.load``), alternating baseline and exo_lab within each repeat. It
then prints the ratios exo_lab / mlx_lm (target: >= 0.97 for generation),
the gain from the BLAS set-up exo_lab makes (OpenBLAS, measured against
mlx_lm with MLX's bundled reference BLAS in a child process), and how close
generation gets to the limit set by memory bandwidth.

    .venv/bin/python benchmarks/single_node.py                       # full run (slow on CPU)
    .venv/bin/python benchmarks/single_node.py --presets tiny --variants fp32 --pp 64 --tg 8 --repeat 1

Run with ``--help`` for the options; ``--json out.json`` keeps every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import exo_lab  # first: it preloads OpenBLAS before mlx is imported

# isort: split

import mlx.core as mx
from tqdm import tqdm

from exo_lab import _blas
from exo_lab.models import ModelCard
from exo_lab.paths import models_dir

TARGET_GEN_RATIO = 0.97
WARMUP_PROMPT = 32  # tokens in the untimed warm-up run of each path
WARMUP_TOKENS = 4

VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": {"dtype": "bfloat16", "quantize": None},
    "fp32": {"dtype": "float32", "quantize": None},
    "q4": {"dtype": "float32", "quantize": 4},  # quantized from fp32: fast on CPU
}

TEXT = (
    "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
    "Scientists measure the speed of light, engineers build bridges, and poets count syllables. "
    "Every morning the baker opens the shop at six and sells bread, cakes and coffee to the town. "
)


# ---------------------------------------------------------------------------
# prompts


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids: repeated English text, encoded (with BOS) and truncated."""
    reps = 1
    while True:
        ids = list(tokenizer.encode(TEXT * reps))
        if len(ids) >= n:
            return ids[:n]
        reps *= 2


def chat_messages(engine: Any, n: int) -> tuple[list[dict[str, str]], int]:
    """A user message whose chat-templated prompt is as close to ``n`` tokens as
    possible without exceeding it (at least one word); returns it and its length."""
    words = (TEXT * 4).split()
    while len(engine.chat_tokens([{"role": "user", "content": " ".join(words)}])) <= n:
        words += words

    def length(k: int) -> int:
        return len(engine.chat_tokens([{"role": "user", "content": " ".join(words[:k])}]))

    lo, hi = 1, len(words)  # length(hi) > n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= n:
            lo = mid
        else:
            hi = mid
    messages = [{"role": "user", "content": " ".join(words[:lo])}]
    return messages, length(lo)


# ---------------------------------------------------------------------------
# one timed run of each path


@dataclass
class Run:
    """One measured generation."""

    path: str  # mlx_lm | exo | api
    prompt_tokens: int
    generated: int
    prompt_tps: float
    generation_tps: float  # (generated - 1) / (time from first to last token), for every path
    ttft_s: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)


def run_mlx_lm(model: Any, tokenizer: Any, ids: list[int], tg: int) -> Run:
    """Baseline: ``mlx_lm.stream_generate`` with the greedy sampler, EOS ignored."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    # stream_generate stops at the tokenizer's EOS ids: empty them for the run
    # (a logits processor would add per-token work the exo_lab path does not do).
    saved = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = set()
    start = time.perf_counter()
    try:
        last = None
        for last in stream_generate(model, tokenizer, ids, max_tokens=tg, sampler=sampler):  # noqa: B007  (keep the last)
            pass
    finally:
        tokenizer.eos_token_ids = saved
    total = time.perf_counter() - start
    if last is None:
        raise RuntimeError("mlx_lm.stream_generate produced nothing")
    n = last.generation_tokens
    # mlx_lm reports n / (time from first to last token); exo_lab reports
    # (n - 1) / (same time), which counts the intervals actually timed. Use the
    # latter for every path so the ratios compare like with like.
    gen_tps = last.generation_tps * (n - 1) / n if n > 1 else 0.0
    return Run(
        "mlx_lm",
        last.prompt_tokens,
        n,
        last.prompt_tps,
        gen_tps,
        ttft_s=last.prompt_tokens / last.prompt_tps if last.prompt_tps else 0.0,
        raw={"mlx_lm_generation_tps": last.generation_tps, "finish_reason": last.finish_reason, "total_s": total},
    )


def run_exo(engine: Any, ids: list[int], tg: int) -> Run:
    """exo_lab in-process: ``Engine.generate`` and its own usage numbers."""
    gen = engine.generate(ids, max_tokens=tg, temperature=0, ignore_eos=True)
    for chunk in gen:
        if chunk.error:
            raise RuntimeError(f"exo_lab generation failed: {chunk.error}")
    u = gen.usage
    return Run(
        "exo",
        u.prompt_tokens,
        u.completion_tokens,
        u.prompt_tps,
        u.generation_tps,
        u.ttft_s,
        raw={**u.to_json(), "finish_reason": gen.finish_reason},
    )


def run_api(client: Any, model: str, messages: list[dict[str, str]], tg: int) -> Run:
    """exo_lab through the OpenAI API, streamed and timed by the client."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=tg,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first = last = None
    usage = None
    chunks = 0
    finish = None
    for event in stream:
        now = time.perf_counter()
        if event.usage is not None:
            usage = event.usage
        if event.choices:
            choice = event.choices[0]
            finish = choice.finish_reason or finish
            if choice.delta.content:
                chunks += 1
                first = now if first is None else first
                last = now
    if usage is None or first is None:
        raise RuntimeError("the API stream had no content or no usage chunk")
    n = usage.completion_tokens
    ttft = first - start
    gen_tps = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return Run(
        "api",
        usage.prompt_tokens,
        n,
        usage.prompt_tokens / ttft,
        gen_tps,
        ttft,
        raw={"content_chunks": chunks, "finish_reason": finish, "total_s": last - start},
    )


# ---------------------------------------------------------------------------
# models, bandwidth, BLAS child


def model_path(root: Path, preset: str, variant: str) -> Path:
    return root / f"{preset}-{variant}"


def ensure_models(root: Path, presets: list[str], variants: list[str]) -> dict[tuple[str, str], Path]:
    """Create the synthetic models that are missing (or were made with other settings)."""
    from filelock import FileLock

    from exo_lab.models import synthetic
    from exo_lab.models.store import is_model_dir

    def current(path: Path, preset: str, variant: str) -> bool:
        meta = path / "exo_lab_synthetic.json"
        if not (is_model_dir(path) and meta.is_file()):
            return False
        m = json.loads(meta.read_text())
        want = VARIANTS[variant]
        return m.get("preset") == preset and m.get("dtype") == want["dtype"] and m.get("quantize") == want["quantize"]

    paths = {(p, v): model_path(root, p, v) for p in presets for v in variants}
    missing = [key for key, path in paths.items() if not current(path, *key)]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        with tqdm(missing, desc="creating models", unit="model") as bar:
            for preset, variant in bar:
                bar.set_postfix_str(f"{preset}-{variant}")
                path = paths[(preset, variant)]
                with FileLock(str(path) + ".lock"):
                    if not current(path, preset, variant):
                        synthetic.create(path, preset, overwrite=True, **VARIANTS[variant])
                gc.collect()
                mx.clear_cache()
    return paths


def measure_bandwidth(gib: float = 0.5, iters: int = 5) -> dict[str, Any]:
    """Read bandwidth of MLX on this device, GB/s, from two kernels over ``gib`` of fp32.

    ``sum``: ``mx.sum`` over a vector. ``gemv``: ``x @ W.T`` with a 1-row ``x``,
    the shape of a linear layer during generation (on Linux CPU it goes to the
    BLAS, which may use several threads). On some CPUs ``mx.sum`` is limited by
    compute, not memory, so the limit is the best rate of either kernel.
    """
    n = int(gib * (1 << 30)) // 4
    cols = 8192
    kernels = {
        "sum": (lambda a, x: mx.sum(a), (n,)),
        "gemv": (lambda a, x: x @ a.T, (n // cols, cols)),
    }
    out: dict[str, Any] = {"bytes": n * 4, "device": str(mx.default_device()), "times_s": {}}
    for name, (op, shape) in kernels.items():
        a = mx.random.uniform(shape=shape, dtype=mx.float32)
        x = mx.random.uniform(shape=(1, cols), dtype=mx.float32)
        mx.eval(a, x)
        mx.eval(op(a, x))  # warm up
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            mx.eval(op(a, x))
            times.append(time.perf_counter() - t)
        out["times_s"][name] = times
        out[f"{name}_gbps"] = a.nbytes / min(times) / 1e9
        del a, x
        mx.clear_cache()
    out["best_gbps"] = max(out[f"{k}_gbps"] for k in kernels)
    return out


def bytes_per_token(card: ModelCard, pp: int, tg: int) -> dict[str, int]:
    """Bytes read from memory per generated token.

    Weights: every layer, the final norm and the output head, once each. The
    embedding lookup reads one row, which is negligible; with a tied embedding
    the matrix is read once, as the head. KV cache: the mean context of the
    generation (prompt + half the new tokens), in the activation dtype.
    """
    weights = sum(card.layer_bytes) + card.norm_bytes
    weights += card.embedding_bytes if card.tie_word_embeddings else card.head_bytes
    kv = int(card.kv_bytes_per_token * (pp + (tg - 1) / 2))
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def run_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """mlx_lm baseline with MLX's bundled BLAS, in a fresh process."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["EXO_LAB_BLAS"] = "reference"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-baseline",
        str(path),
        "--pp",
        str(args.pp),
        "--tg",
        str(args.tg),
        "--repeat",
        str(args.blas_repeat),
    ]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the bundled-BLAS child failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def child_main(args: argparse.Namespace) -> int:
    """``--child-baseline PATH``: mlx_lm alone, JSON on stdout (BLAS as inherited)."""
    from mlx_lm import load

    model, tokenizer = load(args.child_baseline)
    ids = prompt_ids(tokenizer, args.pp)
    run_mlx_lm(model, tokenizer, ids[:WARMUP_PROMPT], WARMUP_TOKENS)
    runs = []
    for _ in tqdm(range(args.repeat), desc=f"mlx_lm, {_blas.name()} BLAS", unit="run", leave=False):
        runs.append(asdict(run_mlx_lm(model, tokenizer, ids, args.tg)))
    print(
        json.dumps(
            {"blas": _blas.name(), "ld_preload": os.environ.get("LD_PRELOAD", ""), "runs": runs, **medians(runs)}
        )
    )
    return 0


# ---------------------------------------------------------------------------
# one variant


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "prompt_tps": statistics.median(r["prompt_tps"] for r in runs),
        "generation_tps": statistics.median(r["generation_tps"] for r in runs),
    }


def bench_variant(preset: str, variant: str, path: Path, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    import openai

    paths = ["mlx_lm", "exo"] + ([] if args.skip_api else ["api"])
    steps = len(paths) * (args.repeat + 1)
    bar = tqdm(total=steps, desc=f"{preset}-{variant}", unit="run")
    bar.set_postfix_str("loading")
    engine = exo_lab.Engine(path)
    server = client = None
    result: dict[str, Any] = {"preset": preset, "variant": variant, "path": str(path), **VARIANTS[variant]}
    try:
        ids = prompt_ids(engine.tokenizer, args.pp)
        if len(ids) != args.pp:
            raise RuntimeError(f"could only build a {len(ids)}-token prompt, not {args.pp}")
        if not args.skip_api:
            server = exo_lab.serve(engine, port=0)
            model_id = server.registry.names()[0]
            client = openai.OpenAI(
                base_url=server.openai_base_url,
                api_key="none",
                max_retries=0,
                timeout=3600.0,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            )
            messages, api_pp = chat_messages(engine, args.pp)
            warm_messages, _ = chat_messages(engine, WARMUP_PROMPT)
            result["api_prompt_tokens"] = api_pp

        def one(kind: str, warm: bool) -> Run:
            p, n = (ids[:WARMUP_PROMPT], WARMUP_TOKENS) if warm else (ids, args.tg)
            if kind == "mlx_lm":
                return run_mlx_lm(engine.model, engine.tokenizer, p, n)
            if kind == "exo":
                return run_exo(engine, p, n)
            return run_api(client, model_id, warm_messages if warm else messages, n)

        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
        for rep in range(-1, args.repeat):  # -1: untimed warm-up of every path
            for kind in paths:
                bar.set_postfix_str("warm-up" if rep < 0 else f"repeat {rep + 1}: {kind}")
                run = one(kind, rep < 0)
                if rep >= 0:
                    runs[kind].append(asdict(run))
                bar.update()
        result["runs"] = runs
        result["median"] = {k: medians(v) for k, v in runs.items()}
        result["generated"] = {k: sorted({r["generated"] for r in v}) for k, v in runs.items()}
    finally:
        bar.close()
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        engine.close()
        engine = server = client = None  # drop the model before clearing MLX's cache
        gc.collect()
        mx.clear_cache()

    card = ModelCard.from_dir(path)
    per_token = bytes_per_token(card, args.pp, args.tg)
    limit = bandwidth * 1e9 / per_token["total"]
    result["card"] = {
        "weight_bytes": card.weight_bytes,
        "dtype": card.dtype,
        "quantization": card.quantization,
        "tie_word_embeddings": card.tie_word_embeddings,
    }
    result["bytes_per_token"] = per_token
    result["bandwidth_limit_tps"] = limit
    result["bandwidth_fraction"] = result["median"]["exo"]["generation_tps"] / limit

    med = result["median"]
    base = med["mlx_lm"]
    result["ratio"] = {
        kind: {
            "prompt": med[kind]["prompt_tps"] / base["prompt_tps"],
            "generation": med[kind]["generation_tps"] / base["generation_tps"],
        }
        for kind in paths
        if kind != "mlx_lm"
    }
    if not args.skip_blas:
        child = run_child(path, args)
        result["bundled_blas"] = child
        result["blas_gain"] = {
            "prompt": med["exo"]["prompt_tps"] / child["prompt_tps"],
            "generation": med["exo"]["generation_tps"] / child["generation_tps"],
        }
    return result


# ---------------------------------------------------------------------------
# output


def num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(headers: list[list[str]], rows: list[list[str]]) -> str:
    cols = len(rows[0]) if rows else len(headers[-1])
    widths = [max(len(r[i]) for r in headers + rows) for i in range(cols)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    rule = "-" * len(fmt(headers[-1]))
    return "\n".join([*map(fmt, headers), rule, *map(fmt, rows)])


def report(results: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> None:
    print()
    print(
        f"exo_lab single-node benchmark: prompt {args.pp} tokens, generate {args.tg} tokens (EOS ignored), "
        f"greedy, median of {args.repeat}"
    )
    print(
        f"BLAS: mlx_lm baseline, exo in-proc and exo API run in this process with {env['blas']}"
        f"{' (' + env['openblas'] + ')' if env['blas'] == 'openblas' else ''}; "
        + (
            "BLAS gain compares exo_lab (this set-up) with mlx_lm using MLX's bundled BLAS in a child "
            f"(child reported: {', '.join(sorted(env['child_blas'])) or '-'}; median of {args.blas_repeat})"
            if not args.skip_blas
            else "BLAS comparison skipped"
        )
    )
    bw = env["bandwidth"]
    print(
        f"memory bandwidth (MLX {bw['device']}, fp32, {bw['bytes'] >> 20} MiB, best of {len(bw['times_s']['sum'])}): "
        f"{bw['best_gbps']:.1f} GB/s used as the limit (mx.sum {bw['sum_gbps']:.1f}, 1-row matmul {bw['gemv_gbps']:.1f})"
    )
    print(f"target: exo_lab / mlx_lm >= {TARGET_GEN_RATIO} for generation tokens/s")
    print()

    headers = [
        [
            "",
            "prompt tok/s",
            "",
            "",
            "gen tok/s",
            "",
            "",
            "exo/mlx_lm gen",
            "",
            "exo/mlx_lm prompt",
            "",
            "BLAS gain",
            "",
            "bw",
        ],
        [
            "variant",
            "mlx_lm",
            "exo",
            "API",
            "mlx_lm",
            "exo",
            "API",
            "in-proc",
            "API",
            "in-proc",
            "API",
            "prompt",
            "gen",
            "frac",
        ],
    ]
    rows = []
    for r in results:
        med, rat, gain = r["median"], r.get("ratio", {}), r.get("blas_gain", {})
        api = med.get("api", {})
        rows.append(
            [
                f"{r['preset']}-{r['variant']}",
                num(med["mlx_lm"]["prompt_tps"]),
                num(med["exo"]["prompt_tps"]),
                num(api.get("prompt_tps")),
                num(med["mlx_lm"]["generation_tps"]),
                num(med["exo"]["generation_tps"]),
                num(api.get("generation_tps")),
                ratio(rat["exo"]["generation"]),
                ratio(rat.get("api", {}).get("generation")),
                ratio(rat["exo"]["prompt"]),
                ratio(rat.get("api", {}).get("prompt")),
                f"{gain['prompt']:.2f}x" if gain else "-",
                f"{gain['generation']:.2f}x" if gain else "-",
                f"{r['bandwidth_fraction']:.2f}",
            ]
        )
    print(table(headers, rows))
    print()

    def mark(x: float) -> str:
        return "ok" if x >= TARGET_GEN_RATIO else "BELOW TARGET"

    for r in results:
        name = f"{r['preset']}-{r['variant']}"
        rat = r["ratio"]
        gen = f"in-proc {rat['exo']['generation']:.3f} ({mark(rat['exo']['generation'])})"
        prm = f"in-proc {rat['exo']['prompt']:.3f}"
        if "api" in rat:
            gen += f"  API {rat['api']['generation']:.3f} ({mark(rat['api']['generation'])})"
            prm += f"  API {rat['api']['prompt']:.3f}"
        print(f"{name}: ratio gen    exo/mlx_lm  {gen}  [target >= {TARGET_GEN_RATIO}]")
        print(f"{name}: ratio prompt exo/mlx_lm  {prm}")
        if "blas_gain" in r:
            child = r["bundled_blas"]
            print(
                f"{name}: BLAS gain    exo ({env['blas']}) / mlx_lm ({child['blas']})  prompt "
                f"{r['blas_gain']['prompt']:.2f}x  gen {r['blas_gain']['generation']:.2f}x  "
                f"(mlx_lm bundled: prompt {num(child['prompt_tps'])}, gen {num(child['generation_tps'])} tok/s)"
            )
        b = r["bytes_per_token"]
        print(
            f"{name}: bandwidth    {b['weights'] / 1e9:.3f} GB weights + {b['kv_cache'] / 1e9:.3f} GB KV cache "
            f"per token -> max {num(r['bandwidth_limit_tps'])} tok/s; exo gen reaches "
            f"{r['bandwidth_fraction']:.2f} of it"
        )
        notes = []
        if "api_prompt_tokens" in r:
            differs = "" if r["api_prompt_tokens"] == args.pp else f", not {args.pp}"
            notes.append(
                f"API prompt is {r['api_prompt_tokens']} tokens (chat template over a user message{differs}); "
                "API prompt tok/s = prompt tokens / client time to first content chunk"
            )
        short = {k: v for k, v in r["generated"].items() if v != [args.tg]}
        if short:
            notes.append(f"generated token counts differ from {args.tg}: {short}")
        for note in notes:
            print(f"{name}: note         {note}")
    print()
    print(
        "gen tok/s = (tokens - 1) / (time from first to last token) on every path (mlx_lm's own figure, "
        "tokens / that time, is rescaled; raw values are in --json)"
    )


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from exo_lab.models.synthetic import PRESETS

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", default="llama-1b", help=f"comma-separated synthetic presets ({', '.join(PRESETS)})")
    p.add_argument("--variants", default="bf16,fp32,q4", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--tg", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--repeat", type=int, default=2, help="timed repeats per path (default 2; medians are shown)")
    p.add_argument(
        "--blas-repeat", type=int, default=1, help="repeats of the bundled-BLAS child (default 1: it is slow)"
    )
    p.add_argument("--skip-api", action="store_true", help="do not benchmark the HTTP API")
    p.add_argument("--skip-blas", action="store_true", help="do not run mlx_lm with MLX's bundled BLAS")
    p.add_argument("--models-dir", type=Path, help="where the models are made (default <models dir>/bench)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write all raw numbers to this JSON file")
    p.add_argument("--child-baseline", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.presets = [s for s in args.presets.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    for preset in args.presets:
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    for variant in args.variants:
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if args.pp < WARMUP_PROMPT or args.tg < 2 or args.repeat < 1 or args.blas_repeat < 1:
        p.error(f"need --pp >= {WARMUP_PROMPT}, --tg >= 2, --repeat >= 1 and --blas-repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_baseline:
        return child_main(args)

    import mlx_lm

    root = args.models_dir or models_dir() / "bench"
    env: dict[str, Any] = {
        "blas": _blas.name(),
        "openblas": _blas.find_openblas() or "",
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "exo_lab": exo_lab.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "child_blas": set(),
    }
    if env["blas"] != "openblas" and sys.platform == "linux":
        print(
            f"warning: this process uses the {env['blas']} BLAS, not OpenBLAS "
            "(install libopenblas0-pthread); the BLAS gain will be about 1",
            file=sys.stderr,
        )
    paths = ensure_models(root, args.presets, args.variants)
    print("measuring memory bandwidth ...", file=sys.stderr)
    env["bandwidth"] = measure_bandwidth()
    bandwidth = env["bandwidth"]["best_gbps"]

    results = []
    for preset in args.presets:
        for variant in args.variants:
            r = bench_variant(preset, variant, paths[(preset, variant)], args, bandwidth)
            if "bundled_blas" in r:
                env["child_blas"].add(r["bundled_blas"]["blas"])
            results.append(r)

    report(results, args, env)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "env": {**env, "child_blas": sorted(env["child_blas"])},
                    "target_generation_ratio": TARGET_GEN_RATIO,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
