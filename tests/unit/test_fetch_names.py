"""A peer's model listing names files to fetch: only plain names are taken, nothing is written outside the model dir.

The peer is a real HTTP server that answers like an agent holding the cluster key but lists a file
named to climb out of the model directory (what a compromised or buggy member could send).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exo_lab.cluster.auth import HEADER_NONCE, HEADER_RESPONSE_SIG, response_signature
from exo_lab.cluster.fetch import FetchError, fetch_tensors, is_plain_name, range_checksums
from exo_lab.models import partial

KEY = "k" * 64
HEADER = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
WEIGHTS = struct.pack("<Q", len(HEADER)) + HEADER + b"\x00\x00\x80\x3f"  # one float32 tensor: 1.0


class Peer(BaseHTTPRequestHandler):
    """Serves any listed name as ``WEIGHTS`` (or ``{}`` for JSON files) by byte range, and their checksums."""

    files: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if HEADER_NONCE in self.headers:  # signed as an agent signs its answers
            self.send_header(HEADER_RESPONSE_SIG, response_signature(KEY, self.headers[HEADER_NONCE], status, data))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/models/m":
            self._send(200, json.dumps({"name": "m", "files": self.files}).encode())
            return
        data = b"{}" if self.path.endswith(".json") else WEIGHTS
        if "Range" in self.headers:
            start, end = self.headers["Range"].removeprefix("bytes=").split("-")
            self._send(206, data[int(start) : int(end) + 1])
        else:
            self._send(200, data)

    def do_POST(self) -> None:
        ranges = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["ranges"]
        self._send(
            200, json.dumps({"sha256": [hashlib.sha256(WEIGHTS[a:b]).hexdigest() for _, a, b in ranges]}).encode()
        )


@pytest.fixture
def peer() -> Iterator[type[Peer]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Peer.address = f"127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield Peer
    server.shutdown()
    server.server_close()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_peer_that_lists_plain_names_is_fetched_from(peer, tmp_path):
    peer.files = {"config.json": 2, "model.safetensors": len(WEIGHTS)}
    dest = tmp_path / "models" / "m"
    assert fetch_tensors(peer.address, KEY, "m", dest, lambda name: True) == 4
    assert (partial.area(dest) / "model.safetensors").read_bytes() == WEIGHTS  # in the partial area until promoted


@pytest.mark.parametrize(
    "bad", ["../../x.safetensors", "../x.safetensors", "ABSOLUTE", ".x.safetensors", "a\\b.safetensors", ".."]
)
def test_a_name_that_is_not_plain_is_refused_and_nothing_is_written(peer, tmp_path, bad):
    bad = str(tmp_path / "abs.safetensors") if bad == "ABSOLUTE" else bad
    peer.files = {"config.json": 2, bad: len(WEIGHTS)}
    dest = tmp_path / "a" / "models" / "m"
    dest.parent.mkdir(parents=True)
    before = tree(tmp_path)
    with pytest.raises(FetchError, match="only plain file names are accepted"):
        fetch_tensors(peer.address, KEY, "m", dest, lambda name: True)
    written = {p for p in tree(tmp_path) - before if not p.startswith("a/models/")}
    assert not written, written  # nothing outside the model store


def test_plain_names():
    assert is_plain_name("model-00001-of-00002.safetensors") and is_plain_name("config.json")
    for bad in ("", ".", "..", ".hidden", "a/b", "a\\b", "a\0b", None, 3):
        assert not is_plain_name(bad), bad


def test_checksums_are_only_of_plain_names_in_the_model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.safetensors").write_bytes(WEIGHTS)
    (tmp_path / "secret").write_bytes(b"do not hash me")
    assert range_checksums(tmp_path / "m", [("w.safetensors", 0, 4)]) == [hashlib.sha256(WEIGHTS[:4]).hexdigest()]
    for bad in ("../secret", "/etc/hostname"):
        with pytest.raises(ValueError):
            range_checksums(tmp_path / "m", [(bad, 0, 4)])
