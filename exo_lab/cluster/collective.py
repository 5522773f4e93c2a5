"""What one message between ranks costs beyond the wire: MLX's ring backend measured on this machine.

A rank's message (a pipeline hop, each exchange of a tensor group's all-reduce) goes through MLX's ring
backend, which hands it from the stream's thread to a pool thread and on to one thread per socket, and back:
on a small CPU that costs more than the link's latency (on this project's 2-core VM a 2-rank ``all_sum`` of
8 KB over loopback took ~150-180 us, where a plain socket exchange of the same bytes took ~20 us). The cost
model adds it per message (``message_overhead_s`` in the device profile, unless a calibration fitted
``hop_overhead_s``).

:func:`measure_message_overhead` starts one ring rank (``python -m exo_lab.cluster.collective``, in the
caller's cgroup, as workers are) and plays its peer here: it speaks the ring's wire format (plain TCP, the
peer connecting to rank 0 and rank 0 connecting back) and sends every round's bytes ahead, so the rank never
waits for the peer or the wire, only for its own threads. A 2-rank ``all_sum`` is two messages each way;
the overhead per message is half its time (median over ``ROUNDS``). A second real rank would do, but on a
one-core host the two would share the core and MLX's busy-polling socket threads make that take
milliseconds; one rank measures only what a rank on its own core pays.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from exo_lab.cluster.ports import free_port

log = logging.getLogger(__name__)

#: bytes per ``all_sum``: one token's fp32 hidden state of a 2048-wide model
BYTES = 8192
#: timed rounds (after as many warm-up ones)
ROUNDS = 200
#: seconds the rank gets to start, connect and measure (it takes ~1 s)
TIMEOUT_S = 30.0
#: seconds the rank waits after connecting, so the peer's bytes are in its socket before it starts
SETTLE_S = 0.3


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def _connect(port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        except ConnectionRefusedError:  # the rank is not listening yet (no loopback at all: give up at once)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def _feed(sock: socket.socket, nbytes: int) -> None:
    try:
        sock.sendall(bytes(nbytes))
    except OSError:
        pass


def _rank_main(rounds: int) -> dict[str, float]:
    """Rank 0: ``2 * rounds`` ring ``all_sum`` of ``BYTES`` (fp32) each evaluated on its own; the medians."""
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    time.sleep(SETTLE_S)
    x = mx.ones((BYTES // 4,), dtype=mx.float32)
    mx.eval(x)
    times = []
    for i in range(2 * rounds):
        y = x * 0.5  # a fresh input each time, as a layer's partial sum is
        mx.eval(y)
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(y, group=group))
        if i >= rounds:
            times.append(time.perf_counter() - t)
    all_sum = statistics.median(times)
    return {"all_sum_s": all_sum, "message_overhead_s": all_sum / 2}


def measure_message_overhead(rounds: int = ROUNDS, timeout_s: float = TIMEOUT_S) -> dict[str, float] | None:
    """Time one ring rank's ``all_sum`` against a peer that is never late: ``{"all_sum_s",
    "message_overhead_s"}`` (seconds), or None when it could not run (no MLX distributed, a timeout)."""
    from exo_lab import _blas

    deadline = time.monotonic() + timeout_s
    rank_port = free_port()
    with _listener() as peer_srv, tempfile.TemporaryDirectory(prefix="exo-lab-collective-") as tmp:
        peer_srv.settimeout(timeout_s)
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{rank_port}"], [f"127.0.0.1:{peer_srv.getsockname()[1]}"]]))
        env = _blas.child_env({**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)})
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(rounds)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        socks: list[socket.socket] = []
        try:
            socks.append(_connect(rank_port, deadline))  # the rank sends on this one (its left)
            socks.append(peer_srv.accept()[0])  # and receives on this one (its right): every round's bytes
            threads = [
                threading.Thread(target=_drain, args=(socks[0],), daemon=True),
                threading.Thread(target=_feed, args=(socks[1], 2 * rounds * BYTES), daemon=True),
            ]
            for t in threads:
                t.start()
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("message overhead not measured: %s", exc)
            return None
        finally:
            for s in socks:
                s.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        log.warning("message overhead not measured: %s", err.strip()[-300:])
        return None
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.warning("message overhead: unreadable output %r", out[-300:])
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m exo_lab.cluster.collective ROUNDS`` (with ``MLX_RANK=0`` and ``MLX_HOSTFILE``): the rank
    of :func:`measure_message_overhead`; prints its figures as JSON."""
    args = sys.argv[1:] if argv is None else argv
    import exo_lab  # noqa: F401  (OpenBLAS and the small-GEMM kernel before MLX, as in a worker)

    print(json.dumps(_rank_main(int(args[0]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
