"""Build real meshes for tests: real CA and node certs (the PKI library), configs on free loopback ports."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from pki.bootstrap import bootstrap, parse_node_spec
from quicmesh.config import Config, load_config
from quicmesh.errors import PeerNotConnectedError
from quicmesh.ops.demo import free_udp_ports
from quicmesh.protocol import wire
from quicmesh.runtime.connection import Connection, Transition
from quicmesh.runtime.connections import Connections
from quicmesh.runtime.context import Context
from quicmesh.runtime.credentials import Credentials
from quicmesh.runtime.datagrams import DatagramChannel
from quicmesh.runtime.events import PeerEvents
from quicmesh.runtime.features import FeatureHost
from quicmesh.runtime.inbox import Inbox
from quicmesh.runtime.messages import MessageChannel
from quicmesh.runtime.node import Node
from quicmesh.runtime.peer import Peer
from quicmesh.runtime.streams import StreamReader
from quicmesh.transport._aioquic import MeshQuicConnection
from quicmesh.transport.endpoint import Link


def make_mesh(
    directory: Path, names: list[str], *, mesh: str = "test", fast: bool = True, **bootstrap_options: object
) -> dict[str, Config]:
    """Bootstrap ``names`` on 127.0.0.1 into ``directory``; return each node's loaded config.

    ``fast`` shortens the timers (keepalive 0.2 s, dead after 1 s, backoff 0.05..0.5 s) so tests of
    detection and reconnection take a fraction of a second.
    """
    ports = free_udp_ports(len(names))
    specs = [parse_node_spec(f"{name}=127.0.0.1:{port}") for name, port in zip(names, ports)]
    bootstrap(directory, mesh, specs, **bootstrap_options)  # type: ignore[arg-type]
    configs = {}
    for name in names:
        config = load_config(directory / name / "node.toml")
        listen = dataclasses.replace(config.node.listen, host="127.0.0.1")
        config = dataclasses.replace(config, node=dataclasses.replace(config.node, listen=listen))
        if fast:
            config = with_timers(config, keepalive=0.2, dead_after=1.0, backoff_min=0.05, backoff_max=0.5)
        configs[name] = config
    return configs


async def settled(nodes: Iterable[Node], timeout: float = 5.0, quiet: float = 0.3) -> None:
    """Until every node holds one connection per connected peer and that held for ``quiet`` seconds: at
    start both ends of a pair dial, and the tie-break closes one a little later (a datagram sent on the
    closed one is lost, a path MTU search on it is forgotten). TimeoutError otherwise."""
    nodes = list(nodes)
    loop = asyncio.get_running_loop()
    since: float | None = None
    async with asyncio.timeout(timeout):
        while True:
            single = all(len(node._connections.by_id) == len(node.connected_peers()) for node in nodes)
            if not single:
                since = None
            elif since is None:
                since = loop.time()
            elif loop.time() - since >= quiet:
                return
            await asyncio.sleep(0.02)


async def wait_rejection(node: Node, needle: str, timeout: float = 5.0) -> str:
    """The first handshake rejection recorded by ``node`` whose reason contains ``needle``."""
    async with asyncio.timeout(timeout):
        while True:
            for _, _, reason in node.rejections:
                if needle in reason:
                    return reason
            await asyncio.sleep(0.02)


def with_timers(config: Config, **timers: float) -> Config:
    return dataclasses.replace(config, timers=dataclasses.replace(config.timers, **timers))


def with_limits(config: Config, **limits: int) -> Config:
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))


class TerminationWatch(QuicConnectionProtocol):
    """A plain aioquic client protocol that records how its connection ended (``terminated``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.terminated: asyncio.Future[ConnectionTerminated] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        super().quic_event_received(event)


# --- runtime units without a node: in-memory configs and real aioquic connections, no socket -----------
def unit_config(name: str = "alpha", peers: tuple[str, ...] = ("beta",), **limits: int) -> Config:
    """A config built in memory (its file paths are never opened): enough for a Context and the channels."""
    from quicmesh.config import Address, ControlSection, Limits, LogSection, NodeSection, PeerConfig, Timers, TlsSection

    return Config(
        node=NodeSection(name, "test", Address("127.0.0.1", 4433)),
        tls=TlsSection(Path("ca.crt"), Path("node.crt"), Path("node.key")),
        peers=tuple(PeerConfig(peer, Address("127.0.0.1", 4434 + i)) for i, peer in enumerate(peers)),
        limits=Limits(**limits), timers=Timers(), control=ControlSection(Path("control.sock")), log=LogSection(),
    )


class RecordingQuic(MeshQuicConnection):
    """A real (unconnected) aioquic connection that also keeps what the runtime handed it: stream writes
    and DATAGRAM frames, so a test can carry them to the other side itself (or lose them)."""

    def __init__(self, *, max_datagram_size: int = 1200) -> None:
        configuration = QuicConfiguration(is_client=True, max_datagram_frame_size=max_datagram_size,
                                          max_datagram_size=max_datagram_size)
        super().__init__(configuration=configuration, verify_peer=lambda chain: None)
        self.stream_writes: list[tuple[int, bytes, bool]] = []
        self.datagram_frames: list[bytes] = []

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.stream_writes.append((stream_id, bytes(data), end_stream))
        super().send_stream_data(stream_id, data, end_stream)

    def send_datagram_frame(self, data: bytes) -> None:
        self.datagram_frames.append(bytes(data))
        super().send_datagram_frame(data)


def ready_connection(quic: MeshQuicConnection, peer: str, epoch: int, *, own_epoch: int = 0, conn_id: int = 1,
                     dialed: bool = True, features: int = wire.FEATURES, max_message_size: int = 16 * 1024 * 1024,
                     max_datagram_payload: int = 1169) -> Connection:
    """A Connection moved to READY through its state machine, as Connections does once the peer's Hello came
    (``epoch``, ``features``...: that Hello's; ``dialed``: which side we play, whatever ``quic`` is). Our
    control stream is opened with our own Hello, so the other side's decoder takes what follows."""
    connection = Connection(Link(conn_id=conn_id, quic=quic, dialed=dialed))
    connection.transition(Transition.VERIFIED)
    connection.peer = peer
    connection.control_stream = quic.get_next_available_stream_id(is_unidirectional=True)
    own_hello = wire.Hello(wire.PROTOCOL_VERSION, own_epoch, max_message_size, max_datagram_payload, wire.FEATURES)
    quic.send_stream_data(connection.control_stream,
                          wire.encode_stream_type(wire.StreamType.CONTROL) + wire.encode_frame(own_hello))
    connection.hello = wire.Hello(wire.PROTOCOL_VERSION, epoch, max_message_size, max_datagram_payload, features)
    connection.batching = bool(features & wire.Feature.DATAGRAM_BATCH)
    connection.transition(Transition.HELLO)
    return connection


class QuicPair:
    """alpha (client) and beta (server) as real MeshQuicConnections with the mesh's mutual TLS, their
    packets carried in memory: ``exchange()`` runs the handshake, then whatever either side queued."""

    ALPHA, BETA = ("127.0.0.1", 7001), ("127.0.0.1", 7002)

    def __init__(self, directory: Path, **limits: int) -> None:
        if not (directory / "beta" / "node.toml").exists():
            bootstrap(directory, "test", [parse_node_spec(f"alpha={self.ALPHA[0]}:{self.ALPHA[1]}"),
                                          parse_node_spec(f"beta={self.BETA[0]}:{self.BETA[1]}")])
        alpha, beta = (with_limits(load_config(directory / name / "node.toml"), **limits) for name in ("alpha", "beta"))
        ours, theirs = Credentials(alpha), Credentials(beta)
        self.client = MeshQuicConnection(
            configuration=ours.quic_configuration(alpha, is_client=True),
            verify_peer=lambda chain: ours.verify_peer(chain, "beta", {p.name: p for p in alpha.peers}))
        self.server = MeshQuicConnection(
            configuration=theirs.quic_configuration(beta, is_client=False),
            original_destination_connection_id=self.client.original_destination_connection_id,
            verify_peer=lambda chain: theirs.verify_peer(chain, None, {p.name: p for p in beta.peers}))
        self.client.connect(self.BETA, now=time.monotonic())

    def exchange(self, rounds: int = 50) -> tuple[list[QuicEvent], list[QuicEvent]]:
        """Carry packets both ways until neither side has any (at most ``rounds`` times); each side's events."""
        for _ in range(rounds):
            now = time.monotonic()
            for quic in (self.client, self.server):
                timer = quic.get_timer()
                if timer is not None and timer <= now:
                    quic.handle_timer(now)
            to_server = self.client.datagrams_to_send(now=now)
            for data, _ in to_server:
                self.server.receive_datagram(data, self.ALPHA, now=now)
            to_client = self.server.datagrams_to_send(now=now)
            for data, _ in to_client:
                self.client.receive_datagram(data, self.BETA, now=now)
            if not to_server and not to_client:
                break
        return _drain(self.client), _drain(self.server)


def _drain(quic: MeshQuicConnection) -> list[QuicEvent]:
    found = []
    while (event := quic.next_event()) is not None:
        found.append(event)
    return found


class ChannelNode:
    """One node's runtime units (inbox, channels, stream reader, feature host) with one peer, and no
    Connections or endpoint: the test attaches them to a QUIC connection and carries its packets."""

    def __init__(self, name: str, peer: str, **limits: int) -> None:
        self.ctx = ctx = Context(unit_config(name, (peer,), **limits))
        ctx.state = "running"
        self.peer = ctx.peers[peer] = Peer(ctx.config.peers[0], ctx.config.limits.message_window)
        self.inbox = Inbox(ctx)
        self.datagrams = DatagramChannel(ctx, self.inbox)
        self.messages = MessageChannel(ctx, self.inbox)
        # the node's Connections, for the request channel and the feature host it makes: never attached to an
        # endpoint (the test carries the packets and routes the events itself, below)
        self.connections = Connections(ctx, self.datagrams, self.messages, PeerEvents())
        self.requests = self.connections.requests
        self.reader = StreamReader(ctx, self.messages, self.requests, self._control_frames, self._close)
        self.features = self.connections.features = FeatureHost(ctx, self.datagrams, self.messages, self.connections,
                                                                self.inbox)
        self.connection: Connection | None = None
        self.closed: list[tuple[int, str]] = []  # (code, reason) of what the stream reader closed

    def attach(self, quic: MeshQuicConnection, peer_epoch: int, *, dialed: bool, conn_id: int = 1,
               features: int = wire.FEATURES) -> Connection:
        """A new active connection (the old one is lost): unacknowledged messages go again on it."""
        if self.connection is not None:
            self.lose()
        connection = ready_connection(quic, self.peer.name, peer_epoch, own_epoch=self.ctx.epoch, conn_id=conn_id,
                                      dialed=dialed, features=features)
        self.connection = self.peer.connection = connection
        self.messages.connection_ready(connection)
        self.messages.resend(self.peer, connection)
        self.features.peer_ready(self.peer.name, peer_epoch)
        return connection

    def lose(self) -> None:
        """The active connection is gone, as Connections handles it."""
        connection = self.connection
        assert connection is not None
        connection.link.terminated = True
        connection.transition(Transition.TERMINATED)
        self.connection = self.peer.connection = None
        self.requests.fail(connection, PeerNotConnectedError("connection lost"))
        self.messages.drop_parked(connection)
        self.datagrams.drop_queued(self.peer)
        self.features.peer_lost(self.peer.name, "connection lost")

    def before_flush(self) -> None:
        connection = self.connection
        if connection is not None and connection.usable:
            self.messages.flush_acks(connection)
            if self.peer.datagram_queue:
                self.datagrams.flush(self.peer, connection)

    def handle(self, quic_events: list[QuicEvent]) -> int:
        """Route the connection's events to the units; how many carried application data."""
        connection = self.connection
        routed = 0
        for event in quic_events:
            if connection is None:
                break
            if isinstance(event, StreamDataReceived):
                self.reader.data(connection, event.stream_id, event.data, event.end_stream)
            elif isinstance(event, StreamReset):
                self.reader.reset(connection, event.stream_id)
            elif isinstance(event, DatagramFrameReceived):
                self.datagrams.received(connection, event.data)
            else:
                continue
            routed += 1
        return routed

    def _control_frames(self, connection: Connection, frames: list[object]) -> None:
        for frame in frames:
            if isinstance(frame, wire.Ack):
                self.messages.acked(connection, frame.message_ids)
            elif isinstance(frame, wire.Reject):
                self.messages.rejected(connection, frame)
            elif not isinstance(frame, wire.Hello) and connection.hello is not None:
                self.features.control_received(self.peer.name, connection.hello.epoch, frame)

    def _close(self, connection: Connection, code: int, reason: str, quiet: bool) -> None:
        self.closed.append((code, reason))
        connection.transition(Transition.CLOSE)


class ChannelPair:
    """alpha and beta's runtime units (ChannelNode) over real aioquic connections carried in memory;
    ``reconnect()`` replaces the connection, losing whatever it had not carried yet."""

    def __init__(self, directory: Path, *, alpha_features: int = wire.FEATURES, beta_features: int = wire.FEATURES,
                 **limits: int) -> None:
        self.directory = directory
        self.alpha = ChannelNode("alpha", "beta", **limits)
        self.beta = ChannelNode("beta", "alpha", **limits)
        self._features = alpha_features, beta_features  # what each one's Hello advertises
        self.connections = 0
        self.reconnect()

    def reconnect(self) -> None:
        self.quic = QuicPair(self.directory)
        self.quic.exchange()
        self.connections += 1
        self.alpha.attach(self.quic.client, self.beta.ctx.epoch, dialed=True, conn_id=self.connections,
                          features=self._features[1])
        self.beta.attach(self.quic.server, self.alpha.ctx.epoch, dialed=False, conn_id=self.connections,
                         features=self._features[0])

    async def carry(self, *, acks: bool = True, rounds: int = 20) -> None:
        """Let tasks run and carry packets both ways until quiet (``acks`` False: the nodes' pending Acks stay
        unsent, as if the connection broke before they went out)."""
        for _ in range(rounds):
            for _ in range(3):
                await asyncio.sleep(0)
            if acks:
                self.alpha.before_flush()
                self.beta.before_flush()
            to_alpha, to_beta = self.quic.exchange()
            if not self.alpha.handle(to_alpha) + self.beta.handle(to_beta):
                if acks and (self.alpha.connection and self.alpha.connection.pending_acks
                             or self.beta.connection and self.beta.connection.pending_acks):
                    continue
                return
