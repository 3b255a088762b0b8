"""Real nodes on 127.0.0.1: real aioquic connections, real certificates, real faults on the path."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from meshkit import make_mesh, with_limits, with_timers
from quicmesh import (
    DatagramTooLargeError,
    MessageTooLargeError,
    Node,
    PeerNotConnectedError,
    RemoteError,
    RequestTimeoutError,
    UnknownPeerError,
)
from quicmesh.config import Address
from udpproxy import UdpRelay

NAMES = ["alpha", "beta", "gamma"]


async def drain(node: Node, count: int, timeout: float = 10.0) -> list:
    items = []
    async with asyncio.timeout(timeout):
        while len(items) < count:
            items.append(await node.recv())
    return items


@pytest.fixture
async def mesh3(tmp_path: Path):
    configs = make_mesh(tmp_path / "mesh", NAMES)
    nodes = {name: Node(config) for name, config in configs.items()}
    try:
        for node in nodes.values():
            await node.start()
        for node in nodes.values():
            await node.wait_connected(timeout=10)
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop()


async def test_three_nodes_converge_and_traffic_flows_every_way(mesh3: dict[str, Node]) -> None:
    for node in mesh3.values():
        node.set_request_handler(lambda peer, data, me=node.name: _echo(me, data))
    for sender in mesh3.values():
        for receiver in mesh3.values():
            if sender is receiver:
                continue
            sender.send_datagram(receiver.name, b"dgram from " + sender.name.encode())
            await sender.send(receiver.name, b"msg from " + sender.name.encode())
            reply = await sender.request(receiver.name, b"ping", timeout=5)
            assert reply == f"{receiver.name} got ping".encode()
    for receiver in mesh3.values():
        got = {(item.peer, item.kind, item.data) for item in await drain(receiver, 4)}
        others = [name for name in NAMES if name != receiver.name]
        assert got == {
            *((peer, "datagram", b"dgram from " + peer.encode()) for peer in others),
            *((peer, "message", b"msg from " + peer.encode()) for peer in others),
        }
    status = {peer.name: peer for peer in mesh3["alpha"].peers()}
    assert {peer.state for peer in status.values()} == {"connected"}
    assert status["beta"].counters["messages_out"] == 1
    assert status["beta"].counters["requests_out"] == 1
    assert status["beta"].rtt is not None and status["beta"].fingerprint.startswith("sha256:")


async def _echo(me: str, data: bytes) -> bytes:
    return f"{me} got ".encode() + data


async def test_request_errors_are_typed(mesh3: dict[str, Node]) -> None:
    alpha = mesh3["alpha"]
    with pytest.raises(RemoteError, match="no request handler"):
        await alpha.request("beta", b"x")

    async def failing(peer: str, data: bytes) -> bytes:
        raise ValueError("bad request body")

    async def slow(peer: str, data: bytes) -> bytes:
        await asyncio.sleep(5)
        return b"late"

    mesh3["beta"].set_request_handler(failing)
    with pytest.raises(RemoteError, match="ValueError: bad request body"):
        await alpha.request("beta", b"x")
    mesh3["beta"].set_request_handler(slow)
    with pytest.raises(RequestTimeoutError):
        await alpha.request("beta", b"x", timeout=0.2)
    with pytest.raises(UnknownPeerError):
        await alpha.request("nobody", b"x")


async def test_oversized_datagram_fails_at_once_and_later_datagrams_flow(mesh3: dict[str, Node]) -> None:
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    limit = alpha.max_datagram_payload
    assert limit == 1169  # max_datagram_size 1200
    with pytest.raises(DatagramTooLargeError, match="max_datagram_payload"):
        alpha.send_datagram("beta", b"x" * (limit + 1))
    for index in range(20):
        alpha.send_datagram("beta", bytes([index]) * limit)  # the largest allowed payload, repeatedly
    received = await drain(beta, 20, timeout=5)
    assert sorted(item.data[0] for item in received) == list(range(20))
    assert all(len(item.data) == limit for item in received)


async def test_a_burst_of_datagrams_of_every_size_is_packed_into_batches_and_arrives_intact(
    mesh3: dict[str, Node],
) -> None:
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    limit = alpha.max_datagram_payload
    edge = [0, 1, 61, 62, 63, 64, 65, 100, 1000, limit - 3, limit - 2, limit - 1, limit]
    sizes = [*edge, *((index * 37) % 300 for index in range(150)), *edge]
    frames: list[bytes] = []
    unspied = beta._datagrams.received

    def spy(state, data: bytes) -> None:  # the real receive path, counting the QUIC DATAGRAM frames
        frames.append(data)
        unspied(state, data)

    beta._datagrams.received = spy  # type: ignore[method-assign]
    for index, size in enumerate(sizes):  # one loop iteration: all of them leave at the same flush
        alpha.send_datagram("beta", (index.to_bytes(2, "big") * size)[:size] if size >= 2 else b"\xff" * size)
    received = await drain(beta, len(sizes), timeout=5)
    expected = sorted((index.to_bytes(2, "big") * size)[:size] if size >= 2 else b"\xff" * size
                      for index, size in enumerate(sizes))
    assert sorted(item.data for item in received) == expected
    assert len(frames) < len(sizes) / 3, "neighbouring datagrams were not packed into BATCH frames"
    assert max(len(frame) for frame in frames) <= limit + 1  # no frame larger than the largest single one
    counters = {peer.name: peer.counters for peer in beta.peers()}["alpha"]
    assert counters["datagrams_in"] == len(sizes)
    assert {peer.name: peer.state for peer in alpha.peers()}["beta"] == "connected"


async def test_a_reply_carries_the_ack_of_its_request(mesh3: dict[str, Node]) -> None:
    """One packet per reply: the QUIC ACK of the request rides on it.

    aioquic sends an ACK only once its 1 ms delay is due, so without quicmesh's piggyback each reply was
    followed by an ACK-only packet (one more wake-up of the requester per request).
    """
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    beta.set_request_handler(lambda peer, data: data)
    await alpha.request("beta", b"warm-up", timeout=5)
    await asyncio.sleep(0.1)  # let the warm-up's own ACKs settle
    before = beta.socket_counters()["packets_out"]
    count = 50
    for index in range(count):
        assert await alpha.request("beta", index.to_bytes(2, "big"), timeout=5) == index.to_bytes(2, "big")
        await asyncio.sleep(0.003)  # longer than the ACK delay: a separate ACK would have left by now
    sent = beta.socket_counters()["packets_out"] - before
    assert count <= sent <= count * 1.1, f"beta sent {sent} packets for {count} replies"


async def test_many_writes_in_one_turn_start_leaving_before_the_turn_ends(mesh3: dict[str, Node]) -> None:
    """Messages queued in one loop turn are flushed every 32 writes, not only when the turn ends: the peer
    starts on the first ones while the sender makes the rest (with 16 KiB packets a whole 64-message window
    went out as one packet and the two ends took turns)."""
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    got: list[bytes] = []
    beta.set_receive_handler(lambda item: got.append(item.data))
    await alpha.send("beta", b"warm-up")
    await asyncio.sleep(0.1)  # let the warm-up's ACKs settle
    before = alpha.socket_counters()["packets_out"]
    sends = [asyncio.ensure_future(alpha.send("beta", index.to_bytes(2, "big"))) for index in range(40)]
    await asyncio.sleep(0)  # the 40 sends take their first step (to the wire's queue) in the turn before us
    assert alpha.socket_counters()["packets_out"] > before, "nothing left before the end of the turn"
    await asyncio.wait_for(asyncio.gather(*sends), timeout=5)
    assert sorted(got[1:]) == [index.to_bytes(2, "big") for index in range(40)]


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
async def test_a_wildcard_listener_answers_from_the_address_it_was_dialed_at(tmp_path: Path, wildcard: str) -> None:
    """alpha listens on a wildcard address and is dialed at 127.0.0.7, one of the host's other addresses.

    The kernel would answer from 127.0.0.1 (its pick for the route back), and a QUIC client ignores a
    handshake from another address: without IP_PKTINFO beta never connects. alpha cannot dial beta here
    (a port nobody listens on), so only beta's dial can make the connection.
    """
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    alpha, beta = configs["alpha"], configs["beta"]
    port = alpha.node.listen.port
    listen = dataclasses.replace(alpha.node.listen, host=wildcard)
    nowhere = Address("127.0.0.1", 9)  # discard port: nothing answers
    alpha = dataclasses.replace(alpha, node=dataclasses.replace(alpha.node, listen=listen),
                                peers=tuple(dataclasses.replace(p, address=nowhere) for p in alpha.peers))
    beta = dataclasses.replace(beta, peers=tuple(dataclasses.replace(p, address=Address("127.0.0.7", port))
                                                 for p in beta.peers))
    async with Node(alpha) as a, Node(beta) as b:
        await b.wait_connected(timeout=5)
        a.set_request_handler(lambda peer, data: data)
        assert await b.request("alpha", b"which address?", timeout=5) == b"which address?"
        assert {peer.name: peer.remote_address for peer in b.peers()}["alpha"].startswith("127.0.0.7:")


async def test_message_size_limit_is_enforced_on_both_sides(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["beta"] = with_limits(configs["beta"], max_message_size=1000)
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(timeout=10)
        await beta.wait_connected(timeout=10)
        with pytest.raises(MessageTooLargeError, match="peer beta's max_message_size"):
            await alpha.send("beta", b"x" * 1001)
        with pytest.raises(MessageTooLargeError, match="local max_message_size"):
            await beta.send("alpha", b"x" * 1001)
        await alpha.send("beta", b"x" * 1000)
        assert (await beta.recv()).data == b"x" * 1000


async def test_api_misuse_gives_typed_errors(mesh3: dict[str, Node]) -> None:
    alpha = mesh3["alpha"]
    with pytest.raises(UnknownPeerError):
        alpha.send_datagram("nobody", b"x")
    with pytest.raises(UnknownPeerError):
        await alpha.send("nobody", b"x")
    await mesh3["gamma"].stop()
    async with asyncio.timeout(5):
        while "gamma" in alpha.connected_peers():
            await asyncio.sleep(0.05)
    with pytest.raises(PeerNotConnectedError):
        alpha.send_datagram("gamma", b"x")


async def test_broadcast_reaches_every_peer(mesh3: dict[str, Node]) -> None:
    outcome = await mesh3["alpha"].broadcast(b"to all")
    assert outcome == {"beta": None, "gamma": None}
    assert sorted(mesh3["alpha"].broadcast_datagram(b"d")) == ["beta", "gamma"]
    for name in ("beta", "gamma"):
        kinds = sorted(item.kind for item in await drain(mesh3[name], 2))
        assert kinds == ["datagram", "message"]


async def test_no_message_lost_or_duplicated_across_forced_connection_drops(tmp_path: Path) -> None:
    """2,000 acked messages while the path is cut twice: each arrives exactly once."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    relays = {}
    for here, there in (("alpha", "beta"), ("beta", "alpha")):
        relay = UdpRelay(("127.0.0.1", configs[there].node.listen.port))
        port = await relay.start()
        relays[here] = relay
        peer = dataclasses.replace(configs[here].peers[0], address=Address("127.0.0.1", port))
        configs[here] = dataclasses.replace(configs[here], peers=(peer,))
    total = 2000
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(timeout=10)
        received: Counter[bytes] = Counter()

        async def receive() -> None:
            while sum(received.values()) < total:
                received[(await beta.recv()).data] += 1

        async def cut_twice() -> None:
            for _ in range(2):
                await _wait_for(lambda: alpha.connected_peers() == ["beta"], timeout=10)
                await asyncio.sleep(0.2)
                for relay in relays.values():
                    relay.cut = True
                await _wait_for(lambda: not alpha.connected_peers(), timeout=5)  # dead_after is 1 s
                for relay in relays.values():
                    relay.cut = False

        async def send_paced() -> None:
            sends = []
            for start in range(0, total, 100):  # spread over ~2 s so both cuts hit messages in flight
                sends += [asyncio.ensure_future(alpha.send("beta", b"%d" % i)) for i in range(start, start + 100)]
                await asyncio.sleep(0.1)
            await asyncio.gather(*sends)

        receiver = asyncio.ensure_future(receive())
        events = []

        async def watch() -> None:
            async for event in alpha.events():
                events.append(event.kind)

        watcher = asyncio.ensure_future(watch())
        async with asyncio.timeout(60):
            await asyncio.gather(cut_twice(), send_paced())
            await asyncio.sleep(0.3)  # any duplicate would arrive now
        receiver.cancel()
        watcher.cancel()
        assert sum(received.values()) == total
        assert set(received) == {b"%d" % i for i in range(total)}
        assert max(received.values()) == 1
        assert events.count("disconnected") >= 2, "the cuts must really have broken the connection"
    for relay in relays.values():
        relay.close()


def _write_timers(config_path: Path, **timers: float) -> None:
    with config_path.open("a") as file:
        file.write("\n[timers]\n" + "".join(f"{key} = {value}\n" for key, value in timers.items()))


def _start_daemon(config_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "quicmesh", "run", "-c", str(config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def _wait_for(predicate, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
    return loop.time() - start


async def test_killed_peer_is_detected_and_restarted_peer_rejoins(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    beta_path = tmp_path / "mesh" / "beta" / "node.toml"
    _write_timers(beta_path, keepalive=0.2, dead_after=1.0, backoff_min=0.05, backoff_max=0.5)
    beta = _start_daemon(beta_path)
    try:
        async with Node(configs["alpha"]) as alpha:
            await alpha.wait_connected(timeout=10)
            beta.send_signal(signal.SIGKILL)
            beta.wait(5)
            detected = await _wait_for(lambda: not alpha.connected_peers(), timeout=5)
            assert detected <= 1.0 + 0.5  # dead_after plus a keepalive period of slack
            beta = _start_daemon(beta_path)
            rejoined = await _wait_for(lambda: alpha.connected_peers() == ["beta"], timeout=5)
            assert rejoined < 2.0
            await asyncio.wait_for(alpha.send("beta", b"after restart"), 5)
    finally:
        beta.kill()
        beta.wait(5)


async def test_restarted_peer_replaces_stale_connection_at_once(tmp_path: Path) -> None:
    """aioquic has no stateless reset: the restarted peer's new connection must win before dead_after."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    configs["alpha"] = with_timers(configs["alpha"], keepalive=1.0, dead_after=10.0)
    beta_path = tmp_path / "mesh" / "beta" / "node.toml"
    _write_timers(beta_path, keepalive=1.0, dead_after=10.0, backoff_min=0.05, backoff_max=0.5)
    beta = _start_daemon(beta_path)
    try:
        async with Node(configs["alpha"]) as alpha:
            await alpha.wait_connected(timeout=10)
            beta.send_signal(signal.SIGKILL)
            beta.wait(5)
            beta = _start_daemon(beta_path)
            # The old connection looks alive for 10 s; a message only gets acked by the new process.
            await asyncio.wait_for(alpha.send("beta", b"to the new process"), 4)
            assert alpha.connected_peers() == ["beta"]
    finally:
        beta.kill()
        beta.wait(5)


async def test_stopped_node_leaves_no_phantom_connection(mesh3: dict[str, Node]) -> None:
    """Peers redial at once after the GoAway; a stopping node must not complete those handshakes."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await mesh3["gamma"].stop()
    assert loop.time() - started < 0.9, "stop must not wait out its whole grace period"
    await asyncio.sleep(0.5)
    for name in ("alpha", "beta"):
        assert "gamma" not in mesh3[name].connected_peers()


async def test_received_yields_what_is_waiting_then_ends_when_the_node_stops(mesh3: dict[str, Node]) -> None:
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    for i in range(5):  # acknowledged: in beta's inbox before anyone iterates
        await alpha.send("beta", b"r%d" % i)
    alpha.send_datagram("beta", b"d")
    got: list[bytes] = []

    async def read() -> None:
        async for item in beta.received():
            got.append(item.data)

    reader = asyncio.ensure_future(read())
    for _ in range(250):  # bounded: 5 s
        if len(got) == 6:
            break
        await asyncio.sleep(0.02)
    assert sorted(got) == [b"d", b"r0", b"r1", b"r2", b"r3", b"r4"]
    await beta.stop()
    await asyncio.wait_for(reader, 5)  # the iterator ends by itself


async def test_datagram_flood_does_not_starve_messages(mesh3: dict[str, Node]) -> None:
    """aioquic writes queued datagrams before stream data; quicmesh feeds it datagrams in small bursts."""
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    payload = b"d" * 1000
    stop = asyncio.Event()

    async def flood() -> int:
        sent = 0
        for _ in range(2000):  # bounded: at most 2000 rounds of 200 datagrams
            if stop.is_set():
                break
            for _ in range(200):
                alpha.send_datagram("beta", payload)
                sent += 1
            await asyncio.sleep(0)
        return sent

    messages: list = []

    async def read() -> None:  # beta keeps reading: a full inbox would hold messages back by design
        async for item in beta.received():
            if item.kind == "message":
                messages.append(item)

    reader = asyncio.ensure_future(read())
    flooder = asyncio.ensure_future(flood())
    await asyncio.sleep(0.2)
    try:
        # Liveness, not speed: without the burst cap these acks wait behind the whole backlog.
        await asyncio.wait_for(asyncio.gather(*(alpha.send("beta", b"m%d" % i) for i in range(100))), 10)
    finally:
        stop.set()
    sent = await flooder
    for _ in range(250):  # bounded: let the local queue drain (queued datagrams are neither out nor dropped yet)
        if alpha.datagram_backlog("beta") == 0:
            break
        await asyncio.sleep(0.02)
    counters = {peer.name: peer for peer in alpha.peers()}["beta"].counters
    assert counters["datagrams_dropped"] > 0, "the flood must have overrun the bounded queue"
    assert counters["datagrams_out"] + counters["datagrams_dropped"] == sent
    assert counters["datagrams_dropped_queue_full"] == counters["datagrams_dropped"]
    for _ in range(250):  # bounded: acknowledged means in beta's inbox, not yet read by its reader
        if len(messages) == 100:
            break
        await asyncio.sleep(0.02)
    reader.cancel()
    assert sorted(item.data for item in messages) == sorted(b"m%d" % i for i in range(100))


async def test_a_dial_timing_out_while_its_name_still_resolves_is_dropped_quietly(tmp_path: Path) -> None:
    """Seen in containers: DNS slower than the handshake timeout. Closing such a dial used to make aioquic
    raise inside the endpoint's flush (no network path yet), which also skipped every other flush."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    beta_port = configs["beta"].node.listen.port
    slow = dataclasses.replace(configs["alpha"].peers[0], address=Address("beta.slow.test", beta_port))
    alpha_config = with_timers(dataclasses.replace(configs["alpha"], peers=(slow,)), handshake_timeout=0.2)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    real_getaddrinfo = loop.getaddrinfo
    lookups = 0

    async def slow_getaddrinfo(host, port, **kwargs):
        nonlocal lookups
        if host != "beta.slow.test":
            return await real_getaddrinfo(host, port, **kwargs)
        lookups += 1
        await asyncio.sleep(0.1 if lookups > 2 else 0.5)  # the first two outlast the handshake timeout
        return await real_getaddrinfo("127.0.0.1", port, **kwargs)

    loop.getaddrinfo = slow_getaddrinfo  # type: ignore[method-assign]
    alpha, beta = Node(alpha_config), Node(configs["beta"])
    try:
        await alpha.start()
        async with asyncio.timeout(10):
            while lookups < 3:  # two dials timed out while resolving, the third one resolves in time
                await asyncio.sleep(0.05)
        await beta.start()
        await alpha.wait_connected(["beta"], timeout=15)
        assert lookups >= 3
        await alpha.send("beta", b"after slow lookups")
        assert (await beta.recv()).data == b"after slow lookups"
    finally:
        await alpha.stop()
        await beta.stop()
        del loop.getaddrinfo
        loop.set_exception_handler(None)
    assert errors == []


async def test_requests_on_a_duplicate_that_loses_the_tie_break_are_answered_once(tmp_path: Path) -> None:
    """alpha's own dial (the one both keep) is held up, so beta's becomes the connection first and carries
    alpha's requests; when alpha's dial gets through, both swap to it: the requests already running on the
    loser are answered there, each handled exactly once, none failed."""
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta"])
    relay = UdpRelay(("127.0.0.1", configs["beta"].node.listen.port))
    port = await relay.start()
    relay.cut = True
    via_relay = dataclasses.replace(configs["alpha"].peers[0], address=Address("127.0.0.1", port))
    alpha = Node(dataclasses.replace(configs["alpha"], peers=(via_relay,)))
    beta = Node(configs["beta"])
    handled: Counter[bytes] = Counter()

    async def slow_echo(peer: str, data: bytes) -> bytes:
        handled[data] += 1
        await asyncio.sleep(0.5)
        return data

    beta.set_request_handler(slow_echo)
    try:
        await alpha.start()
        await beta.start()
        await alpha.wait_connected(timeout=10)  # over beta's dial: alpha's is cut off
        requests = [asyncio.ensure_future(alpha.request("beta", b"%d" % i, timeout=10)) for i in range(8)]
        await asyncio.sleep(0.05)
        relay.cut = False  # alpha's dial gets through at its next Initial and wins the tie-break
        results = await asyncio.gather(*requests, return_exceptions=True)
        assert results == [b"%d" % i for i in range(8)]
        assert set(handled.values()) == {1} and len(handled) == 8
        async with asyncio.timeout(10):  # both ends settle on alpha's dial, through the relay
            while beta.peers()[0].remote_address is None or not beta.peers()[0].remote_address.endswith(
                    f":{relay_port(relay)}"):
                await asyncio.sleep(0.05)
    finally:
        await alpha.stop()
        await beta.stop()
        relay.close()


def relay_port(relay: UdpRelay) -> int:
    """The port beta sees alpha's relayed packets come from (the relay's upstream socket)."""
    upstream = next(iter(relay._upstreams.values()))
    assert upstream.transport is not None
    return upstream.transport.get_extra_info("sockname")[1]


async def test_receive_handler_gets_items_as_they_arrive_and_survives_its_own_errors(mesh3: dict[str, Node]) -> None:
    alpha, beta = mesh3["alpha"], mesh3["beta"]
    got: list = []

    def handler(item) -> None:
        got.append(item)
        if item.data == b"boom":
            raise RuntimeError("application bug")

    beta.set_receive_handler(handler)
    alpha.send_datagram("beta", b"dgram")
    await alpha.send("beta", b"boom")  # acknowledged although the handler raised
    await alpha.send("beta", b"after")
    async with asyncio.timeout(5):
        while len(got) < 3:
            await asyncio.sleep(0.01)
    assert sorted((item.kind, item.data) for item in got) == [
        ("datagram", b"dgram"), ("message", b"after"), ("message", b"boom")]
    beta.set_receive_handler(None)
    await alpha.send("beta", b"to recv")
    assert (await drain(beta, 1))[0].data == b"to recv"


async def test_a_plain_function_request_handler_is_answered_and_its_errors_reported(mesh3: dict[str, Node]) -> None:
    def handler(peer: str, data: bytes) -> bytes:
        if data == b"fail":
            raise ValueError("no thanks")
        if data == b"wrong":
            return "not bytes"  # type: ignore[return-value]
        return peer.encode() + b":" + data

    mesh3["beta"].set_request_handler(handler)
    assert await mesh3["alpha"].request("beta", b"hi") == b"alpha:hi"
    with pytest.raises(RemoteError, match="ValueError: no thanks"):
        await mesh3["alpha"].request("beta", b"fail")
    with pytest.raises(RemoteError, match="returned str, not bytes"):
        await mesh3["alpha"].request("beta", b"wrong")
