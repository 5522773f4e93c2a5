"""The API judges a request by its headers before it reads its body, and a signed request by whom it was signed for.

A client that announces a 10 MB body and sends only its headers gets the 401 (no or wrong API key) or the keyless
loopback guards' 421/403/415 at once, in the family's error shape, and the connection is closed: nothing of the body
is read. A request with the right key, or with signature headers that may be good, is let in to send its body. A
request signed with the cluster key for another coordinator (what a relay replaying a member's forwarded request to a
third member would send) is refused with 401. Real servers (tornado, in this process) on loopback, raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from tornado.ioloop import IOLoop

from exo_lab.api.app import make_app
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server
from exo_lab.cluster.auth import sign_headers
from exo_lab.cluster.serving import MIB, GuardedHTTPServer
from tests.helpers.raw_http import raw
from tests.helpers.stub_backend import StubBackend

KEY = "before-body-api-key"
CLUSTER_KEY = "c" * 64
TEN_MB = 10_000_000
COUNT = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "Hello"}]})
POSTS = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/embeddings": "openai",
    "/v1/responses": "openai",
    "/v1/messages": "anthropic",
    "/api/chat": "ollama",
    "/api/embed": "ollama",
    "/api/pull": "ollama",
}


def registry() -> ModelRegistry:
    reg = ModelRegistry()
    reg.add(StubBackend(), "stub")
    return reg


@pytest.fixture(scope="module")
def keyed() -> Iterator[Server]:
    srv = Server(registry(), "127.0.0.1", 0, api_key=KEY).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local() -> Iterator[Server]:
    srv = Server(registry(), "127.0.0.1", 0).start()
    yield srv
    srv.stop()


class Member:
    """A member's API: an API key, the cluster key, and its coordinator id ``coord-a`` (tornado on a thread)."""

    def __init__(self) -> None:
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = IOLoop.current()
            app = make_app(registry(), api_key=KEY, cluster_key=CLUSTER_KEY, node_id="coord-a")
            self.http = GuardedHTTPServer(app, max_body_bytes=16 * MIB)
            self.http.listen(0, "127.0.0.1")
            self.port = next(iter(self.http._sockets.values())).getsockname()[1]
            started.set()
            self.loop.start()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)

    def stop(self) -> None:
        self.loop.add_callback(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def member() -> Iterator[Member]:
    m = Member()
    yield m
    m.stop()


def head_only(port: int, method: str, path: str, headers: dict[str, str], wait_s: float = 3.0) -> bytes:
    """Send a request's headers announcing a 10 MB body and none of it; everything answered within ``wait_s``
    (until the server closes the connection)."""
    lines = [f"{method} {path} HTTP/1.1", f"Content-Length: {TEN_MB}"] + [f"{k}: {v}" for k, v in headers.items()]
    if not any(k.lower() == "host" for k in headers):
        lines.insert(1, f"Host: 127.0.0.1:{port}")
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def split(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def assert_family_error(answer: bytes, status: int, family: str) -> None:
    got, data = split(answer)
    assert got == status, answer[:300]
    if family == "openai":
        assert data["error"]["message"] and data["error"]["code"], data
    elif family == "anthropic":
        assert data["type"] == "error" and data["error"]["message"], data
    else:
        assert list(data) == ["error"] and isinstance(data["error"], str), data


@pytest.mark.parametrize(("path", "family"), POSTS.items())
@pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}])
def test_no_or_wrong_key_is_refused_before_the_body(keyed, path, family, auth):
    t = time.monotonic()
    answer = head_only(keyed.port, "POST", path, {"Content-Type": "application/json", **auth})
    assert time.monotonic() - t < 2.5  # answered and closed, not waiting for 10 MB that never come
    assert_family_error(answer, 401, family)


def test_the_right_key_is_let_in_to_send_its_body(keyed):
    answer = head_only(keyed.port, "POST", "/v1/messages/count_tokens", {"x-api-key": KEY}, wait_s=1.0)
    assert answer == b""  # the server waits for the body
    status, data = raw(keyed, "POST", "/v1/messages/count_tokens", COUNT, {"x-api-key": KEY})
    assert status == 200 and json.loads(data) == {"input_tokens": 3}, data


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Host": "evil.example", "Content-Type": "application/json"}, 421, "misdirected_request"),
        ({"Origin": "https://evil.example", "Content-Type": "application/json"}, 403, "forbidden_origin"),
        ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
def test_the_loopback_guards_answer_before_the_body(local, headers, status, code):
    for path, family in POSTS.items():
        answer = head_only(local.port, "POST", path, headers)
        assert_family_error(answer, status, family)
        if family == "openai":
            assert split(answer)[1]["error"]["code"] == code


def test_signature_headers_are_judged_with_the_body(member):
    """Fresh signature headers let the body in; a bad signature is then refused like a missing key."""
    forged = sign_headers("x" * 64, "POST", "/v1/messages/count_tokens", COUNT.encode(), target="coord-a")
    assert head_only(member.port, "POST", "/v1/messages/count_tokens", forged, wait_s=1.0) == b""
    status, data = raw(member, "POST", "/v1/messages/count_tokens", COUNT, forged)
    assert status == 401 and "API key" in json.loads(data)["error"]["message"], data
    stale = {**forged, "X-Exo-Lab-Timestamp": f"{time.time() - 3600:.3f}"}
    assert_family_error(head_only(member.port, "POST", "/v1/messages/count_tokens", stale), 401, "anthropic")


def test_a_request_signed_for_another_coordinator_is_refused(member):
    path = "/v1/messages/count_tokens"
    for target in ("coord-a", None):  # for this coordinator, or for none in particular: a member
        signed = sign_headers(CLUSTER_KEY, "POST", path, COUNT.encode(), target=target, source="coord-b")
        status, data = raw(member, "POST", path, COUNT, signed)
        assert status == 200 and json.loads(data) == {"input_tokens": 3}, data
        assert raw(member, "POST", path, COUNT, signed)[0] == 401  # a nonce is spent once
    replayed = sign_headers(CLUSTER_KEY, "POST", path, COUNT.encode(), target="coord-c", source="coord-b")
    status, data = raw(member, "POST", path, COUNT, replayed)
    assert status == 401, data  # signed for coord-c: refused here, like any unsigned request without the key
    get = sign_headers(CLUSTER_KEY, "GET", "/v1/models", target="coord-c")
    assert raw(member, "GET", "/v1/models", None, get)[0] == 401
    get = sign_headers(CLUSTER_KEY, "GET", "/v1/models", target="coord-a")
    assert raw(member, "GET", "/v1/models", None, get)[0] == 200
