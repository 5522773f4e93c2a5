"""HTTP servers that a slow, idle or greedy client cannot exhaust: :class:`GuardedHTTPServer`.

Every listening port of exo_lab (the node agent, the workers' control ports, the API) uses it:

- a client has ``header_timeout_s`` to send its request headers (and to send the next request on a
  kept-alive connection) and ``body_timeout_s`` for the body; then the connection is closed;
- bodies larger than ``max_body_bytes`` are refused before they are read (HTTP 400);
- one address holds at most ``per_address`` connections; more are closed at once;
- when the process runs out of file descriptors (EMFILE), the server stops accepting for a moment
  instead of spinning on the listening socket, logs it once per episode, and resumes by itself.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

log = logging.getLogger(__name__)

#: accept() errors that mean "no resources now": back off instead of retrying at once
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_S = 0.5
KIB = 1024
MIB = 1024 * KIB


def raise_fd_limit() -> None:
    """Let this process open as many files as it may (the soft limit up to the hard one; macOS starts at 256)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the limit there is
        pass


class GuardedHTTPServer(HTTPServer):
    """A tornado ``HTTPServer`` with header and body timeouts, a body limit, a per-address connection cap and
    EMFILE back-off (see the module docstring)."""

    def initialize(  # type: ignore[override]  (tornado's Configurable calls initialize, not __init__)
        self,
        request_callback: Any,
        *,
        max_body_bytes: int = 16 * MIB,
        per_address: int = 256,
        header_timeout_s: float = 20.0,
        body_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().initialize(
            request_callback,
            idle_connection_timeout=header_timeout_s,
            body_timeout=body_timeout_s,
            max_body_size=max_body_bytes,
            max_buffer_size=max(max_body_bytes, MIB),
            **kwargs,
        )
        raise_fd_limit()
        self.per_address = per_address
        self.refused = 0  # connections closed for going over the cap
        self._starved_since: float | None = None

    # the cap
    def connections_from(self, ip: str) -> int:
        return sum(1 for c in self._connections if getattr(c.context, "remote_ip", None) == ip)

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        ip = address[0] if address else ""
        if ip and self.connections_from(ip) >= self.per_address:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "%s holds %d connections already; closing new ones (%d so far)", ip, self.per_address, self.refused
                )
            stream.close()
            return
        super().handle_stream(stream, address)

    # EMFILE
    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)

    def _accept_on(self, sock: socket.socket) -> Callable[[], None]:
        """Like tornado's ``add_accept_handler``, but out of file descriptors it pauses instead of spinning."""
        loop = IOLoop.current()
        fd = sock.fileno()
        state = {"removed": False, "paused": False}

        def resume() -> None:
            if state["removed"]:
                return
            state["paused"] = False
            loop.add_handler(sock, on_readable, IOLoop.READ)

        def on_readable(_fd: Any, _events: int) -> None:
            for _ in range(128):
                if state["removed"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    break
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno not in RESOURCE_ERRNOS:
                        raise
                    if self._starved_since is None:
                        self._starved_since = time.monotonic()
                        log.warning("out of file descriptors (%s): not accepting for %.1f s at a time", exc, BACKOFF_S)
                    loop.remove_handler(sock)
                    state["paused"] = True
                    loop.call_later(BACKOFF_S, resume)
                    return
                if self._starved_since is not None:
                    log.warning(
                        "accepting again after %.1f s without file descriptors", time.monotonic() - self._starved_since
                    )
                    self._starved_since = None
                self._handle_connection(connection, address)

        def remove() -> None:
            if not state["paused"]:
                loop.remove_handler(sock)
            state["removed"] = True

        loop.add_handler(sock, on_readable, IOLoop.READ)
        self._handlers[fd] = remove
        return remove
