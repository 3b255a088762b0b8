"""The node's connections: carries out the peer manager's decisions on real QUIC connections and turns
what the endpoint reports (accepted, events, terminated, about to flush) into connection transitions and
channel calls. Everything here runs inside the endpoint's packet processing or the mesh timer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode

from quicmesh.config import Address, PeerConfig
from quicmesh.errors import IdentityError, PeerNotConnectedError, ProtocolError, UnknownPeerError
from quicmesh.protocol import wire
from quicmesh.protocol.addresses import format_address
from quicmesh.runtime import dialing
from quicmesh.runtime.connection import REASON_LIMIT, Connection, ConnectionState, Transition
from quicmesh.runtime.context import Context
from quicmesh.runtime.credentials import Credentials
from quicmesh.runtime.datagrams import DatagramChannel
from quicmesh.runtime.events import PeerEvents
from quicmesh.runtime.features import FeatureHost
from quicmesh.runtime.messages import MessageChannel
from quicmesh.runtime.peer import Peer
from quicmesh.runtime.peer_manager import Close, Dial, PeerDown, PeerManager, PeerUp, Ping
from quicmesh.runtime.requests import RequestChannel, Superseded
from quicmesh.runtime.streams import StreamReader
from quicmesh.transport._aioquic import MeshQuicConnection
from quicmesh.transport.endpoint import Endpoint, Link, RelayPath

log = logging.getLogger("quicmesh.node")

#: The QUIC packet size of a relayed connection: the smallest QUIC allows, so that its packets (plus the relay
#: header) fit in the DATAGRAM frames of outer connections of 1,240 bytes and more (docs/RELAY.md).
RELAYED_PACKET_SIZE = 1200
#: Mesh timer deadlines are rounded up to this (seconds), so N peers' keepalives cost fewer, batched ticks.
_MESH_TICK_SLOT = 0.05


class Connections:
    """Implements the endpoint's LinkHandler; owns every Connection by conn_id."""

    def __init__(self, ctx: Context, datagrams: DatagramChannel, messages: MessageChannel,
                 events_out: PeerEvents) -> None:
        self._ctx = ctx
        self.credentials: Credentials | None = None  # loaded at start, replaced on reload
        self._datagrams = datagrams
        self._messages = messages
        self.requests = RequestChannel(ctx, self._retired_if_idle)
        self.features: FeatureHost | None = None  # set by the node once the seam exists (it needs our requests)
        self._events = events_out
        self._streams = StreamReader(ctx, messages, self.requests, self._control_frames, self.close)
        self.by_id: dict[int, Connection] = {}
        self.endpoint: Endpoint | None = None
        self.mesh = PeerManager(ctx.name, ctx.peers, ctx.config.timers, random.Random())
        self._heard: dict[int, float] = {}
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # its deadline: uvloop returns a plain Handle, without when(), for a past one
        #: The latest handshake rejections, either way: (unix time, address, reason).
        self.rejections: deque[tuple[float, str, str]] = deque(maxlen=32)
        self.rejection_count = 0
        self._ping_uid = 0  # Node.ping's PINGs count from 1 (the peer manager's keepalives use 0)

    @property
    def _feature_host(self) -> FeatureHost:
        assert self.features is not None
        return self.features

    # --- QUIC connections and identity ----------------------------------------------------------
    def new_server_connection(self, original_destination_cid: bytes, retry_source_cid: bytes | None = None,
                              path: RelayPath | None = None) -> MeshQuicConnection:
        """An accepted connection; through a relay circuit (``path``) it must be the circuit's expected peer."""
        assert self.credentials is not None
        expect = path.expected_peer if path is not None else None
        return MeshQuicConnection(
            configuration=self.credentials.quic_configuration(
                self._ctx.config, is_client=False, packet_size=RELAYED_PACKET_SIZE if path is not None else None),
            original_destination_connection_id=original_destination_cid,
            retry_source_connection_id=retry_source_cid,
            verify_peer=lambda chain: self._verify(chain, expect),
        )

    def dial_relayed(self, peer_name: str, path: RelayPath) -> None:
        """Dial ``peer_name`` through a relay circuit; verified like a direct dial, kept or dropped by the
        peer manager like any other connection (a direct one wins over it)."""
        assert self.endpoint is not None and self.credentials is not None
        quic = MeshQuicConnection(
            configuration=self.credentials.quic_configuration(self._ctx.config, is_client=True,
                                                              packet_size=RELAYED_PACKET_SIZE),
            verify_peer=lambda chain: self._verify(chain, peer_name),
        )
        link = self.endpoint.new_relayed_client_link(quic, path)
        self.by_id[link.conn_id] = Connection(link)
        self.mesh.inbound_started(link.conn_id, self._ctx.now())  # whose it is counts once it is ready
        self._reschedule()

    def dial_address(self, address: tuple[str, int], expect: str | None = None) -> None:
        """A direct dial to one address, attributed to whoever proves its identity (a seed, whose name we do
        not know yet, or a hole-punched peer): kept or dropped by the peer manager like any connection."""
        assert self.endpoint is not None
        connection = self._client_connection(expect)
        self.mesh.inbound_started(connection.conn_id, self._ctx.now())  # whose it is counts once it is ready
        self._reschedule()
        resolved = dialing.sendable(address[0], address[1], self.endpoint.family)
        if resolved is not None:
            self.endpoint.connect(connection.link, resolved)
        else:
            self._ctx.spawn(self._resolve_and_connect(connection, [address], expect))

    def _verify(self, chain: Any, expect: str | None) -> tuple[str, str]:
        peers = {name: peer.config for name, peer in self._ctx.peers.items()}
        assert self.credentials is not None
        return self.credentials.verify_peer(chain, expect, peers, open_membership=self._ctx.config.mesh.open)

    def admit(self, name: str, address: tuple[str, int] | None, *, dial: bool) -> Peer | None:
        """Make ``name`` a known peer (membership): a member learnt from an announcement or a verified inbound
        connection. None if the member limit is reached. An existing peer is returned as it is (``dial``
        may turn a passive peer into a dialed one)."""
        peer = self._ctx.peers.get(name)
        if peer is None:
            if sum(1 for p in self._ctx.peers.values() if p.member) >= self._ctx.config.mesh.max_members:
                return None
            host, port = address if address is not None else ("0.0.0.0", 0)
            config = PeerConfig(name, Address(_unmapped(host), port))
            peer = self._ctx.peers[name] = Peer(config, self._ctx.config.limits.message_window, member=True)
        self.mesh.add_peer(name, self._ctx.now(), dial=dial)
        self._reschedule()
        return peer

    def forget(self, name: str, reason: str, code: int) -> None:
        """A member gone (left, silent, revoked): close its connections and forget it."""
        peer = self._ctx.peers.get(name)
        if peer is None or not peer.member:
            return
        self.apply(self.mesh.remove_peer(name, reason, code))
        self._ctx.peers.pop(name, None)
        self._messages.fail_unacked(peer, UnknownPeerError(f"member {name} is gone: {reason}"))

    def redial_soon(self, name: str) -> None:
        self.mesh.redial_soon(name, self._ctx.now())
        self._reschedule()

    def release(self, name: str, reason: str) -> None:
        """On-demand membership: stop dialing ``name`` and close our connection (it stays a known member)."""
        self.apply(self.mesh.set_passive(name, self._ctx.now(), reason))

    def recheck(self) -> list[Any]:
        """After a reload: re-verify every live connection against the new CA, CRL, denylist and pins."""
        actions: list[Any] = []
        for connection in list(self.by_id.values()):
            if connection.peer is None or not connection.chain or connection.closing:
                continue
            if connection.peer not in self._ctx.peers and self._ctx.config.mesh.open:
                continue  # the peer manager's set_peers closes it
            try:
                self._verify(connection.chain, connection.peer)
            except IdentityError as error:
                reason = f"rejected after reload: {error}"
                log.warning("peer no longer accepted after reload", extra={
                    "event": "peer_rejected", "peer": connection.peer, "reason": str(error)})
                self.close(connection, wire.ErrorCode.IDENTITY_REJECTED, reason)
                actions += self.mesh.connection_lost(connection.conn_id, reason, self._ctx.now(), rejected=True)
        return actions

    def ping(self, connection: Connection) -> asyncio.Future[None]:
        """Send a QUIC PING; the future completes when the peer's ACK of it arrives."""
        self._ping_uid += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        connection.pings[self._ping_uid] = waiter
        connection.quic.send_ping(self._ping_uid)
        self._ctx.touch(connection)
        return waiter

    # --- the peer manager's actions ---------------------------------------------------------------
    def tick(self) -> None:
        self._timer = None
        if not self._ctx.running:
            return
        for conn_id, connection in self.by_id.items():
            heard = connection.link.last_received
            if heard and heard > self._heard.get(conn_id, 0.0):
                self._heard[conn_id] = heard
                self.mesh.heard_from(conn_id, heard)
        self.apply(self.mesh.poll(self._ctx.now()))

    def apply(self, actions: Iterable[object]) -> None:
        for action in actions:
            if isinstance(action, Dial):
                self._dial(action.peer)
            elif isinstance(action, Ping):
                connection = self.by_id.get(action.conn_id)
                if connection is not None and not connection.link.terminated:
                    connection.quic.send_ping(0)
                    self._ctx.touch(connection)
            elif isinstance(action, Close):
                connection = self.by_id.get(action.conn_id)
                if connection is None:
                    continue
                if action.code == wire.ErrorCode.DUPLICATE_CONNECTION and connection.state is ConnectionState.READY \
                        and not connection.link.terminated and (connection.requests or connection.serving):
                    self._retire(connection, action.reason)
                else:
                    self.close(connection, action.code, action.reason)
            elif isinstance(action, PeerUp):
                self._peer_up(action.peer, action.conn_id)
            elif isinstance(action, PeerDown):
                self._peer_down(action.peer, action.reason)
        self._reschedule()

    def _reschedule(self) -> None:
        if not self._ctx.running:
            return
        deadline = self.mesh.next_deadline()
        if deadline is not None:  # coalesce: one tick serves every peer whose deadline falls in the same slot
            # (-inf, "at once", would make the rounding NaN: the next slot from now instead)
            deadline = max(deadline, self._ctx.now())
            deadline = -(-deadline // _MESH_TICK_SLOT) * _MESH_TICK_SLOT
        if self._timer is not None:
            if deadline is not None and abs(self._timer_at - deadline) < 1e-4:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self.tick)
            self._timer_at = deadline

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dial(self, peer_name: str) -> None:
        assert self.endpoint is not None
        connection = self._client_connection(peer_name)
        self.mesh.dial_started(peer_name, connection.conn_id, self._ctx.now())
        peer = self._ctx.peers[peer_name]
        # A configured peer is dialed where the config says (the operator's word, which may differ from what it
        # announces on purpose); a member at every address it announced.
        addresses = [(a.host, a.port) for a in (peer.addresses if peer.member else (peer.config.address,))]
        only = dialing.sendable(*addresses[0], self.endpoint.family) if len(addresses) == 1 else None
        if only is not None:
            self.endpoint.connect(connection.link, only)
        else:
            self._ctx.spawn(self._resolve_and_connect(connection, addresses, peer_name))

    def _client_connection(self, expect: str | None) -> Connection:
        """A dial's QUIC connection on the shared socket; its peer must prove to be ``expect`` (None: any peer
        this node accepts)."""
        assert self.endpoint is not None and self.credentials is not None
        quic = MeshQuicConnection(
            configuration=self.credentials.quic_configuration(self._ctx.config, is_client=True),
            verify_peer=lambda chain: self._verify(chain, expect),
        )
        link = self.endpoint.new_client_link(quic)
        connection = self.by_id[link.conn_id] = Connection(link)
        return connection

    async def _resolve_and_connect(self, connection: Connection, addresses: Sequence[tuple[str, int]],
                                   expect: str | None) -> None:
        """Resolve every address (A and AAAA records) and race them, IPv6 first (RFC 8305, runtime/dialing.py):
        ``connection`` tries the first; each later one gets a connection of its own, attributed once verified
        like an inbound one. The first handshake to complete wins; the others are closed."""
        assert self.endpoint is not None
        targets, problems = await dialing.resolve(addresses, self.endpoint.family)
        if connection.closing or not self._ctx.running or not targets:
            self.endpoint.abandon(connection.link)
            self.by_id.pop(connection.conn_id, None)
            if self._ctx.running and not connection.closing:
                reason = "; ".join(problems) or "no address to dial"
                self.apply(self.mesh.connection_lost(connection.conn_id, reason, self._ctx.now()))
            return
        attempts: list[Connection] = []

        def start(target: tuple[str, int]) -> Connection:
            assert self.endpoint is not None
            attempt = self._client_connection(expect) if attempts else connection
            if attempts:
                self.mesh.inbound_started(attempt.conn_id, self._ctx.now())  # whose it is counts once it is ready
                self._reschedule()
            attempts.append(attempt)
            self.endpoint.connect(attempt.link, target)
            return attempt

        def outcome(attempt: Connection) -> bool | None:
            if attempt.hello is not None:
                return True  # its handshake completed: that address works, whichever connection is kept
            return False if attempt.closing or attempt.link.terminated or not self._ctx.running else None

        winner = await dialing.race(targets, start, outcome, timeout=self._ctx.config.timers.handshake_timeout)
        for attempt in attempts:
            if attempt is not winner and self._ctx.running:
                self.close(attempt, wire.ErrorCode.NO_ERROR, "another address of the peer answered first", quiet=True)

    def _peer_up(self, peer_name: str, conn_id: int) -> None:
        peer = self._ctx.peers.get(peer_name)
        connection = self.by_id.get(conn_id)
        if peer is None or connection is None:
            return
        was_up = peer.connection is not None
        peer.connection = connection
        peer.fingerprint = connection.fingerprint
        if not was_up:
            peer.connected_since = time.time()
        self._messages.resend(peer, connection)
        address = connection.quic.get_peer_address() or connection.link.address
        rtt = connection.quic.smoothed_rtt()
        log.info("peer connected" if not was_up else "peer connection replaced", extra={
            "event": "peer_connected" if not was_up else "peer_connection_replaced", "peer": peer_name,
            "address": format_address(address), "fingerprint": connection.fingerprint,
            "path": f"via {connection.relay}" if connection.relay else "direct",
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None})
        if connection.hello is not None:
            self._feature_host.peer_ready(peer_name, connection.hello.epoch)
        if not was_up:
            self._events.publish(peer_name, "connected", None)

    def _peer_down(self, peer_name: str, reason: str) -> None:
        peer = self._ctx.peers.get(peer_name)
        if peer is None:
            return
        old = peer.connection
        peer.connection = None
        peer.connected_since = None
        self._datagrams.drop_queued(peer)
        if old is not None:
            self.requests.fail(old, PeerNotConnectedError(f"connection to {peer_name} lost: {reason}"))
        log.warning("peer disconnected", extra={"event": "peer_disconnected", "peer": peer_name, "reason": reason})
        self._feature_host.peer_lost(peer_name, reason)
        self._events.publish(peer_name, "disconnected", reason)

    # --- LinkHandler: what the endpoint tells us -------------------------------------------------
    def link_accepted(self, link: Link) -> None:
        connection = self.by_id[link.conn_id] = Connection(link)
        if not self._ctx.running:
            self.close(connection, wire.ErrorCode.SHUTDOWN, "node is shutting down", quiet=True)
            return
        self.mesh.inbound_started(link.conn_id, self._ctx.now())
        self._reschedule()

    def link_event(self, link: Link, event: events.QuicEvent) -> None:
        connection = self.by_id.get(link.conn_id)
        if connection is None:
            return
        try:
            kind = type(event)
            if kind is events.DatagramFrameReceived:
                self._datagrams.received(connection, event.data)
            elif kind is events.StreamDataReceived:
                self._streams.data(connection, event.stream_id, event.data, event.end_stream)
            elif kind is events.HandshakeCompleted:
                self._handshake_completed(connection)
                if link.path is None:  # relayed packets keep their size: no path of their own to probe
                    link.quic.start_path_mtu_discovery()
            elif kind is events.StreamReset:
                self._streams.reset(connection, event.stream_id)
            elif kind is events.PingAcknowledged:
                waiter = connection.pings.pop(event.uid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        except ProtocolError as error:
            log.warning("protocol violation", extra={
                "event": "protocol_violation", "peer": connection.peer, "reason": str(error)})
            self.close(connection, error.code, f"protocol violation: {error}")

    def link_terminated(self, link: Link, event: events.ConnectionTerminated) -> None:
        connection = self.by_id.pop(link.conn_id, None)
        self._heard.pop(link.conn_id, None)
        if connection is None:
            return
        reason, rejected = self._termination_reason(connection, event)
        connection.transition(Transition.TERMINATED)
        if rejected:
            address = format_address(link.address)
            self.rejections.append((time.time(), address, reason))
            self.rejection_count += 1
            log.warning("handshake rejected", extra={
                "event": "handshake_rejected", "direction": "outbound" if link.dialed else "inbound",
                "address": address, "reason": reason})
        superseded = connection.close_code == wire.ErrorCode.DUPLICATE_CONNECTION or (
            event.frame_type is None and event.error_code == wire.ErrorCode.DUPLICATE_CONNECTION
        )
        error_type = Superseded if superseded else PeerNotConnectedError
        self.requests.fail(connection, error_type(f"connection lost: {reason}"))
        for waiter in connection.pings.values():
            if not waiter.done():
                waiter.set_exception(PeerNotConnectedError(f"connection lost: {reason}"))
        connection.pings.clear()
        self._messages.drop_parked(connection)
        if self._ctx.running:
            self.apply(self.mesh.connection_lost(link.conn_id, reason, self._ctx.now(), rejected=rejected))

    @staticmethod
    def _termination_reason(connection: Connection, event: events.ConnectionTerminated) -> tuple[str, bool]:
        """Why it ended, in words, and whether it was a handshake rejection (either way)."""
        link = connection.link
        if link.quic.verify_error is not None:
            return f"rejected peer certificate: {link.quic.verify_error}", True
        if connection.close_reason is not None:
            return connection.close_reason, False
        if QuicErrorCode.CRYPTO_ERROR <= event.error_code < QuicErrorCode.CRYPTO_ERROR + 0x100:
            # Dialing, the alert is the peer's; accepting, it may be ours (e.g. no common ALPN) or the client's.
            who = "peer refused the TLS handshake" if link.dialed else "TLS handshake refused"
            return f"{who}: {event.reason_phrase or 'no reason given'}", True
        if event.error_code == QuicErrorCode.NO_ERROR and event.reason_phrase == "":
            return ("idle timeout" if event.frame_type is None else "closed by peer"), False
        return f"closed by peer: {event.reason_phrase or error_name(event.error_code)}", False

    def before_flush(self, link: Link) -> None:
        connection = self.by_id.get(link.conn_id)
        if connection is None or not connection.usable:
            return
        if self._messages.flush_acks(connection):
            link.ack_now = True  # data to send: the QUIC ACK may go with it
        peer = self._ctx.peers.get(connection.peer or "")
        if peer is not None and peer.connection is connection and peer.datagram_queue:
            self._datagrams.flush(peer, connection)

    # --- handshake and control stream ------------------------------------------------------------
    def _handshake_completed(self, connection: Connection) -> None:
        if not self._ctx.running:  # a peer redialed while we stop: no Hello, or it would think us up
            self.close(connection, wire.ErrorCode.SHUTDOWN, "node is shutting down", quiet=True)
            return
        quic = connection.quic
        verified = quic.verified_peer
        if verified is None:  # cannot happen: the TLS hook raises instead of returning nothing
            self.close(connection, wire.ErrorCode.IDENTITY_REJECTED, "peer identity not verified")
            return
        connection.transition(Transition.VERIFIED)
        connection.peer, connection.fingerprint = verified
        quic.release_handshake_buffers()
        connection.chain = quic.peer_chain()
        connection.control_stream = quic.get_next_available_stream_id(is_unidirectional=True)
        hello = wire.Hello(
            version=wire.PROTOCOL_VERSION,
            epoch=self._ctx.epoch,
            max_message_size=self._ctx.config.limits.max_message_size,
            max_datagram_payload=self._datagrams.accepted_payload(connection),
            features=wire.FEATURES,
        )
        quic.send_stream_data(
            connection.control_stream, wire.encode_stream_type(wire.StreamType.CONTROL) + wire.encode_frame(hello)
        )
        self._ctx.touch(connection)

    def _control_frames(self, connection: Connection, frames: list[Any]) -> None:
        for frame in frames:
            if isinstance(frame, wire.Hello):
                self._hello(connection, frame)
            elif isinstance(frame, wire.Ack):
                self._messages.acked(connection, frame.message_ids)
            elif isinstance(frame, wire.Reject):
                self._messages.rejected(connection, frame)
            elif isinstance(frame, wire.GoAway):
                reason = f"peer is going away: {frame.reason or error_name(frame.code)}"
                self.close(connection, wire.ErrorCode.NO_ERROR, reason, quiet=True)
                if self._ctx.running:
                    self.apply(self.mesh.connection_lost(connection.conn_id, reason, self._ctx.now()))
            elif connection.hello is not None and connection.peer is not None:
                self._feature_host.control_received(connection.peer, connection.hello.epoch, frame)

    def _hello(self, connection: Connection, hello: wire.Hello) -> None:
        assert connection.peer is not None
        if not self._ctx.running or connection.closing:
            return  # stopping: no new peers
        if connection.state is not ConnectionState.VERIFIED:
            raise ProtocolError("a second Hello", code=wire.ErrorCode.PROTOCOL_VIOLATION)
        if hello.version != wire.PROTOCOL_VERSION:
            self.close(connection, wire.ErrorCode.VERSION_MISMATCH,
                       f"peer speaks protocol version {hello.version}, this node {wire.PROTOCOL_VERSION}")
            return
        if connection.peer not in self._ctx.peers and self._ctx.config.mesh.open:
            # Verified under open membership (the TLS hook accepts no unknown name otherwise): a new member.
            address = connection.quic.get_peer_address() or connection.link.address
            if self.admit(connection.peer, address, dial=False) is None:
                self.close(connection, wire.ErrorCode.REFUSED, "member limit reached")
                return
        connection.hello = hello
        connection.batching = bool(hello.features & wire.Feature.DATAGRAM_BATCH)
        connection.transition(Transition.HELLO)
        self.apply(self.mesh.connection_ready(
            connection.peer, connection.conn_id, dialed_by_us=connection.link.dialed, peer_epoch=hello.epoch,
            now=self._ctx.now(), relayed=connection.link.path is not None,
        ))
        self._messages.connection_ready(connection)

    def send_goaway(self, connection: Connection, code: int, reason: str) -> None:
        if connection.state is ConnectionState.READY or connection.state is ConnectionState.RETIRING:
            connection.send_control(wire.GoAway(int(code), reason[:REASON_LIMIT]))

    def close(self, connection: Connection, code: int, reason: str, quiet: bool = False) -> None:
        if connection.closing or connection.link.terminated:
            return
        connection.transition(Transition.CLOSE)
        connection.close_reason = reason
        connection.close_code = code
        if not quiet:
            log.info("closing connection", extra={
                "event": "connection_closing", "peer": connection.peer,
                "address": format_address(connection.link.address), "reason": reason})
        if connection.link.address is None:
            # A dial still resolving its peer's name has sent nothing and has no path to send a close
            # on: forget it (the resolver sees it closing and does not connect it).
            assert self.endpoint is not None
            self.endpoint.abandon(connection.link)
            self.by_id.pop(connection.conn_id, None)
            self.apply(self.mesh.connection_lost(connection.conn_id, reason, self._ctx.now()))
            return
        connection.quic.close(error_code=int(code), reason_phrase=reason[:REASON_LIMIT])
        self._ctx.touch(connection)
        peer = self._ctx.peers.get(connection.peer or "")
        if peer is not None and peer.connection is connection:
            peer.connection = None

    def _retire(self, connection: Connection, reason: str) -> None:
        """A duplicate that lost the tie-break while requests ran on it: nothing new goes on it (the
        winner carries the peer now), but its requests finish before it closes, within a bound."""
        connection.transition(Transition.RETIRE)
        connection.retire_reason = reason
        peer = self._ctx.peers.get(connection.peer or "")
        if peer is not None and peer.connection is connection:
            peer.connection = None
        asyncio.get_running_loop().call_later(
            self._ctx.config.timers.handshake_timeout, self.close, connection, wire.ErrorCode.DUPLICATE_CONNECTION,
            reason,
        )

    def _retired_if_idle(self, connection: Connection) -> None:
        if connection.state is not ConnectionState.RETIRING or connection.requests or connection.serving:
            return
        # A moment for our last response to reach the peer: a close discards unsent stream data.
        grace = max(0.05, 3 * (connection.quic.smoothed_rtt() or 0.0))
        asyncio.get_running_loop().call_later(
            grace, self.close, connection, wire.ErrorCode.DUPLICATE_CONNECTION, connection.retire_reason or ""
        )


def _unmapped(host: str) -> str:
    """An IPv4 address as seen on a dual-stack socket (``::ffff:a.b.c.d``) written as plain IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def error_name(code: int) -> str:
    try:
        return wire.ErrorCode(code).name.lower()
    except ValueError:
        return f"error 0x{code:x}"
