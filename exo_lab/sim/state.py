"""The record of a running sim: everything it created, so anyone can take it down.

One JSON file per sim in the run directory (``$EXO_LAB_SIM_RUN_DIR``, else
``/run/exo_lab/sim`` as root, else ``$XDG_RUNTIME_DIR/exo_lab/sim``). A
resource is written down *before* it is created, so a crash at any moment
leaves a record that covers it; teardown treats "already gone" as success.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from exo_lab import defaults
from exo_lab.sim.procs import ProcRecord

log = logging.getLogger(__name__)


def run_dir() -> Path:
    """Directory of sim state files (created on demand, mode 0700)."""
    override = defaults.sim_run_dir()
    if override:
        path = Path(override)
    elif os.geteuid() == 0:
        path = Path("/run/exo_lab/sim")
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or f"{tempfile.gettempdir()}/exo_lab-{os.getuid()}"
        path = Path(base) / "exo_lab" / "sim"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def lock() -> FileLock:
    """Held while a sim picks its index and name, so concurrent ``up`` calls do not collide."""
    return FileLock(str(run_dir() / ".lock"), timeout=60)


@dataclass
class SimState:
    """What one sim created. Saved atomically after every change."""

    name: str
    index: int
    spec: dict[str, Any]
    base_dir: str
    cluster_key: str
    status: str = "building"  # building | up | stopping
    owner_pid: int | None = None
    created: float = field(default_factory=time.time)
    netns: list[str] = field(default_factory=list)
    root_links: list[str] = field(default_factory=list)  # devices in the root namespace (its link into the sim)
    root_address: str | None = None  # the root namespace's address in the sim
    cgroups: list[str] = field(default_factory=list)
    processes: list[ProcRecord] = field(default_factory=list)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return path_for(self.name)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["processes"] = [p.to_json() for p in self.processes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimState:
        data = dict(data)
        data["processes"] = [ProcRecord.from_json(p) for p in data.get("processes", [])]
        return cls(**data)

    def save(self) -> None:
        path = self.path
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the cluster key
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(tmp, path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def path_for(name: str) -> Path:
    return run_dir() / f"{name}.json"


def load(name: str) -> SimState:
    """The state of sim ``name``; FileNotFoundError says how to list the running ones."""
    path = path_for(name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no sim named {name!r} is recorded in {run_dir()}; `exo-lab sim status` lists them"
        ) from None
    return SimState.from_json(data)


def all_states() -> list[SimState]:
    """Every recorded sim (unreadable files are logged and skipped)."""
    out = []
    for path in sorted(run_dir().glob("*.json")):
        try:
            out.append(SimState.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable sim state %s: %s", path, exc)
    return out


def free_index(taken: set[int], limit: int = 255) -> int:
    """The lowest sim index not in ``taken``."""
    for i in range(limit + 1):
        if i not in taken:
            return i
    raise RuntimeError(f"all {limit + 1} sim indexes are taken; take some sims down (`exo-lab sim down --all`)")
