"""Strangers at a real node's UDP port (issue 8): allowlist, handshake rate limits, pending cap, QUIC Retry.

Each test fails if its protection is removed: the stranger's real QUIC Initial (made by aioquic's own client)
would then get a reply. Stranger sources are other loopback addresses (127.0.0.2, 127.0.0.3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from pathlib import Path

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from meshkit import make_mesh
from quicmesh import Node
from quicmesh.config import Config, SecuritySection
from quicmesh.protocol.wire import ALPN

from test_rejections import raw_client_refused

QUIET = 0.5  # seconds a dropped source waits to be sure nothing comes back


def with_security(config: Config, **options: object) -> Config:
    return dataclasses.replace(config, security=dataclasses.replace(SecuritySection(), **options))


def client_initial(port: int) -> tuple[bytes, bytes]:
    """A real first client Initial (aioquic) for 127.0.0.1:port, and the client's source CID."""
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN]))
    client.connect(("127.0.0.1", port), now=time.monotonic())
    (data, _), *_ = client.datagrams_to_send(now=time.monotonic())
    return data, client.host_cid


def udp_from(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def replies(sock: socket.socket, quiet: float = QUIET) -> list[bytes]:
    """Every datagram that arrives until ``quiet`` seconds pass without one (at most 200, 5 s)."""
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    deadline = loop.time() + 5
    while len(got) < 200 and loop.time() < deadline:
        try:
            got.append(await asyncio.wait_for(loop.sock_recv(sock, 65536), quiet))
        except TimeoutError:
            break
    return got


def reply_cids(datagrams: list[bytes]) -> set[bytes]:
    """The destination CIDs (= our clients' source CIDs) of the long-header replies."""
    return {pull_quic_header(Buffer(data=d), host_cid_length=8).destination_cid for d in datagrams if d[0] & 0x80}


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Config]:
    return make_mesh(tmp_path / "mesh", ["alpha", "beta"])


async def test_allowlist_stranger_gets_no_reply_allowed_source_does(configs: dict[str, Config]) -> None:
    async with Node(with_security(configs["beta"], allowlist=("127.0.0.1/32",))) as beta:
        port = beta.listen_address[1]
        with udp_from("127.0.0.2") as stranger, udp_from("127.0.0.1") as friend:
            for _ in range(3):
                stranger.sendto(client_initial(port)[0], ("127.0.0.1", port))
            assert await replies(stranger) == []
            data, cid = client_initial(port)
            friend.sendto(data, ("127.0.0.1", port))
            answers = await replies(friend)
            assert cid in reply_cids(answers)
        status = beta.guard_status()
        assert status is not None and status["counters"]["not_allowed"] >= 3


async def test_allowlist_peers_lets_peers_in_and_keeps_strangers_out(configs: dict[str, Config]) -> None:
    alpha_config = with_security(configs["alpha"], allowlist_peers=True)
    beta_config = with_security(configs["beta"], allowlist_peers=True)
    async with Node(alpha_config) as alpha, Node(beta_config) as beta:
        await alpha.wait_connected(timeout=10)
        await beta.wait_connected(timeout=10)
        await asyncio.wait_for(alpha.send("beta", b"hello"), 5)
        assert (await asyncio.wait_for(beta.recv(), 5)).data == b"hello"
        port = beta.listen_address[1]
        with udp_from("127.0.0.3") as stranger:
            stranger.sendto(client_initial(port)[0], ("127.0.0.1", port))
            assert await replies(stranger) == []
        assert beta.guard_status()["counters"]["not_allowed"] >= 1


async def test_per_source_rate_limit_drops_initials_over_the_budget(configs: dict[str, Config]) -> None:
    config = with_security(configs["beta"], handshake_rate_per_source=0.01, handshake_burst_per_source=3)
    async with Node(config) as beta:
        port = beta.listen_address[1]
        with udp_from("127.0.0.2") as flooder:
            cids = []
            for _ in range(10):
                data, cid = client_initial(port)
                cids.append(cid)
                flooder.sendto(data, ("127.0.0.1", port))
            answered = reply_cids(await replies(flooder))
        assert answered == set(cids[:3])
        assert beta.guard_status()["counters"]["rate_source"] == 7
        with udp_from("127.0.0.3") as other:  # another source still has its budget
            data, cid = client_initial(port)
            other.sendto(data, ("127.0.0.1", port))
            assert cid in reply_cids(await replies(other))


async def test_global_rate_limit_drops_initials_over_the_budget(configs: dict[str, Config]) -> None:
    config = with_security(configs["beta"], handshake_rate_per_source=0, handshake_rate=0.01, handshake_burst=2)
    async with Node(config) as beta:
        port = beta.listen_address[1]
        with udp_from("127.0.0.2") as first, udp_from("127.0.0.3") as second:
            for sock in (first, second, first, second):
                sock.sendto(client_initial(port)[0], ("127.0.0.1", port))
            answered = len(reply_cids(await replies(first))) + len(reply_cids(await replies(second)))
        assert answered == 2
        assert beta.guard_status()["counters"]["rate_global"] == 2


async def test_pending_handshakes_are_capped(configs: dict[str, Config]) -> None:
    config = with_security(configs["beta"], handshake_rate_per_source=0, handshake_rate=0, max_pending_handshakes=2)
    async with Node(config) as beta:
        port = beta.listen_address[1]
        with udp_from("127.0.0.2") as sock:
            for _ in range(5):  # half-open handshakes: the client never answers
                sock.sendto(client_initial(port)[0], ("127.0.0.1", port))
            assert len(reply_cids(await replies(sock))) == 2
        assert beta.guard_status()["counters"]["pending_full"] == 3
        assert beta.guard_status()["pending_handshakes"] == 2


async def test_retry_forces_a_round_trip_and_peers_still_authenticate(configs: dict[str, Config]) -> None:
    alpha_config = with_security(configs["alpha"], retry=True)
    beta_config = with_security(configs["beta"], retry=True)
    async with Node(alpha_config) as alpha, Node(beta_config) as beta:
        await alpha.wait_connected(timeout=10)
        await beta.wait_connected(timeout=10)
        await asyncio.wait_for(alpha.send("beta", b"after retry"), 5)
        assert (await asyncio.wait_for(beta.recv(), 5)).data == b"after retry"
        sent = alpha.guard_status()["counters"]["retry_sent"] + beta.guard_status()["counters"]["retry_sent"]
        assert sent >= 1
        # A token-less Initial gets a Retry and nothing else: no handshake state, no server Initial.
        port = beta.listen_address[1]
        with udp_from("127.0.0.2") as sock:
            sock.sendto(client_initial(port)[0], ("127.0.0.1", port))
            answers = await replies(sock)
        assert [pull_quic_header(Buffer(data=d), host_cid_length=8).packet_type for d in answers] == [
            QuicPacketType.RETRY]
        # A client without a certificate passes the Retry but is still refused by mutual TLS.
        reason = await raw_client_refused(beta, beta_config.tls.ca, None)
        assert "certificate" in reason.lower(), reason
        assert beta.connected_peers() == ["alpha"]
        assert beta.guard_status()["counters"]["retry_sent"] >= 2


async def test_reload_turns_the_allowlist_on_without_dropping_peers(configs: dict[str, Config]) -> None:
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(timeout=10)
        port = beta.listen_address[1]
        with udp_from("127.0.0.2") as stranger:
            data, cid = client_initial(port)
            stranger.sendto(data, ("127.0.0.1", port))
            assert cid in reply_cids(await replies(stranger))  # no allowlist yet: the port answers
            await beta.reload(with_security(configs["beta"], allowlist=("127.0.0.1/32",)))
            stranger.sendto(client_initial(port)[0], ("127.0.0.1", port))
            assert await replies(stranger) == []
        await asyncio.wait_for(alpha.send("beta", b"still here"), 5)
        assert (await asyncio.wait_for(beta.recv(), 5)).data == b"still here"
        assert beta.connected_peers() == ["alpha"]
        assert beta.guard_status()["counters"]["not_allowed"] >= 1


async def test_version_negotiation_only_answers_full_size_datagrams(configs: dict[str, Config]) -> None:
    async with Node(configs["beta"]) as beta:
        port = beta.listen_address[1]
        # Long header, version 0x1a2a3a4a (unsupported), DCID and SCID of 8 bytes.
        probe = b"\xc0" + bytes.fromhex("1a2a3a4a") + b"\x08" + b"D" * 8 + b"\x08" + b"S" * 8
        with udp_from("127.0.0.2") as sock:
            sock.sendto(probe, ("127.0.0.1", port))  # small: answering would amplify a spoofed source
            assert await replies(sock) == []
            sock.sendto(probe + bytes(1200), ("127.0.0.1", port))
            (answer,) = await replies(sock)
            assert pull_quic_header(Buffer(data=answer), host_cid_length=8).packet_type == \
                QuicPacketType.VERSION_NEGOTIATION


async def test_replies_to_our_own_dials_pass_an_allowlist_that_does_not_cover_the_peer(
    configs: dict[str, Config],
) -> None:
    alpha_config = with_security(configs["alpha"], allowlist=("10.0.0.0/8",))  # 127.0.0.1 (beta) not in it
    async with Node(alpha_config) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(timeout=10)  # alpha's own dial to beta
        await asyncio.wait_for(beta.send("alpha", b"back"), 5)
        assert (await asyncio.wait_for(alpha.recv(), 5)).data == b"back"
