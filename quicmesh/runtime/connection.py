"""One verified-or-verifying QUIC connection to a peer, and its state machine.

The state changes only through :meth:`Connection.transition`, which looks the move up in
``TRANSITIONS`` (data, not flags scattered over the node) and raises on a move the table does not allow:

============  ===============  ============  ==================================================
from          event            to            when
============  ===============  ============  ==================================================
HANDSHAKING   verified         VERIFIED      TLS done and the peer's identity checked; our Hello sent
VERIFIED      hello            READY         the peer's Hello arrived with our protocol version
READY         retire           RETIRING      lost a duplicate tie-break while requests ran on it
any open      close            CLOSING       we close it (CONNECTION_CLOSE queued), with a reason
any           terminated       CLOSED        aioquic reports it gone (either side, or idle timeout)
============  ===============  ============  ==================================================

No application byte is sent or accepted before READY: messages that arrive between VERIFIED and READY
are held (``early_messages``) and delivered once the peer's Hello gives their sender's epoch.
A RETIRING connection still carries the requests running on it, but nothing new goes on it.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import TYPE_CHECKING, Any

from quicmesh.errors import QuicmeshError
from quicmesh.protocol import wire

if TYPE_CHECKING:
    from cryptography import x509

    from quicmesh.transport._aioquic import MeshQuicConnection
    from quicmesh.transport.endpoint import Link


#: Longest reason (characters) we put in a CONNECTION_CLOSE, GoAway, Reject or error response.
REASON_LIMIT = 512


class ConnectionState(str, Enum):
    HANDSHAKING = "handshaking"
    VERIFIED = "verified"
    READY = "ready"
    RETIRING = "retiring"
    CLOSING = "closing"
    CLOSED = "closed"


class Transition(str, Enum):
    VERIFIED = "verified"
    HELLO = "hello"
    RETIRE = "retire"
    CLOSE = "close"
    TERMINATED = "terminated"


_S, _T = ConnectionState, Transition
TRANSITIONS: dict[tuple[ConnectionState, Transition], ConnectionState] = {
    (_S.HANDSHAKING, _T.VERIFIED): _S.VERIFIED,
    (_S.VERIFIED, _T.HELLO): _S.READY,
    (_S.READY, _T.RETIRE): _S.RETIRING,
    **{(state, _T.CLOSE): _S.CLOSING for state in (_S.HANDSHAKING, _S.VERIFIED, _S.READY, _S.RETIRING)},
    **{(state, _T.TERMINATED): _S.CLOSED for state in _S},
}
_CARRIES_TRAFFIC = frozenset({_S.READY, _S.RETIRING})
_CLOSED_OR_CLOSING = frozenset({_S.CLOSING, _S.CLOSED})


class InvalidTransitionError(QuicmeshError):
    """A connection was asked to move where the state table does not allow (a bug in the runtime)."""


class InStream:
    """A peer-opened stream whose type, or body, has not fully arrived yet."""

    __slots__ = ("head", "stream_type", "decoder", "refused", "buffered")

    def __init__(self) -> None:
        self.head = b""
        self.buffered = 0  # bytes fed to the decoder so far (counted in the connection's buffer totals)
        self.stream_type: int | None = None
        self.decoder: Any = None
        self.refused = False


class Connection:
    """quicmesh's state for one QUIC connection: identity, control stream, streams in progress, and the
    per-connection parts of the channels (pending acks and early messages; requests out and served)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.state = ConnectionState.HANDSHAKING
        self.peer: str | None = None  # verified identity (node name), from VERIFIED on
        self.fingerprint: str | None = None
        self.chain: list[x509.Certificate] = []
        self.hello: wire.Hello | None = None  # the peer's, from READY on
        self.batching = False  # the peer accepts BATCH datagrams (its Hello says so)
        self.close_reason: str | None = None
        self.close_code: int | None = None  # ours, once we close it
        self.retire_reason: str | None = None
        # control stream
        self.control_stream: int | None = None
        self.control = wire.ControlDecoder()
        self.control_seen = False
        # peer-opened streams in progress, and the bytes this peer makes us hold (limits.max_peer_buffer)
        self.streams: dict[int, InStream] = {}
        self.message_bytes = 0
        self.request_bytes = 0
        # message channel: ids to acknowledge at the next flush; messages that came before the Hello
        self.pending_acks: list[int] = []
        self.early_messages: list[tuple[int, bytes, int]] = []  # (message id, body, feature tag)
        # request channel: our requests waiting for a response (by stream id); requests we are serving
        self.requests: dict[int, Any] = {}
        self.serving = 0
        # Node.ping: QUIC PINGs by uid (keepalives use uid 0), resolved when the peer acknowledges them
        self.pings: dict[int, asyncio.Future[None]] = {}

    def transition(self, event: Transition) -> ConnectionState:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise InvalidTransitionError(f"connection {self.conn_id}: no transition from {self.state.value} "
                                         f"on {event.value}")
        self.state = new
        return new

    @property
    def quic(self) -> MeshQuicConnection:
        return self.link.quic

    @property
    def conn_id(self) -> int:
        return self.link.conn_id

    @property
    def relay(self) -> str | None:
        """The relay node this connection goes through (None: direct)."""
        path = self.link.path
        return path.relay if path is not None else None

    @property
    def usable(self) -> bool:
        """Traffic may flow on it: READY (or RETIRING, for the requests still on it) and not gone."""
        return self.state in _CARRIES_TRAFFIC and not self.link.terminated

    @property
    def closing(self) -> bool:
        """We closed it, or it is gone."""
        return self.state in _CLOSED_OR_CLOSING

    def send_control(self, frame: wire.Frame) -> None:
        """Queue a frame on our control stream (once it exists; never on a connection that is gone)."""
        if self.control_stream is not None and not self.link.terminated:
            self.link.quic.send_stream_data(self.control_stream, wire.encode_frame(frame))
