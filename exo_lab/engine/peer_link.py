"""TCP sockets between ranks: a tensor group's all-reduces, a pipeline's hidden states between neighbours.

A tensor pair sums two partial results twice per layer. Through MLX's ring backend each sum is a trip
through three threads on each side (on this project's 2-core machine ~150-180 us for 8 KB, where a plain
socket exchange takes ~20 us; :mod:`exo_lab.cluster.collective`), 32 times per llama-1b decode step. A
:class:`PeerLink` is one socket between the two ranks over which ``peer_sum.cpp`` (:mod:`exo_lab.native`)
exchanges and adds on the stream's own thread: the same bits as the ring's sum of two.

:func:`open_link` is a collective over the world group: every rank calls it, the lower rank of each pair
listens on its hostfile address and publishes the port and a one-time token through one ``all_sum``, the
higher connects and presents the token, and a second ``all_sum`` makes every rank agree: links everywhere
they were wanted, or none (each pair's ranks must sum the same way). ``EXO_LAB_PEER_LINK=0`` keeps the ring.
:func:`route_tensor_all_reduces` points the tensor-sharded linears (:mod:`mlx.nn.layers.distributed`) at the
link, and with them the split embedding's sum and the split head's gather of the logits (:mod:`exo_lab.engine.vocab`,
``peer_gather``: the ring's bytes, without its threads); a 2-rank instance's
:class:`~exo_lab.engine.lockstep.Lockstep` sums each step's shared vector (int32) over it too.

Every instance of more than one rank links its ranks along its stages' ranks in order (``Layout.chain``,
:func:`open_chain`), whose neighbours are the ranks that exchange: a pair's two ranks, and a stage's last rank
and the next stage's first. Hidden states go between stages over the links (``peer_send``/``peer_recv``), and
each step's shared vector goes along the chain and back (:func:`chain_sum`). Waiting for another rank, a rank
sleeps in ``poll()``, where the ring's socket thread would spin on a core for the whole wait.

A one-stage tensor group of more than two ranks sums along its chain too (:class:`ChainLinks`): a decode step's
all-reduces, its logits' gather and its shared vector, the same bits on every rank (the last rank's sum in rank
order), up to ``defaults.CHAIN_MAX_BYTES``; larger sums (a prompt's) go round the ring, whose hops carry a share
of the bytes. On a host with fewer cores than ranks the ring's spinning socket threads had each rank wait for
the others' time slices: a tiny model over four tensor ranks on two cores took 10-22 s for 32 tokens, 0.4-0.5 s
along the chain; as a pipeline of two tensor pairs (whose stages and step vectors went round the ring) 5.4-5.9
s, and 0.34-0.41 s.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from exo_lab import defaults, native
from exo_lab.engine.trace import CoreWith

log = logging.getLogger(__name__)

#: seconds the pair's ranks get to connect
CONNECT_TIMEOUT_S = 30.0
#: the dtypes the native sum adds
SUMMABLE = (mx.float32, mx.bfloat16, mx.float16, mx.int32)
CHAIN_MAX_BYTES = defaults.CHAIN_MAX_BYTES


def module() -> Any:
    """The checked ``peer_sum`` extension, or None (not built here, or not this MLX's ABI)."""
    return native.checked_extension("peer_sum", _check, "MLX's ring")


def _check(ext: Any) -> None:
    """One sum over a socket pair, the peer's bytes written ahead."""
    a, b = socket.socketpair()
    with a, b:
        mine = mx.arange(6, dtype=mx.float32) / 3
        theirs = mx.arange(6, dtype=mx.float32) * 7
        b.sendall(np.array(theirs).tobytes())
        got = ext.peer_sum(mine, a.fileno())
        mx.eval(got)
        assert b.recv(mine.nbytes, socket.MSG_WAITALL) == np.array(mine).tobytes(), "sent other bytes"
        assert mx.array_equal(got, mine + theirs).item(), "not the sum"
        b.sendall(np.array(theirs).tobytes())
        got = ext.peer_gather(mine.reshape(2, 3), a.fileno(), False)
        mx.eval(got)
        assert b.recv(mine.nbytes, socket.MSG_WAITALL) == np.array(mine).tobytes(), "gathered, sent other bytes"
        assert mx.array_equal(got, mx.concatenate([theirs, mine]).reshape(4, 3)).item(), "not the gather"


@dataclass
class PeerLink:
    """A connected socket to the pair's other rank."""

    sock: socket.socket
    peer: int
    size: ClassVar[int] = 2  # the ranks its sums add

    def sum(self, x: mx.array) -> mx.array:
        """``x`` plus the peer's ``x`` (the same bits on both ranks); both must call it alike."""
        return module().peer_sum(x, self.sock.fileno())

    def gather(self, x: mx.array, first: bool) -> mx.array:
        """The pair's ``x`` concatenated along the first axis in rank order (``first``: this rank's comes first),
        as ``mx.distributed.all_gather`` over the pair; both must call it alike."""
        return module().peer_gather(x, self.sock.fileno(), first)

    def send(self, x: mx.array) -> mx.array:
        """``x``, its bytes sent to the peer when evaluated (as ``mx.distributed.send``); the peer reads them with :meth:`recv`."""
        return module().peer_send(x, self.sock.fileno())

    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, after: Sequence[mx.array] = ()) -> mx.array:
        """The array the peer sends next (:meth:`send`), read when evaluated (as ``mx.distributed.recv``), after
        the arrays in ``after``."""
        return module().peer_recv(list(shape), dtype, self.sock.fileno(), list(after))

    def close(self) -> None:
        self.sock.close()


def hostfile_address(rank: int, env: Mapping[str, str] | None = None) -> str | None:
    """The IP address of ``rank`` in the ring's hostfile (``MLX_HOSTFILE``), or None."""
    path = (os.environ if env is None else env).get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        host = str(json.loads(Path(path).read_text())[rank][0]).rsplit(":", 1)[0]
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return None
    return host.strip("[]")


def _wanted(peer: int | None) -> bool:
    return peer is not None and defaults.peer_link() and mx.default_device() == mx.cpu and module() is not None


def open_link(group: mx.distributed.Group, peer: int | None) -> PeerLink | None:
    """The link to ``peer`` (this rank's pair partner; None: none), or None where the ring stays.

    A collective over ``group``: every rank calls it, each with its own partner or None."""
    rank, world = group.rank(), group.size()
    want = _wanted(peer)
    listener: socket.socket | None = None
    token = secrets.randbits(31)
    offer = [0] * (3 * world)  # per rank: listening port, token, wants a link
    offer[3 * rank + 2] = int(want)
    if want and peer is not None and rank < peer:
        host = hostfile_address(rank)
        try:
            listener = socket.create_server((host or "127.0.0.1", 0))
            offer[3 * rank : 3 * rank + 2] = [listener.getsockname()[1], token]
        except OSError as err:
            log.warning("no peer link: cannot listen on %s (%s)", host, err)
            offer[3 * rank + 2] = 0
    offers = [int(v) for v in np.array(mx.distributed.all_sum(mx.array(offer, mx.int32), group=group))]
    paired = peer is not None and bool(offers[3 * rank + 2]) and bool(offers[3 * peer + 2])
    link = None
    if paired:
        assert peer is not None
        try:
            link = _accept(listener, token, peer) if rank < peer else _connect(peer, offers[3 * peer : 3 * peer + 2])
        except OSError as err:
            log.warning("no peer link to rank %d: %s", peer, err)
    if listener is not None:
        listener.close()
    failed = mx.array([int(paired and link is None)], mx.int32)
    if mx.distributed.all_sum(failed, group=group).item():
        if link is not None:
            link.close()
        log.warning("a pair's link failed to connect: every pair sums through MLX's ring")
        return None
    if link is not None:
        log.info("rank %d: messages over a socket of our own", peer)
    return link


def open_chain(group: mx.distributed.Group, chain: Sequence[int]) -> dict[int, PeerLink]:
    """Links between neighbours of ``chain`` (an instance's ranks, stage by stage: ``Layout.chain``), by peer rank.

    A collective over ``group``, two :func:`open_link` rounds: the boundaries after even positions, then after
    odd ones. All of them, or none (each round agrees everywhere; a failed round closes the first's too)."""
    i = chain.index(group.rank())
    links: dict[int, PeerLink] = {}
    for parity in (0, 1):
        j = i + 1 if (i - parity) % 2 == 0 else i - 1
        partner = chain[j] if 0 <= j < len(chain) else None
        link = open_link(group, partner)
        wanted = mx.array([int(partner is not None), int(link is not None)], mx.int32)
        counts = [int(v) for v in np.array(mx.distributed.all_sum(wanted, group=group))]
        if counts[0] != counts[1]:  # every wanted link opened, or the chain stays on the ring
            for opened in [*links.values(), *([link] if link else [])]:
                opened.close()
            return {}
        if link is not None:
            links[link.peer] = link
    return links


def chain_sum(x: mx.array, before: PeerLink | None, after: PeerLink | None) -> mx.array:
    """``x`` summed over a chain of ranks (this rank's links to the one before and after it, None at the ends):
    partial sums go forward to the last rank, the total comes back. Exact for integers (int32: the steps'
    shared vectors); every rank calls it alike."""
    part = x if before is None else x + before.recv(x.shape, x.dtype)
    total = part
    if after is not None:
        total = after.recv(x.shape, x.dtype, after=[after.send(part)])
    if before is not None:
        (total,) = mx.depends([total], [before.send(total)])
    return total


def _accept(listener: socket.socket | None, token: int, peer: int) -> PeerLink:
    if listener is None:
        raise OSError("not listening")
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        listener.settimeout(max(0.01, deadline - time.monotonic()))
        sock, _ = listener.accept()  # socket.timeout (an OSError) once the time is up
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            presented = sock.recv(4, socket.MSG_WAITALL)
        except OSError:
            presented = b""
        if presented == token.to_bytes(4, "big"):
            return _ready(sock, peer)
        sock.close()  # not our peer: keep waiting for it


def _connect(peer: int, port_token: list[int]) -> PeerLink:
    port, token = port_token
    host = hostfile_address(peer) or "127.0.0.1"
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.sendall(token.to_bytes(4, "big"))
    return _ready(sock, peer)


def _ready(sock: socket.socket, peer: int) -> PeerLink:
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return PeerLink(sock, peer)


class LinkedDistributed:
    """``mlx.core.distributed`` whose ``all_sum`` and ``all_gather`` over the tensor group go through this rank's
    own sockets: a pair's :class:`PeerLink`, or a larger group's :class:`ChainLinks` for sums of up to
    :data:`CHAIN_MAX_BYTES` (larger ones, a prompt's, go round MLX's ring, which moves fewer bytes a hop)."""

    def __init__(self, real: Any, links: PeerLink | ChainLinks) -> None:
        self._real = real
        self._links = links

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def all_sum(self, x: Any, *, group: Any = None, stream: Any = None) -> Any:
        pair = isinstance(self._links, PeerLink)
        ours = group is None or group.size() == self._links.size
        if x.dtype in SUMMABLE and stream is None and ours and (pair or x.nbytes <= CHAIN_MAX_BYTES):
            return self._links.sum(x)
        return self._real.all_sum(x, group=group, stream=stream)

    def all_gather(self, x: Any, *, group: Any = None, stream: Any = None) -> Any:
        """A pair's gather over its socket (the same bytes as MLX's); a larger group's of up to
        :data:`CHAIN_MAX_BYTES` in all along its chain: each rank's ``x`` in its own slot of zeros, summed (adding
        zeros leaves every value as it was); else MLX's."""
        ours = group is None or group.size() == self._links.size
        if isinstance(self._links, PeerLink) and ours and stream is None and x.ndim > 0:
            return self._links.gather(x, (group or self._real.init()).rank() == 0)
        chain = isinstance(self._links, ChainLinks)
        if chain and ours and x.dtype in SUMMABLE and stream is None and x.nbytes * self._links.size <= CHAIN_MAX_BYTES:
            rank, k = (group or self._real.init()).rank(), self._links.size
            zeros = mx.zeros_like(x)
            slots = mx.concatenate([x if i == rank else zeros for i in range(k)], axis=0)
            return self._links.sum(slots)
        return self._real.all_gather(x, group=group, stream=stream)


@dataclass
class ChainLinks:
    """A tensor group of more than two ranks linked along a chain (:func:`open_chain` over its ranks): this
    rank's links to the ranks before and after it (None at the ends)."""

    before: PeerLink | None
    after: PeerLink | None
    size: int

    @classmethod
    def of(cls, links: Mapping[int, PeerLink], chain: Sequence[int], rank: int) -> ChainLinks:
        i = chain.index(rank)
        return cls(
            links.get(chain[i - 1]) if i > 0 else None,
            links.get(chain[i + 1]) if i + 1 < len(chain) else None,
            len(chain),
        )

    def sum(self, x: mx.array) -> mx.array:
        """``x`` summed over the chain (:func:`chain_sum`): every rank gets the last rank's bits."""
        return chain_sum(x, self.before, self.after)


def route_tensor_all_reduces(links: PeerLink | ChainLinks) -> None:
    """The tensor-sharded linears' all-reduces go through ``links`` (a rank of a tensor group calls it once,
    before :func:`exo_lab.engine.trace.trace_tensor_all_reduces`)."""
    import mlx.nn.layers.distributed as layers

    layers.mx = CoreWith(layers.mx, LinkedDistributed(layers.mx.distributed, links))  # pyright: ignore[reportAttributeAccessIssue]
