"""Reach ports inside host namespaces from the root namespace, over loopback.

A sim links the root namespace into its LAN (``SimCluster.root_address``), so
a notebook on this machine reaches every node at its own address; this relay
is the other way in, one that needs no route: the ``local_url`` of each host,
and the only one when the sim was built with ``root_link=False``. It listens
on ``127.0.0.1:<free port>`` in the root namespace and, for every connection,
connects to ``127.0.0.1:PORT`` *inside* the host's namespace (the socket is
made after ``setns``) and copies bytes both ways. Only the node's own port is
relayed: workers started by a launch are reached over the root's link.

Run it as::

    python -m exo_lab.sim.portmap NS:PORT [NS:PORT ...]

It prints one JSON line, the local port for each target in order, then serves
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from exo_lab.sim import netns

log = logging.getLogger(__name__)

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _connect_in(ns: str, port: int) -> socket.socket:
    with netns.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        if sock.getsockname() == sock.getpeername():  # took the port itself before the node listens on it
            raise ConnectionRefusedError(f"nothing listens on port {port} yet (the connection met itself)")
    except OSError:
        sock.close()
        raise
    return sock


def _handler(ns: str, port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await _connect_in(ns, port)
        except OSError as exc:
            log.debug("%s:%d: %s", ns, port, exc)
            writer.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r2, w2 = await asyncio.open_connection(sock=sock)
        try:
            await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
        finally:
            w2.close()
            writer.close()

    return handle


async def serve(targets: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = [await asyncio.start_server(_handler(ns, port), host, 0) for ns, port in targets]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # whoever read the ports may go away
    os.close(devnull)
    await stop.wait()
    for s in servers:
        s.close()


def _target(text: str) -> tuple[str, int]:
    ns, sep, port = text.rpartition(":")
    if not sep or not ns or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write a target as NAMESPACE:PORT")
    return ns, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exo_lab.sim.portmap", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("targets", nargs="+", type=_target, help="NAMESPACE:PORT to reach")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s portmap %(levelname)s %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(serve(args.targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
