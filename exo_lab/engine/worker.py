"""Shard worker: one rank of one instance, a process started by a node agent.

``python -m exo_lab.engine.worker CONFIG.json`` with ``MLX_RANK`` and
``MLX_HOSTFILE`` set. It serves a small control API (signed with the cluster
key) as soon as it starts, joins the MLX distributed group, loads only its
shard (reporting layers loaded), warms up in step with the other ranks, and
then generates: jobs are admitted in the order of their sequence numbers and
decode together, up to ``max_batch`` at a time (continuous batching, see
:mod:`exo_lab.engine.lockstep`); rank 0 decides when a job joins or stops and
every rank follows at the same step. An error in one job's own part (its sampler or grammar on the
rank that samples, its text on rank 0) ends that job with the error on every rank at the same step;
the instance goes on serving the others:

- ``GET /status``: state (``connecting``, ``loading``, ``warming``, ``ready``,
  ``failed``), layers loaded / total, last finished sequence number;
- ``POST /generate``: a :class:`~exo_lab.engine.job.Job` (``Job.to_json``; a malformed one is
  answered 400 with what is wrong); rank 0 streams NDJSON chunks, the other ranks answer at once
  (every rank must get every job: a rank waits for the jobs rank 0 admits);
- ``POST /cancel``: ``{"seq"}`` (rank 0 turns it into the shared stop flag);
- ``POST /shutdown``: ``{"seq"}``: drain, barrier with every rank, exit;
- ``POST /trace``, ``GET /clock``: this rank's spans (:mod:`exo_lab.engine.trace`) and its clock.

A worker never outlives its node agent: a thread checks every half second that its parent is
still the agent that started it (``agent_pid`` in the config; the parent at start otherwise)
and exits when it is not. A worker whose setup fails (the group, the shard, the tokenizer)
reports ``failed`` with the error, waits briefly for the coordinator to read it, and exits
with :data:`EXIT_SETUP_FAILED`; the agent then reports the instance failed with the log's tail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import tornado.iostream
import tornado.web
from mlx_lm.utils import load_tokenizer

from exo_lab import defaults
from exo_lab.cluster.auth import Verifier, header_problem, rank_target
from exo_lab.cluster.fetch import fetched
from exo_lab.cluster.serving import MIB, GuardedHTTPServer
from exo_lab.cluster.signed_handler import SignedHandler
from exo_lab.engine.families import tied_embeddings
from exo_lab.engine.group import form_group
from exo_lab.engine.guided import SchemaConstraint, vocabulary
from exo_lab.engine.job import Job, JobError
from exo_lab.engine.lockstep import FAILED, Layout, Lockstep, describe
from exo_lab.engine.lookahead import Step, pays
from exo_lab.engine.pairs import Exchange
from exo_lab.engine.peer_link import ChainLinks, PeerLink, open_chain, route_tensor_all_reduces
from exo_lab.engine.pipeline import Group, GroupSchedule, Speculation, decode_tick, streamed_prefill
from exo_lab.engine.prefix_cache import PrefixCache, agree, row_caches
from exo_lab.engine.sampling import SamplingParams, make_penalties, make_sampler
from exo_lab.engine.shard import ShardSpec, load_shard, tensor_names
from exo_lab.engine.stopping import StopMatcher
from exo_lab.engine.thread_policy import batch_threads
from exo_lab.engine.trace import TRACER, trace_tensor_all_reduces
from exo_lab.models import formats, partial

log = logging.getLogger("exo_lab.engine.worker")

#: exit status of a worker whose setup failed
EXIT_SETUP_FAILED = 3
#: exit status of a worker whose node agent is gone
EXIT_ORPHANED = 4
#: how long a failed worker waits for its status to be read before it exits
FAILED_LINGER_S = 3.0


def _argmax(logprobs: mx.array) -> mx.array:
    """The sampler of a row whose own could not be made (the row fails at its first step)."""
    return mx.argmax(logprobs, axis=-1)


@dataclass
class QueuedJob:
    """A job this rank holds: a generation (``job``) or the shutdown at ``seq``, and rank 0's chunks for it."""

    seq: int
    kind: str  # generate | shutdown
    job: Job | None = None  # the generation (None for a shutdown)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False
    done: bool = False
    wakers: list = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)

    def push(self, chunk: dict[str, Any]) -> None:
        self.chunks.append(chunk)
        for loop, ev in list(self.wakers):
            loop.call_soon_threadsafe(ev.set)


@dataclass
class _Row:
    """A job decoding in the batch (compute thread only); detokenizing and stop strings on rank 0."""

    job: QueuedJob
    prompt_tokens: int
    max_tokens: int
    ignore_eos: bool
    start: float
    n: int = 0
    first: float = 0.0
    ended: bool = False
    detok: Any = None
    stopper: Any = None
    cached: int = 0  # prompt tokens reused from the prefix cache
    tokens: list[int] = field(default_factory=list)  # the tokens it generated (every rank)
    #: no grammar, log-probabilities or logits processing, sampler made: it may decode a step ahead (every rank)
    plain: bool = False


class Worker:
    """State shared by the control API and the compute thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        env_rank = os.environ.get("MLX_RANK")
        self.rank = int(env_rank if env_rank is not None else config.get("rank", 0))
        self.state = "connecting"
        self.loaded = 0
        self.total = config["layers"][1] - config["layers"][0]
        self.error: str | None = None
        self.jobs: dict[int, QueuedJob] = {}
        self.cond = threading.Condition()
        self.admitted = 0  # the last sequence number that joined the batch
        self.admit_to = 0  # the last one rank 0 has let join
        self.last_done = 0
        self.max_batch = int(config.get("max_batch", 16))
        self.eos = {int(t) for t in config.get("eos_token_ids") or []}
        #: decode steps taken, the most sequences one step decoded, steps built ahead (:mod:`exo_lab.engine.lookahead`),
        #: steps this pipeline stage built before their input arrived (:func:`~exo_lab.engine.pipeline.decode_tick`)
        self.stats = {"decode_steps": 0, "peak_batch": 0, "steps_ahead": 0, "steps_prebuilt": 0}
        # requests must be signed for this rank of this launch: one signed for another rank is refused
        self.verifier = Verifier(
            config["cluster_key"],
            node_id=rank_target(str(config.get("instance_id", "")), self.rank),
            require_target=True,
        )
        self.guide = None  # the llguidance vocabulary, on the rank that samples (constrained output)
        self.failure_read = threading.Event()  # someone read the status after the setup failed
        #: this rank's layers' KV caches of finished jobs, keyed by job seq (rank 0 decides hits: prefix_cache.agree)
        self.prefix_cache = PrefixCache(int(config.get("prefix_cache_bytes") or 0))
        #: the decode step built ahead and in flight (see :mod:`exo_lab.engine.lookahead`), or None
        self.ahead: Step | None = None
        self.lookahead = defaults.lookahead() != "off"
        #: a pipeline's later stages build each step's graph before its input arrives (``off`` keeps them from it)
        self.prebuild = self.lookahead
        #: the socket this rank's tensor pair sums over (:mod:`exo_lab.engine.peer_link`), or None (MLX's ring)
        self.peer_link: PeerLink | None = None
        #: the sockets to this rank's neighbours along the stages' ranks in order (:attr:`Layout.chain`), by rank
        self.stage_links: dict[int, PeerLink] = {}

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "rank": self.rank,
            "loaded": self.loaded,
            "total": self.total,
            "error": self.error,
            "last_done": self.last_done,
            "pid": os.getpid(),
            **self.stats,
            "fetched_bytes": getattr(self, "fetched_bytes", 0),
            "fetch_progress": getattr(self, "fetch_progress", None),
            "prefix_cache": self.prefix_cache.summary(),
            "peer_link": self.peer_link is not None or bool(self.stage_links),
        }

    def enqueue(self, job: QueuedJob) -> QueuedJob:
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
            self.failure_read.wait(FAILED_LINGER_S)  # let the coordinator see why
            time.sleep(0.2)  # and the answer leave
            log.error("exiting: the setup failed")
            logging.shutdown()
            os._exit(EXIT_SETUP_FAILED)
        self.state = "ready"
        sched = self.schedule
        try:
            while True:
                self._serve_step(sched)
        except Exception as exc:  # reported to the coordinator; the ranks may now be out of step
            log.exception("generation failed")
            for row in sched.rows():
                self._fail_row(row, f"{type(exc).__name__}: {exc}")
            self.state = "failed"
            self.error = str(exc)

    def _serve_step(self, sched: GroupSchedule) -> None:
        """One tick of the group schedule (:mod:`exo_lab.engine.pipeline`): every stage computes its group, the
        landing group takes its tokens, drops the rows that ended and admits what rank 0 admits."""
        ls = self.lockstep
        TRACER.step = self.stats["decode_steps"]  # the same on every rank: they take their steps together
        if self.ahead is not None or self._may_step_ahead(sched):
            self._serve_ahead(sched)
            return
        if not sched.running:  # idle: wait for the next job, then agree on how many join
            job = self._job(self.admitted + 1)
            if job.kind == "shutdown":
                ls.barrier()
                job.done = True
                job.push({"finish_reason": "shutdown"})
                self.state = "stopped"
                time.sleep(0.2)
                os._exit(0)
            _, _, self.admit_to = ls.share(None, [], self._admissible(sched))
            self._admit_all(sched.landing())
            sched.tick += 1
            return
        t = time.perf_counter()
        # not while tracing: a traced stage builds once its input is there, so that its `compute` spans (from which
        # calibration fits each stage's compute) hold the build as they did
        prebuild = self.prebuild and not TRACER.on
        tokens = decode_tick(ls, sched, prebuild=prebuild)
        self.stats["steps_prebuilt"] += sched.following().built is not None
        group = sched.landing()
        rows = group.rows
        flags = [1 if r.job.stop else 0 for r in rows] if self.rank == 0 else [0] * len(rows)
        shared = ls.shared_vector(tokens, flags, self._admissible(sched))
        # a one-rank first stage computes the landing group next: its step is built before the tokens arrive
        ahead = prebuild and rows and sched.stages > 1 and ls.layout.first and len(ls.layout.stages[0]) == 1
        spec = Speculation.build(ls, group, shared) if ahead else None
        tokens_all, flags, self.admit_to = ls.read_shared(shared)
        if rows:
            self._land(group, tokens_all, flags)
            self.stats["decode_steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], sched.running)
        self._admit_all(group)
        if spec is not None:
            self.stats["steps_prebuilt"] += spec.settle(group)
        log.debug("tick %d (%d rows landing): %.3f s", sched.tick, len(rows), time.perf_counter() - t)
        sched.tick += 1

    def _may_step_ahead(self, sched: GroupSchedule) -> bool:
        """Whether the next step may be built before this one's tokens are read (:mod:`exo_lab.engine.lookahead`):
        one stage, rows in the batch, every one plain. The same on every rank (what it reads, every rank has)."""
        rows = sched.groups[0].rows
        return self.lookahead and sched.stages == 1 and bool(rows) and all(r.plain for r in rows)

    def _serve_ahead(self, sched: GroupSchedule) -> None:
        """One step with lookahead: the step in flight (built now when none is), the next one built and queued
        on its lazy tokens when the rows allow, then the step's tokens read and landed, and admissions."""
        group = sched.groups[0]
        step = self.ahead
        if step is None:  # queued at once, as mlx_lm does: it computes while the step after it is built
            step = self._build_step(sched, None)
            mx.async_eval(step.shared)
        self.ahead = None
        t = time.perf_counter()
        if self._may_step_ahead(sched):
            self.ahead = self._build_step(sched, step)
            mx.async_eval(self.ahead.shared)
            self.stats["steps_ahead"] += 1
        with TRACER.span("all_sum"):
            values = cast("list[int]", step.shared.tolist())
        tokens, flags, self.admit_to = step.split(values)
        idx = step.carried(group.rows)
        if idx:
            self._land_ahead(group, [tokens[i] for i in idx], [flags[i] for i in idx])
            self.stats["decode_steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(step.rows))
        self._admit_all(group)
        log.debug(
            "step %d (%d rows, ahead %s): %.3f s", sched.tick, len(idx), self.ahead is not None, time.perf_counter() - t
        )
        sched.tick += 1

    def _build_step(self, sched: GroupSchedule, before: Step | None) -> Step:
        """Build (not evaluate) the next decode step of the one group; ``before`` is the step in flight whose
        lazy tokens the rows that took part in it take as inputs."""
        group = sched.groups[0]
        rows, batch = list(group.rows), group.batch
        inputs = mx.array(batch.inputs, mx.int32) if before is None else before.inputs_for(rows, batch.inputs)
        flags = [1 if r.job.stop else 0 for r in rows] if self.rank == 0 else [0] * len(rows)
        return Step(rows, self.lockstep.step_ahead(batch, inputs, flags, self._admissible(sched)))

    def _land_ahead(self, group: Group, tokens: list[int], flags: list[int]) -> None:
        """Give the first ``len(tokens)`` rows of the group (those that took part in the step) their tokens; the
        rows after them joined later and stay. Plain rows only: no failed tokens, no log-probabilities."""
        batch, rows, m = group.batch, group.rows, len(tokens)
        keep = []
        for i, (row, token, flag) in enumerate(zip(rows, tokens, flags)):
            if flag:  # stopped by rank 0 (cancelled, or a stop string): this step's token is discarded
                self._end(row, "cancelled")
            elif self._accept(row, token):
                keep.append(i)
        keep += range(m, len(rows))
        if self.prefix_cache.enabled:
            self._remember(batch, rows, set(keep))
        batch.inputs = tokens + batch.inputs[m:]
        batch.keep(keep)
        group.rows = [rows[i] for i in keep]

    def _land(self, group: Group, tokens_all: list[int], flags: list[int]) -> None:
        """Give the landing group's rows their tokens (every rank); keep the rows that go on."""
        ls, batch, rows = self.lockstep, group.batch, group.rows
        failed = [i for i, token in enumerate(tokens_all) if token == FAILED]
        errors = ls.share_errors(failed) if failed else {}  # every rank sees the same FAILED tokens
        logprobs = ls.share_logprobs(batch, tokens_all)
        batch.inputs = tokens_all
        keep, errored = [], set(errors)
        for i, (row, token, flag, lp) in enumerate(zip(rows, tokens_all, flags, logprobs)):
            if i in errors:  # its sampling failed on the rank that samples: this job alone ends, on every rank
                log.warning("job %d failed: %s", row.job.seq, errors[i])
                self._end(row, "error", errors[i])
            elif flag:  # stopped by rank 0 (cancelled, or a stop string): this step's token is discarded
                self._end(row, "cancelled")
            elif self._accept(row, token, lp):
                keep.append(i)
        if self.prefix_cache.enabled:
            self._remember(batch, rows, set(keep) | errored)
        batch.keep(keep)
        group.rows = [rows[i] for i in keep]

    def _admit_all(self, group: Group) -> None:
        """Admit (prefill) the jobs rank 0 let join, into ``group``."""
        for seq in range(self.admitted + 1, self.admit_to + 1):
            t = time.perf_counter()
            queued = self._job(seq)
            if queued.job is not None and queued.job.embed:  # an embedding: every rank now, never in a group
                self._embed(queued)  # (no hidden states are in flight between ticks: the pipeline is free)
            else:
                with TRACER.span("admit", seq=seq):
                    group.rows.append(self._admit(queued, group.batch))
            self.admitted = seq
            log.debug("job %d joined (prefill %.3f s)", seq, time.perf_counter() - t)

    def _job(self, seq: int) -> QueuedJob:
        """The job ``seq``, once it has arrived."""
        with self.cond:
            while seq not in self.jobs:
                self.cond.wait()
            return self.jobs[seq]

    def _admissible(self, sched: GroupSchedule) -> int:
        """Rank 0: the last sequence number that may join the landing group now (generation jobs that arrived, up
        to ``max_batch`` in all, keeping the groups balanced: :meth:`GroupSchedule.room`)."""
        if self.rank != 0:
            return 0
        last = self.admitted
        with self.cond:
            while (job := self.jobs.get(last + 1)) is not None and job.kind == "generate":
                last += 1
        return self.admitted + sched.room(last - self.admitted, self.max_batch)

    def _embed(self, queued: QueuedJob) -> None:
        """Every rank: the job's prompt through the pipeline (see :meth:`Lockstep.embed`); rank 0 answers with it."""
        job = queued.job
        assert job is not None
        vector = self.lockstep.embed(list(job.prompt))
        with self.cond:
            self.jobs.pop(queued.seq, None)
            self.last_done = max(self.last_done, queued.seq)
        queued.done = True
        if self.rank == 0:
            usage = {"prompt_tokens": len(job.prompt), "total_s": time.perf_counter() - queued.arrived}
            queued.push({"text": "", "finish_reason": "stop", "usage": usage, "embedding": vector})

    def _admit(self, queued: QueuedJob, batch) -> _Row:
        """Prefill ``queued``'s prompt and add it as the last row of ``batch``."""
        job = queued.job
        assert job is not None, f"job {queued.seq} is a {queued.kind}"  # rank 0 admits only generations
        params = job.sampling
        prompt = list(job.prompt)
        row = _Row(queued, len(prompt), job.max_tokens, job.ignore_eos, time.perf_counter())
        if self.rank == 0:
            row.detok = self.tokenizer.detokenizer
            row.stopper = StopMatcher(list(job.stop))
        constraint, error, penalties = None, None, None
        sampler: Callable[[mx.array], mx.array] = _argmax
        try:  # what fails here fails this job alone, at its first step (see Lockstep.step)
            sampler = make_sampler(params)
            penalties = make_penalties(params, prompt)
            if job.grammar and self.guide is not None:  # the rank that samples keeps the output in the grammar
                constraint = SchemaConstraint(job.grammar, self.guide, job.max_tokens)
        except Exception as exc:
            log.exception("job %d cannot be sampled", queued.seq)
            error = describe(exc)
        row.plain = error is None and penalties is None and not job.grammar and job.logprobs is None
        cache, row.cached = None, 0
        if self.prefix_cache.enabled:  # every rank, in admission order: all reuse rank 0's choice or none does
            cache, row.cached = agree(self.prefix_cache, prompt, self.rank, self.group)
        batch.add(
            streamed_prefill(self.lockstep, prompt, cache, row.cached),
            prompt[-1],
            sampler,
            params.greedy,
            constraint,
            job.logprobs,
            error,
            penalties,
        )
        return row

    def _remember(self, batch, rows: list[_Row], staying: set[int]) -> None:
        """Keep the KV caches of the rows that ended this step (not with an error) in the prefix cache.

        A row's cache holds its prompt and the tokens fed back so far, the first ``offset`` of prompt + generated.
        """
        for i, row in enumerate(rows):
            if i in staying or row.job.job is None:
                continue
            try:
                layers = row_caches(batch.cache or [], i)
                held = list(row.job.job.prompt) + row.tokens
                n = int(layers[0].offset) if layers else 0
                if 0 < n <= len(held):
                    self.prefix_cache.store(row.job.seq, held[:n], layers)
            except Exception:  # a cache that cannot be kept costs the next request time, nothing more
                log.exception("keeping the KV cache of job %d failed", row.job.seq)

    def _accept(self, row: _Row, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take ``row``'s new token (rank 0 streams it); False when the row ends with it."""
        row.n += 1
        row.tokens.append(token)
        if row.n == 1:
            row.first = time.perf_counter()
        if token in self.eos and not row.ignore_eos:  # every rank knows the EOS ids: ends at once everywhere
            self._end(row, "stop")
            return False
        if self.rank == 0 and not row.ended:
            try:
                if self._stream(row, token, logprob):
                    return row.n < row.max_tokens
            except Exception as exc:  # rank 0's own part (text, stop strings): this job alone fails
                log.exception("job %d failed", row.job.seq)
                self._end(row, "error", describe(exc))
                row.job.stop = True  # the other ranks drop it at the next step, as for a stop string
                return row.n < row.max_tokens
        if row.n >= row.max_tokens:
            self._end(row, "length")
            return False
        return True

    def _stream(self, row: _Row, token: int, logprob: tuple[float, list[tuple[int, float]]] | None) -> bool:
        """Rank 0: stream ``row``'s new token; True when a stop string ended the row (the other ranks end it at
        the next step)."""
        row.detok.add_token(token)
        text, hit = row.stopper.feed(row.detok.last_segment)
        chunk: dict[str, Any] = {"text": text, "tokens": [token]}
        if logprob is not None:  # [token, text, logprob, [[id, text, logprob], ...]]
            decode = self.tokenizer.decode
            chunk["logprobs"] = [[token, decode([token]), logprob[0], [[t, decode([t]), lp] for t, lp in logprob[1]]]]
        row.job.push(chunk)
        if hit:  # only rank 0 sees text: the row ends here, the other ranks drop it at the next step
            self._end(row, "stop")
            row.job.stop = True
            return True
        return False

    def _end(self, row: _Row, finish: str, error: str | None = None) -> None:
        """Rank 0: flush held text and send the final chunk with usage (once); every rank: forget the job.

        ``finish`` ``error`` ends it with ``error`` said.
        """
        job = row.job
        with self.cond:
            self.jobs.pop(job.seq, None)
            self.last_done = max(self.last_done, job.seq)
        if self.rank != 0 or row.ended:
            job.done = True
            return
        row.ended = True
        if finish in ("length", "stop") and row.stopper.matched is None:
            try:
                row.detok.finalize()
                tail, hit = row.stopper.feed(row.detok.last_segment)
                tail += "" if hit else row.stopper.flush()
            except Exception as exc:
                log.exception("job %d failed at its end", job.seq)
                finish, error, tail = "error", describe(exc), ""
            if tail:
                job.push({"text": tail, "tokens": []})
        end = time.perf_counter()
        n, first = row.n, row.first or end
        usage = {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": n,
            "ttft_s": first - job.arrived,
            "prompt_tps": row.prompt_tokens / (first - row.start) if first > row.start else 0.0,
            "generation_tps": (n - 1) / (end - first) if n > 1 and end > first else 0.0,
            "total_s": end - job.arrived,
            "cached_tokens": row.cached,
        }
        job.done = True
        final: dict[str, Any] = {"text": "", "finish_reason": finish, "usage": usage}
        if finish == "error":
            final["error"] = error or "generation failed"
        else:
            final["stop_sequence"] = row.stopper.matched
        job.push(final)

    def _fail_row(self, row: _Row, error: str) -> None:
        if self.rank == 0 and not row.ended:
            row.ended = True
            row.job.push({"text": "", "finish_reason": "error", "error": error})

    def _setup(self) -> None:
        cfg = self.config
        backend = cfg.get("backend", "ring")
        world = sum(len(s) for s in cfg["stages"])
        if world == 1:  # a ring of one cannot form; a single rank needs no group
            os.environ.pop("MLX_HOSTFILE", None)
            self.group = mx.distributed.init()
        else:
            self.group = form_group(backend)
        if self.group.rank() != self.rank:
            raise RuntimeError(f"MLX rank {self.group.rank()} != configured rank {self.rank}")
        self.state = "loading"
        stages = tuple(tuple(s) for s in cfg["stages"])
        layout = Layout(self.rank, stages)
        tensor_group = self.group if len(stages) == 1 and len(stages[0]) > 1 else None
        mine = stages[layout.stage]
        if len(stages) > 1 and len(mine) > 2:
            raise RuntimeError("a pipeline stage can hold a tensor pair (2 ranks), not more")
        peer = mine[1 - mine.index(self.rank)] if len(mine) == 2 else None
        # sockets of the ranks' own along the stages' ranks in order, whose neighbours are the ranks that exchange:
        # a pair (it sums over its socket), a stage's last rank and the next stage's first (hidden states); a
        # step's shared vector goes along the whole chain, as a tensor group's small all-reduces do along its own
        if len(layout.chain) > 1:
            self.stage_links = open_chain(self.group, layout.chain)
            self.peer_link = self.stage_links.get(peer) if peer is not None else None
        if tensor_group is not None:
            if self.peer_link is not None:
                route_tensor_all_reduces(self.peer_link)
            elif self.stage_links:
                route_tensor_all_reduces(ChainLinks.of(self.stage_links, mine, self.rank))
            trace_tensor_all_reduces()  # a trace shows this rank's in-layer all-reduces apart from its compute
        pair = None
        if len(stages) > 1 and peer is not None:
            exchange = Exchange(self.group, peer, lower=self.rank < peer, link=self.peer_link)
            pair = (mine.index(self.rank), exchange)
        start, end = cfg["layers"]
        spec = ShardSpec(start, end, cfg["num_layers"], cfg.get("dtype"))
        samples = self.rank == layout.stages[-1][0]  # the last stage's lead rank samples every token
        with self._model_files(spec) as (model_dir, checksums):
            self.state = "loading"
            self.shard, config = load_shard(
                model_dir, spec, tensor_group, progress=self._progress, pair=pair, checksums=checksums
            )
            if self.rank == 0 or samples:
                self.tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
        # hidden states arrive in the activation dtype of the previous stage's weight format (q8/q4: fp32)
        act_name = formats.activation_dtype_of(cfg.get("dtype") or config.get("torch_dtype") or "bfloat16")
        if layout.stage > 0:
            act_name = (cfg.get("act_dtypes") or {}).get(str(stages[layout.stage - 1][0]), act_name)
        act = getattr(mx, act_name)
        gpu, quantized = mx.default_device() == mx.gpu, bool(cfg.get("quantized"))
        step = cfg.get("prefill_step_size") or defaults.prefill_step(len(stages), gpu, quantized)
        links = self.stage_links
        self.lockstep = Lockstep(self.shard, self.group, layout, config["hidden_size"], act, step, links)
        self.schedule = GroupSchedule(len(stages), layout.stage)
        if samples:
            self.guide = vocabulary(self.tokenizer, int(config["vocab_size"]))
        if self.prefix_cache.enabled:  # on every rank or none (its bytes are the instance's): off if any rank's is
            self.prefix_cache.check(self.shard.make_cache())
            off = mx.distributed.all_sum(mx.array([0 if self.prefix_cache.enabled else 1], mx.int32), group=self.group)
            if int(off.item()) and self.prefix_cache.enabled:  # type: ignore[arg-type]
                self.prefix_cache.disabled = "another rank's layers cannot be cut to a prefix"
        self.state = "warming"
        list(self.lockstep.generate([1, 2], 2, make_sampler(SamplingParams()), lambda: False, greedy=True))
        # every rank decides to step ahead alike (the same collectives in the same order): on only if on everywhere
        worth = pays(self.group, self.shard if len(stages) == 1 else None) or defaults.lookahead() == "always"
        mine = mx.array([0 if self.lookahead and worth else 1], mx.int32)
        self.lookahead = not int(mx.distributed.all_sum(mine, group=self.group).item())  # type: ignore[arg-type]
        log.info("decoding a step ahead: %s", self.lookahead)
        mx.synchronize()

    @contextmanager
    def _model_files(self, spec: ShardSpec) -> Iterator[tuple[Path, dict[str, str] | None]]:
        """Where this rank reads its shard, and the checksums to verify it by (None: a complete model).

        A rank whose node lacks the model fetches its shard's tensors from the first peer that has
        it into the store's partial area, and reads them from there only by its manifest, holding
        the area while it reads (:func:`exo_lab.cluster.fetch.fetched`).
        """
        model_dir = Path(self.config["model_dir"])
        fetch = self.config.get("fetch")
        if not fetch:
            yield model_dir, None
            return
        self.state = "fetching"
        needed: set[str] = set()

        def wanted(name: str) -> bool:  # asked once the area holds every header: what load_shard will read
            if not needed:
                where = partial.area(model_dir)
                config = json.loads((where / "config.json").read_text())
                needed.update(tensor_names(where, spec, tied_embeddings(config)))
            return name in needed

        with fetched(
            model_dir,
            fetch["sources"],
            self.config["cluster_key"],
            fetch["name"],
            wanted,
            progress=lambda d, t: setattr(self, "fetch_progress", (d, t)),
        ) as got:
            self.fetched_bytes = got.bytes_fetched
            yield got.path, got.checksums

    def _progress(self, done: int, total: int) -> None:
        self.loaded, self.total = done, total


@tornado.web.stream_request_body
class _Handler(SignedHandler):
    """Signed requests only; the answers are signed (``/generate``'s NDJSON stream over its status only).

    The body streams in only once the signature headers passed a first check (present, fresh): an unsigned
    or stale request is refused before its body is read."""

    def initialize(self, worker: Worker) -> None:
        self.worker = worker
        self._chunks: list[bytes] = []

    def prepare(self) -> None:
        problem = header_problem(dict(self.request.headers), self.worker.verifier.window_s)
        if problem is not None:
            self.set_status(401)
            self.finish({"error": problem})

    def data_received(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    def check(self) -> bool:
        self.request.body = b"".join(self._chunks)
        problem = self.signature_problem(self.worker.verifier)
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
            status = self.worker.status()
            self.finish(status)
            if status["state"] == "failed":
                self.worker.failure_read.set()


class GenerateHandler(_Handler):
    async def post(self) -> None:
        if not self.check():
            return
        try:
            parsed = Job.from_json(self.body())
        except (JobError, ValueError) as exc:  # ValueError: the body is not JSON
            self.set_status(400)
            self.finish({"error": str(exc)})
            return
        job = self.worker.enqueue(QueuedJob(parsed.seq, "generate", parsed))
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


class TraceHandler(_Handler):
    """``POST /trace``: ``{"on": bool}`` turns this rank's tracer on (clearing it) or off; ``{"since_ns": N}``
    returns the spans that ended at or after ``N`` (this rank's clock). Always answers the clock."""

    def post(self) -> None:
        if self.check():
            b = self.body()
            if "on" in b:
                TRACER.enable(bool(b["on"]), bool(b.get("detail")))
            out: dict[str, Any] = {"rank": self.worker.rank, "on": TRACER.on}
            if "since_ns" in b:
                out["spans"] = [list(s) for s in TRACER.since(int(b["since_ns"]))]
            out["clock_ns"] = time.perf_counter_ns()
            self.finish(out)


class ClockHandler(_Handler):
    """``GET /clock``: this rank's span clock (``time.perf_counter_ns``), for aligning its trace."""

    def get(self) -> None:
        if self.check():
            self.finish({"clock_ns": time.perf_counter_ns()})


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
            self.worker.enqueue(QueuedJob(int(b["seq"]), "shutdown"))
            self.finish({"shutting_down": True})


def exit_with_parent(parent: int, interval_s: float = 0.5) -> threading.Thread:
    """Exit this process (:data:`EXIT_ORPHANED`) once its parent is no longer ``parent`` (a daemon thread).

    An orphan is re-parented (to init or a subreaper), so ``os.getppid()`` changes; this works
    with ``start_new_session`` and on every POSIX system, unlike a parent-death signal.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.warning("the node agent (pid %d) that started this worker is gone: exiting", parent)
        logging.shutdown()
        os._exit(EXIT_ORPHANED)

    thread = threading.Thread(target=watch, name="exo-lab-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    config = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(
        level=defaults.worker_log_level(), format=f"%(asctime)s rank{config.get('rank')} %(levelname)s %(message)s"
    )
    exit_with_parent(int(config.get("agent_pid") or os.getppid()))
    if defaults.worker_batch():  # before the compute thread starts: it, and the threads it starts, inherit it
        log.info("%d threads under SCHED_BATCH", batch_threads())
    worker = Worker(config)
    compute = threading.Thread(target=worker.run, name="exo-lab-rank", daemon=True)

    async def serve() -> None:
        app = tornado.web.Application(
            [
                (r"/status", StatusHandler, {"worker": worker}),
                (r"/generate", GenerateHandler, {"worker": worker}),
                (r"/cancel", CancelHandler, {"worker": worker}),
                (r"/trace", TraceHandler, {"worker": worker}),
                (r"/clock", ClockHandler, {"worker": worker}),
                (r"/shutdown", ShutdownHandler, {"worker": worker}),
            ]
        )
        # jobs carry prompts and grammars: up to 16 MiB; the coordinator streams every request it has in flight
        # from rank 0 (max_batch + max_queue of them), other addresses have no business here
        GuardedHTTPServer(app, max_body_bytes=16 * MIB, per_address=1024, header_timeout_s=60.0).listen(
            config["control_port"], config.get("control_host", "0.0.0.0")
        )
        compute.start()
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
