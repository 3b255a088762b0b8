"""The peer manager's decisions: which peers to dial, which connection to keep, who is alive.

Sans-I/O, like aioquic's QuicConnection: the transport numbers each QUIC connection with an int
``conn_id``, reports events with the current monotonic time, and executes the returned actions
(:class:`Dial`, :class:`Close`, :class:`Ping`, :class:`PeerUp`, :class:`PeerDown`) in order. It sleeps
until :meth:`PeerManager.next_deadline` and then calls :meth:`PeerManager.poll`. The transport must take
a peer's up/down state only from PeerUp/PeerDown: :class:`PeerUp` may repeat with a new ``conn_id``
when a duplicate or a restarted peer's connection replaces the active one, without a PeerDown between.

Per-peer state machine (the state is derived from the fields, see ``_PeerPlan.state``):

===========  ===========================================  ===========  ===============================
from         event                                        to           actions
===========  ===========================================  ===========  ===============================
IDLE         poll, due (at start; when added by reload)   CONNECTING   Dial
IDLE         first poll, the peer's name sorts first      IDLE         - (due keepalive x U[0.5, 1] later)
IDLE etc.    due, but 8 dials already in flight           (same)       - (dialed when one of them ends)
BACKOFF      poll, retry due                              CONNECTING   Dial
REJECTED     poll, retry due                              CONNECTING   Dial
CONNECTING   dial_started (records the pending dial)      CONNECTING   -
CONNECTING   pending dial lost                            BACKOFF      - (failure n += 1)
CONNECTING   pending dial lost, rejected=True             REJECTED     - (failure n += 1)
CONNECTING   handshake_timeout (dial or Dial not started) BACKOFF      Close(NO_ERROR) if started
CONNECTING   dial_failed (the Dial could not start)       BACKOFF      -
any not up   connection_ready (ours or inbound)           CONNECTED    PeerUp (failures reset to 0)
CONNECTED    connection_ready, other epoch (restart)      CONNECTED    PeerUp(new), Close(old, DUPLICATE)
CONNECTED    connection_ready, same epoch, direct new     CONNECTED    PeerUp(new), Close(old, DUPLICATE)
             and relayed old (direct always beats relayed)
CONNECTED    connection_ready, same epoch, relayed new    CONNECTED    Close(new, DUPLICATE)
             and direct old
CONNECTED    connection_ready, same epoch, new wins       CONNECTED    PeerUp(new), Close(old, DUPLICATE)
CONNECTED    connection_ready, same epoch, old wins       CONNECTED    Close(new, DUPLICATE)
CONNECTED    active lost                                  BACKOFF      PeerDown (failure n = 1)
CONNECTED    active lost, rejected=True                   REJECTED     PeerDown (failure n = 1)
CONNECTED    no packet for dead_after                     BACKOFF      Close(PEER_UNRESPONSIVE), PeerDown
CONNECTED    relayed, poll, direct dial due               CONNECTED    Dial (direct dials go on, on backoff)
CONNECTED    quiet for keepalive (we dialed it), or for   CONNECTED    Ping
             (keepalive + dead_after) / 2 (the peer did),
             rounded up to a quarter keepalive
any          removed by set_peers or remove_peer          (forgotten)  Close(code) [+PeerDown]
===========  ===========================================  ===========  ===============================

Peers come from the config (``set_peers``) and, with open membership, from announcements and verified inbound
connections (``add_peer``). A *passive* peer (``add_peer(..., dial=False)``) is never dialed: its connection is
kept while the other side holds it (an inbound member; on-demand membership releases idle ones this way).

A lost pending dial while another connection is active is no failure, unless that one is relayed (the
direct path is still being probed, with backoff). A relayed connection is one that ``connection_ready``
reports with ``relayed=True``; the transport starts it with ``inbound_started`` (it belongs to no peer
until ready). Duplicates are settled identically on both nodes: the connection dialed by the node whose name sorts first wins. Backoff
after failure n (1-based) waits ``min(backoff_max, backoff_min * 2**(n-1))`` times a jitter factor
uniform in [0.5, 1.0]; a rejection (failed identity check) waits ``backoff_max`` and is still
retried, since the other side may fix its config.

Connections not yet attributed: an inbound connection (:meth:`PeerManager.inbound_started`) belongs
to no peer until ``connection_ready`` names it; one still not ready after ``handshake_timeout`` is
closed. A connection closed by an action is forgotten: later events about it are ignored.
``connection_ready`` for a conn_id never reported before is accepted (no handshake timeout guarded it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Union

from quicmesh.errors import UnknownPeerError
from quicmesh.config import Timers
from quicmesh.protocol.wire import ErrorCode


class PeerState(str, Enum):
    IDLE = "idle"  # never dialed yet (or just added): due at once
    CONNECTING = "connecting"  # our dial is requested or its handshake is running
    CONNECTED = "connected"
    BACKOFF = "backoff"  # waiting to redial after a failure
    REJECTED = "rejected"  # like BACKOFF, after an identity check failed; waits backoff_max


@dataclass(frozen=True)
class Dial:
    """Dial this peer, then report ``dial_started(peer, conn_id, now)``."""

    peer: str


@dataclass(frozen=True)
class Close:
    """Close this connection with an application error code (``wire.ErrorCode``)."""

    conn_id: int
    code: int
    reason: str


@dataclass(frozen=True)
class Ping:
    """Send a keepalive (QUIC PING) on this connection."""

    conn_id: int


@dataclass(frozen=True)
class PeerUp:
    """The peer's active connection is now ``conn_id`` (emit "connected" unless it was already up)."""

    peer: str
    conn_id: int


@dataclass(frozen=True)
class PeerDown:
    """The peer lost its active connection (emit "disconnected" with the reason)."""

    peer: str
    reason: str


Action = Union[Dial, Close, Ping, PeerUp, PeerDown]


@dataclass(frozen=True)
class PeerView:
    """A peer's status. Times are on the manager's monotonic clock; ``next_retry_in`` is relative."""

    name: str
    state: PeerState
    active_conn: int | None
    connected_since: float | None
    last_heard: float | None
    consecutive_failures: int
    next_retry_in: float | None
    last_error: str | None


class _Role(Enum):
    DIALING = "dialing"  # our dial, handshake running
    INBOUND = "inbound"  # accepted, peer not known yet
    ACTIVE = "active"  # a peer's verified connection


@dataclass
class _Conn:
    conn_id: int
    role: _Role
    peer: str | None  # None while INBOUND
    started: float
    dialed_by_us: bool = False
    relayed: bool = False  # through a relay circuit: a direct connection replaces it, and is still dialed
    epoch: int = 0
    last_heard: float = 0.0
    last_ping: float = 0.0


@dataclass
class _PeerPlan:
    name: str
    next_dial_at: float = -math.inf  # -inf: due at the first poll
    yields_first: bool = False  # its dial would lose the tie-break: give the peer's a head start
    active: int | None = None
    pending: int | None = None  # conn_id of our dial in progress
    dial_requested_at: float | None = None  # Dial emitted, dial_started not reported yet
    failures: int = 0
    rejected: bool = False
    last_error: str | None = None
    connected_since: float | None = None
    dial: bool = True  # False: passive, never dialed (its inbound connections are still kept)

    @property
    def state(self) -> PeerState:
        if self.active is not None:
            return PeerState.CONNECTED
        if self.pending is not None or self.dial_requested_at is not None:
            return PeerState.CONNECTING
        if self.rejected:
            return PeerState.REJECTED
        return PeerState.BACKOFF if self.failures else PeerState.IDLE


_MAX_DOUBLINGS = 64  # past this the cap applies anyway; keeps 2.0 ** n finite


class PeerManager:
    """Keeps a full mesh to ``peers``; see the module docstring for the rules."""

    def __init__(
        self, local_name: str, peers: Iterable[str], timers: Timers, rng: random.Random | None = None
    ) -> None:
        self.local_name = local_name
        self._timers = timers
        self._rng = rng if rng is not None else random.Random()
        self._peers: dict[str, _PeerPlan] = {
            name: _PeerPlan(name, yields_first=name < local_name) for name in peers if name != local_name
        }
        self._conns: dict[int, _Conn] = {}
        self._closed: set[int] = set()  # closed by an action, connection_lost not reported yet
        self._deferred: list[tuple[float, Close]] = []  # Closes for dials no peer wants any more

    # --- configuration ------------------------------------------------------------------------
    @property
    def peers(self) -> tuple[str, ...]:
        """Configured peer names (the local name is never one of them)."""
        return tuple(self._peers)

    def set_peers(self, peers: Iterable[str], now: float, keep: Iterable[str] = ()) -> list[Action]:
        """Reload: added peers are due at once; removed ones lose every connection, unless in ``keep``
        (members that joined by announcement rather than by the config)."""
        wanted = [name for name in dict.fromkeys(peers) if name != self.local_name]
        kept = set(keep)
        actions: list[Action] = []
        for name in [name for name in self._peers if name not in wanted and name not in kept]:
            actions += self.remove_peer(name, "peer removed from configuration", ErrorCode.NOT_CONFIGURED)
        for name in wanted:
            if name not in self._peers:
                self._peers[name] = _PeerPlan(name, next_dial_at=now)
        return actions

    def add_peer(self, name: str, now: float, *, dial: bool = True) -> None:
        """A peer learnt at run time (membership), or a passive one made active: due at once if ``dial``."""
        if name == self.local_name:
            return
        p = self._peers.get(name)
        if p is None:
            self._peers[name] = _PeerPlan(name, next_dial_at=now, dial=dial)
        elif dial and not p.dial:
            p.dial = True
            p.next_dial_at = min(p.next_dial_at, now)

    def redial_soon(self, name: str, now: float) -> None:
        """The peer has new addresses (it announced them): a dial waiting on backoff is due now."""
        p = self._peers.get(name)
        if p is not None and self._may_dial(p) and p.next_dial_at > now:
            p.next_dial_at = now

    def set_passive(self, name: str, now: float, reason: str = "idle") -> list[Action]:
        """Stop dialing ``name`` and close our connection to it (on-demand membership releasing an idle peer);
        the peer stays known, and a connection it opens is still accepted."""
        p = self._peers.get(name)
        if p is None:
            return []
        dialed = p.dial or (p.active is not None and self._conns[p.active].dialed_by_us)  # a seed: by address
        if not dialed:
            return []  # an inbound connection is the dialer's to close
        p.dial = False
        actions: list[Action] = []
        if p.pending is not None:
            actions.append(self._close(p.pending, ErrorCode.NO_ERROR, reason))
            p.pending = None
        p.dial_requested_at = None
        if p.active is not None:
            actions.append(self._close(p.active, ErrorCode.NO_ERROR, reason))
            actions.append(PeerDown(name, reason))
            p.active = None
            p.connected_since = None
        p.failures = 0
        p.rejected = False
        return actions

    def remove_peer(self, name: str, reason: str, code: int) -> list[Action]:
        """Forget ``name`` (removed from the config, or a member gone or revoked): every connection closes."""
        peer = self._peers.pop(name, None)
        if peer is None:
            return []
        actions: list[Action] = []
        for conn_id in (peer.active, peer.pending):
            if conn_id is not None:
                actions.append(self._close(conn_id, code, reason))
        if peer.active is not None:
            actions.append(PeerDown(name, reason))
        return actions

    def set_timers(self, timers: Timers) -> None:
        """New timers apply to every deadline from now on; a backoff already drawn is kept."""
        self._timers = timers

    # --- events -------------------------------------------------------------------------------
    def dial_started(self, peer: str, conn_id: int, now: float) -> None:
        """The transport began the dial asked for by ``Dial(peer)``; its handshake clock starts now."""
        if conn_id in self._conns or conn_id in self._closed:
            return
        p = self._peers.get(peer)
        if p is None or p.pending is not None or not p.dial:
            # Removed by a reload since the Dial, made passive, or a second dial: never two pending dials.
            reason = ("peer removed from configuration" if p is None else "a dial to this peer is already running"
                      if p.pending is not None else "peer no longer dialed")
            code = ErrorCode.NOT_CONFIGURED if p is None else ErrorCode.NO_ERROR
            self._closed.add(conn_id)
            self._deferred.append((now, Close(conn_id, code, reason)))
            return
        p.dial_requested_at = None
        p.pending = conn_id
        self._conns[conn_id] = _Conn(conn_id, _Role.DIALING, peer, now, dialed_by_us=True)

    def inbound_started(self, conn_id: int, now: float) -> None:
        """A peer's handshake was accepted; who it is is known only at connection_ready."""
        if conn_id not in self._conns and conn_id not in self._closed:
            self._conns[conn_id] = _Conn(conn_id, _Role.INBOUND, None, now)

    def connection_ready(
        self, peer: str, conn_id: int, *, dialed_by_us: bool, peer_epoch: int, now: float, relayed: bool = False
    ) -> list[Action]:
        """The peer's identity is verified and its Hello received: make it active or settle a duplicate.

        ``connected_since`` restarts when a restarted peer's connection takes over, not on a tie-break swap.
        """
        if conn_id in self._closed:
            return []
        previous = self._conns.pop(conn_id, None)
        if previous is not None:
            if previous.role is _Role.ACTIVE:
                self._conns[conn_id] = previous  # reported twice
                return []
            self._forget_pending(previous)
        p = self._peers.get(peer)
        if p is None:
            self._closed.add(conn_id)
            return [Close(conn_id, ErrorCode.NOT_CONFIGURED, f"{peer!r} is not a configured peer")]
        conn = _Conn(conn_id, _Role.ACTIVE, peer, now, dialed_by_us=dialed_by_us, relayed=relayed, epoch=peer_epoch,
                     last_heard=now, last_ping=now)
        if p.active is None:
            self._activate(p, conn, now)
            return [PeerUp(peer, conn_id)]
        old = self._conns[p.active]
        if old.epoch != peer_epoch:
            self._activate(p, conn, now)
            reason = "replaced by a new connection from restarted peer"
            close = self._close(old.conn_id, ErrorCode.DUPLICATE_CONNECTION, reason)
            return [PeerUp(peer, conn_id), close]
        if old.relayed != relayed:  # direct beats relayed, on both nodes alike
            if relayed:
                self._closed.add(conn_id)
                return [Close(conn_id, ErrorCode.DUPLICATE_CONNECTION, "duplicate connection: kept the direct one")]
            since = p.connected_since
            self._activate(p, conn, now)
            p.connected_since = since
            close = self._close(old.conn_id, ErrorCode.DUPLICATE_CONNECTION, "replaced by a direct connection")
            return [PeerUp(peer, conn_id), close]
        winner = min(self.local_name, peer)
        if self._dialer(conn, peer) == winner and self._dialer(old, peer) != winner:
            since = p.connected_since
            self._activate(p, conn, now)
            p.connected_since = since  # the same peer process: no reconnect to show
            reason = f"duplicate connection: kept the one {winner} dialed"
            close = self._close(old.conn_id, ErrorCode.DUPLICATE_CONNECTION, reason)
            return [PeerUp(peer, conn_id), close]
        self._closed.add(conn_id)
        return [Close(conn_id, ErrorCode.DUPLICATE_CONNECTION, "duplicate connection: kept the existing one")]

    def connection_lost(self, conn_id: int, reason: str, now: float, *, rejected: bool = False) -> list[Action]:
        """Any connection ended; ``rejected`` means an identity check failed. Unknown ids are ignored."""
        if conn_id in self._closed:
            self._closed.discard(conn_id)
            self._deferred = [(at, close) for at, close in self._deferred if close.conn_id != conn_id]
            return []
        conn = self._conns.pop(conn_id, None)
        if conn is None or conn.peer is None:
            return []  # unknown, or inbound before we knew who it was
        p = self._peers[conn.peer]
        if conn.role is _Role.DIALING:
            p.pending = None
            if p.active is None or self._conns[p.active].relayed:
                self._fail(p, reason, now, rejected)
            return []
        p.active = None
        p.connected_since = None
        p.failures = 0  # a lost working connection redials after the first backoff step
        self._fail(p, reason, now, rejected)
        return [PeerDown(p.name, reason)]

    def heard_from(self, conn_id: int, now: float) -> None:
        """A packet arrived on the connection: it is alive."""
        conn = self._conns.get(conn_id)
        if conn is not None and conn.role is _Role.ACTIVE and now > conn.last_heard:
            conn.last_heard = now

    def dial_failed(self, peer: str, reason: str, now: float) -> None:
        """``Dial(peer)`` could not even start (e.g. the address did not resolve): count a failure."""
        p = self._peers.get(peer)
        if p is not None and p.dial_requested_at is not None:
            p.dial_requested_at = None
            if not self._directly_up(p):
                self._fail(p, reason, now, False)

    # --- time -----------------------------------------------------------------------------------
    def poll(self, now: float) -> list[Action]:
        """Everything due at ``now``: deferred closes, timeouts, dead peers, pings, dials."""
        t = self._timers
        actions: list[Action] = []
        if self._deferred:
            due = [close for at, close in self._deferred if at <= now]
            self._deferred = [(at, close) for at, close in self._deferred if at > now]
            actions.extend(due)
        timed_out = f"handshake timed out after {t.handshake_timeout:.1f}s"
        dialing = self._dials_in_flight()
        for conn in list(self._conns.values()):
            if conn.role is _Role.INBOUND and now >= conn.started + t.handshake_timeout:
                actions.append(self._close(conn.conn_id, ErrorCode.NO_ERROR, timed_out))
        for p in list(self._peers.values()):
            if p.active is not None:
                conn = self._conns[p.active]
                if now >= conn.last_heard + t.dead_after:
                    reason = f"no packet for {now - conn.last_heard:.1f}s"
                    actions.append(self._close(conn.conn_id, ErrorCode.PEER_UNRESPONSIVE, reason))
                    actions.append(PeerDown(p.name, reason))
                    p.active = None
                    p.connected_since = None
                    p.failures = 0
                    self._fail(p, reason, now, False)
                elif now >= self._ping_due(conn):
                    conn.last_ping = now
                    actions.append(Ping(conn.conn_id))
            if p.pending is not None and now >= self._conns[p.pending].started + t.handshake_timeout:
                actions.append(self._close(p.pending, ErrorCode.NO_ERROR, timed_out))
                p.pending = None
                if not self._directly_up(p):
                    self._fail(p, timed_out, now, False)
            if p.dial_requested_at is not None and now >= p.dial_requested_at + t.handshake_timeout:
                p.dial_requested_at = None
                if not self._directly_up(p):
                    self._fail(p, f"dial did not start within {t.handshake_timeout:.1f}s", now, False)
            if p.state in _MAY_DIAL and now >= p.next_dial_at and p.yields_first:
                # At start, the peer whose name sorts first dials: its connection is the one both keep.
                # Ours follows only if it has not arrived by then (that peer may be down): half the
                # handshakes when a whole mesh starts at once.
                p.yields_first = False
                p.next_dial_at = now + t.keepalive * self._rng.uniform(0.5, 1.0)
            if self._may_dial(p) and now >= p.next_dial_at and dialing < _MAX_DIALS:
                dialing += 1
                p.dial_requested_at = now
                actions.append(Dial(p.name))
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time poll() has something to do (-inf: at once), None if nothing is scheduled.

        Computed with the very expressions poll() compares against, so sleeping until it never
        misses a deadline by a rounding error.
        """
        t = self._timers
        times = [at for at, _ in self._deferred]
        for conn in self._conns.values():
            if conn.role is _Role.ACTIVE:
                times.append(conn.last_heard + t.dead_after)
                times.append(self._ping_due(conn))
            else:
                times.append(conn.started + t.handshake_timeout)
        may_dial = self._dials_in_flight() < _MAX_DIALS  # else a dial ending (an event) comes first
        for p in self._peers.values():
            if p.dial_requested_at is not None:
                times.append(p.dial_requested_at + t.handshake_timeout)
            elif self._may_dial(p) and may_dial:
                times.append(p.next_dial_at)
        return min(times, default=None)

    # --- queries ------------------------------------------------------------------------------
    def active_conn(self, peer: str) -> int | None:
        p = self._peers.get(peer)
        return None if p is None else p.active

    def peer_of(self, conn_id: int) -> str | None:
        """The peer a dial or active connection belongs to (None for unknown or unidentified inbound)."""
        conn = self._conns.get(conn_id)
        return None if conn is None else conn.peer

    def view(self, peer: str, now: float) -> PeerView:
        p = self._peers.get(peer)
        if p is None:
            raise UnknownPeerError(f"{peer!r} is not a configured peer")
        state = p.state
        conn = self._conns[p.active] if p.active is not None else None
        return PeerView(
            name=p.name,
            state=state,
            active_conn=p.active,
            connected_since=p.connected_since,
            last_heard=None if conn is None else conn.last_heard,
            consecutive_failures=p.failures,
            next_retry_in=max(0.0, p.next_dial_at - now) if state in _MAY_DIAL else None,
            last_error=p.last_error,
        )

    def dials(self, peer: str) -> bool:
        """Whether ``peer`` is known and dialed (not passive)."""
        p = self._peers.get(peer)
        return p is not None and p.dial

    def relayed(self, peer: str) -> bool:
        """Whether the peer's active connection goes through a relay."""
        p = self._peers.get(peer)
        return p is not None and p.active is not None and self._conns[p.active].relayed

    # --- helpers ------------------------------------------------------------------------------
    def _activate(self, p: _PeerPlan, conn: _Conn, now: float) -> None:
        self._conns[conn.conn_id] = conn
        p.active = conn.conn_id
        p.connected_since = now
        if not conn.relayed:  # relayed: the direct dials go on, on their backoff
            p.failures = 0
            p.rejected = False

    def _directly_up(self, p: _PeerPlan) -> bool:
        return p.active is not None and not self._conns[p.active].relayed

    def _may_dial(self, p: _PeerPlan) -> bool:
        """Due for a direct dial when its time comes: not connected, or connected only through a relay."""
        if not p.dial:
            return False
        if p.state in _MAY_DIAL:
            return True
        return (p.active is not None and self._conns[p.active].relayed and p.pending is None
                and p.dial_requested_at is None)

    def _dials_in_flight(self) -> int:
        return sum(1 for p in self._peers.values() if p.pending is not None or p.dial_requested_at is not None)

    def _ping_due(self, conn: _Conn) -> float:
        """When a quiet connection is pinged: the dialer once it was quiet for keepalive; the other side only
        if those pings stop (halfway to dead_after), so an idle connection costs one PING and one ACK per
        keepalive, not two. Rounded up to a quarter keepalive, so that the pings of all connections share
        a few wake-ups per keepalive instead of one each (idle CPU of a 32-node mesh: measured)."""
        t = self._timers
        interval = t.keepalive if conn.dialed_by_us else (t.keepalive + t.dead_after) / 2
        slot = t.keepalive / 4
        return math.ceil((max(conn.last_heard, conn.last_ping) + interval) / slot) * slot

    def _dialer(self, conn: _Conn, peer: str) -> str:
        return self.local_name if conn.dialed_by_us else peer

    def _forget_pending(self, conn: _Conn) -> None:
        if conn.role is _Role.DIALING and conn.peer is not None:
            p = self._peers.get(conn.peer)
            if p is not None and p.pending == conn.conn_id:
                p.pending = None

    def _close(self, conn_id: int, code: int, reason: str) -> Close:
        """Forget the connection now; its connection_lost, when it comes, is then ignored."""
        del self._conns[conn_id]
        self._closed.add(conn_id)
        return Close(conn_id, code, reason)

    def _fail(self, p: _PeerPlan, reason: str, now: float, rejected: bool) -> None:
        t = self._timers
        p.failures += 1
        p.rejected = rejected
        p.last_error = reason
        if rejected:
            delay = t.backoff_max
        else:
            step = t.backoff_min * 2.0 ** min(p.failures - 1, _MAX_DOUBLINGS)
            delay = min(t.backoff_max, step) * self._rng.uniform(0.5, 1.0)
        p.next_dial_at = now + delay


#: Dials in flight at once. Unbounded, a whole mesh starting together on a busy host (32 nodes on 2 cores)
#: ran so many handshakes at once that they outlived handshake_timeout, were retried, and fed themselves:
#: convergence 16-73 s or never; with 4 or 8: 4 s (quicmesh.bench.meshscale).
_MAX_DIALS = 8
_MAY_DIAL = frozenset({PeerState.IDLE, PeerState.BACKOFF, PeerState.REJECTED})

__all__ = [
    "PeerState",
    "Dial",
    "Close",
    "Ping",
    "PeerUp",
    "PeerDown",
    "Action",
    "PeerView",
    "PeerManager",
]
