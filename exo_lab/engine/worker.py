"""Shard worker: one rank of one instance, a process started by a node agent.

``python -m exo_lab.engine.worker CONFIG.json`` with ``MLX_RANK`` and
``MLX_HOSTFILE`` set. It serves a small control API (signed with the cluster
key) as soon as it starts, joins the MLX distributed group, loads only its
shard (reporting layers loaded), warms up in step with the other ranks, and
then runs generation jobs in the order of their sequence numbers:

- ``GET /status``: state (``connecting``, ``loading``, ``warming``, ``ready``,
  ``failed``), layers loaded / total, last finished sequence number;
- ``POST /generate``: ``{"seq", "prompt", "max_tokens", "sampling", "stop",
  "ignore_eos"}``; rank 0 streams NDJSON chunks, the other ranks answer at once;
- ``POST /cancel``: ``{"seq"}`` (rank 0 turns it into the shared stop flag);
- ``POST /shutdown``: ``{"seq"}``: drain, barrier with every rank, exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import exo_lab  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import tornado.web  # noqa: E402
from tornado.httpserver import HTTPServer  # noqa: E402

from exo_lab.cluster.auth import Verifier  # noqa: E402

log = logging.getLogger("exo_lab.engine.worker")


@dataclass
class Job:
    seq: int
    kind: str  # generate | shutdown
    body: dict[str, Any]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False
    done: bool = False
    wakers: list = field(default_factory=list)

    def push(self, chunk: dict[str, Any]) -> None:
        self.chunks.append(chunk)
        for loop, ev in list(self.wakers):
            loop.call_soon_threadsafe(ev.set)


class Worker:
    """State shared by the control API and the compute thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.rank = int(os.environ.get("MLX_RANK", config.get("rank", 0)))
        self.state = "connecting"
        self.loaded = 0
        self.total = config["layers"][1] - config["layers"][0]
        self.error: str | None = None
        self.jobs: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.next_seq = 1
        self.last_done = 0
        self.verifier = Verifier(config["cluster_key"])

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "rank": self.rank, "loaded": self.loaded, "total": self.total,
                "error": self.error, "last_done": self.last_done, "pid": os.getpid(),
                "fetched_bytes": getattr(self, "fetched_bytes", 0),
                "fetch_progress": getattr(self, "fetch_progress", None)}

    def enqueue(self, job: Job) -> Job:
        with self.cond:
            existing = self.jobs.get(job.seq)
            if existing is not None:
                return existing
            self.jobs[job.seq] = job
            self.cond.notify_all()
        return job

    # compute thread
    def run(self) -> None:
        try:
            self._setup()
        except Exception as exc:
            log.exception("worker setup failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            return
        self.state = "ready"
        while True:
            with self.cond:
                while self.next_seq not in self.jobs:
                    self.cond.wait()
                job = self.jobs[self.next_seq]
            if job.kind == "shutdown":
                self.lockstep.barrier()
                job.done = True
                job.push({"finish_reason": "shutdown"})
                self.state = "stopped"
                time.sleep(0.2)
                os._exit(0)
            try:
                self._generate(job)
            except Exception as exc:  # reported to the coordinator; the ranks may now be out of step
                log.exception("job %d failed", job.seq)
                job.push({"text": "", "finish_reason": "error", "error": f"{type(exc).__name__}: {exc}"})
                self.state = "failed"
                self.error = str(exc)
            job.done = True
            with self.cond:
                self.jobs.pop(job.seq, None)
                self.last_done = job.seq
                self.next_seq += 1

    def _setup(self) -> None:
        from exo_lab.engine.lockstep import Layout, Lockstep
        from exo_lab.engine.shard import ShardSpec, load_shard

        cfg = self.config
        backend = cfg.get("backend", "ring")
        world = sum(len(s) for s in cfg["stages"])
        if world == 1:  # a ring of one cannot form; a single rank needs no group
            os.environ.pop("MLX_HOSTFILE", None)
            self.group = mx.distributed.init()
        else:
            self.group = mx.distributed.init(backend=backend, strict=True)
        if self.group.rank() != self.rank:
            raise RuntimeError(f"MLX rank {self.group.rank()} != configured rank {self.rank}")
        self.state = "loading"
        stages = tuple(tuple(s) for s in cfg["stages"])
        layout = Layout(self.rank, stages)
        tensor_group = self.group if len(stages) == 1 and len(stages[0]) > 1 else None
        pair = None
        mine = stages[layout.stage]
        if len(stages) > 1 and len(mine) > 1:
            if len(mine) != 2:
                raise RuntimeError("a pipeline stage can hold a tensor pair (2 ranks), not more")
            from exo_lab.engine.pairs import Exchange

            index = mine.index(self.rank)
            peer = mine[1 - index]
            pair = (index, Exchange(self.group, peer, lower=self.rank < peer))
        start, end = cfg["layers"]
        spec = ShardSpec(start, end, cfg["num_layers"], cfg.get("dtype"))
        model_dir = Path(cfg["model_dir"])
        if cfg.get("fetch"):
            self._fetch(cfg["fetch"], model_dir, spec)
            self.state = "loading"
        self.shard, config = load_shard(model_dir, spec, tensor_group, progress=self._progress, pair=pair)
        act = getattr(mx, cfg.get("dtype") or config.get("torch_dtype") or "bfloat16")
        self.lockstep = Lockstep(self.shard, self.group, layout, config["hidden_size"], act,
                                 cfg.get("prefill_step_size", 2048))
        if self.rank == 0:
            from mlx_lm.utils import load_tokenizer

            self.tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
            self.eos = set(self.tokenizer.eos_token_ids)
        self.state = "warming"
        from exo_lab.engine.sampling import SamplingParams, make_sampler

        list(self.lockstep.generate([1, 2], 1, make_sampler(SamplingParams()), lambda: False))
        mx.synchronize()

    def _fetch(self, fetch: dict[str, Any], model_dir: Path, spec) -> None:
        """Copy this shard's tensors from the first peer that has the model."""
        from exo_lab.engine.shard import needs_tensor
        from exo_lab.models.fetch import FetchError, fetch_tensors

        self.state = "fetching"

        def wanted(name: str) -> bool:
            cfg = json.loads((model_dir / "config.json").read_text())
            return needs_tensor(name, spec, bool(cfg.get("tie_word_embeddings", False)))

        errors = []
        for source in fetch["sources"]:
            try:
                self.fetched_bytes = fetch_tensors(source, self.config["cluster_key"], fetch["name"], model_dir, wanted,
                                                   progress=lambda d, t: setattr(self, "fetch_progress", (d, t)))
                return
            except FetchError as exc:
                errors.append(str(exc))
        raise RuntimeError("could not fetch the model: " + "; ".join(errors))

    def _progress(self, done: int, total: int) -> None:
        self.loaded, self.total = done, total

    def _generate(self, job: Job) -> None:
        from exo_lab.engine.sampling import SamplingParams, make_sampler
        from exo_lab.engine.stopping import StopMatcher

        b = job.body
        sampler = make_sampler(SamplingParams(**b.get("sampling", {})))
        prompt = list(b["prompt"])
        max_tokens = int(b["max_tokens"])
        if self.rank != 0:
            for _ in self.lockstep.generate(prompt, max_tokens, sampler, lambda: False):
                pass
            return
        detok = self.tokenizer.detokenizer
        stopper = StopMatcher(b.get("stop") or [])
        ignore_eos = bool(b.get("ignore_eos"))
        start = time.perf_counter()
        first = start
        n = 0
        finish = "length"
        for t in self.lockstep.generate(prompt, max_tokens, sampler, lambda: job.stop):
            if job.stop:
                continue  # the step in flight when the stop was decided: discarded by every rank
            if n == 0:
                first = time.perf_counter()
            n += 1
            if t in self.eos and not ignore_eos:
                finish, job.stop = "stop", True
                continue
            detok.add_token(t)
            text, hit = stopper.feed(detok.last_segment)
            job.push({"text": text, "tokens": [t]})
            if hit:
                finish, job.stop = "stop", True
        if job.stop and finish == "length":
            finish = "cancelled"
        if finish in ("length",) or (finish == "stop" and stopper.matched is None):
            detok.finalize()
            tail, hit = stopper.feed(detok.last_segment)
            tail += "" if hit else stopper.flush()
            if tail:
                job.push({"text": tail, "tokens": []})
        end = time.perf_counter()
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "ttft_s": first - start,
                 "prompt_tps": len(prompt) / (first - start) if first > start else 0.0,
                 "generation_tps": (n - 1) / (end - first) if n > 1 and end > first else 0.0,
                 "total_s": end - start}
        job.push({"text": "", "finish_reason": finish, "usage": usage, "stop_sequence": stopper.matched})


class _Handler(tornado.web.RequestHandler):
    def initialize(self, worker: Worker) -> None:
        self.worker = worker

    def check(self) -> bool:
        problem = self.worker.verifier.problem(self.request.method, self.request.uri, self.request.body,
                                               dict(self.request.headers))
        if problem:
            self.set_status(401)
            self.finish({"error": problem})
            return False
        return True

    def body(self) -> dict[str, Any]:
        return json.loads(self.request.body or b"{}")


class StatusHandler(_Handler):
    def get(self) -> None:
        if self.check():
            self.finish(self.worker.status())


class GenerateHandler(_Handler):
    async def post(self) -> None:
        if not self.check():
            return
        b = self.body()
        job = self.worker.enqueue(Job(int(b["seq"]), "generate", b))
        if self.worker.rank != 0:
            self.finish({"queued": job.seq})
            return
        self.set_header("Content-Type", "application/x-ndjson")
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        job.wakers.append((loop, ev))
        sent = 0
        while True:
            while sent < len(job.chunks):
                chunk = job.chunks[sent]
                sent += 1
                self.write(json.dumps(chunk) + "\n")
                try:
                    await self.flush()
                except tornado.iostream.StreamClosedError:
                    job.stop = True  # the coordinator went away: stop this generation
                    return
                if chunk.get("finish_reason"):
                    self.finish()
                    return
            await ev.wait()
            ev.clear()


class CancelHandler(_Handler):
    def post(self) -> None:
        if self.check():
            job = self.worker.jobs.get(int(self.body()["seq"]))
            if job is not None:
                job.stop = True
            self.finish({"cancelled": job is not None})


class ShutdownHandler(_Handler):
    def post(self) -> None:
        if self.check():
            b = self.body()
            self.worker.enqueue(Job(int(b["seq"]), "shutdown", b))
            self.finish({"shutting_down": True})


def main(argv: list[str] | None = None) -> int:
    import tornado.iostream  # noqa: F401

    argv = argv if argv is not None else sys.argv[1:]
    config = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{config.get('rank')} %(levelname)s %(message)s")
    worker = Worker(config)
    compute = threading.Thread(target=worker.run, name="exo-lab-rank", daemon=True)

    async def serve() -> None:
        app = tornado.web.Application([
            (r"/status", StatusHandler, {"worker": worker}),
            (r"/generate", GenerateHandler, {"worker": worker}),
            (r"/cancel", CancelHandler, {"worker": worker}),
            (r"/shutdown", ShutdownHandler, {"worker": worker}),
        ])
        HTTPServer(app).listen(config["control_port"], config.get("control_host", "0.0.0.0"))
        compute.start()
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
