"""Per-peer and node-wide memory limits (issue 8): what one peer can make a node hold stays bounded,
a peer that ignores its window is cut off, and a peer with the same limits never is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshkit import make_mesh, with_limits
from quicmesh import Node, RemoteError
from quicmesh.config import Config
from quicmesh.ops.metrics import render

KIB = 1024


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Config]:
    return make_mesh(tmp_path / "mesh", ["alpha", "beta", "gamma"])


def counters(node: Node, peer: str) -> dict[str, int]:
    return next(p.counters for p in node.peers() if p.name == peer)


async def started(*nodes: Node) -> None:
    for node in nodes:
        await node.start()
    for node in nodes:
        await node.wait_connected([other.name for other in nodes if other is not node], timeout=10)


async def test_a_peer_that_ignores_its_window_is_cut_off_and_others_keep_talking(
    configs: dict[str, Config],
) -> None:
    # beta holds at most 64 KiB for one peer and reads nothing from alpha; alpha sends as if beta
    # allowed 64 MiB (its own default), i.e. it keeps far more unacknowledged than beta can hold.
    beta_config = with_limits(configs["beta"], max_peer_buffer=64 * KIB, max_message_size=16 * KIB,
                              max_inbox_bytes=16 * KIB)
    alpha = Node(with_limits(configs["alpha"], message_window=120))
    beta, gamma = Node(beta_config), Node(configs["gamma"])
    try:
        await started(alpha, beta, gamma)
        disconnected = asyncio.get_running_loop().create_future()

        async def watch() -> None:
            async for event in alpha.events():
                if event.peer == "beta" and event.kind == "disconnected":
                    disconnected.set_result(event.reason)
                    return

        watcher = asyncio.create_task(watch())
        sends = [asyncio.create_task(alpha.send("beta", bytes(10 * KIB))) for _ in range(60)]
        async with asyncio.timeout(10):
            reason = await disconnected
        assert "max_peer_buffer" in reason
        assert counters(beta, "alpha")["limit_closes"] >= 1
        # gamma <-> beta is untouched: a message each way, acknowledged.
        await gamma.send("beta", b"still here")
        await beta.send("gamma", b"and here")
        async with asyncio.timeout(5):
            got = await gamma.recv()
        assert got.data == b"and here"
        for task in (*sends, watcher):
            task.cancel()
        await asyncio.gather(*sends, watcher, return_exceptions=True)
    finally:
        for node in (alpha, beta, gamma):
            await node.stop()


async def test_a_peer_with_the_same_limits_is_slowed_down_not_cut_off(configs: dict[str, Config]) -> None:
    # The same small limits on both sides: alpha keeps at most 32 KiB unacknowledged, so beta, whose
    # application reads nothing for a while, holds it all and never closes the connection.
    small = {"max_peer_buffer": 64 * KIB, "max_message_size": 16 * KIB, "max_inbox_bytes": 16 * KIB,
             "message_window": 120}
    alpha, beta = Node(with_limits(configs["alpha"], **small)), Node(with_limits(configs["beta"], **small))
    count = 60
    try:
        await started(alpha, beta)
        sending = asyncio.gather(*(alpha.send("beta", i.to_bytes(4, "big") * (2 * KIB + 512))
                                   for i in range(count)))
        await asyncio.sleep(0.5)  # beta's application is busy: its inbox fills, messages wait unacked
        assert not sending.done()
        received = []
        async with asyncio.timeout(20):
            while len(received) < count:
                received.append(await beta.recv())
            await sending
        assert sorted(int.from_bytes(item.data[:4], "big") for item in received) == list(range(count))
        assert counters(beta, "alpha")["limit_closes"] == 0
        assert beta.connected_peers() == ["alpha"]
    finally:
        await alpha.stop()
        await beta.stop()


async def test_the_inbox_is_bounded_in_bytes(configs: dict[str, Config]) -> None:
    beta = Node(with_limits(configs["beta"], max_inbox_bytes=10_000))
    alpha = Node(configs["alpha"])
    try:
        await started(alpha, beta)
        payload = bytes(1000)
        async with asyncio.timeout(5):  # (a datagram sent on a duplicate connection as it closes is lost)
            while counters(beta, "alpha")["datagrams_in"] < 30:
                alpha.send_datagram("beta", payload)
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        arrived = counters(beta, "alpha")["datagrams_in"]
        held = []
        while True:
            try:
                async with asyncio.timeout(0.2):
                    held.append(await beta.recv())
            except TimeoutError:
                break
        assert len(held) == 10  # 10 x 1000 B reach the 10,000 B bound: the rest were dropped
        dropped = counters(beta, "alpha")
        assert dropped["datagrams_dropped"] == dropped["datagrams_dropped_inbox_full"] == arrived - 10
        assert f'quicmesh_datagrams_dropped_total{{peer="alpha",reason="inbox_full"}} {arrived - 10}' in render(beta)
    finally:
        await alpha.stop()
        await beta.stop()


async def test_requests_over_the_peer_buffer_are_refused_not_the_connection(configs: dict[str, Config]) -> None:
    beta = Node(with_limits(configs["beta"], max_peer_buffer=64 * KIB, max_message_size=32 * KIB))
    alpha = Node(with_limits(configs["alpha"], max_message_size=32 * KIB))

    async def echo(peer: str, data: bytes) -> bytes:
        return data[:4]

    beta.set_request_handler(echo)
    try:
        await started(alpha, beta)
        # Eight 30 KiB requests at once: their bodies arrive interleaved, over 64 KiB in progress.
        results = await asyncio.gather(*(alpha.request("beta", bytes([i]) * 30 * KIB) for i in range(8)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, RemoteError)]
        answered = [r for r in results if isinstance(r, bytes)]
        assert refused and all("max_peer_buffer" in str(r) for r in refused), results
        assert len(answered) + len(refused) == 8, results
        assert counters(beta, "alpha")["requests_refused"] == len(refused)
        assert beta.connected_peers() == ["alpha"]
        assert await alpha.request("beta", b"one more") == b"one "
    finally:
        await alpha.stop()
        await beta.stop()
