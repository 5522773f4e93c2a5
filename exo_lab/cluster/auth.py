"""Cluster key and request signing.

Nodes started with the same key form a cluster. Every mutating request and
every peer-to-peer request carries an HMAC-SHA256 signature over the method,
the path (with query), a hash of the body, a timestamp, a nonce, and the ids of the
target node and of the sending node when they are known. A request is accepted once:
within ``WINDOW_S`` of its timestamp, with a nonce not seen before, and by the node it
was signed for (a request signed for another node id is refused, so a relay cannot
replay a node's request to a third node). Only a fingerprint of the key is ever
advertised (mDNS), never the key.

A server that accepted a signed request signs its answer: :func:`response_signature`
binds the request's nonce, the status and the SHA-256 of the body (or, for an answer
streamed as it is produced, the status only: :data:`STREAMED`), so a client can tell
an answer from its peer from one altered or made up on the way.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from exo_lab import defaults, paths

WINDOW_S = 30.0
#: the shortest cluster key accepted (a generated key has 64 hex digits)
MIN_KEY_LENGTH = 16
HEADER_TS = "X-Exo-Lab-Timestamp"
HEADER_NONCE = "X-Exo-Lab-Nonce"
HEADER_SIG = "X-Exo-Lab-Signature"
#: the node id the request is meant for (signed; a node refuses a request signed for another id)
HEADER_TARGET = "X-Exo-Lab-Target"
#: the sending node's id, when the sender is a node (signed; for the logs)
HEADER_SOURCE = "X-Exo-Lab-Source"
#: the server's signature of its answer to a signed request (:func:`response_signature`)
HEADER_RESPONSE_SIG = "X-Exo-Lab-Response-Signature"
#: what a streamed answer's signature covers instead of the body's hash
STREAMED = "streamed"


def check_key(key: str, where: str = "the cluster key") -> str:
    """``key`` if it is long enough to be a cluster key, else a ValueError saying so.

    Only a fingerprint of the key is advertised, so a short key could be found from it offline.
    """
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(
            f"{where} has {len(key)} characters; a cluster key needs at least {MIN_KEY_LENGTH} "
            "(leave it out and one is made, or make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


def load_or_create_key(state_dir: Path, explicit: str | None = None) -> str:
    """The cluster key: ``explicit``, else ``$EXO_LAB_CLUSTER_KEY``, else the state dir's (made once, mode 0600
    in a 0700 directory). A key shorter than :data:`MIN_KEY_LENGTH` is refused (ValueError)."""
    if explicit:
        return check_key(explicit)
    from_env = defaults.cluster_key()
    if from_env:
        return check_key(from_env, f"${defaults.CLUSTER_KEY}")
    paths.private_dir(state_dir)
    path = state_dir / "cluster.key"
    if not path.exists():
        try:  # O_EXCL: of two agents starting at once on one state dir, one makes the key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
    return check_key(path.read_text().strip(), str(path))


def fingerprint(key: str) -> str:
    """A public, non-reversible id of the key (what mDNS advertises)."""
    return hashlib.sha256(b"exo-lab-cluster-fingerprint:" + key.encode()).hexdigest()[:16]


def _hmac(key: str, parts: list[str]) -> str:
    return hmac.new(key.encode(), "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def signature(
    key: str, method: str, path: str, body: bytes, timestamp: str, nonce: str, target: str = "", source: str = ""
) -> str:
    """The signature of one request; ``target``/``source``: the receiving and sending node ids ("" if unknown)."""
    body_hash = hashlib.sha256(body or b"").hexdigest()
    return _hmac(key, [method.upper(), path, timestamp, nonce, body_hash, "to:" + target, "from:" + source])


def sign_headers(
    key: str, method: str, path: str, body: bytes = b"", target: str | None = None, source: str | None = None
) -> dict[str, str]:
    """Headers that authenticate one request; ``target``: the node id it is meant for (when the sender knows it),
    ``source``: the sender's node id (when it is a node)."""
    ts = f"{time.time():.3f}"
    nonce = secrets.token_hex(12)
    headers = {HEADER_TS: ts, HEADER_NONCE: nonce}
    if target:
        headers[HEADER_TARGET] = target
    if source:
        headers[HEADER_SOURCE] = source
    headers[HEADER_SIG] = signature(key, method, path, body, ts, nonce, target or "", source or "")
    return headers


def response_signature(key: str, nonce: str, status: int, body: bytes | None, *, body_sha256: str | None = None) -> str:
    """The signature of the answer to the request with ``nonce``: its status and ``body``'s SHA-256
    (or ``body_sha256``, the hex digest of a body not held in memory), or, with neither (an answer
    streamed as it is produced), its status only."""
    if body_sha256 is None:
        body_sha256 = STREAMED if body is None else hashlib.sha256(body).hexdigest()
    digest = body_sha256
    return _hmac(key, ["response", nonce, str(int(status)), digest])


def response_is_authentic(key: str, nonce: str, status: int, body: bytes | None, given: str | None) -> bool:
    """Whether ``given`` (the response's :data:`HEADER_RESPONSE_SIG`) signs this answer."""
    return bool(given) and hmac.compare_digest(response_signature(key, nonce, status, body), given or "")


def rank_target(instance_id: str, rank: int) -> str:
    """The id a rank's control port answers to (what requests to it are signed for): one rank of one launch."""
    return f"{instance_id}/rank{int(rank)}"


#: the most nonces a :class:`Verifier` remembers (a flood of valid requests beyond it is refused, not stored)
MAX_NONCES = 100_000


class Verifier:
    """Checks signatures and remembers nonces for the replay window.

    ``node_id``: this server's id; a request signed for another id is refused. ``require_target``: a request
    must be signed for this id (one signed for no id in particular is refused too; for servers whose every
    client knows whom it calls: rank control ports, whose id is :func:`rank_target`)."""

    def __init__(
        self, key: str, window_s: float = WINDOW_S, node_id: str | None = None, *, require_target: bool = False
    ) -> None:
        self.key = key
        self.window_s = window_s
        self.node_id = node_id
        self.require_target = require_target
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def remembered(self) -> int:
        """How many nonces are remembered now (bounded by the window and :data:`MAX_NONCES`)."""
        return len(self._seen)

    def problem(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> str | None:
        """Why the request is not authentic, or None if it is (its nonce is then spent)."""
        ts, nonce, sig = headers.get(HEADER_TS), headers.get(HEADER_NONCE), headers.get(HEADER_SIG)
        if not (ts and nonce and sig):
            return "missing signature: sign requests with the cluster key"
        try:
            age = abs(time.time() - float(ts))
        except ValueError:
            return "bad timestamp"
        if not math.isfinite(age):  # "nan" compares false with everything, "inf" is no time at all
            return "bad timestamp"
        if age > self.window_s:
            return f"timestamp outside the {self.window_s:.0f} s window (clock skew?)"
        target, source = headers.get(HEADER_TARGET, ""), headers.get(HEADER_SOURCE, "")
        expected = signature(self.key, method, path, body, ts, nonce, target, source)
        if not hmac.compare_digest(expected, sig):
            return "bad signature: this node has another cluster key"
        if target and self.node_id and target != self.node_id:
            return f"signed for another node ({target}; this is {self.node_id})"
        if self.require_target and not target:
            return f"not signed for this node ({self.node_id}): sign requests for the node they go to"
        now = time.time()
        with self._lock:
            if nonce in self._seen:
                return "replayed request"
            if len(self._seen) >= MAX_NONCES or len(self._seen) % 256 == 0:
                self._prune(now)
                if len(self._seen) >= MAX_NONCES:  # that many fresh ones: refuse rather than grow
                    return "too many signed requests at once; retry"
            self._seen[nonce] = now
        return None

    def prune(self) -> None:
        """Forget the nonces that are out of the window (requests with them are refused by their timestamp)."""
        with self._lock:
            self._prune(time.time())

    def _prune(self, now: float) -> None:
        cutoff = now - 2 * self.window_s
        self._seen = {n: t for n, t in self._seen.items() if t > cutoff}


def header_problem(headers: dict[str, str], window_s: float = WINDOW_S) -> str | None:
    """What is wrong with a request's signature headers before its body arrives (None: they may be good).

    Servers check this first, so that an unsigned or stale request is refused without reading its body.
    """
    ts, nonce, sig = headers.get(HEADER_TS), headers.get(HEADER_NONCE), headers.get(HEADER_SIG)
    if not (ts and nonce and sig):
        return "missing signature: sign requests with the cluster key"
    try:
        age = abs(time.time() - float(ts))
    except ValueError:
        return "bad timestamp"
    if not math.isfinite(age) or age > window_s:
        return "bad timestamp" if not math.isfinite(age) else f"timestamp outside the {window_s:.0f} s window"
    return None
