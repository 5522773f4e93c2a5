"""The one HTTP client between exo_lab processes: requests signed with the cluster key.

Coordinators talk to node agents (:class:`~exo_lab.workbench.Cluster`), to shard workers
(:class:`~exo_lab.instance.Instance`), and agents and workers fetch model files from peers
(:mod:`exo_lab.cluster.fetch`), all through :class:`SignedClient`: JSON requests, NDJSON
streams, byte-range reads, a timeout on every socket operation, and one error type,
:class:`RequestError` (an ``OSError``: unreachable, timed out, or an HTTP error status).

A signed request expects a signed answer (:func:`~exo_lab.cluster.auth.response_signature`, bound to
the request's nonce): an answer whose signature is missing or wrong is a :class:`RequestError`
("response not authentic"), except an unsigned 401, which is the refusal it says it is. A client
that knows the node id it talks to (``node=``) signs the request for that node only.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

from exo_lab.cluster.auth import HEADER_NONCE, HEADER_RESPONSE_SIG, response_is_authentic, sign_headers

DEFAULT_TIMEOUT_S = 30.0


class RequestError(OSError):
    """A request failed: the peer is unreachable, timed out, answered an error status or not JSON."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status  #: the HTTP status, None when there was no answer
        self.detail = detail  #: the start of the error body


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (an optional ``http://`` and trailing slash allowed) -> (host, port)."""
    host, sep, port = address.removeprefix("http://").rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_answer(
    what: str, key: str | None, nonce: str | None, status: int, body: bytes | None, sig: str | None
) -> None:
    """Raise :class:`RequestError` unless the answer to a request signed with ``nonce`` carries ``key``'s
    signature of ``status`` and ``body`` (None: streamed); nothing to check for an unsigned request."""
    if not key or not nonce or response_is_authentic(key, nonce, status, body, sig):
        return
    if status == 401 and not sig:
        return  # a refusal (another key, a stale clock): reported as the HTTP error it is
    why = "unsigned" if not sig else "bad signature"
    raise RequestError(f"{what}: response not authentic ({why}, HTTP {status}): altered on the way, or not a member")


class LineStream:
    """An NDJSON response read line by line (the request is sent already); ``close`` aborts it.

    With ``key`` and ``nonce`` (a signed request) the answer's signature is checked: a streamed
    answer's covers its status only (the lines are not authenticated), a whole answer's its body too."""

    def __init__(
        self, conn: http.client.HTTPConnection, what: str, key: str | None = None, nonce: str | None = None
    ) -> None:
        self._conn = conn
        self._what = what
        self._key = key
        self._nonce = nonce

    def __iter__(self) -> Iterator[Any]:
        try:
            resp = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise RequestError(f"{self._what}: {exc}") from exc
        sig = resp.getheader(HEADER_RESPONSE_SIG)
        if self._key and self._nonce and not response_is_authentic(self._key, self._nonce, resp.status, None, sig):
            try:  # not signed as a stream: the answer came whole (an error, a short answer)
                whole = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise RequestError(f"{self._what}: {exc}") from exc
            check_answer(self._what, self._key, self._nonce, resp.status, whole, sig)
            if resp.status >= 400:
                detail = whole[:500].decode(errors="replace")
                raise RequestError(f"{self._what}: HTTP {resp.status} {detail}", resp.status, detail)
            for line in whole.splitlines():
                if line.strip():
                    yield json.loads(line)
            return
        if resp.status >= 400:
            detail = resp.read()[:500].decode(errors="replace")
            raise RequestError(f"{self._what}: HTTP {resp.status} {detail}", resp.status, detail)
        try:
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        except http.client.HTTPException as exc:  # e.g. the stream ended mid-chunk
            raise RequestError(f"{self._what}: {exc!r}") from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SignedClient:
    """Requests to one ``host:port``, signed with ``key`` (unsigned when it is None); answers to signed
    requests must be signed by the server. ``node``: the id of the node at ``address`` when it is known
    (the requests are signed for it only); ``source``: this node's id when the client is a node."""

    def __init__(
        self,
        address: str,
        key: str | None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        *,
        node: str | None = None,
        source: str | None = None,
    ) -> None:
        self.address = address.removeprefix("http://").rstrip("/")
        self.host, self.port = split_address(self.address)
        self.key = key
        self.timeout = timeout
        self.node = node
        self.source = source

    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None, timeout: float | None
    ) -> tuple[http.client.HTTPConnection, str | None]:
        """The connection with the request sent, and the request's nonce (None: unsigned)."""
        data = body or b""
        all_headers = dict(headers or {})
        nonce = None
        if self.key:
            signed = sign_headers(self.key, method, path, data, self.node, self.source)
            all_headers.update(signed)
            nonce = signed[HEADER_NONCE]
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data if method != "GET" else None, headers=all_headers)
        except OSError as exc:
            conn.close()
            raise RequestError(f"{method} {self.address}{path}: {exc}") from exc
        return conn, nonce

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        ok: tuple[int, ...] = (200, 206),
    ) -> bytes:
        """The raw body of a response with a status in ``ok`` (else :class:`RequestError`);
        ``timeout``: seconds per socket operation (default: the client's)."""
        what = f"{method} {self.address}{path}"
        conn, nonce = self._send(method, path, body, headers, self.timeout if timeout is None else timeout)
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RequestError(f"{what}: {exc}") from exc
        finally:
            conn.close()
        check_answer(what, self.key, nonce, resp.status, data, resp.getheader(HEADER_RESPONSE_SIG))
        if resp.status not in ok:
            detail = data[:500].decode(errors="replace")
            raise RequestError(f"{what}: HTTP {resp.status} {detail}", resp.status, detail)
        return data

    def json(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """Send ``body`` as JSON (none when None) and return the decoded JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        raw = self.request(method, path, data, headers={"Content-Type": "application/json"}, timeout=timeout)
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise RequestError(f"{method} {self.address}{path}: the answer is not JSON ({exc})") from exc

    def read_range(self, path: str, start: int, end: int, *, timeout: float | None = None) -> bytes:
        """Bytes ``[start, end)`` of the file at ``path`` (an HTTP range request)."""
        data = self.request("GET", path, headers={"Range": f"bytes={start}-{end - 1}"}, timeout=timeout)
        if len(data) != end - start:
            raise RequestError(f"GET {self.address}{path}: asked for {end - start} bytes at {start}, got {len(data)}")
        return data

    def stream_lines(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> LineStream:
        """Send a JSON request whose answer is NDJSON; iterate the returned stream for the decoded lines.

        The request is sent before this returns (a :class:`RequestError` if it cannot be); ``timeout``
        (default: none) bounds each read, so a long generation is not cut short.
        """
        data = json.dumps(body).encode() if body is not None else None
        conn, nonce = self._send(method, path, data, {"Content-Type": "application/json"}, timeout)
        return LineStream(conn, f"{method} {self.address}{path}", self.key, nonce)
