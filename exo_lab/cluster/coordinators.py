"""Coordinators announce themselves, so that other processes of this user find the cluster.

Whoever holds a :class:`~exo_lab.Cluster` (a notebook kernel, ``exo-lab up``) is its
coordinator. The Jupyter server extension runs in another process and must find
it: each coordinator keeps one JSON file, ``<runtime dir>/coordinators/<id>.json``
(mode 0600 in a 0700 directory, like the node's ``cluster.key``), with the agents'
addresses, the cluster key (reads of remote agents are signed), the instances it
launched and the URLs it serves. A background thread rewrites the file when that
changes; :meth:`Registration.close` (``cluster.close()``), the end of the process or
the cluster being garbage-collected removes it. Readers skip and delete the files
of processes that died without cleaning up.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from exo_lab import _blas
from exo_lab.cluster.auth import fingerprint
from exo_lab.cluster.machine import cpu_count, cpu_model, memory_now
from exo_lab.paths import private_dir, runtime_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ids = itertools.count(1)
_live: dict[str, Registration] = {}  # this process's registrations, removed at exit


def registry_dir() -> Path:
    """Where coordinators register: ``<runtime dir>/coordinators``."""
    return runtime_dir() / "coordinators"


@dataclass
class CoordinatorInfo:
    """What one coordinator tells the processes that look for its cluster."""

    id: str
    pid: int
    process_started: float  # the process's start time, so that a reused pid is not mistaken for it
    kind: str  # "kernel", "exo-lab up", "python"
    label: str
    agents: list[str]  # "host:port" of every node agent it reaches, in the order it learnt them
    follow_peers: bool = True
    cluster_key: str | None = None
    fingerprint: str | None = None
    kernel_id: str | None = None
    api_url: str | None = None
    dashboard_url: str | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    local_topology: dict[str, Any] | None = None  # the topology of a coordinator without agents (exo-lab up)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CoordinatorInfo:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def public_json(self) -> dict[str, Any]:
        """Everything but the cluster key (what a browser may see)."""
        d = self.to_json()
        d.pop("cluster_key", None)
        return d

    def alive(self) -> bool:
        """Whether the process that wrote this is still running (and is the same process)."""
        return _process_started(self.pid) == self.process_started


def _process_started(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _kernel_id() -> str | None:
    """The id of the Jupyter kernel this runs in, or None."""
    if "ipykernel" not in sys.modules:
        return None
    try:
        from ipykernel import get_connection_file  # only in a kernel (ipykernel is in sys.modules)

        name = Path(get_connection_file()).stem  # kernel-<id>
    except (RuntimeError, AttributeError, ImportError):
        return None
    return name.removeprefix("kernel-")


def _describe_process() -> tuple[str, str]:
    kernel = _kernel_id()
    if kernel:
        return "kernel", f"kernel {kernel[:8]}"
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if argv0 == "__main__.py":  # python -m package
        argv0 = Path(sys.argv[0]).parent.name
    if argv0 in ("exo-lab", "cli.py"):
        sub = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        return f"exo-lab {sub}".strip(), f"exo-lab {sub} (pid {os.getpid()})".strip()
    return "python", f"{argv0} (pid {os.getpid()})"


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _ensure_dir(path: Path) -> None:
    """``path`` private (0700), and the runtime dir too when ``path`` is inside it."""
    if runtime_dir() in path.parents:
        private_dir(runtime_dir())
    private_dir(path)


def instance_summary(inst: Any) -> dict[str, Any]:
    """What the side panel shows of an :class:`~exo_lab.instance.Instance`."""
    plan = inst.plan
    done, total = inst.loaded
    return {
        "id": getattr(inst, "id", None),
        "name": inst.name,
        "model": str(inst.model),
        "state": inst.state,
        "error": inst.error,
        "loaded_layers": done,
        "total_layers": total,
        "created": inst.created,
        "strategy": plan.strategy,
        "description": plan.describe(),
        "backend": plan.backend,
        "nodes": list(plan.nodes),
        "node_names": [plan.node_names.get(n, n) for n in plan.nodes],
        "predicted_decode_tps": round(plan.decode_tps, 3),
        "predicted_ttft_s": round(plan.ttft_s, 4),
        "replacements": getattr(inst, "replacements", 0),
    }


class Registration:
    """One coordinator's file, kept up to date by a daemon thread until :meth:`close`.

    The source is a :class:`~exo_lab.Cluster` (its agents and instances), or an API server
    without node agents (``exo-lab up`` / ``serve``: this machine as its one node, the models
    it serves as its instances). Only a weak reference is kept: a source that is garbage
    collected unregisters.
    """

    def __init__(
        self,
        cluster: Any = None,
        *,
        server: Any = None,
        kind: str | None = None,
        label: str | None = None,
        interval_s: float = 1.0,
        directory: Path | None = None,
    ) -> None:
        if (cluster is None) == (server is None):
            raise ValueError("register either a cluster or a server")
        auto_kind, auto_label = _describe_process()
        key = cluster.cluster_key if cluster is not None else None
        self.info = CoordinatorInfo(
            id=f"{os.getpid()}-{next(_ids)}",
            pid=os.getpid(),
            process_started=_process_started(os.getpid()) or 0.0,
            kind=kind or auto_kind,
            label=label or auto_label,
            agents=[],
            follow_peers=getattr(cluster, "follow_peers", True),
            cluster_key=key,
            fingerprint=fingerprint(key) if key else None,
            kernel_id=_kernel_id(),
            api_url=getattr(server, "url", None),
        )
        self.directory = directory or registry_dir()
        self.path = self.directory / f"{self.info.id}.json"
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._source = weakref.ref(cluster if cluster is not None else server, lambda _ref: self._stop.set())
        self._is_cluster = cluster is not None
        self._lock = threading.Lock()
        self._written: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Registration:
        """Write the file now and keep it current in the background."""
        try:
            _ensure_dir(self.directory)
            self._sync()
        except OSError as exc:  # a read-only home must not stop a cluster from working
            log.warning(
                "cannot register this coordinator in %s: %s (the JupyterLab panel will not see it)", self.directory, exc
            )
            return self
        _live[self.info.id] = self
        self._thread = threading.Thread(target=self._loop, name=f"exo-lab-registration-{self.info.id}", daemon=True)
        self._thread.start()
        return self

    def update(self, **fields: Any) -> None:
        """Change announced fields (``dashboard_url=...``, ``api_url=...``, ``label=...``) and write them now."""
        unknown = set(fields) - set(CoordinatorInfo.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown coordinator fields: {', '.join(sorted(unknown))}")
        with self._lock:
            for k, v in fields.items():
                setattr(self.info, k, v)
        if self._thread is not None and not self._stop.is_set():
            self._sync()

    def _snapshot(self) -> bool:
        """Refresh ``info`` from the source; False once the source is gone."""
        source = self._source()
        if source is None:
            return False
        read = _cluster_fields if self._is_cluster else _server_fields
        for _ in range(3):  # a cluster's dicts may change while a refresh runs on another thread
            try:
                fields = read(source)
                break
            except RuntimeError:
                time.sleep(0.01)
        else:
            return True
        with self._lock:
            for k, v in fields.items():
                setattr(self.info, k, v)
        return True

    def _sync(self) -> None:
        if not self._snapshot():
            return
        with self._lock:
            data = self.info.to_json()
            unchanged = self._written is not None and {**data, "updated": 0} == {**self._written, "updated": 0}
            if unchanged and self.path.exists():
                return
            data["updated"] = time.time()
            _write_private(self.path, data)
            self._written = data

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sync()
            except OSError as exc:
                log.debug("registration %s: %s", self.path, exc)
            except Exception:
                log.exception("updating %s failed", self.path)
        self._remove()

    def _remove(self) -> None:
        _live.pop(self.info.id, None)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("removing %s: %s", self.path, exc)

    def close(self) -> None:
        """Stop announcing and remove the file."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._remove()


def _cluster_fields(cluster: Any) -> dict[str, Any]:
    contacts = list(dict(cluster._contacts).values())
    return {
        "agents": list(dict.fromkeys([*contacts, *dict(cluster._addresses)])),
        "instances": [instance_summary(i) for i in list(cluster.instances)],
    }


def _server_fields(server: Any) -> dict[str, Any]:
    """An API server without agents: this machine as a one-node topology, its models as ready instances."""
    total, available = memory_now()
    host = socket.gethostname()
    node = {
        "id": "local",
        "name": host,
        "addresses": [server.host],
        "port": server.port,
        "state": "alive",
        "profile": {**_machine_facts(), "memory_total_bytes": total, "memory_available_bytes": available},
    }
    instances = []
    for name in server.registry.names():
        backend = server.registry.get(name)
        instances.append(
            {
                "id": f"api-{name}",
                "name": name,
                "model": str(getattr(backend, "path", name)),
                "state": "ready",
                "error": None,
                "strategy": "single",
                "description": f"one process on {host}, served at {server.url}/v1",
                "nodes": ["local"],
                "node_names": [host],
            }
        )
    return {"local_topology": {"nodes": [node], "links": []}, "instances": instances}


@functools.cache
def _machine_facts() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "system": platform.system(),
        "machine": platform.machine(),
        "blas": _blas.name(),
    }


def register(cluster: Any, **kwargs: Any) -> Registration:
    """Announce ``cluster``'s coordinator (this process) until it closes."""
    return Registration(cluster, **kwargs).start()


def register_server(server: Any, **kwargs: Any) -> Registration:
    """Announce an API server without node agents (``exo-lab up`` / ``exo-lab serve``)."""
    return Registration(server=server, **kwargs).start()


def read(path: Path) -> CoordinatorInfo | None:
    """The coordinator in ``path``, or None if the file is not ours, unreadable or of another format."""
    try:
        st = path.stat()
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            log.warning("ignoring %s: it belongs to another user", path)
            return None
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            return None
        return CoordinatorInfo.from_json(data)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.debug("skipping %s: %s", path, exc)
        return None


def coordinators(directory: Path | None = None, prune: bool = True) -> list[CoordinatorInfo]:
    """Registered coordinators whose process still runs, newest first (dead ones' files are removed)."""
    directory = directory or registry_dir()
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        info = read(path)
        if info is None:
            continue
        if not info.alive():
            if prune:
                log.info("removing the registration of coordinator %s (process %d is gone)", info.id, info.pid)
                path.unlink(missing_ok=True)
            continue
        found.append(info)
    return sorted(found, key=lambda c: c.created, reverse=True)


@atexit.register
def _remove_all() -> None:
    for reg in list(_live.values()):
        reg._stop.set()
        reg._remove()
