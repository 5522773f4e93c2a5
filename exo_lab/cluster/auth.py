"""Cluster key and request signing.

Nodes started with the same key form a cluster. Every mutating request and
every peer-to-peer request carries an HMAC-SHA256 signature over the method,
the path (with query), a hash of the body, a timestamp and a nonce. A request
is accepted once: within ``WINDOW_S`` of its timestamp, with a nonce not seen
before. Only a fingerprint of the key is ever advertised (mDNS), never the key.
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


def signature(key: str, method: str, path: str, body: bytes, timestamp: str, nonce: str) -> str:
    msg = "\n".join([method.upper(), path, timestamp, nonce, hashlib.sha256(body or b"").hexdigest()])
    return hmac.new(key.encode(), msg.encode(), hashlib.sha256).hexdigest()


def sign_headers(key: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    """Headers that authenticate one request."""
    ts = f"{time.time():.3f}"
    nonce = secrets.token_hex(12)
    return {HEADER_TS: ts, HEADER_NONCE: nonce, HEADER_SIG: signature(key, method, path, body, ts, nonce)}


class Verifier:
    """Checks signatures and remembers nonces for the replay window."""

    def __init__(self, key: str, window_s: float = WINDOW_S) -> None:
        self.key = key
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

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
        expected = signature(self.key, method, path, body, ts, nonce)
        if not hmac.compare_digest(expected, sig):
            return "bad signature: this node has another cluster key"
        now = time.time()
        with self._lock:
            if nonce in self._seen:
                return "replayed request"
            self._seen[nonce] = now
            if len(self._seen) > 10_000 or len(self._seen) % 256 == 0:
                cutoff = now - 2 * self.window_s
                self._seen = {n: t for n, t in self._seen.items() if t > cutoff}
        return None


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
