"""``quicmesh.Node``: the asyncio API over the endpoint, the peer manager and the wire protocol.

The decisions live elsewhere (``mesh.PeerManager`` says when to dial, which duplicate to keep and when a
peer is dead; ``wire`` says what bytes mean); this module carries them out on real QUIC connections and
keeps the per-peer state that must outlive a connection: unacknowledged messages (resent on the next
connection), the receiver's duplicate filter, counters and the application's inbox.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509

from quicmesh.protocol import identity, wire
from quicmesh.transport._aioquic import MeshQuicConnection
from quicmesh.config import Config, PeerConfig
from quicmesh.errors import (
    ConfigError,
    DatagramTooLargeError,
    IdentityError,
    MessageTooLargeError,
    NodeClosedError,
    PeerError,
    PeerNotConnectedError,
    ProtocolError,
    QuicmeshError,
    RemoteError,
    RequestTimeoutError,
    UnknownPeerError,
)
from quicmesh.runtime.peer_manager import Close, Dial, MeshTimers, PeerDown, PeerManager, PeerUp, Ping
from quicmesh.transport.guard import Guard
from quicmesh.transport.guard import settings_for as guard_settings
from quicmesh.transport.endpoint import Endpoint, Link

log = logging.getLogger("quicmesh.node")

#: Bytes a QUIC short-header packet spends around one DATAGRAM frame (flags, 8-byte CID, packet number,
#: AEAD tag, frame type and length) plus quicmesh's 1-byte datagram kind. Measured: 1169 at 1200.
_DATAGRAM_PACKET_OVERHEAD = 30 + wire.DATAGRAM_OVERHEAD
#: DATAGRAM frames (a BATCH counts once) handed to aioquic at once; the rest wait in quicmesh's bounded
#: per-peer queue, so a datagram backlog cannot starve stream data (aioquic writes every queued datagram
#: before any stream frame).
_DATAGRAM_BURST = 32
_APP = int(wire.DatagramKind.APP)
_BATCH = int(wire.DatagramKind.BATCH)
#: Mesh timer deadlines are rounded up to this (seconds), so N peers' keepalives cost fewer, batched ticks.
_MESH_TICK_SLOT = 0.05
_INBOX_CAPACITY = 8192
_EVENT_QUEUE_CAPACITY = 1024
_REASON_LIMIT = 512

RequestHandler = Callable[[str, bytes], Awaitable[bytes] | bytes]
ReceiveHandler = Callable[["Received"], None]


@dataclass(slots=True)
class Received:
    """An item delivered to the application: a datagram or a reliable message from ``peer``.

    Not frozen: a frozen dataclass costs ~0.35 us more to make, per datagram (treat it as read-only).
    """

    peer: str
    kind: Literal["datagram", "message"]
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer became connected or disconnected (``reason`` says why, for disconnects)."""

    peer: str
    kind: Literal["connected", "disconnected"]
    reason: str | None
    at: float


@dataclass
class PeerCounters:
    datagrams_in: int = 0
    datagrams_out: int = 0
    datagrams_dropped_queue_full: int = 0  # outgoing: over limits.datagram_queue
    datagrams_dropped_disconnected: int = 0  # outgoing: still queued when the connection was lost
    datagrams_dropped_inbox_full: int = 0  # incoming: the application's inbox was full
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    requests_in: int = 0
    requests_out: int = 0
    limit_closes: int = 0  # connections closed for buffering more than limits.max_peer_buffer
    requests_refused: int = 0  # requests refused: over max_requests_in_flight or max_peer_buffer

    def to_dict(self) -> dict[str, int]:
        """Every counter, plus ``datagrams_dropped``: the total over the three drop reasons."""
        counters = asdict(self)
        counters["datagrams_dropped"] = (
            self.datagrams_dropped_queue_full + self.datagrams_dropped_disconnected + self.datagrams_dropped_inbox_full
        )
        return counters


@dataclass(frozen=True)
class PeerStatus:
    """A snapshot of one configured peer, for status displays and health checks."""

    name: str
    state: str
    address: str
    remote_address: str | None
    rtt: float | None
    last_seen: float | None
    connected_since: float | None
    fingerprint: str | None
    last_error: str | None
    next_retry: float | None
    counters: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Outgoing:
    body: bytes
    future: asyncio.Future[None]


@dataclass
class _DuplicateFilter:
    """Which message ids of one sender process (epoch) were delivered: all below ``floor``, plus ``above``."""

    epoch: int | None = None
    floor: int = 0
    above: set[int] = field(default_factory=set)

    def seen(self, epoch: int, message_id: int) -> bool:
        if epoch != self.epoch:
            self.epoch, self.floor, self.above = epoch, 0, set()
            return False
        return message_id < self.floor or message_id in self.above

    def record(self, message_id: int) -> None:
        if message_id == self.floor:
            self.floor += 1
            while self.floor in self.above:
                self.above.discard(self.floor)
                self.floor += 1
        elif message_id > self.floor:
            self.above.add(message_id)


class _Superseded(PeerNotConnectedError):
    """A request's connection was closed as a duplicate before the peer served it (it is resent)."""


class _Peer:
    """Everything about one configured peer that outlives a single connection."""

    def __init__(self, config: PeerConfig, window: int) -> None:
        self.config = config
        self.link: _LinkState | None = None
        self.next_message_id = 0
        self.unacked: dict[int, _Outgoing] = {}
        self.window = asyncio.Semaphore(window)
        self.unacked_bytes = 0  # bodies in ``unacked``: kept within half the peer's max_peer_buffer
        self.byte_waiters: deque[asyncio.Future[None]] = deque()
        self.incoming = _DuplicateFilter()
        self.parked_ids: set[int] = set()
        self.datagram_queue: deque[bytes] = deque()  # wire.batch_entry()s, handed to QUIC at each flush
        self.counters = PeerCounters()
        self.connected_since: float | None = None
        self.fingerprint: str | None = None

    @property
    def name(self) -> str:
        return self.config.name


class _InStream:
    """A peer-opened stream whose type, or body, has not fully arrived yet."""

    __slots__ = ("head", "stream_type", "decoder", "refused", "buffered")

    def __init__(self) -> None:
        self.head = b""
        self.buffered = 0  # bytes fed to the decoder so far (counted in the link's buffer totals)
        self.stream_type: int | None = None
        self.decoder: Any = None
        self.refused = False


@dataclass
class _PendingRequest:
    future: asyncio.Future[bytes]
    decoder: wire.ResponseDecoder


class _LinkState:
    """quicmesh's protocol state for one QUIC connection."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.peer: str | None = None  # verified identity (node name)
        self.fingerprint: str | None = None
        self.chain: list[x509.Certificate] = []
        self.control_stream: int | None = None
        self.control = wire.ControlDecoder()
        self.control_seen = False
        self.hello: wire.Hello | None = None
        self.batching = False  # the peer accepts BATCH datagrams (its Hello says so)
        self.ready = False
        self.closing_reason: str | None = None
        self.retiring: str | None = None  # lost a duplicate tie-break: closes once its requests are done
        self.close_code: int | None = None  # ours, once we close it
        self.streams: dict[int, _InStream] = {}
        self.requests: dict[int, _PendingRequest] = {}
        self.serving = 0
        self.pending_acks: list[int] = []
        self.early_messages: list[tuple[int, bytes]] = []
        # Bytes this peer makes us hold (limits.max_peer_buffer): partly received and held messages,
        # and partly received requests.
        self.message_bytes = 0
        self.request_bytes = 0

    @property
    def quic(self) -> MeshQuicConnection:
        return self.link.quic

    @property
    def conn_id(self) -> int:
        return self.link.conn_id

    @property
    def usable(self) -> bool:
        return self.ready and self.closing_reason is None and not self.link.terminated


class Node:
    """One mesh node: a QUIC endpoint that keeps verified connections to every configured peer."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._epoch = secrets.randbits(62)
        self._state: Literal["new", "running", "stopping", "stopped"] = "new"
        self._peers: dict[str, _Peer] = {
            peer.name: _Peer(peer, config.limits.message_window) for peer in config.peers
        }
        self._links: dict[int, _LinkState] = {}
        self._inbox: deque[Received] = deque()
        self._inbox_bytes = 0
        self._inbox_waiters: deque[asyncio.Future[None]] = deque()
        self._parked: deque[tuple[_LinkState, int, bytes]] = deque()
        self._subscribers: list[asyncio.Queue[PeerEvent | None]] = []
        self._changed = asyncio.Event()
        self._request_handler: RequestHandler | None = None
        self._receive_handler: ReceiveHandler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mesh_timer: asyncio.Handle | None = None
        self._mesh_timer_at = 0.0  # its deadline: uvloop returns a plain Handle, without when(), for a past one
        self._endpoint: Endpoint | None = None
        self._mesh: PeerManager | None = None
        self._trust: identity.TrustPolicy | None = None
        self._chain: list[x509.Certificate] = []
        self._key: Any = None
        self._ca_pem = b""
        self._heard: dict[int, float] = {}
        self.listen_address: tuple[str, int] | None = None
        self.inbox_dropped = 0
        #: The latest handshake rejections, either way: (unix time, address, reason).
        self.rejections: deque[tuple[float, str, str]] = deque(maxlen=32)
        self.rejection_count = 0
        self._forward_handler: Any = None  # quicmesh.forwarding.forwarder.Forwarder: UDP service forwarding

    # --- properties -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._config.node.name

    @property
    def mesh(self) -> str:
        return self._config.node.mesh

    @property
    def config(self) -> Config:
        return self._config

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def max_datagram_payload(self) -> int:
        """The largest payload :meth:`send_datagram` takes (peers may advertise a smaller one)."""
        return self._config.limits.max_datagram_size - _DATAGRAM_PACKET_OVERHEAD

    @property
    def cert_not_after(self) -> datetime:
        return self._chain[0].not_valid_after_utc

    @property
    def fingerprint(self) -> str:
        return identity.fingerprint(self._chain[0])

    @property
    def ca_not_after(self) -> datetime:
        """When the first certificate of the mesh CA bundle expires (the whole mesh stops then)."""
        return min(cert.not_valid_after_utc for cert in x509.load_pem_x509_certificates(self._ca_pem))

    def socket_counters(self) -> dict[str, int]:
        """UDP packets through the node's socket (a GSO send counts each packet) and failed sends."""
        endpoint = self._endpoint
        if endpoint is None:
            return {"packets_in": 0, "packets_out": 0, "send_errors": 0}
        return {"packets_in": endpoint.packets_in, "packets_out": endpoint.packets_out,
                "send_errors": endpoint.send_errors}

    def guard_status(self) -> dict[str, Any] | None:
        """Strangers' counters (quicmesh/guard.py): drops by reason, what is enforced; None before start."""
        endpoint = self._endpoint
        if endpoint is None or endpoint.guard is None:
            return None
        return {**endpoint.guard.status(), "stray_packets": endpoint.stray_packets,
                "pending_handshakes": endpoint.pending_handshakes()}

    # --- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load credentials, bind the UDP port and start dialing peers."""
        if self._state != "new":
            raise QuicmeshError(f"node {self.name} was already started")
        self._load_credentials(self._config)
        loop = asyncio.get_running_loop()
        self._endpoint = Endpoint(
            self,
            self._new_server_connection,
            supported_versions=QuicConfiguration(is_client=False).supported_versions,
            receive_size=self._config.limits.max_datagram_size,
        )
        self._endpoint.guard = Guard(await guard_settings(self._config), self._now())
        listen = self._config.node.listen
        self.listen_address = self._endpoint.open(listen.host, listen.port)
        self._mesh = PeerManager(self.name, self._peers, _mesh_timers(self._config), random.Random())
        self._state = "running"
        log.info(
            "node %s started: mesh %s, listening on %s:%d, fingerprint %s, %d peers",
            self.name, self.mesh, *self.listen_address, self.fingerprint, len(self._peers),
        )
        del loop
        self._mesh_tick()

    async def stop(self, reason: str = "shutdown") -> None:
        """Tell every peer we are going, close every connection, then the socket."""
        if self._state in ("stopping", "stopped"):
            return
        if self._state == "new":
            self._state = "stopped"
            return
        self._state = "stopping"
        if self._mesh_timer is not None:
            self._mesh_timer.cancel()
        assert self._endpoint is not None
        # GoAway first, so peers drop the connection at once instead of after aioquic's draining period;
        # it must leave in a packet of its own, since CONNECTION_CLOSE discards pending stream data.
        for state in list(self._links.values()):
            self._send_goaway(state, wire.ErrorCode.SHUTDOWN, reason)
        await asyncio.sleep(0.01)
        for state in list(self._links.values()):
            self._close_link(state, wire.ErrorCode.SHUTDOWN, reason)
        # Wait (bounded) for those closes to go out; not for the refusals of handshakes begun since.
        closing = self._endpoint.links()
        deadline = asyncio.get_running_loop().time() + 1.0
        while any(not link.terminated for link in closing) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        self._endpoint.close()
        self._state = "stopped"
        closed = NodeClosedError(f"node {self.name} stopped")
        for peer in self._peers.values():
            self._fail_unacked(peer, closed)
        for state in list(self._links.values()):
            self._fail_requests(state, closed)
        self._links.clear()
        for waiter in self._inbox_waiters:
            if not waiter.done():
                waiter.set_result(None)
        for queue in self._subscribers:
            _put_dropping_oldest(queue, None)
        self._changed.set()
        log.info("node %s stopped (%s)", self.name, reason)

    def _load_credentials(self, config: Config) -> None:
        """Read cert, key, CA and CRL, and check that our own certificate is one the peers will accept."""
        chain = identity.load_certificates(config.tls.cert)
        key = identity.load_private_key(config.tls.key)
        trust = identity.TrustPolicy.from_files(
            config.tls.ca, config.node.mesh, crl_path=config.tls.crl, denylist=config.tls.denylist
        )
        try:
            trust.verify(chain, expect_node=config.node.name)
        except IdentityError as error:
            raise IdentityError(f"this node's own certificate {config.tls.cert} is unusable: {error}") from None
        with open(config.tls.ca, "rb") as file:
            self._ca_pem = file.read()
        self._chain, self._key, self._trust = chain, key, trust

    # --- QUIC configuration and verification ----------------------------------------------------
    def _quic_configuration(self, *, is_client: bool) -> QuicConfiguration:
        limits = self._config.limits
        configuration = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[wire.ALPN],
            max_datagram_frame_size=limits.max_datagram_size,
            max_datagram_size=limits.max_datagram_size,
            idle_timeout=max(30.0, self._config.timers.dead_after * 4),
            verify_mode=ssl.CERT_REQUIRED,
            cadata=self._ca_pem,  # the mesh CA only: never the system roots
        )
        configuration.certificate = self._chain[0]
        configuration.certificate_chain = self._chain[1:]
        configuration.private_key = self._key
        return configuration

    def _verify_peer_chain(
        self, chain: Sequence[x509.Certificate], expect: str | None
    ) -> tuple[str, str]:
        """Check a peer's chain against the mesh CA, CRL, configured peers and pin: (node, fingerprint)."""
        assert self._trust is not None
        if expect is not None:
            found = self._trust.verify(chain, expect_node=expect, pin=self._peers[expect].config.fingerprint)
        else:
            found = self._trust.verify(chain, allowed_nodes=self._peers.keys())
            pin = self._peers[found.node].config.fingerprint
            if pin is not None:
                found = self._trust.verify(chain, expect_node=found.node, pin=pin)
        return found.node, identity.fingerprint(chain[0])

    def _new_server_connection(
        self, original_destination_cid: bytes, retry_source_cid: bytes | None = None
    ) -> MeshQuicConnection:
        return MeshQuicConnection(
            configuration=self._quic_configuration(is_client=False),
            original_destination_connection_id=original_destination_cid,
            retry_source_connection_id=retry_source_cid,
            verify_peer=lambda chain: self._verify_peer_chain(chain, None),
        )

    # --- the peer manager's actions --------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _mesh_tick(self) -> None:
        self._mesh_timer = None
        if self._state != "running":
            return
        assert self._mesh is not None
        for conn_id, state in self._links.items():
            heard = state.link.last_received
            if heard and heard > self._heard.get(conn_id, 0.0):
                self._heard[conn_id] = heard
                self._mesh.heard_from(conn_id, heard)
        self._apply(self._mesh.poll(self._now()))

    def _apply(self, actions: Iterable[object]) -> None:
        for action in actions:
            if isinstance(action, Dial):
                self._dial(action.peer)
            elif isinstance(action, Ping):
                state = self._links.get(action.conn_id)
                if state is not None and not state.link.terminated:
                    state.quic.send_ping(0)
                    self._touch(state)
            elif isinstance(action, Close):
                state = self._links.get(action.conn_id)
                if state is None:
                    continue
                if action.code == wire.ErrorCode.DUPLICATE_CONNECTION and state.usable and (
                    state.requests or state.serving
                ):
                    self._retire(state, action.reason)
                else:
                    self._close_link(state, action.code, action.reason)
            elif isinstance(action, PeerUp):
                self._peer_up(action.peer, action.conn_id)
            elif isinstance(action, PeerDown):
                self._peer_down(action.peer, action.reason)
        self._reschedule_mesh()

    def _reschedule_mesh(self) -> None:
        if self._state != "running" or self._mesh is None:
            return
        deadline = self._mesh.next_deadline()
        if deadline is not None:  # coalesce: one tick serves every peer whose deadline falls in the same slot
            # (-inf, "at once", would make the rounding NaN: the next slot from now instead)
            deadline = max(deadline, self._now())
            deadline = -(-deadline // _MESH_TICK_SLOT) * _MESH_TICK_SLOT
        if self._mesh_timer is not None:
            if deadline is not None and abs(self._mesh_timer_at - deadline) < 1e-4:
                return
            self._mesh_timer.cancel()
            self._mesh_timer = None
        if deadline is not None:
            self._mesh_timer = asyncio.get_running_loop().call_at(deadline, self._mesh_tick)
            self._mesh_timer_at = deadline

    def _dial(self, peer_name: str) -> None:
        assert self._endpoint is not None and self._mesh is not None
        peer = self._peers[peer_name]
        quic = MeshQuicConnection(
            configuration=self._quic_configuration(is_client=True),
            verify_peer=lambda chain: self._verify_peer_chain(chain, peer_name),
        )
        link = self._endpoint.new_client_link(quic)
        state = _LinkState(link)
        self._links[link.conn_id] = state
        self._mesh.dial_started(peer_name, link.conn_id, self._now())
        address = peer.config.address
        resolved = _literal_address(address.host, address.port, self._endpoint.family)
        if resolved is not None:
            self._endpoint.connect(link, resolved)
        else:
            self._spawn(self._resolve_and_connect(state, address.host, address.port))

    async def _resolve_and_connect(self, state: _LinkState, host: str, port: int) -> None:
        assert self._endpoint is not None and self._mesh is not None
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, family=self._endpoint.family, type=2)
            if not infos:
                raise OSError(f"no address for {host}")
        except OSError as error:
            reason = f"cannot resolve {host}: {error}"
            self._endpoint.abandon(state.link)
            self._links.pop(state.conn_id, None)
            if self._state == "running":
                self._apply(self._mesh.connection_lost(state.conn_id, reason, self._now()))
            return
        if state.closing_reason is not None or self._state != "running":
            self._endpoint.abandon(state.link)
            self._links.pop(state.conn_id, None)
            return
        sockaddr = infos[0][4]
        self._endpoint.connect(state.link, (sockaddr[0], sockaddr[1]))

    def _peer_up(self, peer_name: str, conn_id: int) -> None:
        peer = self._peers.get(peer_name)
        state = self._links.get(conn_id)
        if peer is None or state is None:
            return
        was_up = peer.link is not None
        peer.link = state
        peer.fingerprint = state.fingerprint
        if not was_up:
            peer.connected_since = time.time()
        for message_id, outgoing in peer.unacked.items():
            self._transmit(state, message_id, outgoing.body)
        address = state.quic.get_peer_address() or state.link.address
        log.info(
            "peer %s connected from %s (%s)", peer_name, _format_address(address), state.fingerprint,
        )
        if not was_up:
            self._publish(PeerEvent(peer_name, "connected", None, time.time()))

    def _peer_down(self, peer_name: str, reason: str) -> None:
        peer = self._peers.get(peer_name)
        if peer is None:
            return
        old = peer.link
        peer.link = None
        peer.connected_since = None
        peer.counters.datagrams_dropped_disconnected += len(peer.datagram_queue)
        peer.datagram_queue.clear()
        if old is not None:
            self._fail_requests(old, PeerNotConnectedError(f"connection to {peer_name} lost: {reason}"))
        log.warning("peer %s disconnected: %s", peer_name, reason)
        self._publish(PeerEvent(peer_name, "disconnected", reason, time.time()))

    # --- LinkHandler: what the endpoint tells us -------------------------------------------------
    def link_accepted(self, link: Link) -> None:
        assert self._mesh is not None
        state = self._links[link.conn_id] = _LinkState(link)
        if self._state != "running":
            self._close_link(state, wire.ErrorCode.SHUTDOWN, "node is shutting down", quiet=True)
            return
        self._mesh.inbound_started(link.conn_id, self._now())
        self._reschedule_mesh()

    def link_event(self, link: Link, event: events.QuicEvent) -> None:
        state = self._links.get(link.conn_id)
        if state is None:
            return
        try:
            kind = type(event)
            if kind is events.DatagramFrameReceived:
                self._datagram(state, event.data)
            elif kind is events.StreamDataReceived:
                self._stream_data(state, event.stream_id, event.data, event.end_stream)
            elif kind is events.HandshakeCompleted:
                self._handshake_completed(state)
            elif kind is events.StreamReset:
                self._stream_reset(state, event.stream_id)
        except ProtocolError as error:
            log.warning("protocol violation by %s: %s", state.peer or "unverified peer", error)
            self._close_link(state, error.code, f"protocol violation: {error}")

    def link_terminated(self, link: Link, event: events.ConnectionTerminated) -> None:
        state = self._links.pop(link.conn_id, None)
        self._heard.pop(link.conn_id, None)
        if state is None:
            return
        quic = link.quic
        rejected = False
        if quic.verify_error is not None:
            rejected = True
            reason = f"rejected peer certificate: {quic.verify_error}"
        elif state.closing_reason is not None:
            reason = state.closing_reason
        elif QuicErrorCode.CRYPTO_ERROR <= event.error_code < QuicErrorCode.CRYPTO_ERROR + 0x100:
            rejected = True
            # Dialing, the alert is the peer's; accepting, it may be ours (e.g. no common ALPN) or the client's.
            who = "peer refused the TLS handshake" if link.dialed else "TLS handshake refused"
            reason = f"{who}: {event.reason_phrase or 'no reason given'}"
        elif event.error_code == QuicErrorCode.NO_ERROR and event.reason_phrase == "":
            reason = "idle timeout" if event.frame_type is None else "closed by peer"
        else:
            reason = f"closed by peer: {event.reason_phrase or _error_name(event.error_code)}"
        if rejected:
            address = _format_address(link.address)
            self.rejections.append((time.time(), address, reason))
            self.rejection_count += 1
            log.warning("handshake %s %s failed: %s", "to" if link.dialed else "from", address, reason)
        superseded = state.close_code == wire.ErrorCode.DUPLICATE_CONNECTION or (
            event.frame_type is None and event.error_code == wire.ErrorCode.DUPLICATE_CONNECTION
        )
        error_type = _Superseded if superseded else PeerNotConnectedError
        self._fail_requests(state, error_type(f"connection lost: {reason}"))
        self._drop_parked(state)
        if self._state == "running" and self._mesh is not None:
            self._apply(self._mesh.connection_lost(link.conn_id, reason, self._now(), rejected=rejected))

    def _drop_parked(self, state: _LinkState) -> None:
        """Held messages of a lost connection: unacknowledged, so the sender resends them on its next one."""
        if not any(entry[0] is state for entry in self._parked):
            return
        peer = self._peers.get(state.peer or "")
        kept: deque[tuple[_LinkState, int, bytes]] = deque()
        for entry in self._parked:
            if entry[0] is not state:
                kept.append(entry)
            elif peer is not None:
                peer.parked_ids.discard(entry[1])
        self._parked = kept

    def before_flush(self, link: Link) -> None:
        state = self._links.get(link.conn_id)
        if state is None or not state.usable:
            return
        acks = state.pending_acks
        if acks:
            for start in range(0, len(acks), wire.MAX_ACK_IDS):
                self._send_control(state, wire.Ack(tuple(acks[start : start + wire.MAX_ACK_IDS])))
            acks.clear()
            link.ack_now = True  # data to send: the QUIC ACK may go with it
        peer = self._peers.get(state.peer or "")
        if peer is not None and peer.link is state and peer.datagram_queue:
            self._hand_datagrams_to_quic(peer, state)

    def _hand_datagrams_to_quic(self, peer: _Peer, state: _LinkState) -> None:
        """Queued datagrams into QUIC DATAGRAM frames: neighbours packed into BATCH frames when the peer
        accepts them (per-frame work is most of a small datagram's cost on both ends), a lone one as is."""
        quic = state.quic
        queue = peer.datagram_queue
        budget = wire.DATAGRAM_OVERHEAD + self._datagram_limit(state)  # the largest frame the peer takes
        moved = 0
        while queue and quic.pending_datagrams() < _DATAGRAM_BURST:
            entry = queue.popleft()
            used = 1 + len(entry)  # the BATCH kind byte, then the entry
            if not state.batching or not queue or used + len(queue[0]) > budget:
                quic.send_datagram_frame(wire.unbatch_entry(entry))
                moved += 1
                continue
            batch = [entry]
            while queue and used + len(queue[0]) <= budget:
                entry = queue.popleft()
                used += len(entry)
                batch.append(entry)
            quic.send_datagram_frame(wire.encode_datagram_batch(batch))
            moved += len(batch)
        peer.counters.datagrams_out += moved
        if moved and queue:
            self._touch(state)  # QUIC's own queue is full: the rest once it has sent (or an ACK comes)

    # --- handshake and control stream ------------------------------------------------------------
    def _handshake_completed(self, state: _LinkState) -> None:
        if self._state != "running":  # a peer redialed while we stop: no Hello, or it would think us up
            self._close_link(state, wire.ErrorCode.SHUTDOWN, "node is shutting down", quiet=True)
            return
        verified = state.quic.verified_peer
        if verified is None:  # cannot happen: the TLS hook raises instead of returning nothing
            self._close_link(state, wire.ErrorCode.IDENTITY_REJECTED, "peer identity not verified")
            return
        state.peer, state.fingerprint = verified
        state.quic.release_handshake_buffers()
        state.chain = state.quic.peer_chain()
        state.control_stream = state.quic.get_next_available_stream_id(is_unidirectional=True)
        hello = wire.Hello(
            version=wire.PROTOCOL_VERSION,
            epoch=self._epoch,
            max_message_size=self._config.limits.max_message_size,
            max_datagram_payload=self.max_datagram_payload,
            features=wire.FEATURES,
        )
        state.quic.send_stream_data(
            state.control_stream,
            wire.encode_stream_type(wire.StreamType.CONTROL) + wire.encode_frame(hello),
        )
        self._touch(state)

    def _control_frames(self, state: _LinkState, frames: list[Any]) -> None:
        for frame in frames:
            if isinstance(frame, wire.Hello):
                self._hello(state, frame)
            elif isinstance(frame, wire.Ack):
                self._acked(state, frame.message_ids)
            elif isinstance(frame, wire.Reject):
                self._rejected(state, frame)
            elif isinstance(frame, wire.Services):
                if self._forward_handler is not None and state.hello is not None:
                    self._forward_handler.peer_services(state.peer, state.hello.epoch, frame.entries)
            elif isinstance(frame, wire.GoAway):
                reason = f"peer is going away: {frame.reason or _error_name(frame.code)}"
                self._close_link(state, wire.ErrorCode.NO_ERROR, reason, quiet=True)
                if self._mesh is not None and self._state == "running":
                    self._apply(self._mesh.connection_lost(state.conn_id, reason, self._now()))

    def _hello(self, state: _LinkState, hello: wire.Hello) -> None:
        assert self._mesh is not None and state.peer is not None
        if self._state != "running":
            return  # stopping: no new peers
        if hello.version != wire.PROTOCOL_VERSION:
            self._close_link(
                state, wire.ErrorCode.VERSION_MISMATCH,
                f"peer speaks protocol version {hello.version}, this node {wire.PROTOCOL_VERSION}",
            )
            return
        state.hello = hello
        state.batching = bool(hello.features & wire.Feature.DATAGRAM_BATCH)
        state.ready = True
        actions = self._mesh.connection_ready(
            state.peer, state.conn_id, dialed_by_us=state.link.dialed, peer_epoch=hello.epoch,
            now=self._now(),
        )
        self._apply(actions)
        if self._forward_handler is not None and state.usable:
            self._send_control(state, wire.Services(tuple(self._forward_handler.services_for(state.peer))))
        early, state.early_messages = state.early_messages, []
        for message_id, body in early:
            state.message_bytes -= len(body)
            self._message(state, message_id, body)

    def _send_control(self, state: _LinkState, frame: Any) -> None:
        if state.control_stream is not None and not state.link.terminated:
            state.quic.send_stream_data(state.control_stream, wire.encode_frame(frame))

    def _send_goaway(self, state: _LinkState, code: int, reason: str) -> None:
        if state.ready and state.closing_reason is None:
            self._send_control(state, wire.GoAway(int(code), reason[:_REASON_LIMIT]))

    def _close_link(self, state: _LinkState, code: int, reason: str, *, quiet: bool = False) -> None:
        if state.closing_reason is not None or state.link.terminated:
            return
        state.closing_reason = reason
        state.close_code = code
        state.ready = False
        if not quiet:
            log.info("closing connection %s %s: %s", state.peer or "(unverified)",
                     _format_address(state.link.address), reason)
        if state.link.address is None:
            # A dial still resolving its peer's name has sent nothing and has no path to send a close
            # on: forget it (the resolver sees closing_reason and does not connect it).
            assert self._endpoint is not None and self._mesh is not None
            self._endpoint.abandon(state.link)
            self._links.pop(state.conn_id, None)
            self._apply(self._mesh.connection_lost(state.conn_id, reason, self._now()))
            return
        state.quic.close(error_code=int(code), reason_phrase=reason[:_REASON_LIMIT])
        self._touch(state)
        peer = self._peers.get(state.peer or "")
        if peer is not None and peer.link is state:
            peer.link = None

    def _retire(self, state: _LinkState, reason: str) -> None:
        """A duplicate that lost the tie-break while requests ran on it: nothing new goes on it (the
        winner carries the peer now), but its requests finish before it closes, within a bound."""
        state.retiring = reason
        peer = self._peers.get(state.peer or "")
        if peer is not None and peer.link is state:
            peer.link = None
        asyncio.get_running_loop().call_later(
            self._config.timers.handshake_timeout, self._close_link, state, wire.ErrorCode.DUPLICATE_CONNECTION, reason
        )

    def _retired_if_idle(self, state: _LinkState) -> None:
        if state.retiring is None or state.requests or state.serving or state.closing_reason is not None:
            return
        # A moment for our last response to reach the peer: a close discards unsent stream data.
        grace = max(0.05, 3 * (state.quic.smoothed_rtt() or 0.0))
        asyncio.get_running_loop().call_later(
            grace, self._close_link, state, wire.ErrorCode.DUPLICATE_CONNECTION, state.retiring
        )

    def _touch(self, state: _LinkState) -> None:
        if self._endpoint is not None:
            self._endpoint.touch(state.link)

    # --- streams ---------------------------------------------------------------------------------
    def _stream_data(self, state: _LinkState, stream_id: int, data: bytes, end: bool) -> None:
        pending = state.requests.get(stream_id)
        if pending is not None:
            self._response_data(state, stream_id, pending, data, end)
            return
        if state.peer is None:
            raise ProtocolError("stream data before the peer was verified")
        stream = state.streams.get(stream_id)
        if stream is None:
            if _locally_initiated(stream_id, state.link.dialed):
                return  # late data on a request we gave up on
            stream = state.streams[stream_id] = _InStream()
        if stream.stream_type is None:
            head = stream.head + data
            parsed = wire.read_stream_type(head, bidirectional=not stream_id & 0x2)
            if parsed is None:
                stream.head = head
                if end:
                    raise ProtocolError("stream ended inside its type")
                return
            stream.stream_type, used = parsed
            stream.head = b""
            data = head[used:]
            stream.decoder = self._decoder_for(state, stream.stream_type)
        kind = stream.stream_type
        if kind == wire.StreamType.CONTROL:
            self._control_frames(state, stream.decoder.feed(data))
            if end:
                raise ProtocolError("control stream closed by peer")
            return
        if stream.refused or state.closing_reason is not None:
            if end:
                state.streams.pop(stream_id, None)
            return
        limit = self._config.limits.max_peer_buffer
        stream.buffered += len(data)
        if kind == wire.StreamType.MESSAGE:
            state.message_bytes += len(data)
            if state.message_bytes > limit:
                # Our own senders never get here (they keep half of it unacknowledged): a peer that
                # does ignores its window, so it loses the connection, not just this message.
                self._peers[state.peer].counters.limit_closes += 1
                reason = f"peer made us buffer over {limit} bytes of messages (limits.max_peer_buffer)"
                log.warning("closing connection %s: %s", state.peer, reason)
                self._close_link(state, wire.ErrorCode.RESOURCE_LIMIT, reason, quiet=True)
                return
        else:
            state.request_bytes += len(data)
            if state.request_bytes > limit:
                reason = f"over {limit} bytes of requests in progress (limits.max_peer_buffer)"
                self._refuse_stream(state, stream_id, stream, reason, overloaded=True)
                return
        try:
            result = stream.decoder.feed(data, end)
        except ProtocolError as error:
            if error.code != wire.ErrorCode.MESSAGE_TOO_LARGE:
                raise
            self._refuse_stream(state, stream_id, stream, str(error))
            return
        if result is None:
            return
        self._unbuffer(state, stream)
        del state.streams[stream_id]
        if kind == wire.StreamType.MESSAGE:
            message_id, body = result
            if state.ready:
                self._message(state, message_id, body)
            else:
                state.early_messages.append((message_id, body))
                state.message_bytes += len(body)
        else:
            self._request(state, stream_id, result)

    @staticmethod
    def _unbuffer(state: _LinkState, stream: _InStream) -> None:
        """The stream's bytes no longer count against its peer's max_peer_buffer."""
        if stream.stream_type == wire.StreamType.MESSAGE:
            state.message_bytes -= stream.buffered
        else:
            state.request_bytes -= stream.buffered
        stream.buffered = 0

    def _refuse_stream(
        self, state: _LinkState, stream_id: int, stream: _InStream, reason: str, *, overloaded: bool = False
    ) -> None:
        """An oversized message or request, or a request over the buffer: refuse that stream only, say why."""
        stream.refused = True
        self._unbuffer(state, stream)
        code = wire.ErrorCode.RESOURCE_LIMIT if overloaded else wire.ErrorCode.MESSAGE_TOO_LARGE
        state.quic.stop_stream(stream_id, code)
        if stream.stream_type == wire.StreamType.MESSAGE:
            self._send_control(state, wire.Reject(stream.decoder.message_id, code, reason))
        else:
            if overloaded:
                self._peers[state.peer or ""].counters.requests_refused += 1
            status = wire.ResponseStatus.OVERLOADED if overloaded else wire.ResponseStatus.TOO_LARGE
            self._respond(state, stream_id, status, reason.encode())
        self._touch(state)

    def _decoder_for(self, state: _LinkState, stream_type: int) -> Any:
        if stream_type == wire.StreamType.CONTROL:
            if state.control_seen:
                raise ProtocolError("a second control stream", code=wire.ErrorCode.PROTOCOL_VIOLATION)
            state.control_seen = True
            return state.control
        limit = self._config.limits.max_message_size
        if stream_type == wire.StreamType.MESSAGE:
            return wire.MessageDecoder(limit)
        return wire.RequestDecoder(limit)

    def _stream_reset(self, state: _LinkState, stream_id: int) -> None:
        stream = state.streams.pop(stream_id, None)
        if stream is not None:
            self._unbuffer(state, stream)
        pending = state.requests.pop(stream_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(RemoteError("peer reset the request stream"))
        self._retired_if_idle(state)

    # --- datagrams -------------------------------------------------------------------------------
    def send_datagram(self, peer: str, data: bytes) -> None:
        """Send an unreliable datagram to a connected peer (dropped and counted if its queue is full)."""
        # The hot path of a datagram flood: few calls, no helper per check (measured with quicmesh bench).
        target = self._peers.get(peer) or self._peer_or_raise(peer)
        state = target.link
        if state is None or not state.usable:
            raise PeerNotConnectedError(f"peer {peer} is not connected")
        size = len(data)
        limit = self._config.limits.max_datagram_size - _DATAGRAM_PACKET_OVERHEAD
        hello = state.hello
        if hello is not None and hello.max_datagram_payload < limit:
            limit = hello.max_datagram_payload
        if size > limit:
            raise DatagramTooLargeError(
                f"datagram of {size} bytes exceeds max_datagram_payload ({limit} bytes)"
            )
        queue = target.datagram_queue
        if len(queue) >= self._config.limits.datagram_queue:
            target.counters.datagrams_dropped_queue_full += 1
            return
        queue.append(wire.app_batch_entry(data))  # to QUIC at the flush, packed with its neighbours
        target.counters.bytes_out += size
        if len(queue) == 1:
            self._endpoint.touch(state.link)  # type: ignore[union-attr]  # running: the endpoint exists

    def datagram_backlog(self, peer: str) -> int:
        """Datagrams for ``peer`` not yet on the wire (local queue + QUIC's): lets a sender pace itself."""
        target = self._peer_or_raise(peer)
        state = target.link
        queued = len(target.datagram_queue)
        if state is not None and not state.link.terminated:
            queued += state.quic.pending_datagrams()
        return queued

    def broadcast_datagram(self, data: bytes) -> list[str]:
        """Send a datagram to every connected peer; returns the names it was sent to."""
        sent = []
        for name in self.connected_peers():
            try:
                self.send_datagram(name, data)
            except PeerNotConnectedError:
                continue
            sent.append(name)
        return sent

    # --- UDP service forwarding hooks (the logic is in quicmesh.forwarding.forwarder) ---------------------------
    def set_forward_handler(self, handler: Any) -> None:
        """Install the UDP service forwarder: it is asked ``services_for(peer)`` when a connection becomes
        ready, and told ``peer_services(peer, epoch, entries)`` and
        ``forward_datagram(peer, kind, service_id, flow_id, payload)``."""
        self._forward_handler = handler

    @property
    def forward_handler(self) -> Any:
        return self._forward_handler

    def announce_services(self) -> None:
        """Send every ready connection a fresh Services frame (after the exposed services changed)."""
        if self._forward_handler is None:
            return
        for name, peer in self._peers.items():
            state = peer.link
            if state is not None and state.usable:
                self._send_control(state, wire.Services(tuple(self._forward_handler.services_for(name))))
                self._touch(state)

    def forward_payload_limit(self, peer: str) -> int:
        """The largest forwarded UDP payload to ``peer``: its datagram limit minus the FORWARD header."""
        target = self._peers.get(peer)
        state = target.link if target is not None else None
        limit = self._datagram_limit(state) if state is not None else self.max_datagram_payload
        return limit - wire.FORWARD_HEADER_MAX

    def send_forward_datagram(
        self, peer: str, service_id: int, flow_id: int, payload: bytes, *, reply: bool = False
    ) -> str | None:
        """Queue a FORWARD (``reply``: FORWARD_REPLY) datagram: None if queued, else why it was dropped
        (``"not connected"``, ``"queue full"``). The caller keeps payloads within forward_payload_limit."""
        target = self._peers.get(peer)
        state = target.link if target is not None else None
        if target is None or state is None or not state.usable:
            return "not connected"
        encode = wire.encode_forward_reply_datagram if reply else wire.encode_forward_datagram
        queue = target.datagram_queue
        if len(queue) >= self._config.limits.datagram_queue:
            target.counters.datagrams_dropped_queue_full += 1
            return "queue full"
        queue.append(wire.batch_entry(encode(service_id, flow_id, payload)))
        target.counters.bytes_out += len(payload)
        self._touch(state)
        return None

    def _datagram_limit(self, state: _LinkState) -> int:
        own = self.max_datagram_payload
        return min(own, state.hello.max_datagram_payload) if state.hello else own

    def _datagram(self, state: _LinkState, data: bytes) -> None:
        name = state.peer
        if not state.ready or name is None:
            return  # nothing is accepted before the peer's Hello
        if not data:
            raise ProtocolError("empty datagram", code=wire.ErrorCode.PROTOCOL_VIOLATION)
        datagrams = wire.decode_datagram_batch(data) if data[0] == _BATCH else (data,)
        # The hot path of a datagram flood: locals, no helper per datagram (measured with quicmesh bench).
        deliver_now = self._receive_handler is not None  # else to the inbox, if it has room
        count = nbytes = 0
        for datagram in datagrams:
            if datagram[0] == _APP:
                payload = datagram[1:]
            else:
                decoded = wire.decode_datagram(datagram)  # FORWARD / FORWARD_REPLY: quicmesh.forwarding.forwarder's business
                if self._forward_handler is not None:
                    self._forward_handler.forward_datagram(name, *decoded)
                continue
            count += 1
            nbytes += len(payload)
            if deliver_now or not self._inbox_full():
                self._deliver(Received(name, "datagram", payload))
            else:
                self.inbox_dropped += 1
                self._peers[name].counters.datagrams_dropped_inbox_full += 1
        counters = self._peers[name].counters
        counters.datagrams_in += count
        counters.bytes_in += nbytes

    # --- reliable messages -----------------------------------------------------------------------
    async def send(self, peer: str, data: bytes) -> None:
        """Send a reliable message; returns once the peer's node has accepted it for its application."""
        target = self._peer_or_raise(peer)
        self._check_running()
        self._check_message_size(target, data)
        size = len(data)
        await target.window.acquire()
        reserved = False
        try:
            if target.unacked_bytes and target.unacked_bytes + size > self._config.limits.max_peer_buffer // 2:
                await self._wait_for_unacked_bytes(target, size)
            target.unacked_bytes += size
            reserved = True
            self._check_running()
            if self._peers.get(peer) is not target:
                raise UnknownPeerError(f"peer {peer} was removed from the config")
            message_id = target.next_message_id
            target.next_message_id += 1
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            target.unacked[message_id] = _Outgoing(bytes(data), future)
            state = target.link
            if state is not None and state.usable:
                self._transmit(state, message_id, data)
        except BaseException:
            target.window.release()
            if reserved:
                self._release_bytes(target, size)
            raise
        # Cancelling the caller cancels only this wait, not the message: it stays in ``unacked`` (and is
        # resent) until the peer acks it. A plain await: a shield would cost one more loop iteration.
        await future
        target.counters.messages_out += 1
        target.counters.bytes_out += len(data)

    async def broadcast(self, data: bytes) -> dict[str, Exception | None]:
        """Send a reliable message to every configured peer concurrently; per-peer outcome."""
        names = list(self._peers)
        results = await asyncio.gather(*(self.send(name, data) for name in names), return_exceptions=True)
        outcome: dict[str, Exception | None] = {}
        for name, result in zip(names, results):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            outcome[name] = result
        return outcome

    def _check_message_size(self, peer: _Peer, data: bytes) -> None:
        limit = self._config.limits.max_message_size
        where = "local"
        if peer.link is not None and peer.link.hello is not None and peer.link.hello.max_message_size < limit:
            limit, where = peer.link.hello.max_message_size, f"peer {peer.name}'s"
        if len(data) > limit:
            raise MessageTooLargeError(
                f"message of {len(data)} bytes exceeds the {where} max_message_size ({limit} bytes)"
            )

    def _transmit(self, state: _LinkState, message_id: int, body: bytes) -> None:
        quic = state.quic
        stream_id = quic.get_next_available_stream_id(is_unidirectional=True)
        quic.send_stream_data(stream_id, wire.encode_message(message_id, body), end_stream=True)
        self._touch(state)

    def _acked(self, state: _LinkState, message_ids: Iterable[int]) -> None:
        peer = self._peers.get(state.peer or "")
        if peer is None:
            return
        for message_id in message_ids:
            outgoing = peer.unacked.pop(message_id, None)
            if outgoing is None:
                continue  # a repeated ack after a resend
            peer.window.release()
            self._release_bytes(peer, len(outgoing.body))
            if not outgoing.future.done():
                outgoing.future.set_result(None)

    def _rejected(self, state: _LinkState, frame: wire.Reject) -> None:
        peer = self._peers.get(state.peer or "")
        outgoing = peer.unacked.pop(frame.message_id, None) if peer else None
        if peer is None or outgoing is None:
            return
        peer.window.release()
        self._release_bytes(peer, len(outgoing.body))
        if not outgoing.future.done():
            error_type = MessageTooLargeError if frame.code == wire.ErrorCode.MESSAGE_TOO_LARGE else RemoteError
            outgoing.future.set_exception(error_type(f"peer {peer.name} refused the message: {frame.reason}"))

    def _message(self, state: _LinkState, message_id: int, body: bytes) -> None:
        assert state.peer is not None and state.hello is not None
        peer = self._peers[state.peer]
        if peer.incoming.seen(state.hello.epoch, message_id) or message_id in peer.parked_ids:
            if message_id not in peer.parked_ids:
                state.pending_acks.append(message_id)  # our earlier ack was lost: ack again
            return
        if self._inbox_full():
            # The application is behind: hold the message unacknowledged, so the sender's window
            # fills and it slows down, instead of dropping it or growing without bound.
            peer.parked_ids.add(message_id)
            self._parked.append((state, message_id, body))
            state.message_bytes += len(body)
            return
        self._accept_message(state, peer, message_id, body)

    def _accept_message(self, state: _LinkState, peer: _Peer, message_id: int, body: bytes) -> None:
        peer.incoming.record(message_id)
        peer.counters.messages_in += 1
        peer.counters.bytes_in += len(body)
        state.pending_acks.append(message_id)
        self._touch(state)
        self._deliver(Received(peer.name, "message", body))

    def _unpark(self) -> None:
        while self._parked and not self._inbox_full():
            state, message_id, body = self._parked.popleft()
            state.message_bytes -= len(body)
            peer = self._peers.get(state.peer or "")
            if peer is None:
                continue
            peer.parked_ids.discard(message_id)
            if state.usable and state.hello is not None and state.hello.epoch == peer.incoming.epoch:
                self._accept_message(state, peer, message_id, body)
            # else: the connection is gone; the sender resends it on the next one

    def _fail_unacked(self, peer: _Peer, error: Exception) -> None:
        for outgoing in peer.unacked.values():
            if not outgoing.future.done():
                outgoing.future.set_exception(error)
        peer.unacked.clear()
        self._release_bytes(peer, peer.unacked_bytes)

    async def _wait_for_unacked_bytes(self, peer: _Peer, size: int) -> None:
        """Keep at most half of max_peer_buffer unacknowledged (always allowing one message), so a
        receiver with the same limits never has to cut us off for holding too much of ours."""
        budget = self._config.limits.max_peer_buffer // 2
        while peer.unacked_bytes and peer.unacked_bytes + size > budget:
            await _woken_from(peer.byte_waiters)
            self._check_running()

    @staticmethod
    def _release_bytes(peer: _Peer, size: int) -> None:
        peer.unacked_bytes -= size
        while peer.byte_waiters:
            waiter = peer.byte_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- requests --------------------------------------------------------------------------------
    def set_request_handler(self, handler: RequestHandler | None) -> None:
        """Install ``async def handler(peer, data) -> bytes`` (each request runs as a task), or a plain
        ``def handler(peer, data) -> bytes``, answered at once without a task (quicker, must not block).
        Its exceptions reach the caller as RemoteError."""
        self._request_handler = handler

    async def request(self, peer: str, data: bytes, timeout: float = 5.0) -> bytes:
        """Send a request on its own bidirectional stream and wait for the peer handler's response."""
        target = self._peer_or_raise(peer)
        self._check_running()
        self._check_message_size(target, data)
        try:
            async with asyncio.timeout(timeout):
                try:
                    return await self._request_on_link(target, data)
                except _Superseded:
                    # Its connection lost a duplicate tie-break before the peer served it (the peer
                    # finishes requests it started on a losing duplicate): send it on the winner.
                    while target.link is None or not target.link.usable:
                        self._check_running()
                        await asyncio.sleep(0.01)
                    return await self._request_on_link(target, data)
        except TimeoutError:
            raise RequestTimeoutError(f"no response from {peer} within {timeout:g}s") from None

    async def _request_on_link(self, target: _Peer, data: bytes) -> bytes:
        peer = target.name
        state = target.link
        if state is None or not state.usable:
            raise PeerNotConnectedError(f"peer {peer} is not connected")
        if len(state.requests) >= self._config.limits.max_requests_in_flight:
            raise PeerError(
                f"{len(state.requests)} requests to {peer} already in flight "
                f"(limits.max_requests_in_flight)"
            )
        quic = state.quic
        stream_id = quic.get_next_available_stream_id(is_unidirectional=False)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        state.requests[stream_id] = _PendingRequest(future, wire.ResponseDecoder(self._config.limits.max_message_size))
        quic.send_stream_data(stream_id, wire.encode_request(data), end_stream=True)
        self._touch(state)
        target.counters.requests_out += 1
        try:
            return await future
        finally:
            if state.requests.pop(stream_id, None) is not None and not state.link.terminated:
                state.quic.stop_stream(stream_id, wire.ErrorCode.NO_ERROR)
                self._touch(state)
                self._retired_if_idle(state)

    def _response_data(
        self, state: _LinkState, stream_id: int, pending: _PendingRequest, data: bytes, end: bool
    ) -> None:
        result = pending.decoder.feed(data, end)
        if result is None:
            return
        state.requests.pop(stream_id, None)
        self._retired_if_idle(state)
        status, body = result
        if pending.future.done():
            return
        if status == wire.ResponseStatus.OK:
            pending.future.set_result(body)
        elif status == wire.ResponseStatus.TOO_LARGE:
            pending.future.set_exception(MessageTooLargeError(body.decode("utf-8", "replace")))
        else:
            reason = body.decode("utf-8", "replace") or wire.ResponseStatus(status).name.lower()
            pending.future.set_exception(RemoteError(f"{state.peer}: {reason}"))

    def _request(self, state: _LinkState, stream_id: int, body: bytes) -> None:
        peer = self._peers[state.peer or ""]
        peer.counters.requests_in += 1
        if state.serving >= self._config.limits.max_requests_in_flight:
            peer.counters.requests_refused += 1
            self._respond(state, stream_id, wire.ResponseStatus.OVERLOADED, b"too many requests in flight")
            return
        handler = self._request_handler
        if handler is None:
            self._respond(state, stream_id, wire.ResponseStatus.NO_HANDLER, b"peer has no request handler")
            return
        try:
            result = handler(state.peer or "", body)
        except Exception as error:  # noqa: BLE001 - the caller gets it as RemoteError
            self._answer(state, stream_id, error)
            return
        if inspect.isawaitable(result):
            state.serving += 1
            self._spawn(self._serve(state, stream_id, result))
        else:  # a plain function: answered at once, no task
            self._answer(state, stream_id, result)

    async def _serve(self, state: _LinkState, stream_id: int, pending: Awaitable[Any]) -> None:
        try:
            try:
                result = await pending
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the caller gets it as RemoteError
                result = error
            self._answer(state, stream_id, result)
        finally:
            state.serving -= 1
            self._retired_if_idle(state)

    def _answer(self, state: _LinkState, stream_id: int, result: object) -> None:
        """Respond with what the request handler returned or raised."""
        if isinstance(result, (bytes, bytearray, memoryview)):
            status, reply = wire.ResponseStatus.OK, bytes(result)
        else:
            error = result if isinstance(result, Exception) else TypeError(
                f"request handler returned {type(result).__name__}, not bytes")
            log.info("request handler failed for %s: %r", state.peer, error)
            status = wire.ResponseStatus.HANDLER_ERROR
            reply = f"{type(error).__name__}: {error}".encode()[:_REASON_LIMIT]
        peer_limit = state.hello.max_message_size if state.hello else self._config.limits.max_message_size
        if len(reply) > peer_limit:
            status, reply = wire.ResponseStatus.TOO_LARGE, (
                f"response of {len(reply)} bytes exceeds max_message_size ({peer_limit} bytes)".encode()
            )
        self._respond(state, stream_id, status, reply)

    def _respond(self, state: _LinkState, stream_id: int, status: int, body: bytes) -> None:
        if state.link.terminated or state.closing_reason is not None:
            return
        state.quic.send_stream_data(stream_id, wire.encode_response(status, body), end_stream=True)
        self._touch(state)

    def _fail_requests(self, state: _LinkState, error: Exception) -> None:
        for pending in state.requests.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        state.requests.clear()

    # --- receiving, events, status -----------------------------------------------------------------
    def _inbox_full(self) -> bool:
        return len(self._inbox) >= _INBOX_CAPACITY or self._inbox_bytes >= self._config.limits.max_inbox_bytes

    def set_receive_handler(self, handler: ReceiveHandler | None) -> None:
        """Hand each datagram and message to ``handler(item)`` the moment it arrives, instead of to recv().

        The lowest-latency way to receive (no task switch: measured ~130 us less per datagram with uvloop).
        It runs inside the node's packet processing, so it must be quick and must not block; a message is
        acknowledged once it returns. An exception it raises is logged and the item counts as delivered.
        ``None`` goes back to recv(). Items already waiting for recv() stay there.
        """
        self._receive_handler = handler

    def _deliver(self, item: Received) -> None:
        handler = self._receive_handler
        if handler is not None:
            try:
                handler(item)
            except Exception:  # noqa: BLE001 - the application's bug must not take the node down
                log.exception("receive handler failed on a %s from %s", item.kind, item.peer)
            return
        self._inbox.append(item)
        self._inbox_bytes += len(item.data)
        while self._inbox_waiters:
            waiter = self._inbox_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def recv(self) -> Received:
        """The next received datagram or message (raises NodeClosedError once the node stopped)."""
        while not self._inbox:
            if self._state in ("stopping", "stopped"):
                raise NodeClosedError(f"node {self.name} stopped")
            await _woken_from(self._inbox_waiters)
        item = self._inbox.popleft()
        self._inbox_bytes -= len(item.data)
        if self._parked:
            self._unpark()
        return item

    async def received(self) -> AsyncIterator[Received]:
        """Iterate over received items until the node stops."""
        while True:
            try:
                yield await self.recv()
            except NodeClosedError:
                return

    async def events(self) -> AsyncIterator[PeerEvent]:
        """Iterate over peer connected/disconnected events from now on, until the node stops."""
        queue: asyncio.Queue[PeerEvent | None] = asyncio.Queue(_EVENT_QUEUE_CAPACITY)
        self._subscribers.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.remove(queue)

    def _publish(self, event: PeerEvent) -> None:
        for queue in self._subscribers:
            _put_dropping_oldest(queue, event)
        self._changed.set()
        self._changed = asyncio.Event()

    def connected_peers(self) -> list[str]:
        return [name for name, peer in self._peers.items() if peer.link is not None and peer.link.usable]

    async def wait_connected(self, peers: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Wait until the given peers (default: all configured) are connected; TimeoutError otherwise."""
        wanted = set(self._peers if peers is None else peers)
        for name in wanted:
            self._peer_or_raise(name)
        async with asyncio.timeout(timeout):
            while not wanted <= set(self.connected_peers()):
                self._check_running()
                await self._changed.wait()

    def peers(self) -> list[PeerStatus]:
        assert self._mesh is not None or self._state == "new"
        now = self._now()
        statuses = []
        for name, peer in self._peers.items():
            view = self._mesh.view(name, now) if self._mesh is not None else None
            state = peer.link if peer.link is not None and peer.link.usable else None
            heard = self._heard.get(state.conn_id) if state else None
            if state is not None and state.link.last_received:
                heard = state.link.last_received
            remote = state.quic.get_peer_address() if state else None
            statuses.append(
                PeerStatus(
                    name=name,
                    state=view.state.value if view is not None else "idle",
                    address=str(peer.config.address),
                    remote_address=_format_address(remote) if remote else None,
                    rtt=state.quic.smoothed_rtt() if state else None,
                    last_seen=(time.time() - (now - heard)) if heard else None,
                    connected_since=peer.connected_since,
                    fingerprint=peer.fingerprint,
                    last_error=view.last_error if view is not None else None,
                    next_retry=view.next_retry_in if view is not None else None,
                    counters=peer.counters.to_dict(),
                )
            )
        return statuses

    # --- reload ------------------------------------------------------------------------------------
    async def reload(self, config: Config) -> None:
        """Apply a new config: certs, CA, CRL, peers and timers; healthy connections stay up."""
        self._check_running()
        assert self._mesh is not None
        changed = [
            key for key, old, new in (
                ("node.name", self._config.node.name, config.node.name),
                ("node.mesh", self._config.node.mesh, config.node.mesh),
                ("node.listen", self._config.node.listen, config.node.listen),
            ) if old != new
        ]
        if changed:
            raise ConfigError([f"{key}: cannot change on reload; restart the node" for key in changed])
        self._load_credentials(config)
        guard_config = await guard_settings(config)
        assert self._endpoint is not None and self._endpoint.guard is not None
        self._endpoint.guard.configure(guard_config, self._now())
        self._config = config
        new_peers = {peer.name: peer for peer in config.peers}
        for name in list(self._peers):
            if name not in new_peers:
                removed = self._peers.pop(name)
                self._fail_unacked(removed, UnknownPeerError(f"peer {name} was removed from the config"))
        for name, peer_config in new_peers.items():
            if name in self._peers:
                self._peers[name].config = peer_config
            else:
                self._peers[name] = _Peer(peer_config, config.limits.message_window)
        self._mesh.set_timers(_mesh_timers(config))
        actions = self._mesh.set_peers(new_peers, self._now())
        # Re-check every live connection against the new CA, CRL, denylist and pins.
        for state in list(self._links.values()):
            if state.peer is None or not state.chain or state.closing_reason is not None:
                continue
            if state.peer not in self._peers:
                continue  # set_peers closes it
            try:
                self._verify_peer_chain(state.chain, state.peer)
            except IdentityError as error:
                log.warning("peer %s no longer accepted after reload: %s", state.peer, error)
                self._close_link(state, wire.ErrorCode.IDENTITY_REJECTED, f"rejected after reload: {error}")
                actions = [*actions, *self._mesh.connection_lost(state.conn_id, f"rejected after reload: {error}",
                                                                 self._now(), rejected=True)]
        self._apply(actions)
        log.info("node %s reloaded: %d peers", self.name, len(self._peers))

    # --- helpers -----------------------------------------------------------------------------------
    def _peer_or_raise(self, name: str) -> _Peer:
        peer = self._peers.get(name)
        if peer is None:
            raise UnknownPeerError(f"{name!r} is not a configured peer of {self.name}")
        return peer

    def _check_running(self) -> None:
        if self._state != "running":
            raise NodeClosedError(f"node {self.name} is {self._state}")

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed", exc_info=task.exception())


async def _woken_from(waiters: deque[asyncio.Future[None]]) -> None:
    """Wait until whoever owns ``waiters`` sets our future (a cancelled wait leaves a done one behind)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        if not waiter.done():
            waiter.cancel()


def _mesh_timers(config: Config) -> MeshTimers:
    timers = config.timers
    return MeshTimers(
        keepalive=timers.keepalive,
        dead_after=timers.dead_after,
        backoff_min=timers.backoff_min,
        backoff_max=timers.backoff_max,
        handshake_timeout=timers.handshake_timeout,
    )


def _put_dropping_oldest(queue: asyncio.Queue[Any], item: Any) -> None:
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


def _locally_initiated(stream_id: int, we_are_client: bool) -> bool:
    return (stream_id & 0x1) == (0 if we_are_client else 1)


def _literal_address(host: str, port: int, family: int) -> tuple[str, int] | None:
    """``(host, port)`` ready for sendto if host is an IP literal, mapping IPv4 onto a dual-stack socket."""
    import ipaddress
    import socket

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if family == socket.AF_INET6 and ip.version == 4:
        return (f"::ffff:{ip}", port)
    if family == socket.AF_INET and ip.version == 6:
        return None
    return (str(ip), port)


def _format_address(address: Any) -> str:
    if not address:
        return "-"
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error_name(code: int) -> str:
    try:
        return wire.ErrorCode(code).name.lower()
    except ValueError:
        return f"error 0x{code:x}"
