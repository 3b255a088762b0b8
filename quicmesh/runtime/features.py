"""The extension seam: how a feature (UDP forwarding today; relay, durable storage, membership, pub/sub
next) plugs into a node without adding methods to ``Node``.

A feature declares the wire things it owns — datagram kinds and control frame types — and is told when a
peer's connection becomes active and when it is lost. It acts through the :class:`FeatureHost` it is given
(send a datagram or a control frame, ask a peer's datagram limit), never through the node's internals.
Each kind and frame type has at most one owner; registering a second owner is a bug and raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

from quicmesh.errors import QuicmeshError
from quicmesh.protocol import wire

if TYPE_CHECKING:
    from quicmesh.runtime.context import Context
    from quicmesh.runtime.datagrams import DatagramChannel


class Feature(Protocol):
    """What a feature implements. Calls come from the node's packet processing: keep them quick."""

    #: wire.DatagramKind values whose datagrams go to :meth:`datagram_received`
    datagram_kinds: frozenset[int]
    #: control frame classes (wire.Services, ...) that go to :meth:`control_received`
    control_frames: tuple[type, ...]

    def peer_ready(self, peer: str, epoch: int) -> None:
        """``peer`` has a new active connection (its node process is ``epoch``): announce yourself."""

    def peer_lost(self, peer: str, reason: str) -> None:
        """``peer`` has no active connection any more."""

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        """A datagram of one of your kinds (kind byte first). Raise ProtocolError if it is malformed."""

    def control_received(self, peer: str, epoch: int, frame: object) -> None:
        """A control frame of one of your types, from a verified peer whose node process is ``epoch``."""


F = TypeVar("F")


class FeatureError(QuicmeshError):
    """A feature asked for something the seam does not allow (a kind or frame type already owned)."""


class FeatureHost:
    """What a feature may do with the node; ``node.features`` is the one instance."""

    def __init__(self, ctx: Context, datagrams: DatagramChannel) -> None:
        self._ctx = ctx
        self._datagrams = datagrams
        self._features: list[Feature] = []
        self._frames: dict[type, Feature] = {}

    # --- registration -------------------------------------------------------------------------
    def add(self, feature: Feature) -> None:
        """Plug ``feature`` in; peers already connected are announced to it at once."""
        taken = [kind for kind in feature.datagram_kinds if kind in self._datagrams.handlers]
        taken += [frame.__name__ for frame in feature.control_frames if frame in self._frames]
        reserved = {int(wire.DatagramKind.APP), int(wire.DatagramKind.BATCH)} & set(feature.datagram_kinds)
        if taken or reserved:
            raise FeatureError(f"already owned: {sorted(map(str, [*taken, *reserved]))}")
        self._features.append(feature)
        for kind in feature.datagram_kinds:
            self._datagrams.handlers[kind] = feature.datagram_received
        for frame in feature.control_frames:
            self._frames[frame] = feature
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

    def find(self, feature_type: type[F]) -> F | None:
        """The plugged-in feature of this type, if any (status and metrics ask for the forwarder this way)."""
        for feature in self._features:
            if isinstance(feature, feature_type):
                return feature
        return None

    # --- what features may do -----------------------------------------------------------------
    def connected_peers(self) -> list[str]:
        return [name for name, peer in self._ctx.peers.items() if peer.usable_connection is not None]

    def datagram_limit(self, peer: str) -> int:
        """The largest datagram (kind byte included) ``peer`` takes now (our own limit if not connected)."""
        target = self._ctx.peers.get(peer)
        connection = target.connection if target is not None else None
        payload = self._datagrams.limit(connection) if connection is not None else self._datagrams.max_payload
        return payload + wire.DATAGRAM_OVERHEAD

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

    # --- what the node tells features ---------------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        for feature in self._features:
            feature.peer_ready(peer, epoch)

    def peer_lost(self, peer: str, reason: str) -> None:
        for feature in self._features:
            feature.peer_lost(peer, reason)

    def control_received(self, peer: str, epoch: int, frame: object) -> bool:
        """Hand a control frame to its owner; False if no feature owns its type."""
        feature = self._frames.get(type(frame))
        if feature is None:
            return False
        feature.control_received(peer, epoch, frame)
        return True
