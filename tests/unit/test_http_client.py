"""The one signed HTTP client: JSON, NDJSON streams, range reads, timeouts and clear errors,
against a real HTTP server that checks signatures with the cluster's Verifier and signs its answers
(and, on some paths, answers the way a relay in the middle would: altered, unsigned, or signed with
another key)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exo_lab.cluster.auth import HEADER_NONCE, HEADER_RESPONSE_SIG, Verifier, response_signature
from exo_lab.cluster.client import ClusterClient, ClusterError
from exo_lab.cluster.http import RequestError, SignedClient, split_address

KEY = "k" * 64
FILE = bytes(range(256)) * 4


class Handler(BaseHTTPRequestHandler):
    verifier = Verifier(KEY)

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    nonce: str | None = None

    def _send(
        self, status: int, data: bytes, ctype: str = "application/json", signed: bytes | None = None, key: str = KEY
    ) -> None:
        """Answer ``data``, signed (over ``signed`` instead when given: what a relay altering it would send)."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if self.nonce:
            sig = response_signature(key, self.nonce, status, data if signed is None else signed)
            self.send_header(HEADER_RESPONSE_SIG, sig)
        self.end_headers()
        self.wfile.write(data)

    def _authentic(self, body: bytes) -> bool:
        self.nonce = None
        problem = self.verifier.problem(self.command, self.path, body, dict(self.headers))
        if problem:
            self._send(401, json.dumps({"error": problem}).encode())
        else:
            self.nonce = self.headers[HEADER_NONCE]
        return problem is None

    def do_GET(self) -> None:
        if not self._authentic(b""):
            return
        if self.path == "/file":
            start, end = self.headers["Range"].removeprefix("bytes=").split("-")
            self._send(206, FILE[int(start) : int(end) + 1], "application/octet-stream")
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, b"{}")
        elif self.path == "/html":
            self._send(200, b"<html>", "text/html")
        elif self.path == "/altered":  # one byte of the signed answer flipped on the way
            self._send(200, b'{"ok": false}', signed=b'{"ok": true}')
        elif self.path == "/other-key":
            self._send(200, b'{"ok": true}', key="another-cluster-key")
        elif self.path == "/unsigned":
            self.nonce = None
            self._send(200, b'{"ok": true}')
        elif self.path == "/unsigned-404":
            self.nonce = None
            self._send(404, b'{"error": "gone"}')
        else:
            self._send(404, b'{"error": "no such thing"}')

    def do_POST(self) -> None:
        body = self._body()
        if not self._authentic(body):
            return
        if self.path == "/echo":
            self._send(200, json.dumps({"got": json.loads(body or b"null")}).encode())
        elif self.path == "/stream":
            n = json.loads(body)["n"]
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            if self.nonce and n:  # a stream's signature covers its status (n == 0: left unsigned)
                self.send_header(HEADER_RESPONSE_SIG, response_signature(KEY, self.nonce, 200, None))
            self.end_headers()
            for i in range(n):
                self.wfile.write(json.dumps({"i": i}).encode() + b"\n")
                self.wfile.flush()
        else:
            self._send(400, b'{"error": "bad request"}')


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_signed_json_round_trip(address):
    client = SignedClient(address, KEY)
    assert client.json("POST", "/echo", {"a": [1, 2]}) == {"got": {"a": [1, 2]}}
    assert client.json("POST", "/echo") == {"got": None}  # no body


def test_each_request_is_signed_anew(address):
    client = SignedClient(address, KEY)
    for _ in range(3):  # a replayed nonce would be refused
        assert client.json("POST", "/echo", 1) == {"got": 1}


def test_unsigned_or_wrongly_signed_requests_are_refused_with_the_reason(address):
    with pytest.raises(RequestError, match="HTTP 401.*missing signature") as exc:
        SignedClient(address, None).json("POST", "/echo", {})
    assert exc.value.status == 401
    with pytest.raises(RequestError, match="another cluster key"):
        SignedClient(address, "other-key").json("POST", "/echo", {})


def test_error_status_is_an_error_with_status_and_detail(address):
    with pytest.raises(RequestError) as exc:
        SignedClient(address, KEY).json("GET", "/missing")
    assert exc.value.status == 404 and "no such thing" in exc.value.detail
    assert f"GET {address}/missing: HTTP 404" in str(exc.value)
    assert isinstance(exc.value, OSError)  # callers that handle a lost peer handle this too


def test_an_answer_that_is_not_json_is_a_clear_error(address):
    with pytest.raises(RequestError, match="not JSON"):
        SignedClient(address, KEY).json("GET", "/html")


def test_range_reads(address):
    client = SignedClient(address, KEY)
    assert client.read_range("/file", 0, 8) == FILE[:8]
    assert client.read_range("/file", 300, 812) == FILE[300:812]


def test_streamed_lines(address):
    with SignedClient(address, KEY).stream_lines("POST", "/stream", {"n": 5}) as stream:
        assert list(stream) == [{"i": i} for i in range(5)]


def test_a_stream_with_an_error_status_raises_when_read(address):
    stream = SignedClient(address, KEY).stream_lines("POST", "/nope", {})
    with pytest.raises(RequestError, match="HTTP 400"):
        list(stream)
    stream.close()


@pytest.mark.parametrize("path", ["/altered", "/other-key", "/unsigned", "/unsigned-404"])
def test_an_answer_not_signed_by_the_server_is_refused(address, path):
    with pytest.raises(RequestError, match="response not authentic") as exc:
        SignedClient(address, KEY).json("GET", path)
    assert exc.value.status is None  # not taken for the status it claims (a 404 would read as "gone")


def test_a_stream_not_signed_by_the_server_is_refused(address):
    stream = SignedClient(address, KEY).stream_lines("POST", "/stream", {"n": 0})
    with pytest.raises(RequestError, match="response not authentic"):
        list(stream)
    stream.close()


def test_timeouts(address):
    started = time.monotonic()
    with pytest.raises(RequestError, match="timed out"):
        SignedClient(address, KEY, timeout=0.3).json("GET", "/slow")
    assert time.monotonic() - started < 1.5
    assert SignedClient(address, KEY, timeout=0.3).json("GET", "/slow", timeout=5) == {}


def test_an_unreachable_peer_is_an_error_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(RequestError, match=f"POST 127.0.0.1:{port}/echo"):
        SignedClient(f"127.0.0.1:{port}", KEY, timeout=2).json("POST", "/echo", {})
    with pytest.raises(RequestError):
        SignedClient(f"127.0.0.1:{port}", KEY).stream_lines("POST", "/stream", {"n": 1})


def test_addresses():
    assert split_address("http://10.0.0.1:52416/") == ("10.0.0.1", 52416)
    with pytest.raises(ValueError, match="host:port"):
        split_address("10.0.0.1")


def test_the_cluster_client_hints_at_the_key_on_401(address):
    client = object.__new__(ClusterClient)  # only its request method: no agents to read
    client.cluster_key = None
    client._addresses, client._contacts = {}, {}  # no node read yet: requests are not bound to one
    with pytest.raises(ClusterError, match="pass cluster_key= or set EXO_LAB_CLUSTER_KEY"):
        client.request(address, "POST", "/echo", {})
    client.cluster_key = KEY
    assert client.request(address, "POST", "/echo", {"x": 1}) == {"got": {"x": 1}}
