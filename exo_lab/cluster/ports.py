"""Free TCP ports that no outgoing connection can be handed.

``bind(0)`` returns a port from the kernel's ephemeral range, the range an
outgoing connection takes its own port from. A client that polls such a port
on 127.0.0.1 before its server listens can be given that very port and
connect to itself (TCP simultaneous open: a loop in a fresh namespace does it
within a few thousand tries), holding the port when the server binds it
(EADDRINUSE); any other connection on the machine can take it as well. Ports
below the ephemeral range are never handed out that way.
"""

from __future__ import annotations

import random
import socket
import sys
from collections.abc import Collection
from pathlib import Path

LOWEST = 10_000  # below: well-known and registered services people run
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 64
_rng = random.SystemRandom()  # not the shared generator: a test that seeds it must not make processes agree


def ephemeral_range() -> tuple[int, int]:
    """The first and last port the kernel gives outgoing connections."""
    try:
        first, last = (int(v) for v in PORT_RANGE.read_text().split())
        return first, last
    except (OSError, ValueError):
        return (49152, 65535) if sys.platform == "darwin" else (32768, 60999)  # the systems' defaults


def free_port(host: str = "127.0.0.1", exclude: Collection[int] = ()) -> int:
    """A TCP port free on ``host`` now, below the ephemeral range where there is room (else any free one).

    ``exclude``: ports already handed out that nothing has bound yet (a bind test cannot see them)."""
    bind_host = "0.0.0.0" if host in ("", "0.0.0.0") else host
    first, _ = ephemeral_range()
    if first > LOWEST:
        for port in _rng.sample(range(LOWEST, first), min(TRIES, first - LOWEST)):
            if port in exclude:
                continue
            with socket.socket() as s:
                try:
                    s.bind((bind_host, port))
                except OSError:
                    continue
                return port
    for _ in range(TRIES):
        with socket.socket() as s:
            s.bind((bind_host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise OSError(f"no free TCP port on {host} outside the {len(exclude)} handed out")
