"""An authenticated peer flooding streams and big bodies must not delay another peer's messages (issue 8).

Bounded: ~300 streams and a few MiB offered by the flooder for at most a few seconds, while alpha keeps
sending acked messages to beta; every message arrives, and none waits anywhere near the flood's length.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

from meshkit import TerminationWatch, make_mesh
from quicmesh import Node
from quicmesh.protocol.wire import ALPN, StreamType, encode_stream_type, encode_varint

STREAMS = 300
CHUNK = 16 * 1024
MESSAGES = 40


def _client(cert_dir: Path) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_REQUIRED)
    configuration.load_verify_locations(cafile=str(cert_dir / "ca.crt"))
    configuration.load_cert_chain(cert_dir / "node.crt", cert_dir / "node.key")
    configuration.server_name = None
    return configuration


async def _flood(beta: Node, cert_dir: Path, stop: asyncio.Event) -> int:
    """Open streams that announce 10 MB messages and never finish them (past the 128-stream limit)."""
    assert beta.listen_address is not None
    opened = 0
    writers = []  # kept referenced: a collected asyncio StreamWriter closes (FINs) its stream
    async with connect("127.0.0.1", beta.listen_address[1], configuration=_client(cert_dir),
                       create_protocol=TerminationWatch) as protocol:
        for index in range(STREAMS):
            if stop.is_set() or protocol.terminated.done():
                break
            _, writer = await protocol.create_stream(is_unidirectional=True)
            writers.append(writer)
            writer.write(encode_stream_type(StreamType.MESSAGE) + encode_varint(index + 1)
                         + encode_varint(10_000_000) + b"\xab" * CHUNK)
            opened += 1
            if index % 10 == 0:
                await asyncio.sleep(0.005)
        try:
            await asyncio.wait_for(stop.wait(), 5)
        except TimeoutError:
            pass
        if protocol.terminated.done():
            print("flooder closed:", protocol.terminated.result())
    return opened


async def test_a_stream_flood_from_one_peer_does_not_delay_another(tmp_path: Path) -> None:
    configs = make_mesh(tmp_path / "mesh", ["alpha", "beta", "gamma"])
    gamma_dir = Path(configs["gamma"].tls.cert).parent  # the flooder holds gamma's valid identity
    async with Node(configs["alpha"]) as alpha, Node(configs["beta"]) as beta:
        await alpha.wait_connected(["beta"], timeout=10)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(beta, gamma_dir, stop))
        await asyncio.sleep(0.2)
        latencies = []
        try:
            for index in range(MESSAGES):
                started = loop.time()
                await asyncio.wait_for(alpha.send("beta", b"m%d" % index), 5)  # acked by beta
                async with asyncio.timeout(5):
                    while (item := await beta.recv()).peer != "alpha":
                        pass
                assert item.data == b"m%d" % index
                latencies.append(loop.time() - started)
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            opened = await asyncio.wait_for(flood, 15)
        print("flood opened", opened, "max latency", max(latencies))
        assert len(latencies) == MESSAGES
        assert max(latencies) < 2.0, latencies  # generous: unloaded it is a few ms
        assert opened > 0
        assert "alpha" in beta.connected_peers()
