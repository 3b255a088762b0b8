"""One configured peer: what outlives any single connection to it, and its status snapshot."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from quicmesh.config import Address, PeerConfig

if TYPE_CHECKING:
    from quicmesh.runtime.connection import Connection


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
    path: str | None = None  # "direct" or "via RELAY" while connected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outgoing:
    """A reliable message sent and not yet acknowledged: resent on every new connection until it is."""

    body: bytes
    future: asyncio.Future[None]
    tag: int = 0  # 0: for the peer's application; else the wire.FeatureTag of the feature it is for


@dataclass
class DuplicateFilter:
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


class Peer:
    """Everything about one configured peer that outlives a single connection.

    ``connection`` is the active one (the peer manager's PeerUp says which); the message channel owns
    the outbox fields, the datagram channel the queue.
    """

    def __init__(self, config: PeerConfig, window: int, *, member: bool = False) -> None:
        self.config = config
        #: known by membership (an announcement or a verified inbound connection), not from the config file
        self.member = member
        #: addresses the peer announced (membership; NAT traversal adds what it learns); () -> config.address
        self.announced: tuple[Address, ...] = ()
        self.connection: Connection | None = None
        self.connected_since: float | None = None
        self.fingerprint: str | None = None
        self.counters = PeerCounters()
        # messages out: ids, unacknowledged bodies, the in-flight window and byte budget
        self.next_message_id = 0
        self.unacked: dict[int, Outgoing] = {}
        self.window = asyncio.Semaphore(window)
        self.unacked_bytes = 0  # bodies in ``unacked``: kept within half the peer's max_peer_buffer
        self.byte_waiters: deque[asyncio.Future[None]] = deque()
        # messages in: the duplicate filter, and ids held while the application's inbox is full
        self.incoming = DuplicateFilter()
        self.parked_ids: set[int] = set()
        # datagrams out: wire batch entries, handed to QUIC at each flush
        self.datagram_queue: deque[bytes] = deque()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def addresses(self) -> tuple[Address, ...]:
        """Where to dial the peer: what it announced, else its configured address."""
        return self.announced or (self.config.address,)

    @property
    def usable_connection(self) -> Connection | None:
        """The active connection if traffic may go on it now."""
        connection = self.connection
        return connection if connection is not None and connection.usable else None
