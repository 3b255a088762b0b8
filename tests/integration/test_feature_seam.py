"""The feature seam end to end: two real Nodes on 127.0.0.1 — feature messages (accepted, accepted once
an awaitable completes, refused with the handler's reason, no feature for the tag), feature requests,
peer_ready / peer_lost from the real connection events, and Node.ping."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from meshkit import make_mesh

from quicmesh import Node
from quicmesh.errors import PeerNotConnectedError, RemoteError, UnknownPeerError
from quicmesh.runtime.features import FeatureBase

# Tags no built-in feature owns (the node plugs its own features in: pub/sub, durable, relay...).
TAG = 0x3E
UNOWNED = 0x3F


class Echo(FeatureBase):
    """Accepts messages (slowly for b"slow", refusing b"bad") and echoes requests."""

    feature_tags = frozenset({TAG})

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.slow_done_at: float | None = None
        self.events: list[tuple[str, str]] = []

    def peer_ready(self, peer: str, epoch: int) -> None:
        self.events.append(("ready", peer))

    def peer_lost(self, peer: str, reason: str) -> None:
        self.events.append(("lost", peer))

    def message_received(self, peer: str, tag: int, data: bytes):  # noqa: ANN201 - None or an awaitable
        self.got.append(data)
        if data == b"slow":
            async def later() -> None:
                await asyncio.sleep(0.2)
                self.slow_done_at = time.monotonic()
            return later()
        if data == b"bad":
            raise ValueError("no thanks")
        return None

    def request_received(self, peer: str, tag: int, data: bytes):  # noqa: ANN201 - bytes or an awaitable
        if data == b"async":
            async def later() -> bytes:
                await asyncio.sleep(0.01)
                return b"later:" + peer.encode()
            return later()
        if data == b"fail":
            raise KeyError("missing")
        return b"echo:" + data


async def test_feature_messages_requests_and_ping_between_real_nodes(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path, ["alpha", "beta"])
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(timeout=10)
        await beta.wait_connected(timeout=10)
        echo = Echo()
        beta.features.add(echo)
        assert echo.events == [("ready", "alpha")]  # already connected when it was added

        rtt = await alpha.ping("beta")
        assert 0 < rtt < 1.0

        await alpha.features.send_message("beta", TAG, b"x")
        await alpha.features.send_message("beta", TAG, b"slow")
        assert echo.slow_done_at is not None and echo.slow_done_at <= time.monotonic()  # acked after completion
        with pytest.raises(RemoteError, match="refused the message: ValueError: no thanks"):
            await alpha.features.send_message("beta", TAG, b"bad")
        with pytest.raises(RemoteError, match=f"no feature for tag {UNOWNED}"):
            await alpha.features.send_message("beta", UNOWNED, b"nobody")
        assert echo.got == [b"x", b"slow", b"bad"]

        assert await alpha.features.request("beta", TAG, b"q") == b"echo:q"
        assert await alpha.features.request("beta", TAG, b"async") == b"later:alpha"
        with pytest.raises(RemoteError, match="KeyError: 'missing'"):
            await alpha.features.request("beta", TAG, b"fail")
        with pytest.raises(RemoteError, match=f"peer has no feature for tag {UNOWNED}"):
            await alpha.features.request("beta", UNOWNED, b"q")

        with pytest.raises(UnknownPeerError):
            await alpha.ping("gamma")


async def test_features_hear_of_peers_lost_and_back(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path, ["alpha", "beta"])
    async with Node(configs["alpha"]) as alpha:
        echo = Echo()
        alpha.features.add(echo)
        async with Node(configs["beta"]):
            await alpha.wait_connected(timeout=10)
            assert echo.events == [("ready", "beta")]
        async with asyncio.timeout(10):
            while ("lost", "beta") not in echo.events:
                await asyncio.sleep(0.02)
        with pytest.raises(PeerNotConnectedError):
            await alpha.ping("beta")
        async with Node(configs["beta"]):
            await alpha.wait_connected(timeout=10)
            assert echo.events[-1] == ("ready", "beta")
            assert await alpha.ping("beta") > 0
