"""exo_lab's API against mlx_lm.server on the same model and the same prompts, through ``exo-lab bench --url``.

Starts ``exo-lab serve`` and ``python -m mlx_lm.server`` on one synthetic model (made once under
``<models dir>/bench/``), then sweeps both with :func:`exo_lab.bench.bench_url` (exact-length prompts
from the model's tokenizer, temperature 0, streamed, timed on the client), alternating which server
goes first in each round, and prints the medians side by side with the ratios exo_lab / mlx_lm.

    .venv/bin/python benchmarks/servers.py                                  # llama-1b fp32
    .venv/bin/python benchmarks/servers.py --preset tiny --pp 64 --tg 8 --rounds 1 --concurrency 1   # smoke

mlx_lm.server does not take ``ignore_eos``: a request may end at EOS before ``--tg`` tokens there (the
completion tokens of each side are printed; decode tok/s compares rates, not lengths).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import exo_lab  # noqa: F401  (first: OpenBLAS before MLX)
from exo_lab.bench import bench_url
from exo_lab.paths import models_dir


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {timeout:.0f} s")


def _model(preset: str, dtype: str) -> Path:
    from exo_lab.models import synthetic

    path = models_dir() / "bench" / f"servers-{preset}-{dtype}"
    if not (path / "config.json").is_file():
        synthetic.create(path, preset=preset, dtype=dtype)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", type=Path, help="an existing model directory instead of a synthetic preset")
    ap.add_argument("--pp", default="128,512")
    ap.add_argument("--tg", default="64")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--repeat", type=int, default=2, help="requests per combination per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating which server goes first")
    args = ap.parse_args()

    from mlx_lm.utils import load_tokenizer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the two servers on the way out (finally below)
    path = args.model or _model(args.preset, args.dtype)
    tokenizer = load_tokenizer(path)
    ports = {"exo_lab": _free_port(), "mlx_lm": _free_port()}
    procs = {
        "exo_lab": subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exo_lab.cli",
                "serve",
                "--model",
                str(path),
                "--name",
                "m",
                "--port",
                str(ports["exo_lab"]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        "mlx_lm": subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--port", str(ports["mlx_lm"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    }
    try:
        urls = {name: f"http://127.0.0.1:{port}/v1" for name, port in ports.items()}
        for name, proc in procs.items():
            _wait(urls[name] + "/models", proc)
        points: dict[str, dict[tuple[int, int, int], list]] = {name: {} for name in urls}
        order = list(urls)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                res = bench_url(
                    urls[name],
                    "m" if name == "exo_lab" else str(path),  # mlx_lm.server names a local model by its path
                    pp=args.pp,
                    tg=args.tg,
                    concurrency=args.concurrency,
                    repeat=args.repeat,
                    tokenizer=tokenizer,
                    progress=False,
                )
                for pt in res.plans[0].points:
                    points[name].setdefault((pt.pp, pt.tg, pt.concurrency), []).append(pt)
        print(f"model {path.name}: {args.rounds} round(s) x {args.repeat} request(s) per combination, alternating")
        print(f"{'pp':>5} {'tg':>4} {'c':>3}  {'metric':14s} {'exo_lab':>10} {'mlx_lm':>10} {'exo/mlx':>8}")
        for key in sorted(points["exo_lab"]):
            for metric, better in (
                ("ttft_s", "lower"),
                ("prompt_tps", "higher"),
                ("decode_tps", "higher"),
                ("aggregate_tps", "higher"),
            ):
                vals = {}
                for name in urls:
                    meds = [p.median(metric) for p in points[name].get(key, []) if p.ok and p.median(metric)]
                    vals[name] = statistics.median(meds) if meds else None
                a, b = vals["exo_lab"], vals["mlx_lm"]
                ratio = f"{a / b:8.2f}" if a and b else "       -"
                print(
                    f"{key[0]:5d} {key[1]:4d} {key[2]:3d}  {metric:14s} {a or 0:10.4g} {b or 0:10.4g} {ratio}  ({better} is better)"
                )
            done = {n: sorted({c for p in points[n].get(key, []) for c in p.completion_tokens}) for n in urls}
            print(f"{'':14s} completion tokens per request: exo_lab {done['exo_lab']}, mlx_lm {done['mlx_lm']}")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
