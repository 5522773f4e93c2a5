"""Waiting for a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(cond: Callable[[], object], deadline_s: float = 5.0) -> bool:
    """Whether ``cond()`` became true within ``deadline_s`` (checked every 10 ms, and once more at the end)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def wait_for[T](cond: Callable[[], T], deadline_s: float, what: str, every_s: float = 0.05) -> T:
    """The first true value of ``cond()``; AssertionError naming ``what`` after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"not within {deadline_s} s: {what}")
