"""Instances: a plan launched as MLX distributed workers on the cluster's nodes.

``cluster.launch(model, plan=None)`` (or ``plan.launch()``) asks each node
agent to reserve memory and ports for its ranks, then to start the workers
with the full hostfile. The :class:`Instance` tracks loading, sends each
request to every rank with a sequence number (the ranks admit requests in
that order and decode up to ``max_batch`` of them together, in lock step),
streams each request's tokens back from rank 0, and watches the workers: if one dies,
the request in flight ends with an error, the other workers are stopped, and
(with ``auto_replace``) the model is re-planned on the nodes that remain. A launch
that fails while loading on nodes that are all alive (a bad model, a bad config)
is not re-placed: it would fail the same way; one whose rank could not bind its port (another process took it
between the agent choosing it and the rank binding it) is launched again on the same plan with new ports, at
most :data:`PORT_RELAUNCHES` times.

Each node holds the instance on a lease (see :mod:`exo_lab.cluster.workers`): the
instance tells the agents who launched it (``ClusterClient.owner()``) and what it is,
and a thread of its own renews the lease on every node every :data:`RENEW_EVERY_S`
seconds with its status, so that the workers of a coordinator that dies are stopped
within ``lease_s``. A node that answers 404 (the instance was deleted there, or its
lease ran out) stops the instance: state ``stopped``, requests in flight end with an
error, the other nodes' workers are deleted, and it is not re-placed.
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlx_lm.utils import load_tokenizer
from tqdm.auto import tqdm

from exo_lab.cluster.auth import rank_target
from exo_lab.cluster.http import LineStream, RequestError, SignedClient
from exo_lab.cluster.instances import ClusterInstance
from exo_lab.engine.backend import STATES, USAGE_HISTORY, Backend  # noqa: F401  (re-exported)
from exo_lab.engine.generation import Chunk, Generation, TokenLogprob, Usage
from exo_lab.engine.job import Job
from exo_lab.engine.prefix_cache import DEFAULT_BYTES as PREFIX_CACHE_BYTES
from exo_lab.engine.trace import RankInfo, RawSpan, estimate_offset
from exo_lab.models import formats
from exo_lab.models.store import resolve
from exo_lab.placement.plan import Plan

log = logging.getLogger(__name__)

#: seconds a node keeps an instance's workers without hearing from its coordinator
LEASE_S = 10.0
#: how often the instance renews its lease on each node
RENEW_EVERY_S = 2.0
#: timeout of one renewal (or of the check whether a node still holds the instance)
RENEW_TIMEOUT_S = 3.0
#: launches of one placement again after a rank found its port taken (each with new ports)
PORT_RELAUNCHES = 2
#: how a rank says its port was taken: MLX's ring backend, and Python's socket (the control API)
_PORT_TAKEN = ("Couldn't bind socket (error: 98)", "[Errno 98]", "Address already in use")


def port_taken(problem: str) -> bool:
    """Whether a rank's failure ``problem`` is a port another process took (so a launch with new ports may work)."""
    return any(marker in problem for marker in _PORT_TAKEN)


class LaunchError(RuntimeError):
    """A plan could not be launched (a node refused, or workers failed to start)."""


class Instance(Backend):
    """A running model split over ranks; generates like an :class:`~exo_lab.Engine`."""

    #: what it does beyond plain generation (on the rank that samples): logprobs, and output constrained by a grammar
    features = frozenset({"logprobs", "grammar", "embeddings"})

    path: Path  # always a model directory (resolve() raises otherwise)

    def __init__(
        self,
        cluster: Any,
        model: str,
        plan: Plan,
        name: str | None = None,
        auto_replace: bool = True,
        max_batch: int = 16,
        max_queue: int = 256,
        lease_s: float = LEASE_S,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
    ) -> None:
        super().__init__(name or str(model), max_batch, max_queue)
        if prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
        #: the bound of each rank's prefix cache of its own layers' KV caches, split by layers (0: none)
        self.prefix_cache_bytes = prefix_cache_bytes
        self.lease_s = lease_s
        self._leased: set[tuple[str, str]] = set()  # (instance id, node) prepared and not deleted: renewed
        self.cluster = cluster
        self.model = model
        self.plan = plan
        self.auto_replace = auto_replace
        self.path = resolve(model)
        config = json.loads((self.path / "config.json").read_text())
        self.tokenizer = load_tokenizer(self.path, eos_token_ids=config.get("eos_token_id"))
        self.context_length = config.get("max_position_embeddings")
        self.state = "launching"
        self.error: str | None = None
        self.progress: dict[int, tuple[int, int]] = {}
        self.replacements = 0
        self._port_relaunches = 0
        #: the public id: what clients know this instance by, the same across re-placements (:attr:`launch_id`
        #: is the current placement's id on the agents and ranks)
        self.id = uuid.uuid4().hex[:10]
        self.launch_id = self.id
        self._seq = 0
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._inflight: set[Generation] = set()  # sent to the ranks, not finished
        self._closed = threading.Event()
        self._renew_now = threading.Event()  # renew the leases before the next round: news for the agents
        self._rings: dict[int, str] = {}  # rank -> its ring port (kept across re-launches)
        self._start(plan)
        threading.Thread(target=self._dispatch_loop, name=f"exo-lab-instance-{self.name}", daemon=True).start()
        threading.Thread(target=self._watch_loop, name=f"exo-lab-watch-{self.name}", daemon=True).start()
        threading.Thread(target=self._lease_loop, name=f"exo-lab-lease-{self.name}", daemon=True).start()

    # ---------------------------------------------------------------- launch
    def _start(self, plan: Plan) -> None:
        if plan.strategy == "pipeline-tensor" and any(r.tensor_size > 2 for r in plan.ranks):
            raise LaunchError("inside a pipeline, a stage's tensor group can be a pair (2 ranks), not more")
        if not plan.feasible:
            raise LaunchError(f"the plan is infeasible: {plan.reason}")
        self.plan = plan
        # the agents and ranks know each placement by its own id; the public id stays across re-placements
        self.launch_id = self.id if not self.replacements else f"{self.id}-r{self.replacements}"
        self.controls: dict[int, str] = {}
        self._seq = 0  # new workers count jobs from 1
        nodes = plan.nodes
        prepared: list[str] = []
        owner, info = self._owner(), self._info(plan)
        try:
            for node in nodes:
                ranks = [{"rank": r.rank, "address": r.address} for r in plan.ranks if r.node_id == node]
                resp = self._agent(
                    node,
                    "POST",
                    f"/instances/{self.launch_id}/prepare",
                    {
                        "ranks": ranks,
                        "reserve_bytes": plan.memory_bytes.get(node, 0),
                        "owner": owner,
                        "info": info,
                        "lease_s": self.lease_s,
                    },
                )
                prepared.append(node)
                with self._lock:
                    self._leased.add((self.launch_id, node))
                for rank, ports in resp["ranks"].items():
                    self.controls[int(rank)] = ports["control"]
                    spec = next(r for r in plan.ranks if r.rank == int(rank))
                    self.progress[int(rank)] = (0, max(1, spec.layers[1] - spec.layers[0]))  # until it reports
                    self._rings[int(rank)] = ports["ring"]
            hostfile = [[self._rings[r.rank]] for r in sorted(plan.ranks, key=lambda r: r.rank)]
            stages: dict[int, list[int]] = {}
            for r in plan.ranks:
                stages.setdefault(r.stage, []).append(r.rank)
            common = {
                "instance_id": self.launch_id,
                "model_name": self.path.name,
                "model_path": str(self.path),
                "num_layers": _num_layers(plan),
                "stages": [stages[s] for s in sorted(stages)],
                "backend": plan.backend,
                "max_batch": self.max_batch,
                "eos_token_ids": sorted(self.tokenizer.eos_token_ids),
                # what each rank's hidden states are in: a stage receives in its previous stage's dtype
                "act_dtypes": {str(r.rank): formats.activation_dtype_of(r.dtype) for r in plan.ranks},
                # every rank in q8/q4: the prompt's chunks are finer on a CPU (defaults.prefill_step), alike on all
                "quantized": formats.all_quantized(r.dtype for r in plan.ranks),
            }
            holders = self._holders(nodes)
            for node in nodes:
                per_rank = {
                    str(r.rank): {
                        "layers": list(r.layers),
                        "dtype": None if r.dtype == plan.model_dtype else r.dtype,
                        "prefix_cache_bytes": _rank_share(self.prefix_cache_bytes, r.layers, _num_layers(plan)),
                    }
                    for r in plan.ranks
                    if r.node_id == node
                }
                body = {"hostfile": hostfile, "common": common, "ranks": per_rank}
                if holders and node not in holders:
                    body["sources"] = [self._agent_address(node, h) for h in holders]
                self._agent(node, "POST", f"/instances/{self.launch_id}/start", body)
        except Exception as exc:
            with self._lock:
                self._leased.clear()
            for node in prepared:
                self._agent_quiet(node, "DELETE", f"/instances/{self.launch_id}")
            raise LaunchError(f"launching {self.name} failed: {exc}") from exc
        with self._lock:
            if self._closed.is_set():  # deleted or stopped while this launch ran (a re-placement): undo it
                closed = True
                self._leased.clear()
            else:
                closed = False
                self.state = "loading"
        if closed:
            for node in nodes:
                self._agent_quiet(node, "DELETE", f"/instances/{self.launch_id}")

    def _owner(self) -> dict[str, Any]:
        """Who launched this instance (the coordinator), as the agents keep it."""
        if hasattr(self.cluster, "owner"):  # a ClusterClient
            return self.cluster.owner()
        return {"coordinator": f"instance-{id(self):x}", "label": f"instance {self.name}", "api": None}

    def _info(self, plan: Plan) -> dict[str, Any]:
        """What the agents keep about this instance and show to anyone who lists it."""
        return {
            "id": self.id,  # the public id (the agents key this placement by launch_id)
            "model": str(self.model),
            "name": self.name,
            "plan": plan.to_json(),
            "nodes": plan.nodes,
            "max_batch": self.max_batch,
        }

    def cluster_view(self) -> ClusterInstance:
        """This instance as the cluster lists it (what its agents would say, from here): for the time it is on no
        agent (being re-placed, or failed), so that it stays listed under its public id."""
        owner = self._owner()
        return ClusterInstance(
            id=self.id,
            model=str(self.model),
            name=self.name,
            owner={k: owner.get(k) for k in ("coordinator", "label", "api")},
            nodes=list(self.plan.nodes),
            state=self.state,
            loaded=self.loaded,
            error=self.error,
            plan=self.plan.to_json(),
        )

    def _holders(self, nodes: list[str]) -> list[str]:
        """Nodes of the cluster whose store holds this model (peers fetch shards from them)."""
        out = []
        for node in [n.id for n in self.cluster.topology.alive()]:
            try:
                if self.path.name in self._agent(node, "GET", "/models").get("models", []):
                    out.append(node)
            except Exception as exc:
                log.debug("models of %s: %s", node, exc)
        return sorted(out, key=lambda n: (n not in nodes, n))

    def _agent_address(self, src: str, dst: str) -> str:
        """How ``src`` reaches ``dst``'s agent: the best measured link's address, else its first address."""
        topo = self.cluster.topology
        link = topo.best_link(src, dst) if src != dst else None
        node = topo.nodes[dst]
        host = link.dst_address if link is not None else (node.addresses[0] if node.addresses else "127.0.0.1")
        return f"{host}:{node.port}"

    def _agent(self, node_id: str, method: str, path: str, body: Any = None) -> Any:
        return self.cluster.request(self.cluster.address_of(node_id), method, path, body, timeout=30, node=node_id)

    def _agent_quiet(self, node_id: str, method: str, path: str) -> None:
        try:
            self._agent(node_id, method, path)
        except Exception as exc:  # best effort: the node may be gone
            log.debug("%s %s on %s: %s", method, path, node_id, exc)

    def _worker(self, rank: int, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        """A JSON request to rank ``rank``'s control API (:class:`RequestError`, an OSError, when it fails)."""
        return self._rank_client(rank, timeout).json(method, path, body)

    def _rank_client(self, rank: int, timeout: float | None) -> SignedClient:
        """A client of rank ``rank``'s control API, its requests signed for that rank of this launch only."""
        source = self._owner().get("coordinator")
        return SignedClient(
            self.controls[rank],
            self.cluster.cluster_key,
            timeout,
            node=rank_target(self.launch_id, rank),
            source=source,
        )

    # ---------------------------------------------------------------- status
    @property
    def loaded(self) -> tuple[int, int]:
        """Layers loaded and layers in total, over all ranks."""
        done = sum(d for d, _ in self.progress.values())
        total = sum(t for _, t in self.progress.values())
        return done, total

    def wait_ready(self, timeout: float = 300.0, progress: bool = True) -> Instance:
        """Block until every rank is ready (a progress bar shows layers loaded)."""
        off = not progress or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")  # as tqdm reads it
        bar = tqdm(total=max(1, self.loaded[1]), desc=f"loading {self.name}", unit="layer", disable=off)
        deadline = time.monotonic() + timeout
        try:
            while self.state not in ("ready", "failed", "stopped"):
                done, total = self.loaded
                bar.total = max(total, 1)
                bar.n = done
                bar.refresh()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s (state {self.state})")
                time.sleep(0.1)
            bar.n = bar.total
            bar.refresh()
        finally:
            bar.close()
        if self.state != "ready":
            raise LaunchError(f"{self.name} is {self.state}: {self.error}")
        return self

    def _watch_loop(self) -> None:
        while not self._closed.is_set():
            if self.state in ("loading", "ready"):
                problem = self._check_workers()
                if problem:
                    self._fail(problem)
            time.sleep(0.3)

    # ---------------------------------------------------------------- leases
    def lease_status(self) -> dict[str, Any]:
        """What each renewal tells the agents: ``{"state", "loaded": [done, total], "error", "requests"}``
        (``requests``: in flight or queued; the agents leave the links of a serving instance unprobed)."""
        done, total = self.loaded
        requests = len(self._inflight) + self._queue.qsize()
        return {"state": self.state, "loaded": [done, total], "error": self.error, "requests": requests}

    def _lease_loop(self) -> None:
        """Renew the lease on every node every :data:`RENEW_EVERY_S` s (at once when requests arrive at an idle
        instance), on a thread nothing else blocks."""
        with ThreadPoolExecutor(8, thread_name_prefix=f"exo-lab-renew-{self.name}") as pool:
            while True:
                self._renew_now.wait(RENEW_EVERY_S)
                self._renew_now.clear()
                if self._closed.is_set():
                    return
                try:
                    self._renew_leases(pool)
                except Exception:  # keep renewing; report why now
                    log.exception("renewing the leases of %s failed", self.name)

    def _renew_leases(self, pool: ThreadPoolExecutor) -> None:
        with self._lock:
            pairs = sorted(self._leased)
        if not pairs:
            return
        body = {"status": self.lease_status(), "owner": self._owner()}
        for (iid, node), gone in zip(pairs, pool.map(lambda p: self._renew(p[0], p[1], body), pairs)):
            if gone:
                self._stop_deleted(iid, node)
                return

    def _renew(self, iid: str, node: str, body: dict[str, Any]) -> bool:
        """Renew the lease of ``iid`` on ``node``; True when the node no longer holds it (404)."""
        try:
            address = self.cluster.address_of(node)
            self.cluster.request(address, "POST", f"/instances/{iid}/lease", body, timeout=RENEW_TIMEOUT_S)
        except Exception as exc:  # unreachable: the watch loop decides what that means
            if getattr(exc, "status", None) == 404:
                return True
            log.debug("renewing %s on %s: %s", iid, node, exc)
        return False

    def _deleted_on(self) -> str | None:
        """A node that no longer holds this instance (it answers 404), or None."""
        with self._lock:
            nodes = [n for i, n in sorted(self._leased) if i == self.launch_id]
        for node in nodes:
            try:
                self.cluster.request(
                    self.cluster.address_of(node), "GET", f"/instances/{self.launch_id}", timeout=RENEW_TIMEOUT_S
                )
            except Exception as exc:
                if getattr(exc, "status", None) == 404:
                    return node
        return None

    def _stop_deleted(self, iid: str, node: str) -> bool:
        """Stop for good because ``node`` no longer holds ``iid``; False when that is no news (already over)."""
        where = self.plan.node_names.get(node, node)
        problem = f"it was deleted on node {where}, or its lease there ran out"
        with self._lock:
            if (iid, node) not in self._leased or self._closed.is_set():
                return False
            self._leased.clear()
            self._closed.set()
            self._renew_now.set()
            log.warning("instance %s: %s", self.name, problem)
            self.error = problem
            self.state = "stopped"
            inflight = list(self._inflight)
        self._queue.put(None)
        for gen in inflight:
            if not gen.done:
                self._finish(gen, Chunk("", finish_reason="error", error=f"instance stopped: {problem}", usage=Usage()))
        for other in self.plan.nodes:  # the workers the other nodes still run
            self._agent_quiet(other, "DELETE", f"/instances/{iid}")
        return True

    def _rank_process_problem(self, rank: int) -> str | None:
        """Ask the rank's node agent whether its process is alive (None if it is)."""
        node = next(r.node_id for r in self.plan.ranks if r.rank == rank)
        try:
            data = self._agent(node, "GET", f"/instances/{self.launch_id}")
        except Exception as exc:
            return f"the node {self.plan.node_names.get(node, node)} of rank {rank} is unreachable ({exc})"
        info = next((r for r in data.get("ranks", []) if r["rank"] == rank), None)
        if info is None or info.get("alive"):
            return None
        tail = (data.get("logs") or {}).get(str(rank)) or (data.get("logs") or {}).get(rank) or ""
        return f"rank {rank} exited with code {info.get('exit_code')}" + (f": {tail.strip()[-500:]}" if tail else "")

    def _check_workers(self) -> str | None:
        states = []
        for rank in list(self.controls):
            try:
                st = self._worker(rank, "GET", "/status", timeout=2.0)
            except OSError as exc:
                problem = self._rank_process_problem(rank)
                if problem:
                    return problem
                if self.state == "ready":
                    return f"rank {rank} ({self.controls[rank]}) stopped answering: {exc}"
                states.append("starting")
                continue
            if st.get("state") == "failed":
                return f"rank {rank} failed: {st.get('error')}"
            self.progress[rank] = (st.get("loaded", 0), max(1, st.get("total", 1)))
            states.append(st.get("state"))
        if self.state == "loading" and states and all(s == "ready" for s in states):
            self.state = "ready"
        return None

    def _fail(self, problem: str) -> None:
        if self.state in ("failed", "stopped", "replacing"):
            return
        deleted = self._deleted_on()  # workers gone because someone deleted the instance: stop, do not re-place
        if deleted is not None and self._stop_deleted(self.launch_id, deleted):
            return
        with self._lock:
            if self.state in ("failed", "stopped", "replacing"):
                return
            log.warning("instance %s failed: %s", self.name, problem)
            was_ready = self.state == "ready"
            relaunch = (
                not was_ready
                and self.auto_replace
                and port_taken(problem)
                and self._port_relaunches < PORT_RELAUNCHES
                and not self._closed.is_set()
            )
            self.error = problem
            self.state = "replacing" if relaunch else "failed"  # wait_ready waits on through a relaunch
            inflight = list(self._inflight)
        for gen in inflight:
            if not gen.done:
                self._finish(gen, Chunk("", finish_reason="error", error=f"instance failed: {problem}", usage=Usage()))
        self._stop_workers(graceful=False)
        if relaunch:
            threading.Thread(target=self._relaunch, daemon=True).start()
        elif self.auto_replace and not self._closed.is_set():
            threading.Thread(target=self._replace, args=(was_ready,), daemon=True).start()

    def _relaunch(self) -> None:
        """Launch the same plan again, with new ports (a rank's port was taken before it could bind it)."""
        try:
            self._port_relaunches += 1
            self.replacements += 1
            log.info("instance %s: a rank's port was taken; launching it again with new ports", self.name)
            self._start(self.plan)
        except Exception as exc:
            with self._lock:
                if self.state != "stopped":
                    self.state = "failed"
                    self.error = f"{self.error}; launching again failed: {exc}"

    def _replace(self, was_ready: bool = True) -> None:
        """Re-plan on the nodes that remain; a launch that failed while loading is re-placed only if a node was lost."""
        try:
            self.cluster.refresh()
            alive = {n.id for n in self.cluster.topology.alive()}
            dead_nodes = [n for n in self.plan.nodes if n not in alive]
        except Exception as exc:
            alive, dead_nodes = None, []
            log.debug("refreshing the cluster of %s: %s", self.name, exc)
        if not was_ready and not dead_nodes:
            log.info("instance %s failed while loading on nodes that are all alive: not re-placing it", self.name)
            return
        with self._lock:
            if self.state != "failed" or self._closed.is_set():
                return
            self.state = "replacing"
        try:
            if alive is None:
                raise LaunchError("the cluster could not be read")
            plans = self.cluster.preview(
                self.path, context=self.plan.context, prompt_tokens=self.plan.prompt_tokens, lossy=self.plan.lossy
            )
            candidates = [p for p in plans if not (set(p.nodes) & set(dead_nodes))]
            if not candidates:
                raise LaunchError("the model fits on none of the nodes that remain")
            self.replacements += 1
            self._start(candidates[0])
            log.info("instance %s re-placed on %s", self.name, candidates[0].describe())
        except Exception as exc:
            with self._lock:
                if self.state != "stopped":
                    self.state = "failed"
                    self.error = f"{self.error}; re-placing failed: {exc}"

    # ---------------------------------------------------------------- generation
    def _check_open(self) -> None:
        if self.state in ("failed", "stopped"):
            raise RuntimeError(f"instance {self.name} is {self.state}: {self.error}")

    def _enqueue(self, gen: Generation) -> None:
        idle = not self._inflight and self._queue.empty()
        self._queue.put(gen)
        if idle:
            self._renew_now.set()

    def _on_finish(self, gen: Generation) -> None:
        self._inflight.discard(gen)

    @property
    def stats(self) -> dict[str, int]:
        """Rank 0's batching counters: ``decode_steps`` taken, ``peak_batch`` (most sequences in one step) and
        ``steps_ahead`` (steps built while the one before computed: :mod:`exo_lab.engine.lookahead`); and
        ``steps_prebuilt`` over every rank (a pipeline stage's steps built before their input came:
        :mod:`exo_lab.engine.pipeline`)."""
        keys = ("decode_steps", "peak_batch", "steps_ahead")
        out: dict[str, int] = dict.fromkeys((*keys, "steps_prebuilt"), 0)
        try:
            status = self._worker(0, "GET", "/status", timeout=2.0)
            out.update({k: int(status.get(k, 0)) for k in keys})
            for rank in sorted(self.controls):
                status = status if rank == 0 else self._worker(rank, "GET", "/status", timeout=2.0)
                out["steps_prebuilt"] += int(status.get("steps_prebuilt", 0))
        except (OSError, KeyError, ValueError):  # not started, gone, or not answering
            pass
        return out

    def _dispatch_loop(self) -> None:
        """Number each request and send it to every rank; a thread per request streams it back from rank 0."""
        while True:
            gen = self._queue.get()
            if gen is None:
                return
            if gen.cancelled:
                self._finish(gen, Chunk("", finish_reason="cancelled", usage=Usage(len(gen.request.prompt_tokens))))
                continue
            deadline = time.monotonic() + 600
            while self.state in ("launching", "loading", "replacing") and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.state != "ready":
                self._finish(
                    gen, Chunk("", finish_reason="error", error=f"instance {self.state}: {self.error}", usage=Usage())
                )
                continue
            req = gen.request
            with self._lock:
                self._seq += 1
                seq = self._seq
                self._inflight.add(gen)
            try:
                body = Job(
                    seq,
                    tuple(req.prompt_tokens),
                    req.max_tokens,
                    req.sampling,
                    tuple(req.stop),
                    req.ignore_eos,
                    req.grammar.to_json() if req.grammar else None,
                    req.logprobs,
                    req.embed,
                ).to_json()
            except ValueError as exc:  # a JobError, or a grammar the ranks cannot follow: this request only
                self._finish(gen, Chunk("", finish_reason="error", error=str(exc), usage=Usage()))
                with self._lock:
                    self._seq -= 1  # nobody was sent job seq: the next request takes its number
                continue
            try:  # the other ranks first: rank 0 admits a job only once it has it, so they must have it too
                for rank in sorted(self.controls):
                    if rank != 0:
                        self._worker(rank, "POST", "/generate", body)
            except OSError as exc:  # a rank that misses a job would wait for it for ever: the instance is broken
                self._fail(f"could not send request {seq} to every rank: {exc}")
                self._finish(gen, Chunk("", finish_reason="error", error=f"instance failed: {exc}", usage=Usage()))
                continue
            threading.Thread(
                target=self._stream, args=(seq, gen, body), daemon=True, name=f"exo-lab-request-{seq}"
            ).start()

    def _stream(self, seq: int, gen: Generation, body: dict[str, Any]) -> None:
        try:
            self._run(seq, gen, body)
        except Exception as exc:
            self._finish(gen, Chunk("", finish_reason="error", error=f"{type(exc).__name__}: {exc}", usage=Usage()))
        finally:  # never leave a request counted when its stream is over
            if not gen.done:
                self._finish(
                    gen, Chunk("", finish_reason="error", error="the stream from rank 0 ended early", usage=Usage())
                )

    def _send_to_rank0(self, seq: int, body: dict[str, Any]) -> LineStream:
        """Post job ``seq`` to rank 0 (retried: the other ranks hold it already, and rank 0 admits jobs in
        order, so a job it never gets would stall every later one); the instance fails if it cannot."""
        client = self._rank_client(0, None)
        for attempt in range(3):
            try:
                return client.stream_lines("POST", "/generate", body)
            except RequestError as exc:
                if attempt == 2:
                    self._fail(f"could not send request {seq} to rank 0: {exc}")
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def _run(self, seq: int, gen: Generation, body: dict[str, Any]) -> None:
        lines: queue.Queue = queue.Queue()
        stream = self._send_to_rank0(seq, body)

        def reader() -> None:
            try:
                for line in stream:
                    lines.put(line)
            except (OSError, ValueError, AttributeError) as exc:
                lines.put(exc)  # AttributeError: the connection was closed under us (request over)
            lines.put(None)

        reading = threading.Thread(target=reader, daemon=True)
        reading.start()
        cancel_sent = False
        try:
            while True:
                if gen.cancelled and not cancel_sent:  # checked on every chunk: a busy stream is never empty
                    self._worker(0, "POST", "/cancel", {"seq": seq})
                    cancel_sent = True
                try:
                    item = lines.get(timeout=0.1)
                except queue.Empty:
                    if gen.done:  # the watcher ended it (a worker died)
                        return
                    continue
                if item is None or isinstance(item, Exception):
                    self._finish(gen, Chunk("", finish_reason="error", error=f"lost rank 0: {item}", usage=Usage()))
                    return
                if item.get("finish_reason"):
                    usage = Usage(**item["usage"]) if item.get("usage") else Usage()
                    reason = item["finish_reason"]
                    if gen.cancelled and reason != "error":
                        reason = "cancelled"
                    self._finish(
                        gen,
                        Chunk(
                            item.get("text", ""),
                            tuple(item.get("tokens", [])),
                            reason,
                            usage,
                            item.get("error"),
                            item.get("stop_sequence"),
                            embedding=tuple(item["embedding"]) if item.get("embedding") else None,
                        ),
                        record=reason != "error",
                    )
                    return
                gen._push(Chunk(item.get("text", ""), tuple(item.get("tokens", [])), logprobs=_logprobs(item)))
        finally:
            reading.join(1.0)
            stream.close()

    # ---------------------------------------------------------------- tracing
    def _trace_switch(self, on: bool, detail: bool = False) -> None:
        """Every rank's tracer on (clearing it) or off."""
        body = {"on": on, "detail": detail}
        with ThreadPoolExecutor(max(1, len(self.controls))) as pool:
            list(pool.map(lambda r: self._worker(r, "POST", "/trace", body), sorted(self.controls)))

    def _trace_collect(self, since_ns: int) -> list[tuple[RankInfo, list[RawSpan]]]:
        """Each rank's clock offset (round trips to its control API, :func:`estimate_offset`), then its spans."""

        def one(rank: int) -> tuple[RankInfo, list[RawSpan]]:
            client = self._rank_client(rank, 5.0)
            offset, uncertainty = estimate_offset(lambda: int(client.json("GET", "/clock")["clock_ns"]))
            spec = next(r for r in self.plan.ranks if r.rank == rank)
            info = RankInfo(rank, spec.stage, self.plan.node_names.get(spec.node_id, spec.node_id), offset, uncertainty)
            got = client.json("POST", "/trace", {"since_ns": since_ns + offset - uncertainty})
            return info, [(n, int(s), int(e), int(k), a) for n, s, e, k, a in got.get("spans", [])]

        with ThreadPoolExecutor(max(1, len(self.controls))) as pool:
            return list(pool.map(one, sorted(self.controls)))

    def _trace_context(self) -> tuple[str, dict[str, float]]:
        return self.plan.describe(), dict(self.plan.breakdown)

    # ---------------------------------------------------------------- teardown
    def _stop_workers(self, graceful: bool) -> None:
        if graceful and self.state == "ready":
            with self._lock:
                self._seq += 1
                seq = self._seq
            for rank in sorted(self.controls):
                try:
                    self._worker(rank, "POST", "/shutdown", {"seq": seq}, timeout=2.0)
                except OSError:
                    pass
            time.sleep(0.3)
        with self._lock:
            self._leased = {p for p in self._leased if p[0] != self.launch_id}
        for node in self.plan.nodes:
            self._agent_quiet(node, "DELETE", f"/instances/{self.launch_id}")

    def delete(self) -> None:
        """Stop every worker and free every reservation."""
        if self.state == "stopped":
            return
        self._closed.set()
        self._renew_now.set()
        self._queue.put(None)
        with self._lock:
            inflight = list(self._inflight)
        for gen in inflight:  # the ranks drain their batch before they shut down: end it now
            gen.cancel()
        deadline = time.monotonic() + 5
        while any(not g.done for g in inflight) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop_workers(graceful=True)
        self.state = "stopped"

    close = delete

    def pids(self) -> dict[str, list[int]]:
        """Worker process ids per node (for checking that none are left)."""
        out: dict[str, list[int]] = {}
        for node in self.plan.nodes:
            try:
                data = self._agent(node, "GET", f"/instances/{self.launch_id}")
                out[node] = [r["pid"] for r in data["ranks"] if r.get("pid")]
            except Exception:
                out[node] = []
        return out

    def __repr__(self) -> str:
        done, total = self.loaded
        return f"<Instance {self.name} {self.state} {self.plan.describe()} loaded {done}/{total}>"

    def _repr_html_(self) -> str:
        done, total = self.loaded
        pct = 100 * done / total if total else 0
        return (
            f"<b>{html.escape(self.name)}</b> &mdash; <code>{self.state}</code> "
            f"<span style='display:inline-block;width:120px;height:8px;background:var(--jp-layout-color3,#ddd)'>"
            f"<span style='display:block;height:8px;width:{pct:.0f}%;background:var(--jp-brand-color1,#1976d2)'></span>"
            f"</span> {done}/{total} layers<br><small>{html.escape(self.plan.describe())}</small>"
            + (f"<br><small style='color:#c62828'>{html.escape(self.error)}</small>" if self.error else "")
        )


def _logprobs(item: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """A worker chunk's ``logprobs`` (``[token, text, logprob, [[id, text, logprob], ...]]`` each)."""
    return tuple(
        TokenLogprob(int(t), text, float(lp), tuple((int(i), s, float(v)) for i, s, v in top))
        for t, text, lp, top in item.get("logprobs") or ()
    )


def _rank_share(total: int, layers: Any, num_layers: int) -> int:
    """A rank's part of the instance's prefix cache bound: in proportion to its layers (0 stays 0: off)."""
    return max(1, total * (layers[1] - layers[0]) // max(1, num_layers)) if total else 0


def _num_layers(plan: Plan) -> int:
    return max(r.layers[1] for r in plan.ranks)
