import os
import stat
import time

from exo_lab.cluster.auth import HEADER_TS, Verifier, fingerprint, load_or_create_key, sign_headers


def test_key_is_made_once_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv("EXO_LAB_CLUSTER_KEY", raising=False)
    key = load_or_create_key(tmp_path)
    assert len(key) == 64 and load_or_create_key(tmp_path) == key
    assert stat.S_IMODE(os.stat(tmp_path / "cluster.key").st_mode) == 0o600
    assert load_or_create_key(tmp_path, "explicit") == "explicit"
    monkeypatch.setenv("EXO_LAB_CLUSTER_KEY", "from-env")
    assert load_or_create_key(tmp_path) == "from-env"


def test_fingerprint_does_not_reveal_the_key():
    assert fingerprint("k1") != fingerprint("k2") and "k1" not in fingerprint("k1")


def test_signed_request_is_accepted_once():
    v = Verifier("secret")
    h = sign_headers("secret", "POST", "/node/peers", b'{"a": 1}')
    assert v.problem("POST", "/node/peers", b'{"a": 1}', h) is None
    assert v.problem("POST", "/node/peers", b'{"a": 1}', h) == "replayed request"


def test_anything_changed_breaks_the_signature():
    v = Verifier("secret")
    h = sign_headers("secret", "POST", "/node/peers", b"body")
    assert "bad signature" in v.problem("POST", "/node/peers", b"other", dict(h))
    assert "bad signature" in v.problem("PUT", "/node/peers", b"body", dict(h))
    assert "bad signature" in v.problem("POST", "/node/links/probe", b"body", dict(h))
    assert "bad signature" in v.problem(
        "POST", "/node/peers", b"body", sign_headers("other-key", "POST", "/node/peers", b"body")
    )
    assert "missing signature" in v.problem("POST", "/node/peers", b"body", {})


def test_old_timestamps_are_refused():
    v = Verifier("secret", window_s=30)
    h = sign_headers("secret", "GET", "/node")
    h[HEADER_TS] = f"{time.time() - 60:.3f}"
    assert "window" in v.problem("GET", "/node", b"", h)
