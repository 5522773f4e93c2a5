"""``peer_sum`` (``exo_lab/native/peer_sum.cpp``): a partial result plus the peer's, exchanged over a socket;
``peer_send`` / ``peer_recv``: an array's bytes one way.

The peer is played here by another thread (or, for a peer that goes away, by a closed socket in a child
process): it writes its bytes and reads ours while MLX evaluates the sum."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from exo_lab.engine import peer_link

pytestmark = pytest.mark.skipif(peer_link.module() is None, reason="peer_sum is not built here")


def raw(a: mx.array) -> bytes:
    """An array's bytes in row order."""
    return np.array(mx.contiguous(a).view(mx.uint8)).tobytes()


def exchange(mine: mx.array, theirs: mx.array) -> tuple[mx.array, bytes]:
    """``peer_sum(mine)`` with a thread playing the peer that sends ``theirs``; and the bytes the peer got."""
    a, b = socket.socketpair()
    got: list[bytes] = []
    payload = raw(theirs)

    def peer() -> None:
        sender = threading.Thread(target=b.sendall, args=(payload,))
        sender.start()
        got.append(b.recv(len(payload), socket.MSG_WAITALL))
        sender.join()

    with a, b:
        t = threading.Thread(target=peer)
        t.start()
        out = peer_link.module().peer_sum(mine, a.fileno())
        mx.eval(out)
        t.join(timeout=30)
    return out, got[0]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16, mx.int32])
@pytest.mark.parametrize("shape", [(1, 2048), (5, 3, 64), (2048, 1024)])  # the last: 2-8 MB, past socket buffers
def test_the_sum_is_mlx_addition_of_both_sides(shape, dtype):
    mx.random.seed(1)
    mine = (mx.random.normal(shape) * 30).astype(dtype)
    theirs = (mx.random.normal(shape) * 30).astype(dtype)
    if dtype == mx.int32:  # the steps' shared vectors: tokens, flags; and a sum that wraps
        mine = mine.at[0, 0].add(2**31 - 100)
        theirs = theirs.at[0, 0].add(2**31 - 100)
    out, sent = exchange(mine, theirs)
    assert out.dtype == dtype and out.shape == mine.shape
    assert mx.array_equal(out, mine + theirs).item()
    assert sent == raw(mine)


def test_a_strided_input_is_sent_in_row_order():
    mine = mx.arange(12, dtype=mx.float32).reshape(3, 4).T
    out, sent = exchange(mine, mx.ones((4, 3)))
    assert mx.array_equal(out, mine + 1).item()
    assert sent == raw(mine)


def test_two_sums_of_one_array_are_two_messages():
    mine = mx.arange(4, dtype=mx.float32)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(np.arange(8, dtype=np.float32).tobytes())  # two messages of 4 floats, written ahead
        first, second = (peer_link.module().peer_sum(mine, a.fileno()) for _ in range(2))
        mx.eval(first, second)
        b.settimeout(10)
        assert b.recv(2 * mine.nbytes, socket.MSG_WAITALL) == raw(mine) * 2
    assert sorted([first.tolist(), second.tolist()]) == [[0, 2, 4, 6], [4, 6, 8, 10]]


@pytest.mark.parametrize("bad", [mx.arange(4, dtype=mx.int64), mx.array([True, False]), mx.ones(2, mx.uint8)])
def test_other_dtypes_are_refused(bad):
    with pytest.raises(ValueError, match="float32, bfloat16, float16 or int32"):
        peer_link.module().peer_sum(bad, 0)


def test_a_negative_fd_is_refused():
    with pytest.raises(ValueError, match="open socket"):
        peer_link.module().peer_sum(mx.ones(2), -1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.int64, mx.bool_])  # any dtype: bytes
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 512, 2048)])  # the last: a 4 MB prompt chunk, past the buffers
def test_send_writes_the_bytes_and_returns_the_array(shape, dtype):
    x = (mx.random.normal(shape) * 30).astype(dtype)
    a, b = socket.socketpair()
    got: list[bytes] = []
    with a, b:
        t = threading.Thread(target=lambda: got.append(b.recv(x.nbytes, socket.MSG_WAITALL)))
        t.start()
        sent = peer_link.module().peer_send(x, a.fileno())
        mx.eval(sent)
        t.join(timeout=30)
    assert got == [raw(x)]
    assert sent.dtype == dtype and mx.array_equal(sent, x).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.int64, mx.bool_])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 512, 2048), (0, 3)])
def test_recv_reads_an_array_of_the_shape_and_dtype(shape, dtype):
    x = (mx.random.normal(shape) * 30).astype(dtype)
    a, b = socket.socketpair()
    with a, b:
        t = threading.Thread(target=b.sendall, args=(raw(x),))
        t.start()
        got = peer_link.module().peer_recv(list(shape), dtype, a.fileno())
        mx.eval(got)
        t.join(timeout=30)
    assert got.shape == x.shape and got.dtype == dtype
    assert mx.array_equal(got, x).item()


def test_a_strided_send_goes_in_row_order_and_messages_keep_their_order():
    x = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    a, b = socket.socketpair()
    with a, b:
        mx.eval(peer_link.module().peer_send(x.T, a.fileno()))
        mx.eval(peer_link.module().peer_send(x, a.fileno()))
        first = peer_link.module().peer_recv([4, 3], mx.float32, b.fileno())
        mx.eval(first)
        second = peer_link.module().peer_recv([3, 4], mx.float32, b.fileno())
        mx.eval(second)
    assert mx.array_equal(first, x.T).item() and mx.array_equal(second, x).item()


def test_bad_receives_are_refused():
    with pytest.raises(ValueError, match="negative"):
        peer_link.module().peer_recv([2, -1], mx.float32, 0)
    with pytest.raises(ValueError, match="open socket"):
        peer_link.module().peer_recv([2], mx.float32, -1)
    with pytest.raises(ValueError, match="open socket"):
        peer_link.module().peer_send(mx.ones(2), -1)


GONE = """
import socket
import mlx.core as mx
from exo_lab.engine import peer_link
a, b = socket.socketpair()
b.close()
mx.eval(peer_link.module().peer_sum(mx.ones(1000), a.fileno()))
print("not reached")
"""


GONE_RECV = GONE.replace("peer_sum(mx.ones(1000), a.fileno())", "peer_recv([1000], mx.float32, a.fileno())")


@pytest.mark.parametrize("script", [GONE, GONE_RECV], ids=["sum", "recv"])
def test_a_peer_that_is_gone_ends_the_process_with_a_message(script):
    assert script.count("a.fileno()") == 1
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 70
    assert "not reached" not in done.stdout
    assert "peer_sum" in done.stderr and "messages cannot go on" in done.stderr


def test_the_hostfile_gives_each_ranks_address(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text('[["10.0.0.1:5000"], ["[fd00::2]:5001"]]')
    env = {"MLX_HOSTFILE": str(hosts)}
    assert peer_link.hostfile_address(0, env) == "10.0.0.1"
    assert peer_link.hostfile_address(1, env) == "fd00::2"
    assert peer_link.hostfile_address(2, env) is None
    assert peer_link.hostfile_address(0, {}) is None
    hosts.write_text("not json")
    assert peer_link.hostfile_address(0, env) is None
