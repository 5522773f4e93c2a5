"""Link probes: round-trip time and throughput between two node agents.

Each agent runs a small TCP probe service beside its HTTP API. A probing
agent opens one connection per peer address, authenticates with a signed
hello line, then:

- ``E`` + 63 bytes: echoed back (RTT samples; median and p95 are reported);
- ``U`` + 8-byte length + payload: acknowledged with ``A`` once all arrived
  (send throughput, prober -> peer);
- ``D`` + 8-byte length: the peer answers ``A`` and sends that many bytes (receive throughput).

A peer that serves requests answers the hello, and any exchange after it, with ``B`` (busy) and
closes: the prober defers the probe (:class:`ProbeDeferred`) and keeps the link's last measurement.

Each throughput is the best of ``transfers`` runs: on a busy machine a transfer is only ever slowed down
(a node's own work, another probe), so the fastest one is the nearest to what the link carries.

The client side is blocking (run it on a thread): Python's event-loop jitter
would otherwise show up as latency.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable

from exo_lab.cluster.auth import Verifier, sign_headers
from exo_lab.cluster.topology import LinkProfile

log = logging.getLogger(__name__)

FRAME = 64
CHUNK = 1 << 16
_ZEROS = bytes(CHUNK)


BUSY = b"B"


class ProbeServer:
    """The peer side of link probes (asyncio); while ``busy()`` it defers them."""

    def __init__(self, verifier: Verifier, busy: Callable[[], bool] = lambda: False) -> None:
        self.verifier = verifier
        self.busy = busy
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hello = json.loads(await asyncio.wait_for(reader.readline(), 5))
            problem = self.verifier.problem("PROBE", "/probe", b"", hello)
            if problem:
                writer.write(f"NO {problem}\n".encode())
                await writer.drain()
                return
            if self.busy():
                writer.write(b"BUSY serving requests\n")
                await writer.drain()
                return
            writer.write(b"OK\n")
            await writer.drain()
            while True:
                cmd = await reader.readexactly(1)
                # each exchange's header is read whole before a busy answer: closing on unread bytes resets
                # the connection, and the prober would see an error instead of the answer
                if cmd not in (b"E", b"U", b"D"):
                    return
                header = await reader.readexactly(FRAME - 1 if cmd == b"E" else 8)
                busy = self.busy()
                writer.write(BUSY if busy else cmd + header if cmd == b"E" else b"A")  # echo, or go ahead
                await writer.drain()
                if busy:
                    return
                n = 0 if cmd == b"E" else struct.unpack("<Q", header)[0]
                if cmd == b"U":
                    while n:
                        got = await reader.read(min(n, 1 << 20))
                        if not got:
                            return
                        n -= len(got)
                    writer.write(b"A")
                    await writer.drain()
                elif cmd == b"D":
                    while n:
                        k = min(n, CHUNK)
                        writer.write(_ZEROS[:k])
                        n -= k
                        await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError, OSError):
            return
        finally:
            writer.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(min(n - len(buf), 1 << 20))
        if not got:
            raise ConnectionError("peer closed the probe connection")
        buf += got
    return bytes(buf)


class ProbeCancelled(Exception):
    """The agent is shutting down."""


class ProbeDeferred(Exception):
    """The probe gave way to requests being served, at either end: the link keeps its last measurement."""


def _go_on(cancel: threading.Event, defer: Callable[[], bool] | None) -> None:
    """Raise when the probe should stop: its agent stops, or (``defer``) this node serves requests."""
    if cancel.is_set():
        raise ProbeCancelled("agent stopping")
    if defer is not None and defer():
        raise ProbeDeferred("this node serves requests")


def _answer(sock: socket.socket, expected: bytes) -> None:
    """Read the peer's one-byte answer: ``expected``, or busy (:class:`ProbeDeferred`)."""
    got = _recv_exact(sock, 1)
    if got == BUSY:
        raise ProbeDeferred("the peer serves requests")
    if got != expected:
        raise ConnectionError(f"bad probe answer {got!r}")


def probe_link(
    key: str,
    src: str,
    dst: str,
    address: str,
    port: int,
    samples: int = 50,
    transfer_bytes: int = 4 << 20,
    timeout_s: float = 10.0,
    cancel: threading.Event | None = None,
    transfers: int = 3,
    defer: Callable[[], bool] | None = None,
) -> LinkProfile:
    """Measure RTT and throughput to ``address:port`` (each direction the best of ``transfers`` runs of
    ``transfer_bytes``); errors come back in the profile.

    ``cancel`` (set by a stopping agent) ends the probe within one chunk. :class:`ProbeDeferred` when the
    peer answers busy, or ``defer()`` turns true (checked as often as ``cancel``).
    """
    cancel = cancel or threading.Event()
    link = LinkProfile(src=src, dst=dst, src_address=None, dst_address=address, measured_at=time.time())
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link.src_address = sock.getsockname()[0]
            sock.sendall(json.dumps(sign_headers(key, "PROBE", "/probe", target=dst, source=src)).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                got = sock.recv(256)
                if not got:
                    break
                reply += got
            if reply.startswith(b"BUSY"):
                raise ProbeDeferred("the peer serves requests")
            if not reply.startswith(b"OK"):
                raise PermissionError(reply.decode(errors="replace").strip() or "probe refused")
            frame = b"E" + bytes(FRAME - 1)
            rtts = []
            for i in range(samples + 2):
                _go_on(cancel, defer)
                t = time.perf_counter()
                sock.sendall(frame)
                _answer(sock, b"E")
                _recv_exact(sock, FRAME - 1)
                if i >= 2:  # the first round trips warm up the path
                    rtts.append((time.perf_counter() - t) * 1000)
            rtts.sort()
            link.rtt_ms_median = statistics.median(rtts)
            link.rtt_ms_p95 = rtts[min(len(rtts) - 1, int(0.95 * len(rtts)))]
            if transfer_bytes > 0:
                runs = range(max(1, transfers))
                link.send_mbit_per_s = max(_send_rate(sock, transfer_bytes, cancel, defer) for _ in runs)
                link.recv_mbit_per_s = max(_recv_rate(sock, transfer_bytes, cancel, defer) for _ in runs)
    except (OSError, ConnectionError, PermissionError, ValueError, ProbeCancelled) as exc:
        link.error = f"{type(exc).__name__}: {exc}"
    return link


def _send_rate(sock: socket.socket, n: int, cancel: threading.Event, defer: Callable[[], bool] | None) -> float:
    _go_on(cancel, defer)
    sock.sendall(b"U" + struct.pack("<Q", n))
    _answer(sock, b"A")  # go ahead
    t = time.perf_counter()
    left = n
    while left:
        if cancel.is_set():  # a payload cut short ends the connection: only a stopping agent cuts it
            raise ProbeCancelled("agent stopping")
        k = min(left, CHUNK)
        sock.sendall(_ZEROS[:k])
        left -= k
    _answer(sock, b"A")
    return n * 8 / (time.perf_counter() - t) / 1e6


def _recv_rate(sock: socket.socket, n: int, cancel: threading.Event, defer: Callable[[], bool] | None) -> float:
    _go_on(cancel, defer)
    t = time.perf_counter()
    sock.sendall(b"D" + struct.pack("<Q", n))
    _answer(sock, b"A")
    left = n
    while left:
        if cancel.is_set():
            raise ProbeCancelled("agent stopping")
        got = sock.recv(min(left, 1 << 20))
        if not got:
            raise ConnectionError("peer closed during download")
        left -= len(got)
    return n * 8 / (time.perf_counter() - t) / 1e6
