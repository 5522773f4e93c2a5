"""Soak: N concurrent streams for a while against one process and a 2-rank pipeline; errors, hangs, RSS.

Run: .venv/bin/python benchmarks/soak.py [--minutes 10] [--streams 8] [--preset tiny] [--only single|pipeline]

Two targets, one after the other, each for ``--minutes``:

- **single**: ``exo-lab serve`` of the model in a child process (one process: the Engine and the API);
- **pipeline**: ``exo_lab.local_cluster(2)`` and the model launched on its 2-node pipeline plan, served
  by this process's coordinator (ranks in two worker processes under two node agents).

``--streams`` client threads, through the official openai client, each loop until time is up: a
streamed chat request with a random prompt length and ``max_tokens`` (small ranges), random
temperature and seed; some (``--cancel``) are closed after a few chunks; a few (``--malformed``) are
malformed (negative ``max_tokens``, a seed beyond 64 bits, out-of-range temperature or top_p, no messages, unknown model,
a body that is not JSON) and must get a 4xx. A request with no answer within ``--deadline`` seconds
(no next chunk, or not finished in time) counts as hung.

Every ``--sample-s`` seconds the RSS of every process involved (the server, or this coordinator, the
agents and the workers: psutil, children recursively) is sampled. After the warm-up (the first 10% of the
time), RSS is "flat" when no sample of a process exceeds its first sample after warm-up by more than 5%;
each process's RSS slope (least squares, MiB/min) is printed over the whole run after warm-up and over its
second half.
In the pipeline run, this process's RSS includes the client threads.

Exits 1 when any target had an error, a hang, a malformed request that did not get 4xx, or RSS not flat.
"""

from __future__ import annotations

import exo_lab  # first: OpenBLAS before MLX

# isort: split
import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil

WORDS = [
    "the",
    "sea",
    "river",
    "stone",
    "cloud",
    "light",
    "tree",
    "wind",
    "north",
    "city",
    "garden",
    "bridge",
    "glass",
    "paper",
    "music",
    "winter",
]


@dataclass
class Counts:
    ok: int = 0
    cancelled: int = 0
    errored: int = 0
    hung: int = 0
    malformed_4xx: int = 0
    malformed_bad: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, tokens: int = 0, error: str | None = None) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)
            self.tokens += tokens
            if error is not None and len(self.errors) < 20:
                self.errors.append(error)


class Hung(Exception):
    """No answer within the deadline."""


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 200)))


def one_stream(client: openai.OpenAI, model: str, rng: random.Random, counts: Counts, deadline: float, cancel: bool):
    t0 = time.monotonic()
    n = 0
    usage = 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt(rng)}],
            max_tokens=rng.randint(8, 48),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            seed=rng.randint(0, 2**31),
            stream=True,
            stream_options={"include_usage": True},
        )
        stop_after = rng.randint(1, 6) if cancel else None
        for chunk in stream:
            if time.monotonic() - t0 > deadline:
                stream.close()
                raise Hung(f"not finished after {deadline:.0f} s")
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
                if stop_after is not None and n >= stop_after:
                    stream.close()  # the client goes away mid-stream
                    counts.add("cancelled", n)
                    return
        if stop_after is not None:  # finished before we cancelled it
            counts.add("ok", usage or n)
        elif usage <= 0:
            counts.add("errored", n, "stream ended without usage")
        else:
            counts.add("ok", usage)
    except Hung as exc:
        counts.add("hung", n, str(exc))
    except openai.APITimeoutError as exc:
        counts.add("hung", n, f"timeout: {exc}")
    except (openai.APIError, httpx.HTTPError) as exc:
        counts.add("errored", n, f"{type(exc).__name__}: {exc}")


def malformed(base_url: str, model: str, rng: random.Random, counts: Counts, deadline: float) -> None:
    ok_body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases: list[tuple[str, dict | bytes]] = [
        ("negative max_tokens", ok_body | {"max_tokens": -3}),
        ("seed 2**64", ok_body | {"seed": 2**64, "temperature": 0.8}),
        ("seed below -2**63", ok_body | {"seed": -(2**63) - 1, "temperature": 0.8}),
        ("temperature -1", ok_body | {"temperature": -1}),
        ("top_p 0", ok_body | {"top_p": 0, "temperature": 0.8}),
        ("no messages", ok_body | {"messages": []}),
        ("unknown model", ok_body | {"model": "no-such-model"}),
        ("not JSON", b'{"model": "x", "messages": ['),
        ("stream of wrong type", ok_body | {"stream": "yes please"}),
    ]
    what, body = rng.choice(cases)
    try:
        if isinstance(body, bytes):
            r = httpx.post(
                f"{base_url}/chat/completions",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=deadline,
            )
        else:
            r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=deadline)
        if 400 <= r.status_code < 500:
            counts.add("malformed_4xx")
        else:
            counts.add("malformed_bad", error=f"malformed ({what}) got HTTP {r.status_code}: {r.text[:200]}")
    except httpx.TimeoutException:
        counts.add("hung", error=f"malformed ({what}): no answer in {deadline:.0f} s")
    except httpx.HTTPError as exc:
        counts.add("malformed_bad", error=f"malformed ({what}): {exc!r}")


def client_loop(i: int, base_url: str, model: str, until: float, counts: Counts, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed * 1000 + i)
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=args.deadline)
    while time.monotonic() < until:
        r = rng.random()
        if r < args.malformed:
            malformed(base_url, model, rng, counts, args.deadline)
        else:
            one_stream(client, model, rng, counts, args.deadline, cancel=r < args.malformed + args.cancel)
    client.close()


def label(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return f"pid {p.pid}"
    if "exo_lab.engine.worker" in cmd:
        return f"worker {p.pid}"
    if " node " in f" {cmd} " or "exo_lab.cli node" in cmd:
        return f"agent {p.pid}"
    if " serve " in f" {cmd} ":
        return f"server {p.pid}"
    return f"{'this process' if p.pid == os.getpid() else Path(p.name()).name} {p.pid}"


class Sampler(threading.Thread):
    """RSS of ``root`` (when given) and its descendants every ``every`` seconds."""

    def __init__(self, roots: Callable[[], list[psutil.Process]], every: float) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.every = every
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self.halt = threading.Event()

    def sample(self) -> None:
        now = time.monotonic()
        seen: dict[int, psutil.Process] = {}
        for root in self.roots():
            try:
                for p in [root, *root.children(recursive=True)]:
                    seen[p.pid] = p
            except psutil.Error:
                continue
        for p in seen.values():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            self.samples.setdefault(label(p), []).append((now, rss))

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.every)


def slope(samples: list[tuple[float, int]]) -> float:
    """The least-squares slope of RSS over time (bytes per second; 0 with fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / len(samples)
    mr = sum(r for _, r in samples) / len(samples)
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (r - mr) for t, r in samples) / var if var else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def run_load(name: str, base_url: str, model: str, sampler: Sampler, args: argparse.Namespace) -> dict:
    duration = args.minutes * 60
    counts = Counts()
    sampler.start()
    t0 = time.monotonic()
    until = t0 + duration
    threads = [
        threading.Thread(target=client_loop, args=(i, base_url, model, until, counts, args), daemon=True)
        for i in range(args.streams)
    ]
    for t in threads:
        t.start()
    last = t0
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        if time.monotonic() - last >= 30:
            last = time.monotonic()
            print(
                f"  [{name}] {last - t0:5.0f} s: ok {counts.ok} cancelled {counts.cancelled} errored {counts.errored} "
                f"hung {counts.hung} malformed 4xx {counts.malformed_4xx} / bad {counts.malformed_bad}",
                flush=True,
            )
        if time.monotonic() > until + args.deadline + 30:
            print(f"  [{name}] client threads still running {args.deadline + 30:.0f} s after the end", flush=True)
            break
    elapsed = time.monotonic() - t0
    sampler.halt.set()
    sampler.join()
    return report(name, counts, sampler, t0, elapsed, args)


def report(name: str, counts: Counts, sampler: Sampler, t0: float, elapsed: float, args: argparse.Namespace) -> dict:
    warm = t0 + 0.1 * args.minutes * 60
    requests = counts.ok + counts.cancelled + counts.errored + counts.hung + counts.malformed_4xx + counts.malformed_bad
    print(f"\n== {name}: {args.streams} streams, {elapsed:.0f} s, model {args.preset} ==")
    print(
        f"requests {requests}: ok {counts.ok}, cancelled mid-stream {counts.cancelled}, errored {counts.errored}, "
        f"hung {counts.hung}, malformed -> 4xx {counts.malformed_4xx}, malformed -> not 4xx {counts.malformed_bad}"
    )
    print(f"tokens {counts.tokens}, {counts.tokens / elapsed:.1f} tok/s aggregate, {requests / elapsed:.2f} req/s")
    for e in counts.errors[:10]:
        print(f"  error: {e}")
    flat = True
    print(
        f"{'process':22s} {'RSS start MiB':>13s} {'end MiB':>9s} {'max MiB':>9s} {'growth':>8s} "
        f"{'2nd half':>9s} {'MiB/min':>8s} {'2nd h.':>7s}  flat (<=5%)"
    )
    for who, samples in sorted(sampler.samples.items()):
        timed = [(t, rss) for t, rss in samples if t >= warm]
        after = [rss for _, rss in timed]
        if len(after) < 2:
            print(f"{who:22s} (only {len(after)} sample(s) after warm-up: left early or started late)")
            continue
        start, end, peak = after[0], after[-1], max(after)
        growth = peak / start - 1
        half = end / after[len(after) // 2] - 1  # still growing late, or levelled off after an early rise
        ok = growth <= 0.05
        flat &= ok
        mib = 1 << 20
        print(
            f"{who:22s} {start / mib:13.1f} {end / mib:9.1f} {peak / mib:9.1f} {100 * growth:7.1f}% {100 * half:8.1f}% "
            f"{slope(timed) * 60 / mib:8.3f} {slope(timed[len(timed) // 2 :]) * 60 / mib:7.3f}  {'yes' if ok else 'NO'}"
        )
    good = flat and counts.errored == 0 and counts.hung == 0 and counts.malformed_bad == 0
    print(f"verdict: {'ok' if good else 'FAILED'} (target: 0 errors, 0 hung, malformed all 4xx, RSS flat)")
    return {"name": name, "good": good}


def model_path(preset: str) -> Path:
    from exo_lab.models.store import cache_name
    from exo_lab.models.synthetic import create
    from exo_lab.paths import models_dir

    path = models_dir() / "bench" / cache_name(f"{preset}-fp32")
    if not (path / "config.json").exists():
        print(f"creating {path} ...", flush=True)
        create(path, preset, dtype="float32", overwrite=True)
    return path


def soak_single(path: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "exo_lab.cli", "serve", "--model", str(path), "--name", "soak", "--port", str(port)]
    log = tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, server)
        proc = psutil.Process(server.pid)
        return run_load("single (exo-lab serve, one process)", f"http://127.0.0.1:{port}/v1", "soak",
                        Sampler(lambda: [proc], args.sample_s), args)  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.returncode not in (0, -15):
            print(f"server exited with {server.returncode}; its log: {log.name}")
        log.close()


def soak_pipeline(path: Path, args: argparse.Namespace) -> dict:
    cluster = exo_lab.local_cluster(2)
    try:
        plans = cluster.preview(path, context=2048, prompt_tokens=256)
        plan = next(p for p in plans if p.strategy == "pipeline" and p.num_nodes == 2)
        print(f"launching {plan.describe()} ...", flush=True)
        inst = cluster.launch(path, plan=plan, name="soak")
        server = cluster.serve()
        me = psutil.Process()
        return run_load(f"pipeline ({inst.plan.describe()})", f"{server.url}/v1", "soak",
                        Sampler(lambda: [me], args.sample_s), args)  # fmt: skip
    finally:
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="per target (default: %(default)s)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--preset", default="tiny", help="synthetic model preset, e.g. tiny or llama-1b")
    ap.add_argument("--only", choices=["single", "pipeline"], help="run one target only")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds without an answer that count as hung")
    ap.add_argument("--cancel", type=float, default=0.15, help="fraction of requests closed mid-stream")
    ap.add_argument("--malformed", type=float, default=0.05, help="fraction of malformed requests")
    ap.add_argument("--sample-s", type=float, default=3.0, help="seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    path = model_path(args.preset)
    results = []
    if args.only in (None, "single"):
        results.append(soak_single(path, args))
    if args.only in (None, "pipeline"):
        results.append(soak_pipeline(path, args))
    print("\nsummary: " + ", ".join(f"{r['name'].split()[0]} {'ok' if r['good'] else 'FAILED'}" for r in results))
    sys.exit(0 if all(r["good"] for r in results) else 1)


if __name__ == "__main__":
    main()
