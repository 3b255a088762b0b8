"""A loopback UDP relay that can cut or thin the path between two nodes: a real network fault."""

from __future__ import annotations

import asyncio
import random


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client: tuple[str, int]) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.relay.passes():
            assert self.relay.listener is not None
            self.relay.listener.sendto(data, self.client)


class UdpRelay(asyncio.DatagramProtocol):
    """Listens on 127.0.0.1:<port> and relays each client's packets to ``target`` through its own socket.

    ``cut = True`` drops everything both ways; ``loss`` (0..1) drops that share at random.
    """

    def __init__(self, target: tuple[str, int], seed: int = 1) -> None:
        self.target = target
        self.cut = False
        self.loss = 0.0
        self.dropped = 0
        self._random = random.Random(seed)
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self.listener: asyncio.DatagramTransport | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.listener, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self.listener.get_extra_info("sockname")[1]

    def passes(self) -> bool:
        if self.cut or (self.loss and self._random.random() < self.loss):
            self.dropped += 1
            return False
        return True

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        upstream = self._upstreams.get(addr)
        if upstream is None:
            upstream = _Upstream(self, addr)
            self._upstreams[addr] = upstream
            asyncio.ensure_future(self._open(upstream, data))
            return
        if upstream.transport is not None and self.passes():
            upstream.transport.sendto(data, self.target)

    async def _open(self, upstream: _Upstream, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: upstream, local_addr=("127.0.0.1", 0))
        if upstream.transport is not None and self.passes():
            upstream.transport.sendto(first, self.target)

    def close(self) -> None:
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        if self.listener is not None:
            self.listener.close()
