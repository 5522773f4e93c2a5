"""A forwarded stream whose owner stops answering midway ends with the family's error frame, not as if complete.

The owner here is a raw socket that sends the headers and one chunk of a streamed answer, then closes
(as a killed ``exo-lab up`` does): the member forwarding it must tell its client that the answer broke.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from exo_lab.api.registry import ModelRegistry
from exo_lab.api.server import Server


class CutOwner:
    """Answers each request with a streamed 200, one chunk of ``body``, then drops the connection."""

    def __init__(self, content_type: str, chunk: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.head = (
            (
                f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"{len(chunk):x}\r\n"
            ).encode()
            + chunk
            + b"\r\n"
        )
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
                )
                while len(body) < length:  # read it all: unread bytes would turn the close into a reset
                    body += conn.recv(65536)
                conn.sendall(self.head)  # ... and no terminating chunk: the owner is gone


class RouteTo:
    """The one thing forwarding asks of a member's Control: where a model is served."""

    def __init__(self, url: str) -> None:
        self.url = url

    def route(self, model: str) -> str | None:
        return self.url


@pytest.mark.parametrize(
    ("path", "content_type", "chunk", "family"),
    [
        ("/v1/chat/completions", "text/event-stream", b'data: {"choices": []}\n\n', "openai"),
        ("/v1/messages", "text/event-stream", b'event: ping\ndata: {"type": "ping"}\n\n', "anthropic"),
        ("/api/chat", "application/x-ndjson", b'{"message": {"content": "a"}, "done": false}\n', "ollama"),
    ],
)
def test_a_stream_cut_by_the_owner_ends_with_an_error(path, content_type, chunk, family):
    owner = CutOwner(content_type, chunk)
    server = Server(ModelRegistry(), port=0, control=RouteTo(owner.url)).start()
    try:
        body = {"model": "elsewhere", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}
        with httpx.stream("POST", server.url + path, json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.strip()]
        last = json.loads(lines[-1].removeprefix("data: "))
        if family == "openai":
            assert last["error"]["code"] == "owner_lost"
        elif family == "anthropic":
            assert lines[-2] == "event: error" and last["type"] == "error"
        else:
            assert "stopped answering" in last["error"]
    finally:
        server.stop()
        owner.sock.close()
