"""A relay in the middle, for tests: it passes one HTTP exchange at a time between a client and a server,
and can alter the answer's body on the way."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _read_message(sock: socket.socket) -> bytes:
    """One HTTP message with a Content-Length body (or none), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            return data
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        got = sock.recv(65536)
        if not got:
            break
        body += got
    return head + b"\r\n\r\n" + body


@contextmanager
def relay(target: tuple[str, int], alter: Callable[[bytes], bytes] | None = None) -> Iterator[str]:
    """``host:port`` of a relay to ``target``; ``alter``: what it does to each answer's body (same length)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client, socket.create_connection(target, timeout=10) as server:
                server.sendall(_read_message(client))
                answer = _read_message(server)
                if alter is not None:
                    head, _, body = answer.partition(b"\r\n\r\n")
                    answer = head + b"\r\n\r\n" + alter(body)
                client.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)
