"""Peer manager decisions about relayed connections (runtime/peer_manager.py), on a fake clock: a direct
connection always beats a relayed one, on both nodes alike; a restart still wins; the direct path is still
dialed, on backoff, while the peer is reached through a relay; a lost relayed connection is a PeerDown."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from quicmesh.config import Timers
from quicmesh.protocol.wire import ErrorCode
from quicmesh.runtime.peer_manager import Close, Dial, PeerDown, PeerManager, PeerState, PeerUp, Ping

TIMERS = Timers(keepalive=1.0, dead_after=3.0, backoff_min=0.2, backoff_max=10.0, handshake_timeout=5.0)
KEPT_DIRECT = "duplicate connection: kept the direct one"
REPLACED = "replaced by a direct connection"


class HighJitter(random.Random):
    """uniform() returns its high end: backoff delays are exactly min(backoff_max, backoff_min * 2**(n-1))."""

    def uniform(self, a: float, b: float) -> float:
        return b


def manager(local: str = "a", peers: tuple[str, ...] = ("c",)) -> PeerManager:
    return PeerManager(local, peers, TIMERS, HighJitter(0))


def ready(m: PeerManager, peer: str, conn_id: int, now: float, *, relayed: bool, dialed_by_us: bool = True,
          epoch: int = 1) -> list:
    """A connection the transport started (a relayed one always starts as inbound) became ready."""
    m.inbound_started(conn_id, now)
    return m.connection_ready(peer, conn_id, dialed_by_us=dialed_by_us, peer_epoch=epoch, now=now, relayed=relayed)


def fail_direct_dial(m: PeerManager, peer: str, conn_id: int, now: float) -> None:
    assert Dial(peer) in m.poll(now)
    m.dial_started(peer, conn_id, now)
    assert m.connection_lost(conn_id, "no answer", now) == []


def relayed_after_one_failure(m: PeerManager) -> None:
    """a's direct dial to c failed at 0.0 (retry at 0.2); c is then reached through a relay (conn 2) at 0.1."""
    fail_direct_dial(m, "c", 1, 0.0)
    assert ready(m, "c", 2, 0.1, relayed=True) == [PeerUp("c", 2)]


# --- which connection both nodes keep ----------------------------------------------------------
# Connections between a and c: RA a relayed one a dialed, RC a relayed one c dialed, D a direct one c dialed
# (so the tie-break alone, which keeps what a dials, would keep RA: only "direct beats relayed" keeps D).
CONNS = {"RA": (1, True, "a"), "RC": (2, True, "c"), "D": (3, False, "c"), "DA": (4, False, "a")}


def settle(events: list[tuple[str, str]]) -> dict[str, tuple[int | None, set[int]]]:
    """Feed each node's manager the ready events in the order given; each node's active and closed conns."""
    nodes = {"a": PeerManager("a", ["c"], TIMERS, random.Random(1)),
             "c": PeerManager("c", ["a"], TIMERS, random.Random(2))}
    closed: dict[str, set[int]] = {"a": set(), "c": set()}
    for node, name in events:
        conn_id, relayed, dialer = CONNS[name]
        other = "c" if node == "a" else "a"
        for action in ready(nodes[node], other, conn_id, 1.0, relayed=relayed, dialed_by_us=dialer == node):
            assert not isinstance(action, PeerDown)  # a replacement never shows as a disconnect
            if isinstance(action, Close):
                assert action.code == ErrorCode.DUPLICATE_CONNECTION
                closed[node].add(action.conn_id)
    return {node: (m.active_conn("a" if node == "c" else "c"), closed[node]) for node, m in nodes.items()}


def interleavings(names: list[str]) -> list[list[tuple[str, str]]]:
    """Every order of both nodes' ready events in which each node's own events may come in any order."""
    events = [(node, name) for node in ("a", "c") for name in names]
    return [list(order) for order in itertools.permutations(events)]


@pytest.mark.parametrize(("names", "kept"), [
    (["RA", "D"], "D"),  # direct beats relayed whichever came first, although the tie-break prefers RA
    (["RA", "RC"], "RA"),  # two relayed ones: the tie-break (a dialed it), as for direct duplicates
    (["RA", "RC", "D"], "D"),
    (["RC", "D", "DA"], "DA"),  # two direct ones and a relayed one: the direct one a dialed
])
def test_both_nodes_keep_the_same_connection(names: list[str], kept: str) -> None:
    for order in interleavings(names):
        result = settle(order)
        kept_id = CONNS[kept][0]
        others = {CONNS[name][0] for name in names} - {kept_id}
        assert result["a"][0] == kept_id == result["c"][0], order
        assert result["a"][1] == others == result["c"][1], order


def test_direct_replaces_relayed_without_a_reconnect() -> None:
    m = manager()
    relayed_after_one_failure(m)
    assert m.relayed("c")
    assert ready(m, "c", 3, 0.5, relayed=False) == [PeerUp("c", 3), Close(2, ErrorCode.DUPLICATE_CONNECTION, REPLACED)]
    view = m.view("c", 0.5)
    assert not m.relayed("c") and view.active_conn == 3
    assert view.connected_since == 0.1  # the same peer process: no reconnect to show
    assert view.consecutive_failures == 0  # the direct path works again
    assert m.connection_lost(2, "closed", 0.6) == []  # our own Close coming back


def test_relayed_never_replaces_direct() -> None:
    m = manager()
    assert ready(m, "c", 1, 0.0, relayed=False) == [PeerUp("c", 1)]
    for conn_id, dialed_by_us in ((2, True), (3, False)):
        assert ready(m, "c", conn_id, 0.1, relayed=True, dialed_by_us=dialed_by_us) == [
            Close(conn_id, ErrorCode.DUPLICATE_CONNECTION, KEPT_DIRECT)]
    assert m.active_conn("c") == 1 and not m.relayed("c")


@pytest.mark.parametrize("new_relayed", [True, False])
def test_a_restarted_peer_wins_over_either_path(new_relayed: bool) -> None:
    m = manager()
    assert ready(m, "c", 1, 0.0, relayed=not new_relayed, epoch=7) == [PeerUp("c", 1)]
    assert ready(m, "c", 2, 4.0, relayed=new_relayed, dialed_by_us=False, epoch=8) == [
        PeerUp("c", 2), Close(1, ErrorCode.DUPLICATE_CONNECTION, "replaced by a new connection from restarted peer")]
    assert m.relayed("c") is new_relayed and m.view("c", 4.0).connected_since == 4.0


def test_after_a_restart_through_a_relay_the_direct_path_is_dialed() -> None:
    m = manager()
    assert ready(m, "c", 1, 0.0, relayed=False, epoch=7) == [PeerUp("c", 1)]
    ready(m, "c", 2, 4.0, relayed=True, epoch=8)
    assert m.poll(4.0) == [Dial("c")]


# --- the direct path is still dialed while relayed ----------------------------------------------
def test_direct_dials_go_on_with_backoff_while_relayed() -> None:
    m = manager()
    relayed_after_one_failure(m)
    view = m.view("c", 0.1)
    assert (view.state, view.consecutive_failures, view.last_error) == (PeerState.CONNECTED, 1, "no answer")
    assert m.next_deadline() == 0.2  # the direct retry (the relayed connection's ping is due at 1.25)
    now, conn_ids = 0.2, itertools.count(3)
    for failures, delay in ((2, 0.4), (3, 0.8), (4, 1.6)):  # the backoff keeps doubling
        fail_direct_dial(m, "c", next(conn_ids), now)
        m.heard_from(2, now)  # the relayed connection is alive meanwhile
        assert m.view("c", now).consecutive_failures == failures
        assert m.next_deadline() <= now + delay  # the retry is announced (or a ping comes first)
        assert Dial("c") not in m.poll(now + delay - 1e-6)
        now += delay
    assert Dial("c") in m.poll(now)
    assert m.active_conn("c") == 2  # failed direct dials never touch the relayed connection


def test_a_direct_dial_timing_out_while_relayed_counts_a_failure() -> None:
    m = manager()
    relayed_after_one_failure(m)
    assert m.poll(0.2) == [Dial("c")]
    m.dial_started("c", 3, 0.2)
    m.heard_from(2, 5.0)
    actions = m.poll(5.2)
    assert Close(3, ErrorCode.NO_ERROR, "handshake timed out after 5.0s") in actions
    assert not any(isinstance(action, PeerDown) for action in actions)
    retry = m.next_deadline()
    assert m.view("c", 5.2).consecutive_failures == 2 and retry == pytest.approx(5.6)
    assert m.poll(retry) == [Dial("c")]  # and a Dial that never starts is timed out and counted alike
    m.heard_from(2, retry + 4.9)
    m.poll(retry + TIMERS.handshake_timeout)
    view = m.view("c", retry + TIMERS.handshake_timeout)
    assert (view.consecutive_failures, view.last_error) == (3, "dial did not start within 5.0s")


def test_a_dial_that_cannot_start_while_relayed_counts_a_failure() -> None:
    """A Dial that cannot start (the peer's address does not resolve) while the peer is reached through a
    relay must back off like any other failed direct dial, not be asked for again at once, forever."""
    m = manager()
    relayed_after_one_failure(m)
    assert m.poll(0.2) == [Dial("c")]
    m.dial_failed("c", "cannot resolve c.example", 0.2)
    assert m.view("c", 0.2).consecutive_failures == 2
    assert m.poll(0.2) == []  # a backoff step (0.4 s) first
    assert m.next_deadline() == pytest.approx(0.6)


def test_a_direct_dial_succeeding_while_relayed_replaces_the_relayed_connection() -> None:
    m = manager()
    relayed_after_one_failure(m)
    assert m.poll(0.2) == [Dial("c")]
    m.dial_started("c", 3, 0.2)
    assert m.connection_ready("c", 3, dialed_by_us=True, peer_epoch=1, now=0.3) == [
        PeerUp("c", 3), Close(2, ErrorCode.DUPLICATE_CONNECTION, REPLACED)]
    m.heard_from(3, 100.0)
    assert Dial("c") not in m.poll(100.0)  # directly connected: no more dials
    assert m.view("c", 100.0).consecutive_failures == 0


# --- losing the relayed connection --------------------------------------------------------------
def test_a_lost_relayed_connection_is_a_peer_down_and_a_backoff() -> None:
    m = manager()
    relayed_after_one_failure(m)
    assert m.connection_lost(2, "relay beta is gone", 0.15) == [PeerDown("c", "relay beta is gone")]
    view = m.view("c", 0.15)
    assert (view.state, view.active_conn, view.consecutive_failures) == (PeerState.BACKOFF, None, 1)
    assert view.next_retry_in == pytest.approx(0.2) and view.last_error == "relay beta is gone"


def test_a_lost_relayed_connection_leaves_the_running_direct_dial_alone() -> None:
    m = manager()
    relayed_after_one_failure(m)
    assert m.poll(0.2) == [Dial("c")]
    m.dial_started("c", 3, 0.2)
    assert m.connection_lost(2, "relay beta is gone", 0.3) == [PeerDown("c", "relay beta is gone")]
    assert m.view("c", 0.3).state is PeerState.CONNECTING
    assert m.connection_ready("c", 3, dialed_by_us=True, peer_epoch=1, now=0.4) == [PeerUp("c", 3)]


def test_a_silent_relayed_connection_is_dead_after_dead_after() -> None:
    m = manager()
    relayed_after_one_failure(m)
    m.dial_started("c", 3, 0.2)  # a direct dial in flight: no Dial in the polls below
    m.poll(0.2)
    actions = [action for action in m.poll(3.1) if not isinstance(action, Ping)]
    assert actions == [Close(2, ErrorCode.PEER_UNRESPONSIVE, "no packet for 3.0s"), PeerDown("c", "no packet for 3.0s")]


# --- random interleavings -------------------------------------------------------------------
class RelayMachine(RuleBasedStateMachine):
    """A fake transport driving manager "m" (peers "a" < m < "z") through arbitrary events, relayed and direct.

    Checks: one active connection per peer; never a relayed active connection while a direct one of the same
    epoch is ready and open; next_deadline() > now after every poll; while relayed and no direct dial is
    under way, a direct dial is due within backoff_max.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.mgr = PeerManager("m", ["a", "z"], TIMERS, random.Random(0))
        self.ids = itertools.count(1)
        self.open: dict[int, tuple[str | None, bool, bool]] = {}  # conn -> (peer if known, ours, relayed)
        self.ready: dict[int, tuple[str, bool, int]] = {}  # open and reported ready -> (peer, relayed, epoch)
        self.requests: set[str] = set()  # Dial asked, dial_started not reported
        self.active: dict[str, int] = {}  # from PeerUp / PeerDown
        self.gone: list[int] = []

    def apply(self, actions) -> None:  # noqa: ANN001
        for action in actions:
            if isinstance(action, Dial):
                assert action.peer not in self.active or self.mgr.relayed(action.peer)
                self.requests.add(action.peer)
            elif isinstance(action, Close):
                assert action.conn_id in self.open, action
                self.forget(action.conn_id)
            elif isinstance(action, PeerUp):
                assert action.conn_id in self.open
                self.active[action.peer] = action.conn_id
            elif isinstance(action, PeerDown):
                del self.active[action.peer]
        for peer, conn_id in self.active.items():
            assert conn_id in self.open, f"{peer}'s active connection {conn_id} was closed without PeerDown"

    def forget(self, conn_id: int) -> None:
        self.open.pop(conn_id, None)
        self.ready.pop(conn_id, None)
        self.gone.append(conn_id)

    @rule(dt=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.9, 3.0, 5.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def poll(self) -> None:
        self.apply(self.mgr.poll(self.now))
        after = self.mgr.next_deadline()
        assert after is None or after > self.now  # poll did everything due: no busy loop

    @rule(data=st.data(), started=st.booleans())
    def our_dial(self, data: st.DataObject, started: bool) -> None:
        """A requested Dial starts (a direct connection), or cannot start at all."""
        if not self.requests:
            return
        peer = data.draw(st.sampled_from(sorted(self.requests)))
        self.requests.discard(peer)
        if not started:
            self.mgr.dial_failed(peer, "cannot resolve", self.now)
            return
        conn_id = next(self.ids)
        self.open[conn_id] = (peer, True, False)
        self.mgr.dial_started(peer, conn_id, self.now)

    @rule(relayed=st.booleans(), ours=st.booleans())
    def started_elsewhere(self, relayed: bool, ours: bool) -> None:
        """An accepted connection, or a relayed one (ours through a relay circuit, or the peer's)."""
        conn_id = next(self.ids)
        self.open[conn_id] = (None, ours and relayed, relayed)
        self.mgr.inbound_started(conn_id, self.now)

    @rule(data=st.data(), epoch=st.sampled_from([1, 2]))
    def handshake_done(self, data: st.DataObject, epoch: int) -> None:
        candidates = sorted(c for c in self.open if c not in self.ready)
        if not candidates:
            return
        conn_id = data.draw(st.sampled_from(candidates))
        peer, ours, relayed = self.open[conn_id]
        peer = peer or data.draw(st.sampled_from(["a", "z"]))
        self.open[conn_id] = (peer, ours, relayed)
        self.ready[conn_id] = (peer, relayed, epoch)
        self.apply(self.mgr.connection_ready(peer, conn_id, dialed_by_us=ours, peer_epoch=epoch, now=self.now,
                                             relayed=relayed))

    @rule(data=st.data())
    def lost(self, data: st.DataObject) -> None:
        conn_id = data.draw(st.sampled_from(sorted(self.open) + self.gone[-2:] + [10_000]))
        self.forget(conn_id)
        self.apply(self.mgr.connection_lost(conn_id, "lost", self.now))

    @rule(data=st.data())
    def heard(self, data: st.DataObject) -> None:
        if self.open:
            self.mgr.heard_from(data.draw(st.sampled_from(sorted(self.open))), self.now)

    @invariant()
    def one_active_per_peer_and_direct_wins(self) -> None:
        assert len(set(self.active.values())) == len(self.active)
        for peer in self.mgr.peers:
            assert self.mgr.active_conn(peer) == self.active.get(peer)
        for peer, conn_id in self.active.items():
            _, relayed, epoch = self.ready[conn_id]
            assert relayed == self.mgr.relayed(peer)
            if relayed:
                direct = [c for c, (p, r, e) in self.ready.items() if p == peer and not r and e == epoch]
                assert not direct, f"{peer}: relayed {conn_id} kept while direct {direct} is ready"

    @invariant()
    def relayed_peers_keep_being_dialed(self) -> None:
        for peer, conn_id in self.active.items():
            dialing = peer in self.requests or any(
                p == peer and ours and not relayed and c not in self.ready for c, (p, ours, relayed) in self.open.items())
            if not self.mgr.relayed(peer) or dialing:
                continue
            later = copy.deepcopy(self.mgr)
            at = self.now + TIMERS.backoff_max
            later.heard_from(conn_id, at)
            assert Dial(peer) in later.poll(at), f"no direct dial to {peer} within backoff_max while relayed"


TestRelayMachine = RelayMachine.TestCase
TestRelayMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
