import os
import stat
import time

import pytest

from exo_lab.cluster import auth
from exo_lab.cluster.auth import (
    HEADER_NONCE,
    HEADER_SIG,
    HEADER_SOURCE,
    HEADER_TARGET,
    HEADER_TS,
    MIN_KEY_LENGTH,
    Verifier,
    fingerprint,
    load_or_create_key,
    rank_target,
    response_is_authentic,
    response_signature,
    sign_headers,
    signature,
)
from exo_lab.cluster.client import ClusterClient


def test_key_is_made_once_with_mode_0600_in_a_0700_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("EXO_LAB_CLUSTER_KEY", raising=False)
    state = tmp_path / "state" / "node"
    key = load_or_create_key(state)
    assert len(key) == 64 and load_or_create_key(state) == key
    assert stat.S_IMODE(os.stat(state / "cluster.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert load_or_create_key(state, "an-explicit-cluster-key") == "an-explicit-cluster-key"
    monkeypatch.setenv("EXO_LAB_CLUSTER_KEY", "a-key-from-the-environment")
    assert load_or_create_key(state) == "a-key-from-the-environment"


def test_an_open_state_dir_and_key_file_are_narrowed(tmp_path, monkeypatch):
    monkeypatch.delenv("EXO_LAB_CLUSTER_KEY", raising=False)
    (tmp_path / "cluster.key").write_text("k" * 64 + "\n")
    os.chmod(tmp_path / "cluster.key", 0o644)
    os.chmod(tmp_path, 0o755)
    assert load_or_create_key(tmp_path) == "k" * 64
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "cluster.key").st_mode) == 0o600


@pytest.mark.parametrize("where", ["explicit", "env", "file"])
def test_short_keys_are_refused_with_the_reason(tmp_path, monkeypatch, where):
    monkeypatch.delenv("EXO_LAB_CLUSTER_KEY", raising=False)
    short = "s3cret"
    if where == "env":
        monkeypatch.setenv("EXO_LAB_CLUSTER_KEY", short)
    if where == "file":
        (tmp_path / "cluster.key").write_text(short + "\n")
    with pytest.raises(ValueError, match=f"has 6 characters; a cluster key needs at least {MIN_KEY_LENGTH}"):
        load_or_create_key(tmp_path, short if where == "explicit" else None)


def test_a_coordinator_refuses_a_short_key():
    with pytest.raises(ValueError, match="a cluster key needs at least"):
        ClusterClient(["127.0.0.1:9"], cluster_key="short")
    with pytest.raises(ValueError, match="a cluster key needs at least"):
        ClusterClient.start_local(1, cluster_key="short")


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


@pytest.mark.parametrize("stamp", ["nan", "NaN", "inf", "-inf", "soon"])
def test_a_timestamp_that_is_no_time_is_refused(stamp):
    """Signed with the key and that timestamp: ``nan`` is outside no window, ``inf`` is no time at all."""
    v = Verifier("secret")
    h = sign_headers("secret", "GET", "/node")
    h[HEADER_TS] = stamp
    h[HEADER_SIG] = signature("secret", "GET", "/node", b"", stamp, h[HEADER_NONCE])
    assert v.problem("GET", "/node", b"", h) == "bad timestamp"


def test_a_request_signed_for_one_node_is_refused_by_another():
    a, b = Verifier("secret", node_id="node-a"), Verifier("secret", node_id="node-b")
    h = sign_headers("secret", "POST", "/instances/x/start", b"{}", target="node-a", source="node-c")
    assert "signed for another node" in b.problem("POST", "/instances/x/start", b"{}", dict(h))
    assert a.problem("POST", "/instances/x/start", b"{}", dict(h)) is None
    # the target is signed: a relay cannot rewrite it (nor drop it) to pass the request on to node B
    for forged in ({**h, HEADER_TARGET: "node-b"}, {k: v for k, v in h.items() if k != HEADER_TARGET}):
        assert "bad signature" in Verifier("secret", node_id="node-b").problem(
            "POST", "/instances/x/start", b"{}", forged
        )
    # neither is the sender's id
    forged = {**sign_headers("secret", "GET", "/node", source="node-c"), HEADER_SOURCE: "node-d"}
    assert "bad signature" in a.problem("GET", "/node", b"", forged)
    # a request not bound to a node (the client does not know whom it calls) is accepted by any
    assert b.problem("GET", "/node", b"", sign_headers("secret", "GET", "/node")) is None


def test_a_response_signature_binds_the_request_status_and_body():
    sig = response_signature("secret", "nonce-1", 200, b'{"ok": true}')
    assert response_is_authentic("secret", "nonce-1", 200, b'{"ok": true}', sig)
    assert not response_is_authentic("secret", "nonce-1", 200, b'{"ok": false}', sig)  # body altered
    assert not response_is_authentic("secret", "nonce-1", 404, b'{"ok": true}', sig)  # status altered
    assert not response_is_authentic("secret", "nonce-2", 200, b'{"ok": true}', sig)  # another request's answer
    assert not response_is_authentic("other-key", "nonce-1", 200, b'{"ok": true}', sig)
    assert not response_is_authentic("secret", "nonce-1", 200, b'{"ok": true}', None)
    streamed = response_signature("secret", "nonce-1", 200, None)  # a streamed answer: the status only
    assert response_is_authentic("secret", "nonce-1", 200, None, streamed)
    assert not response_is_authentic("secret", "nonce-1", 200, b"", streamed)


def test_the_nonces_a_verifier_keeps_are_bounded_by_their_window_and_a_cap(monkeypatch):
    """Thousands of valid requests: the nonce table holds those of the window only, and never more than the cap."""
    v = Verifier("secret", window_s=0.2)
    for _ in range(3000):
        assert v.problem("GET", "/node", b"", sign_headers("secret", "GET", "/node")) is None
    assert 0 < v.remembered <= 3000
    time.sleep(0.5)
    v.prune()
    assert v.remembered == 0  # all out of the window: forgotten (their requests are refused by timestamp)
    monkeypatch.setattr(auth, "MAX_NONCES", 512)
    v = Verifier("secret")
    answers = [v.problem("GET", "/node", b"", sign_headers("secret", "GET", "/node")) for _ in range(700)]
    assert answers[:512] == [None] * 512 and v.remembered == 512
    assert all(a is not None and "too many" in a for a in answers[512:])


def test_a_rank_verifier_needs_requests_signed_for_it():
    """A rank's control port: signed for this rank of this launch, or refused (no target, another rank)."""
    v = Verifier("secret", node_id=rank_target("abc", 0), require_target=True)
    ok = sign_headers("secret", "GET", "/status", target=rank_target("abc", 0))
    assert v.problem("GET", "/status", b"", ok) is None
    for target in (None, rank_target("abc", 1), rank_target("abc-r1", 0)):
        assert v.problem("GET", "/status", b"", sign_headers("secret", "GET", "/status", target=target)) is not None
