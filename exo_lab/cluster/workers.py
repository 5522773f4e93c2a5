"""Shard workers on one node: memory reservations, ports, processes, leases.

The coordinator launches an instance in two phases. ``prepare`` reserves
memory for this node's ranks (refusing what would over-commit the node) and
picks a ring port and a control port per rank; ``start`` gets the complete
hostfile and spawns one worker process per rank (plain processes, started
with spawn semantics: a fresh interpreter, never a fork of this one).

Every instance is leased from ``prepare`` on: its coordinator renews the lease
(``POST /instances/{id}/lease``, with the status it sees) every few seconds, and
:meth:`WorkerManager.expire` hands back the instances whose lease ran out (their
coordinator died or lost the node) so that the agent stops their workers and
frees their memory. The status says how many requests the instance has in flight: the
agent of a node whose instance is :attr:`LocalInstance.serving` leaves its links unprobed.
Nothing outlives its owner: a worker exits when its agent is
gone (:mod:`exo_lab.engine.worker` watches its parent), and an agent started on a
state dir kills the workers a previous agent there left behind
(:meth:`WorkerManager.clean_leftovers`, from the pid files in each instance's run dir).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from exo_lab import _blas, paths
from exo_lab.cluster.ports import free_port

log = logging.getLogger(__name__)

#: seconds an instance lives without a renewal of its lease, unless ``prepare`` says otherwise
DEFAULT_LEASE_S = 10.0
#: the longest lease a coordinator may ask for (a day)
MAX_LEASE_S = 86400.0
WORKER_MODULE = "exo_lab.engine.worker"
#: an instance counts as serving until this long after a renewal last said it had requests in flight
SERVING_QUIET_S = 10.0


class ReservationError(RuntimeError):
    """The node cannot take the ranks it was asked for."""


@dataclass
class RankProcess:
    rank: int
    ring: str  # address:port for MLX
    control: str  # address:port of the worker's control API
    proc: subprocess.Popen | None = None
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        proc = self.proc
        alive = proc is not None and proc.poll() is None
        code = proc.poll() if proc is not None else None
        return {
            "rank": self.rank,
            "ring": self.ring,
            "control": self.control,
            "pid": proc.pid if proc else None,
            "alive": alive,
            "exit_code": code,
            **(process_memory(proc.pid) if proc is not None and alive else {}),
        }


def process_memory(pid: int) -> dict[str, int]:
    """``rss_bytes`` now and ``peak_rss_bytes`` (Linux: VmHWM; elsewhere the current RSS) of a live process."""
    try:
        rss = int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return {}
    peak = rss
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(rss, int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    return {"rss_bytes": rss, "peak_rss_bytes": peak}


def check_owner(owner: Any) -> dict[str, Any] | None:
    """``owner`` as sent (``{"coordinator": str, "label": str, "api": str | None}``), or a ValueError."""
    if owner is None:
        return None
    if not isinstance(owner, dict):
        raise ValueError("owner must be an object")
    for key in ("coordinator", "label"):
        if not isinstance(owner.get(key), str):
            raise ValueError(f"owner.{key} must be a string")
    if owner.get("api") is not None and not isinstance(owner["api"], str):
        raise ValueError("owner.api must be a string or null")
    return {"coordinator": owner["coordinator"], "label": owner["label"], "api": owner.get("api")}


def check_reserve_bytes(value: Any) -> int:
    """Bytes of memory to reserve: a non-negative integer (a negative one would free others' reservations), or a
    ValueError."""
    if isinstance(value, float) and value.is_integer():  # JSON does not tell 2.0 from 2
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"reserve_bytes must be a whole number of bytes, got {value!r}")
    if value < 0:
        raise ValueError(f"reserve_bytes must be 0 or more, got {value}")
    return value


def check_lease_s(value: Any) -> float:
    """A lease length in seconds (``0 < lease_s <= MAX_LEASE_S``), or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("lease_s must be a number of seconds")
    lease = float(value)
    if not (math.isfinite(lease) and 0 < lease <= MAX_LEASE_S):
        raise ValueError(f"lease_s must be in (0, {MAX_LEASE_S:.0f}], got {value}")
    return lease


@dataclass
class LocalInstance:
    """One instance's ranks on this node, its reservation, its owner and its lease."""

    id: str
    reserved_bytes: int
    ranks: dict[int, RankProcess] = field(default_factory=dict)
    state: str = "prepared"
    created: float = field(default_factory=time.time)
    #: who launched it: ``{"coordinator": id, "label": ..., "api": url or None}`` (None: not said)
    owner: dict[str, Any] | None = None
    #: what the coordinator says it is (model, name, plan, nodes, ...), kept and returned verbatim
    info: dict[str, Any] = field(default_factory=dict)
    lease_s: float = DEFAULT_LEASE_S
    #: ``time.monotonic()`` when the lease runs out
    lease_deadline: float = 0.0
    #: the last status the coordinator reported with a renewal
    status: dict[str, Any] = field(default_factory=dict)
    #: ``time.monotonic()`` when a status last said requests were in flight (0: never)
    busy_at: float = 0.0

    def renew(self, status: dict[str, Any] | None = None) -> None:
        """Extend the lease by ``lease_s`` from now (and keep ``status`` when given)."""
        self.lease_deadline = time.monotonic() + self.lease_s
        if status is not None:
            self.status = status
            requests = status.get("requests")
            if isinstance(requests, int) and requests > 0:
                self.busy_at = time.monotonic()

    @property
    def serving(self) -> bool:
        """Whether it had requests in flight within the last :data:`SERVING_QUIET_S`."""
        return self.busy_at > 0 and time.monotonic() - self.busy_at < SERVING_QUIET_S

    @property
    def lease_expires_in(self) -> float:
        return max(0.0, self.lease_deadline - time.monotonic())

    @property
    def owner_label(self) -> str:
        return self.owner["label"] if self.owner else "an unnamed coordinator"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "reserved_bytes": self.reserved_bytes,
            "ranks": [r.to_json() for r in self.ranks.values()],
            "created": self.created,
            "owner": self.owner,
            "info": self.info,
            "lease_s": self.lease_s,
            "lease_expires_in": round(self.lease_expires_in, 3),
            "status": self.status,
        }


class WorkerManager:
    """This node's instances and the worker processes behind them."""

    def __init__(self, state_dir: Path, key: str, bind_host: str) -> None:
        self.state_dir = state_dir
        self.key = key
        self.bind_host = bind_host
        self.instances: dict[str, LocalInstance] = {}

    @property
    def reserved_bytes(self) -> int:
        return sum(i.reserved_bytes for i in self.instances.values() if i.state != "stopped")

    def ports_handed_out(self) -> set[int]:
        """The ring and control ports of every instance this node holds (some not bound yet: workers not started)."""
        return {
            int(address.rsplit(":", 1)[1])
            for inst in self.instances.values()
            for r in inst.ranks.values()
            for address in (r.ring, r.control)
        }

    def run_dir(self, instance_id: str) -> Path:
        """Where an instance's hostfile, rank configs, logs and pid files live."""
        return self.state_dir / "instances" / instance_id

    def prepare(
        self,
        instance_id: str,
        ranks: list[dict[str, Any]],
        reserve_bytes: int,
        available_bytes: int,
        owner: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> dict:
        """Reserve memory and ports for ``ranks`` (each ``{"rank", "address"}``); the lease starts now."""
        if instance_id in self.instances:
            inst = self.instances[instance_id]
            inst.renew()
            return {r.rank: {"ring": r.ring, "control": r.control} for r in inst.ranks.values()}
        free = available_bytes - self.reserved_bytes
        if reserve_bytes > free:
            raise ReservationError(
                f"needs {reserve_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free "
                f"({self.reserved_bytes / 1e9:.2f} GB already reserved for running instances)"
            )
        inst = LocalInstance(instance_id, reserve_bytes, owner=owner, info=dict(info or {}), lease_s=lease_s)
        inst.renew()
        handed = self.ports_handed_out()  # a worker binds its ports only once it starts: a bind test misses them
        for r in ranks:
            addr = r["address"]
            ring = free_port(addr, handed)
            handed.add(ring)
            control = free_port(addr, handed)
            handed.add(control)
            inst.ranks[int(r["rank"])] = RankProcess(int(r["rank"]), f"{addr}:{ring}", f"{addr}:{control}")
        self.instances[instance_id] = inst
        return {r.rank: {"ring": r.ring, "control": r.control} for r in inst.ranks.values()}

    def start(
        self, instance_id: str, hostfile: list[list[str]], common: dict[str, Any], per_rank: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Spawn this node's workers for a prepared instance."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(f"instance {instance_id} was not prepared on this node (or its lease expired)")
        inst.renew()
        run_dir = self.run_dir(instance_id)
        for private in (self.state_dir, run_dir.parent, run_dir):  # the rank configs hold the cluster key
            paths.private_dir(private)
        hosts_path = run_dir / "hostfile.json"
        paths.write_private(hosts_path, json.dumps(hostfile))
        for rank, rp in inst.ranks.items():
            if rp.proc is not None:
                continue
            host, port = rp.control.rsplit(":", 1)
            cfg = {
                **common,
                **per_rank[str(rank)],
                "instance_id": instance_id,  # what this rank answers to (cluster.auth.rank_target), whatever common says
                "rank": rank,
                "control_host": host,
                "control_port": int(port),
                "cluster_key": self.key,
                "agent_pid": os.getpid(),  # the worker exits when this process is gone
            }
            cfg_path = run_dir / f"rank{rank}.json"
            paths.write_private(cfg_path, json.dumps(cfg))
            env = _blas.child_env()
            env.update({"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts_path)})
            with open(run_dir / f"rank{rank}.log", "ab", opener=_private_opener) as log_file:  # the child keeps its own
                rp.proc = subprocess.Popen(
                    [sys.executable, "-m", WORKER_MODULE, str(cfg_path)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            _write_pid_file(run_dir / f"rank{rank}.pid", rp.proc.pid)
        inst.state = "running"
        return inst.to_json()

    def renew(self, instance_id: str, status: dict[str, Any] | None = None, owner: dict[str, Any] | None = None):
        """Renew an instance's lease (KeyError when it is unknown: deleted, or its lease ran out)."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(instance_id)
        inst.renew(status)
        if owner is not None:
            inst.owner = owner
        return inst

    def detach(self, instance_id: str) -> LocalInstance | None:
        """Forget an instance and free its reservation now; :meth:`terminate` then stops its workers."""
        inst = self.instances.pop(instance_id, None)
        if inst is not None:
            inst.state = "stopped"
        return inst

    def terminate(self, inst: LocalInstance, timeout: float = 5.0) -> None:
        """Stop the workers of a detached instance (SIGTERM, SIGKILL after ``timeout``); blocks until they exit."""
        procs = [r.proc for r in inst.ranks.values() if r.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for rank in inst.ranks:
            (self.run_dir(inst.id) / f"rank{rank}.pid").unlink(missing_ok=True)

    def stop(self, instance_id: str, timeout: float = 5.0) -> bool:
        """Stop every worker of an instance and free its reservation."""
        inst = self.detach(instance_id)
        if inst is None:
            return False
        self.terminate(inst, timeout)
        return True

    def poll(self) -> None:
        """Mark instances whose workers died."""
        for inst in self.instances.values():
            if inst.state == "running" and any(
                r.proc is not None and r.proc.poll() is not None for r in inst.ranks.values()
            ):
                inst.state = "failed"
                codes = {r.rank: r.proc.poll() for r in inst.ranks.values() if r.proc is not None}
                log.warning("instance %s of %s: a worker exited (exit codes %s)", inst.id, inst.owner_label, codes)

    def expire(self) -> list[LocalInstance]:
        """Detach every instance whose lease ran out and return them (stop them with :meth:`terminate`)."""
        now = time.monotonic()
        out = []
        for iid in [i.id for i in self.instances.values() if i.lease_deadline < now]:
            inst = self.detach(iid)
            if inst is not None:
                log.warning(
                    "instance %s of %s: its lease ran out (not renewed for %.1f s); stopping its %d workers "
                    "and freeing %.2f GB",
                    iid,
                    inst.owner_label,
                    inst.lease_s,
                    sum(r.proc is not None for r in inst.ranks.values()),
                    inst.reserved_bytes / 1e9,
                )
                out.append(inst)
        return out

    def clean_leftovers(self) -> list[int]:
        """Kill the workers a previous agent on this state dir left running and remove its run dirs.

        A process is killed only if its pid file says so and its command line is this module's
        worker reading a config from that run dir (a reused pid is left alone). Returns the pids killed.
        """
        root = self.state_dir / "instances"
        if not root.is_dir():
            return []
        victims = []
        for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for pid_file in run_dir.glob("rank*.pid"):
                proc = _leftover_worker(pid_file, run_dir)
                if proc is not None:
                    log.warning("killing worker %d of instance %s, left by a previous agent", proc.pid, run_dir.name)
                    victims.append(proc)
        for proc in victims:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=5)
        for run_dir in [p for p in root.iterdir() if p.is_dir()]:
            shutil.rmtree(run_dir, ignore_errors=True)
        return [p.pid for p in victims]

    def log_tail(self, instance_id: str, rank: int, chars: int = 2000) -> str:
        path = self.run_dir(instance_id) / f"rank{rank}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        for iid in list(self.instances):
            self.stop(iid)


def _write_pid_file(path: Path, pid: int) -> None:
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None
    paths.write_private(path, json.dumps({"pid": pid, "started": started}))


def _private_opener(path: str, flags: int) -> int:
    """For ``open(..., opener=)``: a file made readable by this user only."""
    return os.open(path, flags, 0o600)


def _leftover_worker(pid_file: Path, run_dir: Path) -> psutil.Process | None:
    """The live worker process ``pid_file`` names, if it still is one of ``run_dir``'s workers."""
    try:
        pid = int(json.loads(pid_file.read_text())["pid"])
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None
    if WORKER_MODULE not in cmdline or not any(a.startswith(str(run_dir) + os.sep) for a in cmdline):
        return None
    return proc
