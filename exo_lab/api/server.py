"""Run the API on a background thread with its own event loop.

The server never shares the caller's loop: in a notebook kernel it keeps
answering while a cell runs, even a cell that blocks (a synchronous client
call to this very server, a long computation).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from tornado.httpserver import HTTPServer

from exo_lab import defaults
from exo_lab.api.app import make_app
from exo_lab.api.guard import is_loopback
from exo_lab.api.registry import Backend, ModelRegistry
from exo_lab.cluster.serving import MIB, GuardedHTTPServer

log = logging.getLogger(__name__)

DEFAULT_PORT = defaults.API_PORT
_parked = threading.Event()


def _park() -> None:
    """Keep a finished server thread alive: a thread that ran MLX work (a handler that
    profiled or planned) and then exits can make the process abort at exit."""
    _parked.wait()


class Server:
    """An API server on ``host:port`` serving the models of a registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        cluster: Any = None,
        api_key: str | None = None,
        control: Any = None,
    ) -> None:
        """``control`` (an ``exo_lab.control.Control``) makes this the API of a cluster member: instances
        over HTTP, requests for models served elsewhere in the cluster forwarded there.

        Off loopback the API always needs a key: ``api_key``, else ``$EXO_LAB_API_KEY``, else one made
        up here and printed (``server.api_key``).
        """
        self.registry = registry
        self.control = control
        self.api_key = require_key(api_key or None, host)
        self.cluster = cluster
        self.host = host
        self.port = port
        self._owned: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped.is_set()

    def start(self) -> Server:
        """Bind and start serving; returns once the port is listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                source = (lambda: self.cluster.topology) if self.cluster is not None else None
                key = getattr(self.cluster, "cluster_key", None) if self.control is not None else None
                guard = self.api_key is None and is_loopback(self.host)  # a keyless server for this machine only
                owner = getattr(self.cluster, "owner", None) if self.control is not None else None
                who: dict[str, Any] = owner() if callable(owner) else {}  # type: ignore[assignment]
                node_id = who.get("coordinator")  # what members sign requests to this API for
                app = make_app(
                    self.registry, source, self.api_key, self.control, key, browser_guard=guard, node_id=node_id
                )
                # requests of up to 16 MiB; a client has 20 s for its headers and 30 s for its body
                http = GuardedHTTPServer(app, max_body_bytes=16 * MIB, per_address=512)
                self._http = http
                http.listen(self.port, self.host)
                sock = next(iter(http._sockets.values()))
                self.port = sock.getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                self._stopped.set()
            _park()

        self._thread = threading.Thread(target=run, name=f"exo-lab-api-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            exc = failure[0]
            if isinstance(exc, OSError):
                raise OSError(
                    exc.errno, f"cannot listen on {self.host}:{self.port}: {exc.strerror}; pass another port"
                ) from exc
            raise exc
        log.info("exo_lab API listening on %s", self.url)
        return self

    def own(self, thing: Any) -> None:
        """Close ``thing`` (an Engine) when the server stops."""
        self._owned.append(thing)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, end the loop, close owned engines."""
        loop, http = self._loop, self._http
        if loop is not None and self.running:

            async def shutdown() -> None:
                if http is not None:
                    http.stop()
                    await asyncio.wait_for(http.close_all_connections(), timeout)

            fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
            try:
                fut.result(timeout + 1)
            except Exception:
                log.debug("closing connections timed out", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
            self._stopped.wait(timeout)
        for thing in self._owned:
            thing.close()
        self._owned.clear()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self.running:
                self._stopped.wait(0.5)
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<exo_lab Server {self.url} {state} models={self.registry.names()}>"

    def _repr_html_(self) -> str:
        state = "running" if self.running else "stopped"
        models = ", ".join(self.registry.names())
        return (
            f"<b>exo_lab API</b> {state} at <a href='{self.url}/v1/models' target='_blank'>{self.url}</a>"
            f" &mdash; models: <code>{models}</code>; OpenAI base URL <code>{self.openai_base_url}</code>"
        )


def require_key(api_key: str | None, host: str) -> str | None:
    """The API key a server on ``host`` uses: ``api_key``; off loopback, ``$EXO_LAB_API_KEY`` or a new one
    (printed) when none is given, since anyone who can reach the address could otherwise use it."""
    if api_key is not None or is_loopback(host):
        return api_key
    api_key = defaults.api_key()
    if api_key is None:
        api_key = secrets.token_hex(24)  # hex: safe to paste after --api-key (never starts with "-")
        print(
            f"exo_lab: {host} is reachable from other machines, so the API needs a key; clients must send "
            f"'Authorization: Bearer {api_key}' (or 'x-api-key'). Pass --api-key / api_key= to choose it.",
            flush=True,
        )
    return api_key


def default_name(model: str | Path) -> str:
    """The id clients use for a model: a directory's name, else what was given."""
    path = Path(str(model)).expanduser()
    return path.name if path.is_dir() else str(model)


def serve(
    model: str | Path | Backend,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    name: str | None = None,
    cluster: Any = None,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 256,
    prefix_cache_bytes: int | None = None,
) -> Server:
    """Serve ``model`` (a name, a path, or an Engine) and return the running Server.

    Returns at once; the server runs on its own thread until ``server.stop()``.
    With a ``cluster``, ``GET /instance/previews`` plans on its topology. ``max_batch`` and
    ``max_queue`` size the Engine made for a model given by name (requests decoding together,
    and waiting; beyond both the API answers 429); ``prefix_cache_bytes`` bounds its cache of finished
    requests' KV caches, reused for prompts that start alike (default 1 GiB; 0: none).
    With ``api_key`` (default: ``$EXO_LAB_API_KEY``), every endpoint but
    ``/health`` and ``GET /`` needs ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.
    """
    if api_key is None:
        api_key = defaults.api_key()
    api_key = require_key(api_key, host)
    from exo_lab.engine.generator import Engine

    registry = ModelRegistry()
    owned = None
    if isinstance(model, (str, Path)):
        model_name = name or default_name(model)
        extra = {} if prefix_cache_bytes is None else {"prefix_cache_bytes": prefix_cache_bytes}
        owned = backend = Engine(model, name=model_name, max_batch=max_batch, max_queue=max_queue, **extra)
    else:
        backend = model
        model_name = name or backend.name
    registry.add(backend, model_name)
    server = Server(registry, host, port, cluster, api_key)
    try:
        server.start()
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    if owned is not None:
        server.own(owned)
    return server
