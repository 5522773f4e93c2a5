"""Processes a sim started, remembered so that another process can stop them.

A record is ``(pid, start time)``: the kernel's start time (``/proc/PID/stat``
field 22) tells our process apart from an unrelated one that reused its pid
after a crash, so teardown never signals a stranger.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcRecord:
    """A process we started; ``group`` means it leads its own process group (signal the group)."""

    pid: int
    start: int
    role: str
    group: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcRecord:
        return cls(**data)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def running(pid: int, start: int | None = None) -> bool:
    """True while ``pid`` exists, is not a zombie, and (when given) started at ``start``."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def record(pid: int, role: str, group: bool = False) -> ProcRecord:
    start = start_time(pid)
    if start is None:
        raise ProcessLookupError(f"{role} (pid {pid}) exited right after it started; see its log")
    return ProcRecord(pid, start, role, group)


def _signal(rec: ProcRecord, sig: int) -> None:
    try:
        if rec.group:
            os.killpg(rec.pid, sig)
        else:
            os.kill(rec.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("cannot signal %s (pid %d): %s", rec.role, rec.pid, exc)


def stop(records: Iterable[ProcRecord], timeout: float = 5.0) -> list[ProcRecord]:
    """SIGTERM our processes (and their groups), SIGKILL what is left after ``timeout``.

    Returns the records that were still running when we started.
    """
    live = [r for r in records if running(r.pid, r.start)]
    for rec in live:
        _signal(rec, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    waiting = list(live)
    while waiting and time.monotonic() < deadline:
        waiting = [r for r in waiting if running(r.pid, r.start)]
        if waiting:
            time.sleep(0.02)
    for rec in waiting:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", rec.role, rec.pid, timeout)
        _signal(rec, signal.SIGKILL)
    for rec in live:
        if rec.group:  # stragglers in the group (workers the node started) go too
            _signal(rec, signal.SIGKILL)
    return live


def kill_pids(pids: Iterable[int], timeout: float = 3.0) -> None:
    """SIGTERM then SIGKILL bare pids found in our namespaces or cgroups."""
    targets = [(p, start_time(p)) for p in pids if p != os.getpid()]
    targets = [(p, s) for p, s in targets if s is not None]
    for pid, _ in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while targets and time.monotonic() < deadline:
        targets = [(p, s) for p, s in targets if running(p, s)]
        if targets:
            time.sleep(0.02)
    for pid, start in targets:
        if running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_gone(pids: Iterable[tuple[int, int | None]], timeout: float = 3.0) -> bool:
    """Poll until none of ``(pid, start)`` runs; True when all are gone."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [(p, s) for p, s in pending if running(p, s)]
        if not pending:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
