"""Shard workers on one node: memory reservations, ports, processes.

The coordinator launches an instance in two phases. ``prepare`` reserves
memory for this node's ranks (refusing what would over-commit the node) and
picks a ring port and a control port per rank; ``start`` gets the complete
hostfile and spawns one worker process per rank (plain processes, started
with spawn semantics: a fresh interpreter, never a fork of this one).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from exo_lab import _blas

log = logging.getLogger(__name__)


class ReservationError(RuntimeError):
    """The node cannot take the ranks it was asked for."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", 0))
        return s.getsockname()[1]


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


@dataclass
class LocalInstance:
    id: str
    reserved_bytes: int
    ranks: dict[int, RankProcess] = field(default_factory=dict)
    state: str = "prepared"
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "reserved_bytes": self.reserved_bytes,
            "ranks": [r.to_json() for r in self.ranks.values()],
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

    def prepare(self, instance_id: str, ranks: list[dict[str, Any]], reserve_bytes: int, available_bytes: int) -> dict:
        """Reserve memory and ports for ``ranks`` (each ``{"rank", "address"}``)."""
        if instance_id in self.instances:
            inst = self.instances[instance_id]
            return {r.rank: {"ring": r.ring, "control": r.control} for r in inst.ranks.values()}
        free = available_bytes - self.reserved_bytes
        if reserve_bytes > free:
            raise ReservationError(
                f"needs {reserve_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free "
                f"({self.reserved_bytes / 1e9:.2f} GB already reserved for running instances)"
            )
        inst = LocalInstance(instance_id, reserve_bytes)
        for r in ranks:
            addr = r["address"]
            inst.ranks[int(r["rank"])] = RankProcess(
                int(r["rank"]), f"{addr}:{_free_port(addr)}", f"{addr}:{_free_port(addr)}"
            )
        self.instances[instance_id] = inst
        return {r.rank: {"ring": r.ring, "control": r.control} for r in inst.ranks.values()}

    def start(
        self, instance_id: str, hostfile: list[list[str]], common: dict[str, Any], per_rank: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Spawn this node's workers for a prepared instance."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(f"instance {instance_id} was not prepared on this node")
        run_dir = self.state_dir / "instances" / instance_id
        run_dir.mkdir(parents=True, exist_ok=True)
        hosts_path = run_dir / "hostfile.json"
        hosts_path.write_text(json.dumps(hostfile))
        for rank, rp in inst.ranks.items():
            if rp.proc is not None:
                continue
            host, port = rp.control.rsplit(":", 1)
            cfg = {
                **common,
                **per_rank[str(rank)],
                "rank": rank,
                "control_host": host,
                "control_port": int(port),
                "cluster_key": self.key,
            }
            cfg_path = run_dir / f"rank{rank}.json"
            cfg_path.write_text(json.dumps(cfg))
            env = _blas.child_env()
            env.update({"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts_path)})
            log_file = open(run_dir / f"rank{rank}.log", "ab")  # noqa: SIM115  (the rank writes it while it lives)
            rp.proc = subprocess.Popen(
                [sys.executable, "-m", "exo_lab.engine.worker", str(cfg_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        inst.state = "running"
        return inst.to_json()

    def stop(self, instance_id: str, timeout: float = 5.0) -> bool:
        """Stop every worker of an instance and free its reservation."""
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            return False
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
        inst.state = "stopped"
        return True

    def poll(self) -> None:
        """Mark instances whose workers died."""
        for inst in self.instances.values():
            if inst.state == "running" and any(
                r.proc is not None and r.proc.poll() is not None for r in inst.ranks.values()
            ):
                inst.state = "failed"
                log.warning("instance %s: a worker exited", inst.id)

    def log_tail(self, instance_id: str, rank: int, chars: int = 2000) -> str:
        path = self.state_dir / "instances" / instance_id / f"rank{rank}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        for iid in list(self.instances):
            self.stop(iid)
