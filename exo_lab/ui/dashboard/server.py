"""Serving the dashboard: on its own thread and event loop (like the API server), loopback unless told otherwise.

Off loopback it needs a token for the page, its websocket and so every action (:mod:`.auth`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
from typing import Any

from exo_lab import defaults
from exo_lab.api.guard import is_loopback
from exo_lab.cluster.ports import free_port
from exo_lab.ui.dashboard.app import create_app
from exo_lab.ui.dashboard.auth import LOGIN_URL, TokenAuth
from exo_lab.ui.dashboard.source import DashboardSource

log = logging.getLogger(__name__)

DEFAULT_PORT = defaults.DASHBOARD_PORT


def _origins(host: str, port: int) -> list[str]:
    hosts = {host, "localhost", "127.0.0.1"}
    if host in ("0.0.0.0", "::"):
        hosts.add(socket.gethostname())
        hosts.add(socket.getfqdn())
    return sorted(f"{h}:{port}" for h in hosts if h not in ("0.0.0.0", "::"))


class DashboardServer:
    """The dashboard served on ``host:port`` from a thread with its own event loop (like the API server).

    On loopback anyone on this machine may use it. Elsewhere it needs ``token`` (``exo-lab up`` passes its
    API key; default: one generated, :attr:`token_generated`) for the page, its websocket and so every
    action: open :attr:`login_url` once (see :mod:`exo_lab.ui.dashboard.auth`).
    """

    def __init__(
        self, source: DashboardSource, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None
    ) -> None:
        self.source = source
        self.host = host
        self.port = port
        #: what the browser must show once off loopback (None: on loopback, nothing is needed)
        self.token: str | None = None if is_loopback(host) else (token or secrets.token_urlsafe(24))
        self.token_generated = self.token is not None and not token
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def login_url(self) -> str:
        """The URL that signs a browser in (with the token) and opens the page; the page's URL on loopback."""
        return f"{self.url}{LOGIN_URL}?token={self.token}" if self.token else self.url

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> DashboardServer:
        """Bind and serve; returns once the port listens (OSError when it cannot)."""
        from panel.io.server import get_server
        from tornado.ioloop import IOLoop

        if self.port == 0:
            self.port = free_port(self.host)
        ready = threading.Event()
        failure: list[BaseException] = []
        self.source.start()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                extra: dict[str, Any] = {"auth_provider": TokenAuth(self.token, self.port)} if self.token else {}
                self._server = get_server(
                    {"/": lambda: create_app(self.source)},
                    port=self.port,
                    address=self.host,
                    websocket_origin=_origins(self.host, self.port),
                    loop=IOLoop.current(),
                    show=False,
                    start=False,
                    title="exo_lab dashboard",
                    **extra,  # off loopback: the token (Bokeh's auth hook, passed on to its Server)
                )
                self._server.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"exo-lab-dashboard-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            exc = failure[0]
            if isinstance(exc, OSError):
                raise OSError(
                    exc.errno,
                    f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror}; "
                    "pass another --dashboard-port",
                ) from exc
            raise exc
        log.info("exo_lab dashboard on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and the source's refresh."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is not None and thread is not None and self.running:

            def shutdown() -> None:
                try:
                    server.stop()
                finally:
                    loop.stop()

            loop.call_soon_threadsafe(shutdown)
            thread.join(timeout)
        self.source.close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<exo_lab DashboardServer {self.url} {'running' if self.running else 'stopped'}>"


def serve_dashboard(
    source: DashboardSource | None = None,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    token: str | None = None,
    **source_kwargs: Any,
) -> DashboardServer:
    """Serve the dashboard and return the running server (``source_kwargs`` build a source when none is given).

    Off loopback the page needs ``token`` (default: a generated one, ``server.token``); see :class:`DashboardServer`.
    """
    return DashboardServer(source or DashboardSource(**source_kwargs), host, port, token).start()
