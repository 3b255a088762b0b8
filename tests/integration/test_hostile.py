"""Hostile input at a real node: junk UDP at its port, protocol violations from an authenticated peer.

The node must close only the offending connection (with an error code) and keep serving its other peers.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
from pathlib import Path

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated

from meshkit import TerminationWatch
from quicmesh import Node
from quicmesh.protocol.wire import ALPN, ErrorCode, StreamType, encode_stream_type, encode_varint

from test_node import mesh3  # noqa: F401  (fixture)


async def _still_serving(a: Node, b: Node) -> None:
    await asyncio.wait_for(a.send(b.name, b"still here"), 5)
    async with asyncio.timeout(5):
        while True:
            item = await b.recv()
            if item.data == b"still here":
                return


async def test_random_and_truncated_udp_payloads_do_not_disturb_the_node(mesh3: dict[str, Node]) -> None:  # noqa: F811
    beta = mesh3["beta"]
    assert beta.listen_address is not None
    rng = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index in range(3000):
            size = rng.choice((0, 1, 5, 20, 100, 1199, 1200, 1500))
            payload = bytearray(os.urandom(size))
            if payload and index % 3 == 0:
                payload[0] |= 0xC0  # looks like a long-header (Initial-ish) packet
            sock.sendto(bytes(payload), ("127.0.0.1", beta.listen_address[1]))
            if index % 200 == 0:
                await asyncio.sleep(0)
    await _still_serving(mesh3["alpha"], beta)
    await _still_serving(beta, mesh3["gamma"])
    assert sorted(beta.connected_peers()) == ["alpha", "gamma"]


async def _authenticated_client(node: Node, cert_dir: Path) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_REQUIRED)
    configuration.load_verify_locations(cafile=str(cert_dir / "ca.crt"))
    configuration.load_cert_chain(cert_dir / "node.crt", cert_dir / "node.key")
    configuration.server_name = None
    return configuration


async def _violate(node: Node, cert_dir: Path, payload: bytes, *, unidirectional: bool = True) -> ConnectionTerminated:
    configuration = await _authenticated_client(node, cert_dir)
    assert node.listen_address is not None
    async with asyncio.timeout(10):
        async with connect("127.0.0.1", node.listen_address[1], configuration=configuration,
                           create_protocol=TerminationWatch) as protocol:
            _, writer = await protocol.create_stream(is_unidirectional=unidirectional)
            writer.write(payload)
            writer.write_eof()
            return await protocol.terminated


async def test_malformed_frames_from_an_authenticated_peer_close_only_that_connection(
    mesh3: dict[str, Node], tmp_path: Path  # noqa: F811
) -> None:
    beta = mesh3["beta"]
    alpha_dir = Path(mesh3["alpha"].config.tls.cert).parent
    cases = [
        encode_varint(0x3F),                                              # unknown stream type
        encode_stream_type(StreamType.MESSAGE) + b"\xff",                 # truncated header, then FIN
        encode_stream_type(StreamType.MESSAGE) + encode_varint(1) + encode_varint(5) + b"abc",  # short body
        encode_stream_type(StreamType.REQUEST),                           # request type on a uni stream
    ]
    for payload in cases:
        event = await _violate(beta, alpha_dir, payload)
        assert event.error_code == ErrorCode.PROTOCOL_VIOLATION, (payload, event)
        assert "protocol violation" in event.reason_phrase
    # The impostor connections used alpha's identity; the real alpha and gamma are served throughout.
    await _still_serving(mesh3["gamma"], beta)
    await _still_serving(beta, mesh3["gamma"])
