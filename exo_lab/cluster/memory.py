"""Keep a long-running process's memory from creeping: give freed heap pages back to the system.

A node agent runs for days, answering small requests (lease renewals, status reads, signed handshakes)
whose buffers come and go. Its Python objects stay bounded (every table it keeps has a cap or a window),
but glibc's allocator hands freed memory back to the system only from the top of each heap: a few live
objects above freed space keep the pages resident, and the RSS creeps up by a few MiB an hour, one
sawtooth at a time. :func:`release_free_memory` (``malloc_trim(0)``, which returns every free page in
the middle of the heaps too) undoes that; the agent calls it every minute. Elsewhere (macOS, musl) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

_trim: Callable[[int], int] | None = None
_looked = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked
    if not _looked:
        _looked = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _trim = libc.malloc_trim  # glibc only
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError) as exc:
                log.debug("malloc_trim unavailable: %s", exc)
    return _trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system; whether there is a way to (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
