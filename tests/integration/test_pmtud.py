"""Path MTU discovery on loopback (real nodes, real aioquic): packets grow from 1200 bytes to the cap once
the handshake is done, datagrams with them, and what a peer's Hello accepts is what its largest packet
carries. The fall back on a black hole runs in tests/netns/test_pmtud.py (a path that drops large packets)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from meshkit import make_mesh
from quicmesh import Node
from quicmesh.errors import DatagramTooLargeError, UnknownPeerError
from quicmesh.runtime.datagrams import DATAGRAM_PACKET_OVERHEAD
from quicmesh.transport.pmtud import DEFAULT_CAP


async def grown_limit(node: Node, peer: str, wanted: int, timeout: float = 10.0) -> int:
    """The datagram limit to ``peer`` once it reached ``wanted`` (or what it was at the deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (limit := node.features.datagram_limit(peer)) < wanted and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return limit


async def test_packets_and_datagrams_grow_to_the_cap_on_loopback(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    alpha, beta = Node(configs["alpha"]), Node(configs["beta"])
    await alpha.start()
    await beta.start()
    try:
        await alpha.wait_connected(timeout=10)
        await beta.wait_connected(timeout=10)
        start = 1200 - DATAGRAM_PACKET_OVERHEAD
        assert alpha.max_datagram_payload == start  # the size every path carries, from the first packet
        await asyncio.sleep(0.5)
        assert alpha.features.datagram_limit("beta") == start + 1  # no probing before packets fill up
        assert alpha.datagram_limit("beta") == start
        # Traffic that fills packets starts the search, each way on its own.
        await asyncio.wait_for(alpha.send("beta", bytes(50_000)), 10)
        await asyncio.wait_for(beta.send("alpha", bytes(50_000)), 10)
        assert len((await asyncio.wait_for(beta.recv(), 5)).data) == 50_000
        assert len((await asyncio.wait_for(alpha.recv(), 5)).data) == 50_000
        wanted = DEFAULT_CAP - DATAGRAM_PACKET_OVERHEAD + 1  # datagram_limit counts the kind byte
        assert await grown_limit(alpha, "beta", wanted) == wanted
        assert await grown_limit(beta, "alpha", wanted) == wanted
        assert alpha.datagram_limit("beta") == wanted - 1 == beta.datagram_limit("alpha")
        with pytest.raises(UnknownPeerError):
            alpha.datagram_limit("nobody")
        payload = os.urandom(wanted - 1)
        alpha.send_datagram("beta", payload)
        item = await asyncio.wait_for(beta.recv(), 5)
        assert (item.peer, item.kind, item.data) == ("alpha", "datagram", payload)
        with pytest.raises(DatagramTooLargeError):
            alpha.send_datagram("beta", payload + b"x")
        # Reliable messages ride the larger packets too.
        message = os.urandom(200_000)
        await asyncio.wait_for(beta.send("alpha", message), 10)
        item = await asyncio.wait_for(alpha.recv(), 5)
        assert item.data == message
    finally:
        await alpha.stop()
        await beta.stop()
