"""mDNS: advertise this node as ``_exo-lab._tcp.local.`` and browse for peers.

The advertisement carries the node id, ports, name and the cluster key's
fingerprint (never the key). Services with another fingerprint are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zeroconf import DNSQuestionType, IPVersion, ServiceBrowser, ServiceListener, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_exo-lab._tcp.local."


@dataclass(frozen=True)
class Advert:
    """What a peer's mDNS record says."""

    id: str
    name: str
    addresses: tuple[str, ...]
    port: int
    probe_port: int
    fingerprint: str


def _decode(props: dict[bytes, bytes | None]) -> dict[str, str]:
    return {k.decode(): (v or b"").decode() for k, v in props.items()}


class Discovery:
    """Advertise one node and report peers with the same key fingerprint."""

    def __init__(
        self,
        node_id: str,
        name: str,
        addresses: list[str],
        port: int,
        probe_port: int,
        fingerprint: str,
        on_found: Callable[[Advert], Awaitable[None]],
        on_lost: Callable[[str], Awaitable[None]],
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.addresses = addresses
        self.port = port
        self.probe_port = probe_port
        self.fingerprint = fingerprint
        self.on_found = on_found
        self.on_lost = on_lost
        self.zc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self.info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.port,
            properties={
                "id": self.node_id,
                "name": self.name,
                "probe_port": str(self.probe_port),
                "fp": self.fingerprint,
                "v": "1",
            },
            server=f"exo-lab-{self.node_id}.local.",
        )
        await self.zc.async_register_service(self.info)
        self.browser = AsyncServiceBrowser(self.zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        task = asyncio.ensure_future(self._handle(service_type, name, state_change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, service_type: str, name: str, change: ServiceStateChange) -> None:
        peer_id = name.split(".", 1)[0]
        if peer_id == self.node_id:
            return
        if change is ServiceStateChange.Removed:
            await self.on_lost(peer_id)
            return
        assert self.zc is not None  # _on_change is registered by start() after it sets zc, never unset
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.zc.zeroconf, 3000):
            return
        props = _decode(info.properties)
        if props.get("fp") != self.fingerprint:
            log.info("ignoring %s: it belongs to another cluster (key fingerprint differs)", name)
            return
        advert = Advert(
            id=props.get("id", peer_id),
            name=props.get("name", peer_id),
            addresses=tuple(info.parsed_addresses(IPVersion.V4Only)),
            port=info.port or 0,
            probe_port=int(props.get("probe_port") or 0),
            fingerprint=props["fp"],
        )
        await self.on_found(advert)

    async def stop(self) -> None:
        if self.browser is not None:
            await self.browser.async_cancel()
        if self.zc is not None:
            if self.info is not None:
                await self.zc.async_unregister_service(self.info)
            await self.zc.async_close()
        for task in list(self._tasks):
            task.cancel()


def browse(timeout: float = 3.0, key_fingerprint: str | None = None) -> list[str]:
    """``host:port`` of every agent that answers mDNS within ``timeout`` seconds (with this key
    fingerprint when given), one reachable address each (a node may list addresses we cannot route to)."""
    names: set[str] = set()
    zc = Zeroconf(ip_version=IPVersion.V4Only)

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            names.add(name)

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            names.add(name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            names.discard(name)

    # multicast questions (QM): answers reach this process even when an agent on the same
    # host holds the mDNS port, which would swallow unicast (QU) answers
    browser = ServiceBrowser(zc, SERVICE_TYPE, Listener(), question_type=DNSQuestionType.QM)
    time.sleep(timeout)
    browser.cancel()
    found: dict[str, str] = {}
    try:
        for name in sorted(names):  # resolve after browsing, so a slow answer does not hide the others
            info = zc.get_service_info(SERVICE_TYPE, name, 3000, question_type=DNSQuestionType.QM)
            if info is None or info.port is None:
                continue
            props = _decode(info.properties)
            if key_fingerprint and props.get("fp") != key_fingerprint:
                continue
            reachable = first_reachable(info.parsed_addresses(IPVersion.V4Only), info.port)
            if reachable:
                found[props.get("id", name)] = reachable
    finally:
        zc.close()
    return sorted(found.values())


def first_reachable(addresses: list[str], port: int, timeout: float = 0.5) -> str | None:
    """The first ``address:port`` that accepts a TCP connection."""
    for address in addresses:
        try:
            with socket.create_connection((address, port), timeout=timeout):
                return f"{address}:{port}"
        except OSError:
            continue
    return None
