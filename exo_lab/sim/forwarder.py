"""A cable with latency and loss: joins two TAP devices in two namespaces.

The kernel here has no ``netem``, so delay and loss live in this process. It
attaches to TAP ``A`` (in namespace ``NS_A``) and TAP ``B`` (in ``NS_B``),
reads every frame one side's kernel sends, and writes it into the other side
``delay`` seconds later (one-way, per direction: a round trip takes
``2 * delay``), dropping each frame with probability ``loss``.

Run it as::

    python -m exo_lab.sim.forwarder NS_A:TAP_A NS_B:TAP_B --delay 5ms [--loss 0.01] [--rate 100mbit]

Rate limits are left to ``tbf`` on the TAPs' egress (what
:class:`~exo_lab.sim.cluster.SimCluster` does): the queue then stays in the
kernel, where TCP sees it (TCP small queues) and where it costs this process
nothing. ``--rate`` paces in here instead (serialization time per frame,
drop-tail past 50 ms of backlog). Both are accurate; measured here over a
5 ms cable, one TCP stream, 1 s transfers: tbf 47 / 184 / 899 Mbit/s at
50 / 200 / 1000 mbit, ``--rate`` 48 / 190 / 926; 5 s at 50 mbit: 47.7 vs
49.1, no drops either way (goodput: the rate counts Ethernet headers, so
~95 % is the ceiling). RTT 10.2-10.5 ms with either.

Speed: with no loss the TAPs carry TSO/GSO super-frames (``IFF_VNET_HDR``
plus offloads), so a 64 KiB TCP burst is one read and one write; with loss
the frames are MTU-sized so that loss applies per packet, which limits what
this process carries (about 1 Gbit/s, ~100k frames/s, here). Delays sit on
per-direction FIFO queues (a constant delay keeps them in order); waits use
``select`` with microsecond timeouts. Prints ``ready`` on stdout once both
TAPs are attached; SIGTERM or SIGINT stop it.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import logging
import os
import random
import select
import signal
import struct
import sys
import time

from exo_lab.sim import netns, units

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
READ_SIZE = 65536 + 1024  # a GSO super-frame plus headers
BATCH = 64  # frames read from one side before serving the other
QUEUE_S = 0.05  # --rate: backlog (seconds of serialization) beyond which frames drop


def open_tap(ns: str, name: str, offload: bool) -> int:
    """Attach to TAP ``name`` in namespace ``ns``; the fd is non-blocking."""
    with netns.inside(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        # always set: a TAP keeps offloads from an earlier attach, and without a vnet header
        # those would send super-frames and unfinished checksums that the other side drops
        fcntl.ioctl(fd, TUNSETOFFLOAD, (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) if offload else 0)
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"cannot attach to TAP {name} in namespace {ns}: {exc.strerror}") from None
    return fd


class Direction:
    """Frames read from ``src`` waiting to be written to ``dst``."""

    def __init__(self, src: int, dst: int, label: str) -> None:
        self.src, self.dst, self.label = src, dst, label
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.free_at = 0.0  # --rate: when the wire is free again
        self.frames = self.bytes = self.dropped = self.errors = 0


class Forwarder:
    """The delay line between two attached TAP fds."""

    def __init__(
        self, fd_a: int, fd_b: int, delay: float, loss: float = 0.0, rate: int | None = None, seed: int | None = None
    ) -> None:
        self.dirs = {fd_a: Direction(fd_a, fd_b, "a->b"), fd_b: Direction(fd_b, fd_a, "b->a")}
        self.delay, self.loss, self.rate = delay, loss, rate
        self.random = random.Random(seed)
        self.stopping = False

    def _receive(self, d: Direction, now: float) -> bool:
        """Read up to BATCH frames from ``d.src``; False when it had nothing more."""
        for _ in range(BATCH):
            try:
                frame = os.read(d.src, READ_SIZE)
            except BlockingIOError:
                return False
            except OSError as exc:
                d.errors += 1
                log.warning("read %s: %s", d.label, exc)
                return False
            d.frames += 1
            d.bytes += len(frame)
            if self.loss and self.random.random() < self.loss:
                d.dropped += 1
                continue
            due = now + self.delay
            if self.rate:
                start = max(now, d.free_at)
                if start - now > QUEUE_S:
                    d.dropped += 1
                    continue
                d.free_at = start + len(frame) * 8 / self.rate
                due = d.free_at + self.delay
            d.queue.append((due, frame))
        return True

    def _deliver(self, d: Direction, now: float) -> None:
        q = d.queue
        while q and q[0][0] <= now:
            frame = q.popleft()[1]
            try:
                os.write(d.dst, frame)
            except OSError as exc:  # the receiving kernel refused it (e.g. device down): a lost frame
                d.errors += 1
                if d.errors <= 5:
                    log.warning("write %s: %s", d.label, exc)

    def run(self, wake_fd: int | None = None) -> None:
        """Forward until :attr:`stopping` is set (a byte on ``wake_fd`` wakes the loop)."""
        fds = list(self.dirs)
        watch = fds + ([wake_fd] if wake_fd is not None else [])
        clock = time.monotonic
        while not self.stopping:
            now = clock()
            heads = [d.queue[0][0] for d in self.dirs.values() if d.queue]
            timeout = max(0.0, min(heads) - now) if heads else None
            ready, _, _ = select.select(watch, [], [], timeout)
            now = clock()
            more = True
            while more:
                more = False
                for fd in ready:
                    if fd in self.dirs and self._receive(self.dirs[fd], now):
                        more = True  # a full batch: there may be more, but serve the other side first
                for d in self.dirs.values():
                    self._deliver(d, now)
                if more:
                    now = clock()
            if wake_fd is not None and wake_fd in ready:
                try:
                    os.read(wake_fd, 512)
                except BlockingIOError:
                    pass

    def stats(self) -> str:
        return "; ".join(
            f"{d.label}: {d.frames} frames, {d.bytes} bytes, {d.dropped} dropped, {d.errors} errors"
            for d in self.dirs.values()
        )


def _endpoint(text: str) -> tuple[str, str]:
    ns, sep, dev = text.partition(":")
    if not sep or not ns or not dev:
        raise argparse.ArgumentTypeError(f"{text!r}: write an end as NAMESPACE:TAP")
    return ns, dev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exo_lab.sim.forwarder", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("a", type=_endpoint, help="NAMESPACE:TAP of one end")
    p.add_argument("b", type=_endpoint, help="NAMESPACE:TAP of the other end")
    p.add_argument("--delay", type=units.parse_delay, default=0.0, help="one-way delay per direction, e.g. 5ms")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per frame, per direction")
    p.add_argument("--rate", type=units.parse_rate, help="pace here instead of tbf, e.g. 100mbit (see module doc)")
    p.add_argument("--seed", type=int, help="seed for the loss draws")
    p.add_argument("--no-offload", action="store_true", help="MTU-sized frames even without loss")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s forwarder %(levelname)s %(message)s")
    if not 0.0 <= args.loss < 1.0:
        p.error("--loss must be in [0, 1)")

    offload = args.loss == 0.0 and not args.no_offload
    fd_a = open_tap(*args.a, offload=offload)
    fd_b = open_tap(*args.b, offload=offload)
    fwd = Forwarder(fd_a, fd_b, args.delay, args.loss, args.rate, args.seed)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)

    def stop(signum: int, frame: object) -> None:
        fwd.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("%s:%s <-> %s:%s delay %.3f ms loss %g offload %s", *args.a, *args.b, args.delay * 1e3, args.loss, offload)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # whoever read "ready" may go away; never write to its pipe again
    os.close(devnull)
    fwd.run(wake_r)
    log.info("stopped: %s", fwd.stats())
    os.close(fd_a)
    os.close(fd_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
