"""The baseline: bare aioquic, with the settings a quicmesh node uses.

Stock ``aioquic.asyncio.QuicConnectionProtocol`` on a stock asyncio (or uvloop) datagram endpoint, one socket
per connection as aioquic's own helpers do. Same mutual TLS as quicmesh (the same certificates and
``MeshQuicConnection``'s client-certificate check, with the same chain verification), same
``max_datagram_size`` and DATAGRAM frame size, same ALPN. No mesh, no framing, no acknowledgement beyond:

- datagram: the payload as one DATAGRAM frame;
- message: one new unidirectional stream per message; the receiver sends each finished stream's 8-byte
  sequence number back on one stream of its own, and the sender keeps at most 64 unacknowledged (as a
  quicmesh sender's message window does);
- request: one bidirectional stream per request, the receiver echoes the body and ends the stream;
- bulk: every chunk on ONE unidirectional stream; the receiver acknowledges each chunk's worth of bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from quicmesh.protocol import identity, wire
from quicmesh.transport._aioquic import MeshQuicConnection
from quicmesh.config import load_config

_SEQ = struct.Struct("<Q")


def _configuration(config: Any, *, is_client: bool) -> tuple[QuicConfiguration, identity.TrustPolicy]:
    chain = identity.load_certificates(config.tls.cert)
    trust = identity.TrustPolicy.from_files(config.tls.ca, config.node.mesh, crl_path=config.tls.crl)
    limits = config.limits
    configuration = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[wire.ALPN],
        max_datagram_frame_size=limits.max_datagram_size,
        max_datagram_size=limits.max_datagram_size,
        idle_timeout=30.0,
        verify_mode=ssl.CERT_REQUIRED,
        cadata=config.tls.ca.read_bytes(),
    )
    configuration.certificate = chain[0]
    configuration.certificate_chain = chain[1:]
    configuration.private_key = identity.load_private_key(config.tls.key)
    return configuration, trust


class _Protocol(QuicConnectionProtocol):
    def __init__(self, quic: MeshQuicConnection, impl: BareImpl, peer: str) -> None:
        super().__init__(quic)
        self.impl = impl
        self.peer = peer
        self.streams: dict[int, bytearray] = {}
        self.ack_stream: int | None = None
        self.ack_buffer = bytearray()
        self.bulk_bytes = 0
        self.bulk_chunks = 0

    def quic_event_received(self, event: events.QuicEvent) -> None:
        impl = self.impl
        kind = type(event)
        if kind is events.DatagramFrameReceived:
            if impl.receiver is not None:
                impl.receiver.datagram(self.peer, event.data)
        elif kind is events.StreamDataReceived:
            stream_id = event.stream_id
            if impl.receiver is None:  # sender: acks (uni stream from the receiver) or a reply
                if stream_id & 0x2:
                    buffer = self.ack_buffer
                    buffer += event.data
                    usable = len(buffer) - len(buffer) % 8
                    for offset in range(0, usable, 8):
                        impl.acked(_SEQ.unpack_from(buffer, offset)[0])
                    del buffer[:usable]
                else:
                    impl.reply_data(stream_id, event.data, event.end_stream)
                return
            if impl.bulk and stream_id & 0x2:  # bulk: one long stream, acknowledged chunk by chunk
                self.bulk_bytes += len(event.data)
                size = impl.job["size"]
                quic = self._quic
                while self.bulk_bytes >= size:
                    self.bulk_bytes -= size
                    impl.receiver.counted(self.peer, size)
                    if self.ack_stream is None:
                        self.ack_stream = quic.get_next_available_stream_id(is_unidirectional=True)
                    quic.send_stream_data(self.ack_stream, _SEQ.pack(self.bulk_chunks))
                    self.bulk_chunks += 1
                return
            buffer = self.streams.get(stream_id)
            if buffer is None:
                buffer = self.streams[stream_id] = bytearray()
            buffer += event.data
            if not event.end_stream:
                return
            del self.streams[stream_id]
            body = bytes(buffer)
            quic = self._quic
            if stream_id & 0x2:  # a message: count it, acknowledge its sequence number
                impl.receiver.message(self.peer, body)
                if self.ack_stream is None:
                    self.ack_stream = quic.get_next_available_stream_id(is_unidirectional=True)
                quic.send_stream_data(self.ack_stream, body[:8])
            else:  # a request: count it, echo it
                impl.receiver.message(self.peer, body)
                quic.send_stream_data(stream_id, body, end_stream=True)


class _Server(asyncio.DatagramProtocol):
    """Accepts connections on one socket, one QuicConnectionProtocol per client address."""

    def __init__(self, impl: BareImpl) -> None:
        self.impl = impl
        self.transport: Any = None
        self.clients: dict[Any, _Protocol] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        protocol = self.clients.get(addr)
        if protocol is None:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            except ValueError:
                return
            if header.packet_type != QuicPacketType.INITIAL:
                return
            quic = MeshQuicConnection(
                configuration=self.impl.server_configuration,
                original_destination_connection_id=header.destination_cid,
                verify_peer=lambda chain: self.impl.trust.verify(chain, allowed_nodes=self.impl.peers).node,
                max_packet_size=None,  # stock aioquic: no path MTU discovery
            )
            protocol = self.clients[addr] = _Protocol(quic, self.impl, "?")
            protocol.connection_made(self.transport)
        protocol.datagram_received(data, addr)
        if protocol.peer == "?" and protocol._quic.verified_peer is not None:
            protocol.peer = protocol._quic.verified_peer


class BareImpl:
    """The worker's interface (see worker.QuicmeshImpl), on bare aioquic."""

    def __init__(self, job: dict[str, Any], receiver: Any) -> None:
        self.job = job
        self.receiver = receiver
        self.config = load_config(job["config"])
        self.peers = list(job["peers"])
        self.bulk = job["mode"] == "bulk"
        self.bulk_stream: int | None = None
        self.transports: list[Any] = []
        self.protocol: _Protocol | None = None
        self.server: _Server | None = None
        self.unacked: dict[int, asyncio.Future[None]] = {}
        self._transmit_scheduled = False
        self.replies: dict[int, tuple[bytearray, asyncio.Future[bytes]]] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.receiver is not None:
            self.server_configuration, self.trust = _configuration(self.config, is_client=False)
            listen = self.config.node.listen
            transport, self.server = await loop.create_datagram_endpoint(
                lambda: _Server(self), local_addr=(listen.host, listen.port)
            )
            self.transports.append(transport)
            while len({p.peer for p in self.server.clients.values()} - {"?"}) < len(self.peers):
                await asyncio.sleep(0.01)
            return
        configuration, trust = _configuration(self.config, is_client=True)
        target = self.job["target"]
        address = next(p.address for p in self.config.peers if p.name == target)
        quic = MeshQuicConnection(
            configuration=configuration,
            verify_peer=lambda chain: trust.verify(chain, expect_node=target).node,
            max_packet_size=None,
        )
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Protocol(quic, self, target), local_addr=("127.0.0.1", 0)
        )
        self.transports.append(transport)
        self.protocol = protocol
        protocol.connect((address.host, address.port))
        await protocol.wait_connected()

    # sender side: what is queued goes out once per event-loop iteration (as quicmesh flushes)
    def _transmit_soon(self) -> None:
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            asyncio.get_running_loop().call_soon(self._transmit)

    def _transmit(self) -> None:
        self._transmit_scheduled = False
        if self.protocol is not None:
            self.protocol.transmit()

    def send_datagram(self, peer: str, payload: bytes) -> None:
        protocol = self.protocol
        assert protocol is not None
        protocol._quic.send_datagram_frame(payload)
        self._transmit_soon()

    def datagram_backlog(self, peer: str) -> int:
        assert self.protocol is not None
        return self.protocol._quic.pending_datagrams()

    def datagrams_dropped(self, peer: str) -> int:
        return 0

    def paths(self) -> dict[str, str | None]:
        return {}  # no mesh, no relaying: one direct connection

    async def rtts(self) -> dict[str, float]:
        return {}

    async def send_message(self, peer: str, payload: bytes) -> None:
        protocol = self.protocol
        assert protocol is not None
        quic = protocol._quic
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.unacked[_SEQ.unpack_from(payload)[0]] = future
        if self.bulk:  # every chunk on the same stream, in order
            if self.bulk_stream is None:
                self.bulk_stream = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(self.bulk_stream, payload)
        else:
            quic.send_stream_data(quic.get_next_available_stream_id(is_unidirectional=True), payload,
                                  end_stream=True)
        self._transmit_soon()
        await future

    def acked(self, seq: int) -> None:
        future = self.unacked.pop(seq, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def request(self, peer: str, payload: bytes) -> bytes:
        protocol = self.protocol
        assert protocol is not None
        quic = protocol._quic
        stream_id = quic.get_next_available_stream_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.replies[stream_id] = (bytearray(), future)
        quic.send_stream_data(stream_id, payload, end_stream=True)
        self._transmit_soon()
        async with asyncio.timeout(10.0):
            return await future

    def reply_data(self, stream_id: int, data: bytes, end: bool) -> None:
        entry = self.replies.get(stream_id)
        if entry is None:
            return
        entry[0].extend(data)
        if end:
            del self.replies[stream_id]
            if not entry[1].done():
                entry[1].set_result(bytes(entry[0]))

    async def close(self) -> None:
        protocols = [self.protocol] if self.protocol else list(self.server.clients.values()) if self.server else []
        for protocol in protocols:
            protocol.close()
        await asyncio.sleep(0.05)
        for transport in self.transports:
            transport.close()
