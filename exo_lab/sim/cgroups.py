"""CPU and memory limits for a simulated host, with cgroup v1 ``cpuset`` and ``memory``.

A host's cgroups are made *under this process's own cgroup* for each
controller (``/sys/fs/cgroup/<controller>/<ours>/exolab-<sim>-<host>``), so
they stay inside whatever limits we run under. Processes join them through
:func:`wrap`, a tiny shell prefix that writes its own pid into each
``cgroup.procs`` and then execs the real command. When a controller is
missing or not writable (no root, cgroup v2 only, a container), the limit is
skipped with a log message: the sim still runs, unlimited.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'
# `ip netns exec` mounts a fresh /sys, which hides /sys/fs/cgroup; mount the v1 hierarchies
# we use again (in its private mount namespace) so a node can read its own limits
_REMOUNT = (
    "mount -t tmpfs -o mode=755 exolab-cgroup /sys/fs/cgroup 2>/dev/null && "
    "for c in $EXOLAB_CGROUP_CONTROLLERS; do mkdir -p /sys/fs/cgroup/$c && "
    'mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c 2>/dev/null; done; exec "$@"'
)
CONTROLLERS = ("cpuset", "memory")


class CgroupError(RuntimeError):
    """A limit asked for in the spec cannot be met on this machine."""


def controller_root(controller: str) -> Path | None:
    """The v1 hierarchy of ``controller`` when mounted, else None."""
    root = ROOT / controller
    return root if (root / "tasks").exists() and (root / "cgroup.procs").exists() else None


def own_cgroup(controller: str) -> Path | None:
    """This process's cgroup directory for v1 ``controller``, or None."""
    root = controller_root(controller)
    if root is None:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, rel = line.split(":", 2)
        if controller in names.split(","):
            path = root / rel.lstrip("/")
            return path if path.is_dir() else root
    return None


def unusable(controller: str) -> str | None:
    """None when we can make child cgroups of ``controller``, else why not."""
    parent = own_cgroup(controller)
    if parent is None:
        return f"the cgroup v1 '{controller}' controller is not mounted at {ROOT / controller}"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable (run as root to limit simulated hosts)"
    return None


def _cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def planned_path(controller: str, name: str) -> Path | None:
    """Where the ``name`` cgroup of ``controller`` would go, or None (logged) when it cannot."""
    why = unusable(controller)
    if why:
        log.warning("not limiting %s: %s", name, why)
        return None
    parent = own_cgroup(controller)
    assert parent is not None
    return parent / name


def check_cores(cores: Sequence[int], host: str) -> None:
    """Raise CgroupError when ``cores`` are not all available to us."""
    parent = own_cgroup("cpuset")
    if parent is None:
        return
    try:
        available = _cpus((parent / "cpuset.effective_cpus").read_text())
    except OSError:
        available = _cpus((parent / "cpuset.cpus").read_text())
    missing = sorted(set(cores) - available)
    if missing:
        raise CgroupError(
            f"host {host!r} asks for cores {list(cores)} but CPU(s) {missing} are not available here "
            f"(this machine offers {sorted(available)}); change 'cores' in the spec"
        )


def make_cpuset(path: Path, cores: Sequence[int]) -> None:
    """Create ``path`` limited to ``cores`` (memory nodes as its parent's); FileExistsError if it exists."""
    path.mkdir()
    mems = (path.parent / "cpuset.mems").read_text().strip()
    (path / "cpuset.mems").write_text(mems)
    (path / "cpuset.cpus").write_text(",".join(map(str, cores)))


def make_memory(path: Path, limit: int) -> None:
    """Create ``path`` with ``limit`` bytes of memory (and memory+swap when counted); FileExistsError if it exists."""
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(limit))
    memsw = path / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        try:
            memsw.write_text(str(limit))
        except OSError as exc:
            log.info("memory+swap limit not set on %s: %s", path, exc)


def procs(path: str | Path) -> list[int]:
    """Pids in cgroup ``path`` (empty when it is gone)."""
    try:
        return [int(p) for p in (Path(path) / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def remove(path: str | Path, timeout: float = 3.0) -> bool:
    """rmdir ``path`` once its processes have left; True when it is gone."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while path.exists():
        try:
            path.rmdir()
        except FileNotFoundError:
            break
        except OSError as exc:  # EBUSY while exiting processes are still counted
            if time.monotonic() >= deadline:
                log.warning("could not remove cgroup %s: %s (pids %s)", path, exc, procs(path))
                return False
            time.sleep(0.02)
    return True


def wrap(argv: Sequence[str], paths: Sequence[str | Path]) -> list[str]:
    """``argv`` prefixed so that the process first joins the cgroups at ``paths``.

    Join *before* ``ip netns exec`` (which hides /sys/fs/cgroup); membership survives exec.
    """
    if not paths:
        return list(argv)
    return ["sh", "-c", _JOIN, "exolab-cgroup", *(str(Path(p) / "cgroup.procs") for p in paths), "--", *argv]


def remount(argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed to mount the cpuset and memory hierarchies again inside ``ip netns exec``."""
    mounted = [c for c in CONTROLLERS if controller_root(c) is not None]
    if not mounted:
        return list(argv)
    return ["env", f"EXOLAB_CGROUP_CONTROLLERS={' '.join(mounted)}", "sh", "-c", _REMOUNT, "exolab-cgroup", *argv]
