"""The extension seam: how a feature (UDP forwarding today; relay, durable storage, membership, pub/sub
next) plugs into a node without adding methods to ``Node``.

A feature declares the wire things it owns — datagram kinds, control frame types, and feature tags (its
reliable messages and requests travel on FEATURE_MESSAGE / FEATURE_REQUEST streams with that tag, with the
same ids, window, resends, duplicate filter and limits as the application's) — and is told when a peer's
connection becomes active and when it is lost. It acts through the :class:`FeatureHost` it is given, never
through the node's internals. Each kind, frame type and tag has one owner; a second one raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from quicmesh.errors import PeerNotConnectedError, QuicmeshError
from quicmesh.protocol import wire

if TYPE_CHECKING:
    from quicmesh.config import Address, Config
    from quicmesh.runtime.credentials import Credentials
    from quicmesh.runtime.connections import Connections
    from quicmesh.runtime.context import Context
    from quicmesh.runtime.datagrams import DatagramChannel
    from quicmesh.runtime.events import Received
    from quicmesh.runtime.inbox import Inbox
    from quicmesh.runtime.messages import MessageChannel
    from quicmesh.transport.endpoint import RelayPath

F = TypeVar("F")


class Feature(Protocol):
    """What a feature implements (:class:`FeatureBase` has do-nothing defaults). Calls come from the
    node's packet processing: keep them quick, hand longer work to a task."""

    #: wire.DatagramKind values whose datagrams go to :meth:`datagram_received`
    datagram_kinds: frozenset[int]
    #: control frame classes (wire.Services, ...) that go to :meth:`control_received`
    control_frames: tuple[type, ...]
    #: wire.FeatureTag values whose messages and requests go to :meth:`message_received` / :meth:`request_received`
    feature_tags: frozenset[int]

    def peer_ready(self, peer: str, epoch: int) -> None:
        """``peer`` has a new active connection (its node process is ``epoch``): announce yourself."""

    def peer_lost(self, peer: str, reason: str) -> None:
        """``peer`` has no active connection any more."""

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        """A datagram of one of your kinds (kind byte first). Raise ProtocolError if it is malformed."""

    def control_received(self, peer: str, epoch: int, frame: object) -> None:
        """A control frame of one of your types, from a verified peer whose node process is ``epoch``."""

    def message_received(self, peer: str, tag: int, data: bytes) -> Awaitable[object] | None:
        """A reliable message for one of your tags. Return None to accept it now (it is acknowledged), or
        an awaitable: it is acknowledged once that completes. Raising refuses it; the sender gets why."""

    def request_received(self, peer: str, tag: int, data: bytes) -> Awaitable[bytes] | bytes:
        """A request for one of your tags: the response body (or an awaitable of it). Raising sends the
        caller a RemoteError."""

    def node_stopping(self) -> None:
        """The node is stopping: end what the application waits on (iterators, pending calls)."""


class FeatureBase:
    """Do-nothing defaults for :class:`Feature`: a feature overrides what it uses."""

    datagram_kinds: frozenset[int] = frozenset()
    control_frames: tuple[type, ...] = ()
    feature_tags: frozenset[int] = frozenset()

    def peer_ready(self, peer: str, epoch: int) -> None:
        pass

    def peer_lost(self, peer: str, reason: str) -> None:
        pass

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        pass

    def control_received(self, peer: str, epoch: int, frame: object) -> None:
        pass

    def message_received(self, peer: str, tag: int, data: bytes) -> Awaitable[object] | None:
        raise QuicmeshError(f"{type(self).__name__} takes no messages")

    def request_received(self, peer: str, tag: int, data: bytes) -> Awaitable[bytes] | bytes:
        raise QuicmeshError(f"{type(self).__name__} takes no requests")

    def node_stopping(self) -> None:
        pass


class FeatureError(QuicmeshError):
    """A feature asked for something the seam does not allow (a kind, frame type or tag already owned)."""


_RESERVED_KINDS = frozenset({int(wire.DatagramKind.APP), int(wire.DatagramKind.BATCH)})
_RESERVED_FRAMES = frozenset({wire.Hello, wire.Ack, wire.Reject, wire.GoAway})  # the runtime's own


class FeatureHost:
    """What a feature may do with the node; ``node.features`` is the one instance."""

    def __init__(self, ctx: Context, datagrams: DatagramChannel, messages: MessageChannel,
                 connections: Connections, inbox: Inbox) -> None:
        self._ctx = ctx
        self._datagrams = datagrams
        self._messages = messages
        self._connections = connections
        self._requests = connections.requests
        self._inbox = inbox
        self._features: list[Feature] = []
        self._frames: dict[type, Feature] = {}

    # --- registration -------------------------------------------------------------------------
    def add(self, feature: Feature) -> None:
        """Plug ``feature`` in; peers already connected are announced to it at once."""
        taken = [f"datagram kind {kind}" for kind in feature.datagram_kinds
                 if kind in self._datagrams.handlers or kind in _RESERVED_KINDS]
        taken += [f"frame {frame.__name__}" for frame in feature.control_frames
                  if frame in self._frames or frame in _RESERVED_FRAMES]
        taken += [f"tag {tag}" for tag in feature.feature_tags if tag in self._messages.feature_handlers or tag <= 0]
        if taken:
            raise FeatureError(f"{type(feature).__name__} cannot have {', '.join(taken)}: already owned or reserved")
        self._features.append(feature)
        for kind in feature.datagram_kinds:
            self._datagrams.handlers[kind] = feature.datagram_received
        for frame in feature.control_frames:
            self._frames[frame] = feature
        for tag in feature.feature_tags:
            self._messages.feature_handlers[tag] = _bind_tag(feature.message_received, tag)
            self._requests.feature_handlers[tag] = _bind_tag(feature.request_received, tag)
        for name, peer in self._ctx.peers.items():
            connection = peer.usable_connection
            if connection is not None and connection.hello is not None:
                feature.peer_ready(name, connection.hello.epoch)

    def remove(self, feature: Feature) -> None:
        if feature not in self._features:
            return
        self._features.remove(feature)
        for kind in feature.datagram_kinds:
            self._datagrams.handlers.pop(kind, None)
        for frame in feature.control_frames:
            self._frames.pop(frame, None)
        for tag in feature.feature_tags:
            self._messages.feature_handlers.pop(tag, None)
            self._requests.feature_handlers.pop(tag, None)

    def find(self, feature_type: type[F]) -> F | None:
        """The plugged-in feature of this type, if any (status reads the forwarder this way)."""
        for feature in self._features:
            if isinstance(feature, feature_type):
                return feature
        return None

    # --- what features may do -----------------------------------------------------------------
    @property
    def node_name(self) -> str:
        return self._ctx.name

    @property
    def epoch(self) -> int:
        """This node process's epoch (peers tell a restart from a reconnect by it)."""
        return self._ctx.epoch

    @property
    def config(self) -> Config:
        """The node's config as it is now (a reload replaces it)."""
        return self._ctx.config

    @property
    def running(self) -> bool:
        return self._ctx.running

    def spawn(self, coroutine: Awaitable[object]) -> None:
        """Run a task owned by the node (cancelled when it stops; a failure is logged)."""
        self._ctx.spawn(coroutine)

    def connected_peers(self) -> list[str]:
        return [name for name, peer in self._ctx.peers.items() if peer.usable_connection is not None]

    def datagram_limit(self, peer: str) -> int:
        """The largest datagram (kind byte included) ``peer`` takes now (our own limit if not connected)."""
        return self._datagrams.peer_limit(self._ctx.peers.get(peer)) + wire.DATAGRAM_OVERHEAD

    def send_datagram(self, peer: str, datagram: bytes, payload_size: int) -> str | None:
        """Queue a whole datagram (kind byte first) behind the peer's other datagrams: None if queued, else
        why it was dropped (``"not connected"``, ``"queue full"``); ``payload_size`` counts as bytes out."""
        return self._datagrams.send_frame(peer, datagram, payload_size)

    def send_control(self, peer: str, frame: wire.Frame) -> bool:
        """Send a control frame on the peer's active connection; False if it has none."""
        target = self._ctx.peers.get(peer)
        connection = target.usable_connection if target is not None else None
        if connection is None:
            return False
        connection.send_control(frame)
        self._ctx.touch(connection)
        return True

    async def send_message(self, peer: str, tag: int, data: bytes) -> None:
        """A reliable message to ``peer``'s feature ``tag``: returns once that feature accepted it (resent
        across reconnects until then, like the application's messages)."""
        _check_tag(tag)
        await self._messages.send(peer, data, tag)

    async def request(self, peer: str, tag: int, data: bytes, timeout: float = 5.0) -> bytes:
        """A request to ``peer``'s feature ``tag``; its response body (RemoteError, RequestTimeoutError...)."""
        _check_tag(tag)
        target = self._ctx.peer_or_raise(peer)
        self._ctx.check_running()
        self._messages.check_size(target, data)
        if target.usable_connection is None:
            raise PeerNotConnectedError(f"peer {peer} is not connected")
        return await self._requests.request(target, data, timeout, tag)

    # --- paths: what relaying needs (quicmesh/relay) ------------------------------------------
    def direct_peers(self) -> dict[str, float | None]:
        """Peers connected directly (not through a relay), with their smoothed RTT in seconds."""
        direct = {}
        for name, peer in self._ctx.peers.items():
            connection = peer.usable_connection
            if connection is not None and connection.link.path is None:
                direct[name] = connection.quic.smoothed_rtt()
        return direct

    def direct_failures(self, peer: str) -> int:
        """How many direct dials to ``peer`` failed in a row (0: none yet, or it is connected directly)."""
        if peer not in self._ctx.peers or not self._ctx.running:
            return 0
        return self._connections.mesh.view(peer, self._ctx.now()).consecutive_failures

    def observed_address(self, peer: str) -> tuple[str, int] | None:
        """The UDP address ``peer``'s direct connection receives from now: its NAT's public mapping when it is
        behind one (it follows the peer's migrations); None without a direct connection (quicmesh/nat)."""
        target = self._ctx.peers.get(peer)
        connection = target.usable_connection if target is not None else None
        if connection is None or connection.link.path is not None:
            return None
        address = connection.quic.get_peer_address()
        return None if address is None else (address[0], address[1])

    def dial_relayed(self, peer: str, path: RelayPath) -> None:
        """Dial ``peer`` through a relay circuit (verified end to end exactly like a direct dial)."""
        self._connections.dial_relayed(peer, path)

    def relayed_packet(self, path: RelayPath, packet: bytes) -> None:
        """An inner QUIC packet that came through ``path``."""
        endpoint = self._connections.endpoint
        if endpoint is not None:
            endpoint.relayed_packet(path, packet)

    def dial_address(self, address: tuple[str, int], expect: str | None = None) -> None:
        """A direct dial to one address (a seed, a hole-punched peer), attributed to whoever proves its identity
        (``expect``: the only name accepted; None: any peer this node accepts)."""
        if self._ctx.running:
            self._connections.dial_address(address, expect)

    # --- membership: peers learnt at run time (quicmesh/membership) ------------------------------
    @property
    def credentials(self) -> Credentials:
        """This node's certificate chain, trust policy and signer (replaced by a reload)."""
        credentials = self._connections.credentials
        if credentials is None:
            raise QuicmeshError(f"node {self._ctx.name} was not started")
        return credentials

    def known_peers(self) -> dict[str, bool]:
        """Every known peer: True for members learnt at run time, False for the config's [[peers]]."""
        return {name: peer.member for name, peer in self._ctx.peers.items()}

    def peer_addresses(self, peer: str) -> tuple[str, ...]:
        target = self._ctx.peers.get(peer)
        return () if target is None else tuple(str(address) for address in target.addresses)

    def add_member(self, name: str, addresses: tuple[Address, ...], *, dial: bool) -> bool:
        """Know ``name`` (a verified member) at ``addresses``; dial it if ``dial``. False: member limit reached."""
        first = (addresses[0].host, addresses[0].port) if addresses else None
        peer = self._connections.admit(name, first, dial=dial)
        if peer is None:
            return False
        if addresses and addresses != peer.announced:
            moved = bool(peer.announced) or (peer.member and peer.config.address != addresses[0])
            peer.announced = addresses
            if peer.member:
                peer.config = replace(peer.config, address=addresses[0])
            if moved and peer.usable_connection is None:
                self._connections.redial_soon(name)  # restarted elsewhere: no need to wait out a backoff
        return True

    def release_member(self, name: str, reason: str) -> None:
        """Stop dialing ``name`` and close our connection to it; it stays known (on-demand: idle)."""
        if name in self._ctx.peers and self._ctx.running:
            self._connections.release(name, reason)

    def forget_member(self, name: str, reason: str, code: int = wire.ErrorCode.NOT_CONFIGURED) -> None:
        """A member that left, fell silent or was revoked: close its connections and forget it (a peer of the
        config stays)."""
        if self._ctx.running:
            self._connections.forget(name, reason, code)

    def recheck_identities(self) -> None:
        """Re-verify every connection against the current trust (after a newer CRL): revoked peers are closed."""
        if self._ctx.running:
            self._connections.apply(self._connections.recheck())

    def peer_activity(self, peer: str) -> int:
        """A number that grows with the application's traffic to and from ``peer`` (on-demand idle checks)."""
        target = self._ctx.peers.get(peer)
        if target is None:
            return 0
        c = target.counters
        return c.datagrams_in + c.datagrams_out + c.messages_in + c.messages_out + c.requests_in + c.requests_out

    def set_on_demand(self, callback: Callable[[str], None] | None) -> None:
        """Called with a known peer's name when the application addresses it while it is not connected."""
        self._ctx.on_demand = callback

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """The bound UDP address (the real port when the config says 0); None before start."""
        return self._ctx.listen_address

    def deliver(self, item: Received) -> None:
        """Hand an item to the application (its receive handler, or the inbox read by ``recv()``)."""
        self._inbox.deliver(item)

    # --- what the node tells features ---------------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        for feature in self._features:
            feature.peer_ready(peer, epoch)

    def peer_lost(self, peer: str, reason: str) -> None:
        for feature in self._features:
            feature.peer_lost(peer, reason)

    def node_stopping(self) -> None:
        for feature in self._features:
            feature.node_stopping()

    def control_received(self, peer: str, epoch: int, frame: object) -> bool:
        """Hand a control frame to its owner; False if no feature owns its type."""
        feature = self._frames.get(type(frame))
        if feature is None:
            return False
        feature.control_received(peer, epoch, frame)
        return True


def _check_tag(tag: int) -> None:
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 < tag <= wire.MAX_VARINT:
        raise FeatureError(f"feature tag must be a positive integer (a wire.FeatureTag), got {tag!r}")


def _bind_tag(handler, tag: int):  # noqa: ANN001, ANN202 - (peer, tag, data) -> (peer, data) for the channels
    def for_tag(peer: str, data: bytes):  # noqa: ANN202
        return handler(peer, tag, data)

    return for_tag
