"""Peer manager decisions on a fake clock: no network, deterministic randomness."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from quicmesh.errors import UnknownPeerError
from quicmesh.config import Timers
from quicmesh.runtime.peer_manager import Close, Dial, PeerDown, PeerManager, PeerState, PeerUp, Ping
from quicmesh.protocol.wire import ErrorCode

TIMERS = Timers(keepalive=1.0, dead_after=3.0, backoff_min=0.2, backoff_max=10.0, handshake_timeout=5.0)


class FixedJitter(random.Random):
    """uniform() always returns its low or high end, to pin the jitter bounds."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def manager(local: str = "a", peers=("b",), rng: random.Random | None = None) -> PeerManager:
    return PeerManager(local, peers, TIMERS, rng or random.Random(0))


def connect(m: PeerManager, peer: str, conn_id: int, now: float, epoch: int = 1) -> None:
    """Dial ``peer`` and complete the handshake; the manager must be due to dial it."""
    assert Dial(peer) in m.poll(now)
    m.dial_started(peer, conn_id, now)
    assert m.connection_ready(peer, conn_id, dialed_by_us=True, peer_epoch=epoch, now=now) == [PeerUp(peer, conn_id)]


def fail_dial(m: PeerManager, peer: str, conn_id: int, now: float, **kwargs) -> None:
    assert m.poll(now) == [Dial(peer)]
    m.dial_started(peer, conn_id, now)
    assert m.connection_lost(conn_id, "refused", now, **kwargs) == []


# --- start and convergence --------------------------------------------------------------------
def test_every_peer_is_dialed_once_at_start() -> None:
    m = manager(peers=("b", "c", "a"))  # the local name is ignored
    assert m.peers == ("b", "c")
    assert m.next_deadline() == float("-inf")
    assert m.view("b", 0.0).state is PeerState.IDLE
    assert m.poll(0.0) == [Dial("b"), Dial("c")]
    assert m.poll(0.1) == []  # no second dial while the first is pending
    assert m.view("b", 0.1).state is PeerState.CONNECTING
    m.dial_started("b", 1, 0.2)
    assert m.peer_of(1) == "b" and m.active_conn("b") is None
    assert m.poll(1.0) == []


class Net:
    """Several managers wired by a fake network: a link id is the conn_id on both ends.

    A handshake completes on both ends within one step; a Close reaches the other end at the end of
    the step, as a real close arrives after the Hellos that made both ends ready.
    """

    def __init__(self, names: list[str], handshake: float = 0.05) -> None:
        self.now = 0.0
        self.handshake = handshake
        self.nodes = {n: PeerManager(n, names, TIMERS, random.Random(i)) for i, n in enumerate(names)}
        self.epoch = {n: 100 + i for i, n in enumerate(names)}
        self.links: dict[int, tuple[str, str]] = {}  # open links: id -> (dialer, acceptor)
        self.ready_at: dict[int, float] = {}
        self.up: dict[str, dict[str, int]] = {n: {} for n in names}
        self.events: list[tuple[str, object]] = []
        self.closing: list[tuple[int, str]] = []
        self._ids = itertools.count(1)

    def apply(self, node: str, actions) -> None:
        for action in actions:
            self.events.append((node, action))
            if isinstance(action, Dial):
                link = next(self._ids)
                self.links[link] = (node, action.peer)
                self.ready_at[link] = self.now + self.handshake
                self.nodes[node].dial_started(action.peer, link, self.now)
                self.nodes[action.peer].inbound_started(link, self.now)
            elif isinstance(action, Close):
                self.links.pop(action.conn_id, None)
                self.closing.append((action.conn_id, action.reason))
            elif isinstance(action, PeerUp):
                self.up[node][action.peer] = action.conn_id
            elif isinstance(action, PeerDown):
                del self.up[node][action.peer]

    def deliver_closes(self) -> None:
        while self.closing:
            link, reason = self.closing.pop(0)
            for name, m in self.nodes.items():  # the closer's own report must be ignored
                self.apply(name, m.connection_lost(link, reason, self.now))

    def step(self, dt: float) -> None:
        self.now += dt
        for link, at in list(self.ready_at.items()):
            if at <= self.now:
                del self.ready_at[link]
                for side in (0, 1):
                    if link in self.links:
                        self.ready(link, side)
        for link, ends in self.links.items():
            for name in ends:
                self.nodes[name].heard_from(link, self.now)
        for name, m in self.nodes.items():
            self.apply(name, m.poll(self.now))
        self.deliver_closes()

    def ready(self, link: int, side: int) -> None:
        dialer, acceptor = self.links[link]
        me, other = (dialer, acceptor) if side == 0 else (acceptor, dialer)
        actions = self.nodes[me].connection_ready(
            other, link, dialed_by_us=side == 0, peer_epoch=self.epoch[other], now=self.now
        )
        self.apply(me, actions)


def test_full_mesh_converges_on_one_connection_per_pair() -> None:
    names = ["c", "a", "d", "b"]
    net = Net(names)
    for _ in range(100):
        net.step(0.01)
    for x, y in itertools.combinations(names, 2):
        link = net.up[x][y]
        assert net.up[y][x] == link and set(net.links[link]) == {x, y}
        assert net.links[link][0] == min(x, y)  # the tie-break winner dialed it
    assert len(net.links) == 6
    assert not [e for e in net.events if isinstance(e[1], PeerDown)]


@pytest.mark.parametrize("order", list(itertools.permutations(["aX", "aY", "bX", "bY"])))
def test_simultaneous_dials_keep_the_same_connection_on_both_sides(order) -> None:
    """X is dialed by a, Y by b; whatever order the four ready events arrive in, both keep X."""
    net = Net(["a", "b"])
    net.apply("a", net.nodes["a"].poll(0.0))
    assert net.nodes["b"].poll(0.0) == []  # b gives a's dial a head start, then dials anyway
    net.apply("b", net.nodes["b"].poll(1.0))
    x, y = 1, 2
    assert net.links == {x: ("a", "b"), y: ("b", "a")}
    for node, name in order:
        link, other = (x if name == "X" else y), ("b" if node == "a" else "a")
        dialed_by_us = (link == x) == (node == "a")
        net.apply(node, net.nodes[node].connection_ready(
            other, link, dialed_by_us=dialed_by_us, peer_epoch=net.epoch[other], now=1.1))
    closes = [(node, a.conn_id, a.code) for node, a in net.events if isinstance(a, Close)]
    assert sorted(closes) == [("a", y, ErrorCode.DUPLICATE_CONNECTION), ("b", y, ErrorCode.DUPLICATE_CONNECTION)]
    net.deliver_closes()
    assert net.up == {"a": {"b": x}, "b": {"a": x}}
    assert net.nodes["a"].active_conn("b") == x == net.nodes["b"].active_conn("a")
    assert not [e for e in net.events if isinstance(e[1], PeerDown)]


def test_at_start_the_node_that_would_lose_the_tie_break_lets_the_other_dial_first() -> None:
    m = manager(local="b", peers=("a", "c"))
    assert m.poll(0.0) == [Dial("c")]  # b < c: b's dial is the one both keep
    deadline = m.next_deadline()
    assert deadline is not None and 0.5 <= deadline <= 1.0  # a's head start: keepalive x U[0.5, 1]
    m.inbound_started(7, 0.2)
    assert m.connection_ready("a", 7, dialed_by_us=False, peer_epoch=1, now=0.3) == [PeerUp("a", 7)]
    assert m.poll(1.0) == []  # a's connection came: b never dials a
    other = manager(local="b", peers=("a",))
    assert other.poll(0.0) == []
    assert other.poll(1.0) == [Dial("a")]  # a did not dial (down, or slow): b does


def test_at_most_eight_dials_are_in_flight_at_once() -> None:
    peers = tuple(f"p{i:02d}" for i in range(20))
    m = manager(local="a", peers=peers)  # "a" sorts first: no head start, every peer is due at once
    first = m.poll(0.0)
    assert first == [Dial(name) for name in peers[:8]]
    assert m.next_deadline() == 5.0  # the others wait for a dial to end: at the latest, its timeout
    for i, action in enumerate(first):
        m.dial_started(action.peer, i + 1, 0.0)
    assert m.poll(0.1) == []
    assert m.connection_ready("p00", 1, dialed_by_us=True, peer_epoch=1, now=0.2) == [PeerUp("p00", 1)]
    assert m.poll(0.2) == [Dial("p08")]  # one ended: one more starts
    m.connection_lost(2, "refused", 0.3)
    assert m.poll(0.3) == [Dial("p09")]


def test_duplicate_loser_is_closed_when_the_winner_is_already_active() -> None:
    m = manager(local="b", peers=("a",))
    assert m.poll(0.0) == []  # a's head start
    connect(m, "a", 1, 1.0)  # b dialed: loses to a connection a dials
    m.inbound_started(2, 1.0)
    assert m.connection_ready("a", 2, dialed_by_us=False, peer_epoch=1, now=1.1) == [
        PeerUp("a", 2),
        Close(1, ErrorCode.DUPLICATE_CONNECTION, "duplicate connection: kept the one a dialed"),
    ]
    assert m.view("a", 1.1).connected_since == 1.0  # same peer process: no reconnect shown
    m.inbound_started(3, 1.2)  # another one from a: the existing one stays
    assert m.connection_ready("a", 3, dialed_by_us=False, peer_epoch=1, now=1.2) == [
        Close(3, ErrorCode.DUPLICATE_CONNECTION, "duplicate connection: kept the existing one")
    ]
    assert m.active_conn("a") == 2


def test_restarted_peer_replaces_the_old_connection_without_a_flap() -> None:
    m = manager(local="a", peers=("b",))
    connect(m, "b", 1, 0.0, epoch=7)
    m.inbound_started(2, 4.0)
    # b restarted (new epoch); its dial would lose the tie-break, but a restart wins at once.
    assert m.connection_ready("b", 2, dialed_by_us=False, peer_epoch=8, now=4.0) == [
        PeerUp("b", 2),
        Close(1, ErrorCode.DUPLICATE_CONNECTION, "replaced by a new connection from restarted peer"),
    ]
    assert m.active_conn("b") == 2 and m.peer_of(1) is None
    assert m.view("b", 4.0).connected_since == 4.0
    assert m.connection_lost(1, "closed", 4.1) == []  # our own Close coming back


# --- liveness -------------------------------------------------------------------------------
def test_keepalive_pings_only_quiet_connections() -> None:
    m = manager()
    connect(m, "b", 1, 10.0)
    assert m.next_deadline() == 11.0
    assert m.poll(10.999) == []
    assert m.poll(11.0) == [Ping(1)]
    assert m.next_deadline() == 12.0
    m.heard_from(1, 11.5)  # traffic postpones the next ping
    assert m.next_deadline() == 12.5
    assert m.poll(12.0) == []
    assert m.poll(12.5) == [Ping(1)]
    for t in (13.0, 13.4, 13.8, 14.2):  # steady traffic: no pings at all
        m.heard_from(1, t)
        assert m.poll(t + 0.1) == []


def test_pings_fall_on_a_quarter_keepalive_grid() -> None:
    """Many connections' pings share a few wake-ups per keepalive instead of one each."""
    m = manager(peers=("b", "c", "d"))
    assert m.poll(10.0) == [Dial("b"), Dial("c"), Dial("d")]
    for conn_id, peer, at in ((1, "b", 10.01), (2, "c", 10.13), (3, "d", 10.2)):
        m.dial_started(peer, conn_id, 10.0)
        assert m.connection_ready(peer, conn_id, dialed_by_us=True, peer_epoch=1, now=at) == [PeerUp(peer, conn_id)]
    assert m.next_deadline() == 11.25
    assert m.poll(11.2) == []
    assert m.poll(11.25) == [Ping(1), Ping(2), Ping(3)]
    m.heard_from(1, 11.251)  # the ACK of its ping, seen at the next wake-up
    assert m.next_deadline() == 12.25  # the others, pinged at 11.25; its own falls on the same grid
    assert m.poll(12.25) == [Ping(2), Ping(3)]
    assert m.poll(12.5) == [Ping(1)]


def test_only_the_dialer_pings_while_the_other_side_hears_it() -> None:
    m = manager()
    m.inbound_started(7, 10.0)
    assert m.connection_ready("b", 7, dialed_by_us=False, peer_epoch=1, now=10.0) == [PeerUp("b", 7)]
    assert m.poll(11.0) == []  # the peer dialed: its pings keep the connection alive
    assert m.next_deadline() == 12.0  # halfway between keepalive (1 s) and dead_after (3 s)
    m.heard_from(7, 11.0)  # the peer's ping
    assert m.poll(12.0) == [] and m.next_deadline() == 13.0
    assert m.poll(13.0) == [Ping(7)]  # its pings stopped: ours keep the connection checked


def test_dead_connection_is_closed_at_exactly_dead_after() -> None:
    m = manager()
    connect(m, "b", 1, 10.0)
    m.heard_from(1, 10.1)
    m.heard_from(1, 10.7)  # 10.7 + 3.0 is not exact in binary: the deadline must still hold
    pings = [a for t in (11.7, 11.75, 12.75) for a in m.poll(t)]  # due on the quarter-keepalive grid
    assert pings == [Ping(1), Ping(1)]
    assert m.next_deadline() == 10.7 + 3.0
    assert m.poll(10.7 + 3.0 - 1e-9) == []
    down = m.poll(m.next_deadline())
    assert down == [
        Close(1, ErrorCode.PEER_UNRESPONSIVE, "no packet for 3.0s"),
        PeerDown("b", "no packet for 3.0s"),
    ]
    view = m.view("b", 13.7)
    assert view.state is PeerState.BACKOFF and view.consecutive_failures == 1
    assert 0.1 <= view.next_retry_in <= 0.2 and view.last_error == "no packet for 3.0s"
    assert m.connection_lost(1, "closed", 13.8) == []


# --- backoff ----------------------------------------------------------------------------------
@pytest.mark.parametrize("high", [False, True])
def test_backoff_doubles_with_jitter_up_to_the_cap(high: bool) -> None:
    m = manager(rng=FixedJitter(high))
    now = 0.0
    expected = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    for n, base in enumerate(expected, start=1):
        fail_dial(m, "b", n, now)
        view = m.view("b", now)
        assert view.state is PeerState.BACKOFF and view.consecutive_failures == n
        assert view.next_retry_in == pytest.approx(base if high else base / 2)
        assert m.poll(now + view.next_retry_in - 1e-6) == []
        now = m.next_deadline()


def test_backoff_jitter_stays_in_bounds() -> None:
    m = manager(rng=random.Random(42))
    now, delays = 0.0, []
    for n in range(1, 40):
        fail_dial(m, "b", n, now)
        delays.append(m.view("b", now).next_retry_in)
        now = m.next_deadline()
    bases = [min(10.0, 0.2 * 2 ** (n - 1)) for n in range(1, 40)]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases))
    assert len(set(delays)) == len(delays)  # really jittered


def test_backoff_survives_thousands_of_failures() -> None:
    m = manager()
    now = 0.0
    for n in range(1, 1200):
        fail_dial(m, "b", n, now)
        now = m.next_deadline()
    assert m.view("b", now).consecutive_failures == 1199


def test_failures_reset_once_connected_and_a_lost_link_redials_fast() -> None:
    m = manager(rng=FixedJitter(True))
    now = 0.0
    for n in range(1, 5):
        fail_dial(m, "b", n, now)
        now = m.next_deadline()
    connect(m, "b", 10, now)
    assert m.view("b", now).consecutive_failures == 0
    assert m.connection_lost(10, "peer closed", now + 60) == [PeerDown("b", "peer closed")]
    view = m.view("b", now + 60)
    assert (view.state, view.consecutive_failures, view.next_retry_in) == (PeerState.BACKOFF, 1, pytest.approx(0.2))


def test_rejected_peer_waits_backoff_max_and_is_retried() -> None:
    m = manager()
    fail_dial(m, "b", 1, 0.0, rejected=True)
    view = m.view("b", 0.0)
    assert (view.state, view.next_retry_in, view.last_error) == (PeerState.REJECTED, 10.0, "refused")
    assert m.next_deadline() == 10.0
    assert m.poll(9.99) == []
    assert m.poll(10.0) == [Dial("b")]
    m.dial_started("b", 2, 10.0)
    assert m.view("b", 10.0).state is PeerState.CONNECTING
    m.connection_ready("b", 2, dialed_by_us=True, peer_epoch=1, now=10.1)
    assert m.view("b", 10.1).state is PeerState.CONNECTED


def test_lost_pending_dial_while_connected_is_no_failure() -> None:
    m = manager(local="b", peers=("a",))
    assert m.poll(0.0) == []
    assert m.poll(1.0) == [Dial("a")]
    m.dial_started("a", 1, 1.0)
    m.inbound_started(2, 1.0)
    assert m.connection_ready("a", 2, dialed_by_us=False, peer_epoch=1, now=1.1) == [PeerUp("a", 2)]
    assert m.connection_lost(1, "closed by peer", 1.2) == []
    view = m.view("a", 1.2)
    assert (view.state, view.consecutive_failures, view.last_error) == (PeerState.CONNECTED, 0, None)


# --- handshake timeout ----------------------------------------------------------------------
def test_handshake_timeouts() -> None:
    m = manager(peers=("b", "c"))
    assert m.poll(0.0) == [Dial("b"), Dial("c")]
    m.dial_started("b", 1, 0.0)  # c's dial never starts
    m.inbound_started(2, 1.0)
    assert m.next_deadline() == 5.0
    assert m.poll(4.99) == []
    reason = "handshake timed out after 5.0s"
    assert m.poll(5.0) == [Close(1, ErrorCode.NO_ERROR, reason)]
    assert (m.view("b", 5.0).state, m.view("b", 5.0).last_error) == (PeerState.BACKOFF, reason)
    assert m.view("c", 5.0).last_error == "dial did not start within 5.0s"
    assert m.poll(6.0)[:1] == [Close(2, ErrorCode.NO_ERROR, reason)]  # inbound: closed, nobody to blame
    assert m.connection_ready("b", 2, dialed_by_us=False, peer_epoch=1, now=6.1) == []  # too late
    assert m.connection_lost(1, reason, 6.2) == [] and m.connection_lost(2, reason, 6.2) == []


def test_a_second_dial_to_the_same_peer_is_closed() -> None:
    m = manager()
    assert m.poll(0.0) == [Dial("b")]
    m.dial_started("b", 1, 0.0)
    m.dial_started("b", 2, 0.1)
    assert m.next_deadline() == 0.1
    assert m.poll(0.1) == [Close(2, ErrorCode.NO_ERROR, "a dial to this peer is already running")]
    assert m.peer_of(1) == "b" and m.peer_of(2) is None
    assert m.connection_lost(2, "closed", 0.2) == []
    assert m.view("b", 0.2).state is PeerState.CONNECTING


def test_dial_failed_counts_a_failure() -> None:
    m = manager()
    assert m.poll(0.0) == [Dial("b")]
    m.dial_failed("b", "cannot resolve b.example", 0.0)
    view = m.view("b", 0.0)
    assert (view.state, view.consecutive_failures, view.last_error) == (
        PeerState.BACKOFF, 1, "cannot resolve b.example")


# --- configuration and bookkeeping ----------------------------------------------------------
def test_set_peers_adds_and_removes() -> None:
    m = manager(peers=("b", "c", "d"))
    assert m.poll(0.0) == [Dial("b"), Dial("c"), Dial("d")]
    m.dial_started("b", 1, 0.0)
    m.connection_ready("b", 1, dialed_by_us=True, peer_epoch=1, now=0.1)
    m.dial_started("c", 2, 0.0)
    reason = "peer removed from configuration"
    assert m.set_peers(["e", "d", "a"], 1.0) == [
        Close(1, ErrorCode.NOT_CONFIGURED, reason),
        PeerDown("b", reason),
        Close(2, ErrorCode.NOT_CONFIGURED, reason),
    ]
    assert m.peers == ("d", "e")
    assert m.active_conn("b") is None and m.peer_of(1) is None
    with pytest.raises(UnknownPeerError):
        m.view("b", 1.0)
    assert m.connection_lost(1, "closed", 1.1) == [] and m.connection_lost(2, "closed", 1.1) == []
    assert m.poll(1.0) == [Dial("e")]  # d's dial is still requested
    m.dial_started("d", 3, 1.0)
    assert m.set_peers(["e"], 2.0) == [Close(3, ErrorCode.NOT_CONFIGURED, reason)]
    m.dial_started("d", 4, 2.5)  # a dial asked for before the reload: closed at the next poll
    assert m.next_deadline() == 2.5
    assert m.poll(2.5) == [Close(4, ErrorCode.NOT_CONFIGURED, reason)]
    assert m.set_peers(["e"], 3.0) == []


def test_ready_for_an_unconfigured_name_is_closed() -> None:
    m = manager()
    m.inbound_started(5, 0.0)
    assert m.connection_ready("zz", 5, dialed_by_us=False, peer_epoch=1, now=0.1) == [
        Close(5, ErrorCode.NOT_CONFIGURED, "'zz' is not a configured peer")
    ]
    assert m.peer_of(5) is None and m.connection_lost(5, "closed", 0.2) == []


def test_lost_is_idempotent_and_ready_twice_is_ignored() -> None:
    m = manager()
    assert m.connection_lost(99, "never heard of it", 0.0) == []
    connect(m, "b", 1, 0.0)
    assert m.connection_ready("b", 1, dialed_by_us=True, peer_epoch=1, now=0.1) == []
    assert m.connection_lost(1, "gone", 0.2) == [PeerDown("b", "gone")]
    assert m.connection_lost(1, "gone", 0.3) == []
    m.inbound_started(2, 0.4)
    assert m.connection_lost(2, "handshake failed", 0.5, rejected=True) == []  # unidentified: nobody to blame
    assert m.view("b", 0.5).consecutive_failures == 1


def test_set_timers_applies_to_running_deadlines() -> None:
    m = manager()
    connect(m, "b", 1, 0.0)
    m.set_timers(Timers(keepalive=0.5, dead_after=2.0))
    assert m.next_deadline() == 0.5
    assert m.poll(2.0)[0] == Close(1, ErrorCode.PEER_UNRESPONSIVE, "no packet for 2.0s")


@pytest.mark.parametrize(
    "kwargs", [{"keepalive": 0}, {"dead_after": -1.0}, {"backoff_min": float("nan")}, {"backoff_max": 0.1}]
)
def test_timers_must_be_positive(kwargs) -> None:
    with pytest.raises(ValueError):
        Timers(**kwargs)


# --- random interleavings -------------------------------------------------------------------
class MeshMachine(RuleBasedStateMachine):
    """A fake transport driving one manager ("m", peers "a" < m < "z") through arbitrary events.

    It mirrors what the actions told it and checks they are always consistent: one active connection
    per peer, no Dial while connected or dialing, no Close of an unknown connection, and that
    next_deadline() announces everything poll() does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.mgr = PeerManager("m", ["a", "z"], TIMERS, random.Random(0))
        self.ids = itertools.count(1)
        self.open: dict[int, str | None] = {}  # connections the transport holds -> identity if known
        self.ours: set[int] = set()  # of those, dialed by us
        self.pending: dict[int, str] = {}  # our dials not yet ready
        self.requests: dict[str, float] = {}  # Dial asked, dial_started not reported
        self.orphans: set[str] = set()  # requests of peers removed since: may still start
        self.active: dict[str, int] = {}  # from PeerUp / PeerDown
        self.gone: list[int] = []  # closed or lost connections
        self.closed: set[int] = set()  # closed by an action, connection_lost not reported yet

    def apply(self, actions) -> None:
        for action in actions:
            if isinstance(action, Dial):
                assert action.peer in self.mgr.peers and action.peer not in self.active
                assert action.peer not in self.pending.values()
                asked = self.requests.get(action.peer)
                assert asked is None or self.now >= asked + TIMERS.handshake_timeout
                self.requests[action.peer] = self.now
            elif isinstance(action, Close):
                assert action.conn_id in self.open, action
                self.forget(action.conn_id)
                self.closed.add(action.conn_id)
            elif isinstance(action, PeerUp):
                assert action.conn_id in self.open
                self.active[action.peer] = action.conn_id
            elif isinstance(action, PeerDown):
                del self.active[action.peer]
            else:
                assert isinstance(action, Ping) and action.conn_id in self.active.values()
        for peer, conn_id in self.active.items():
            assert conn_id in self.open, f"{peer}'s active connection {conn_id} was closed without PeerDown"
        assert len(set(self.active.values())) == len(self.active)

    def forget(self, conn_id: int) -> None:
        self.open.pop(conn_id, None)
        self.pending.pop(conn_id, None)
        self.gone.append(conn_id)

    def known_conn(self, data) -> int:
        """An open connection, a recently gone one, or one never reported."""
        return data.draw(st.sampled_from(sorted(self.open) + self.gone[-3:] + [10_000]))

    @rule(dt=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.9, 3.0, 5.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    def snapshot(self) -> list[tuple]:
        views = [self.mgr.view(peer, self.now) for peer in self.mgr.peers]
        return [(v.state, v.active_conn, v.consecutive_failures, v.last_error) for v in views]

    @rule()
    def poll(self) -> None:
        deadline = self.mgr.next_deadline()
        before = self.snapshot()
        actions = self.mgr.poll(self.now)
        if actions or self.snapshot() != before:  # a silent timeout must be announced too
            assert deadline is not None and deadline <= self.now
        self.apply(actions)
        after = self.mgr.next_deadline()
        assert after is None or after > self.now  # poll did everything due: no busy loop

    @rule(data=st.data())
    def start_dial(self, data) -> None:
        if not self.requests and not self.orphans:
            return
        peer = data.draw(st.sampled_from(sorted(self.requests.keys() | self.orphans)))
        self.requests.pop(peer, None)
        self.orphans.discard(peer)
        conn_id = next(self.ids)
        self.open[conn_id] = peer
        self.ours.add(conn_id)
        self.pending[conn_id] = peer
        self.mgr.dial_started(peer, conn_id, self.now)

    @rule()
    def inbound(self) -> None:
        conn_id = next(self.ids)
        self.open[conn_id] = None
        self.mgr.inbound_started(conn_id, self.now)

    @rule(data=st.data(), epoch=st.sampled_from([1, 2]))
    def ready(self, data, epoch: int) -> None:
        # Never ready after lost (a transport cannot see that), but maybe after our own Close.
        choices = sorted(self.open.keys() | self.closed)
        if not choices:
            return
        conn_id = data.draw(st.sampled_from(choices))
        peer = self.open.get(conn_id) or data.draw(st.sampled_from(["a", "z", "q", "m"]))
        if conn_id in self.open:
            self.open[conn_id] = peer
            self.pending.pop(conn_id, None)
        actions = self.mgr.connection_ready(
            peer, conn_id, dialed_by_us=conn_id in self.ours, peer_epoch=epoch, now=self.now
        )
        if conn_id not in self.open:
            assert actions == []  # closed by an action
        self.apply(actions)

    @rule(data=st.data(), rejected=st.booleans())
    def lost(self, data, rejected: bool) -> None:
        conn_id = self.known_conn(data)
        self.forget(conn_id)
        self.closed.discard(conn_id)
        self.apply(self.mgr.connection_lost(conn_id, "lost", self.now, rejected=rejected))

    @rule(data=st.data())
    def heard(self, data) -> None:
        self.mgr.heard_from(self.known_conn(data), self.now)

    @rule(peers=st.lists(st.sampled_from(["a", "z", "q", "m"]), unique=True))
    def reload(self, peers: list[str]) -> None:
        for peer in [p for p in self.requests if p not in peers]:
            del self.requests[peer]
            self.orphans.add(peer)
        self.apply(self.mgr.set_peers(peers, self.now))

    @invariant()
    def views_agree(self) -> None:
        for peer in self.mgr.peers:
            view = self.mgr.view(peer, self.now)
            assert view.active_conn == self.active.get(peer) == self.mgr.active_conn(peer)
            assert (view.state is PeerState.CONNECTED) == (peer in self.active)
            assert view.next_retry_in is None or view.next_retry_in >= 0
        for peer in self.active:
            assert peer in self.mgr.peers


TestMeshMachine = MeshMachine.TestCase
TestMeshMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
