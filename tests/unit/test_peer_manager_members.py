"""Peers learnt at run time (membership): add_peer, passive peers, set_passive, remove_peer, redial_soon."""

from __future__ import annotations

import random

from quicmesh.config import Timers
from quicmesh.protocol.wire import ErrorCode
from quicmesh.runtime.peer_manager import Close, Dial, PeerDown, PeerManager, PeerState, PeerUp

TIMERS = Timers(keepalive=1.0, dead_after=3.0, backoff_min=0.2, backoff_max=10.0, handshake_timeout=5.0)


def manager(peers=()) -> PeerManager:
    return PeerManager("a", peers, TIMERS, random.Random(0))


def test_an_added_peer_is_dialed_at_once_and_a_passive_one_never() -> None:
    m = manager()
    m.add_peer("b", 1.0)
    m.add_peer("c", 1.0, dial=False)
    m.add_peer("a", 1.0)  # our own name: ignored
    assert m.peers == ("b", "c")
    assert m.poll(1.0) == [Dial("b")]
    for now in (2.0, 30.0, 300.0):
        assert Dial("c") not in m.poll(now)
    assert m.dials("b") and not m.dials("c") and not m.dials("zz")


def test_a_passive_peer_keeps_its_inbound_connection_and_is_not_redialed_when_it_ends() -> None:
    m = manager()
    m.add_peer("c", 0.0, dial=False)
    m.inbound_started(7, 0.0)
    assert m.connection_ready("c", 7, dialed_by_us=False, peer_epoch=1, now=0.1) == [PeerUp("c", 7)]
    assert m.view("c", 0.2).state is PeerState.CONNECTED
    assert m.connection_lost(7, "closed by peer", 0.5) == [PeerDown("c", "closed by peer")]
    assert all(not isinstance(a, Dial) for now in (1.0, 20.0, 200.0) for a in m.poll(now))


def test_add_peer_with_dial_turns_a_passive_peer_into_a_dialed_one() -> None:
    m = manager()
    m.add_peer("c", 0.0, dial=False)
    assert m.poll(5.0) == []
    m.add_peer("c", 6.0, dial=True)
    assert m.poll(6.0) == [Dial("c")]


def test_set_passive_closes_our_connection_and_stops_dialing() -> None:
    m = manager(("b",))
    assert m.poll(0.0) == [Dial("b")]
    m.dial_started("b", 1, 0.0)
    assert m.connection_ready("b", 1, dialed_by_us=True, peer_epoch=1, now=0.1) == [PeerUp("b", 1)]
    actions = m.set_passive("b", 1.0, "idle for 60s")
    assert actions == [Close(1, ErrorCode.NO_ERROR, "idle for 60s"), PeerDown("b", "idle for 60s")]
    assert m.connection_lost(1, "closed", 1.1) == []  # closed by the action: ignored
    assert all(not isinstance(a, Dial) for now in (2.0, 50.0) for a in m.poll(now))
    assert m.set_passive("b", 3.0) == []  # already passive


def test_set_passive_abandons_a_pending_dial_and_a_late_dial_started_is_closed() -> None:
    m = manager(("b", "c"))
    assert m.poll(0.0) == [Dial("b"), Dial("c")]
    m.dial_started("b", 1, 0.0)
    assert m.set_passive("b", 0.1) == [Close(1, ErrorCode.NO_ERROR, "idle")]
    assert m.set_passive("c", 0.1) == []  # Dial emitted, not started yet
    m.dial_started("c", 2, 0.2)
    assert m.poll(0.2) == [Close(2, ErrorCode.NO_ERROR, "peer no longer dialed")]


def test_remove_peer_closes_everything_with_the_given_code() -> None:
    m = manager(("b",))
    assert m.poll(0.0) == [Dial("b")]
    m.dial_started("b", 1, 0.0)
    m.connection_ready("b", 1, dialed_by_us=True, peer_epoch=1, now=0.1)
    actions = m.remove_peer("b", "member revoked", ErrorCode.IDENTITY_REJECTED)
    assert actions == [Close(1, ErrorCode.IDENTITY_REJECTED, "member revoked"), PeerDown("b", "member revoked")]
    assert m.peers == () and m.remove_peer("b", "again", ErrorCode.NO_ERROR) == []


def test_set_peers_keeps_the_members_it_is_told_to_keep() -> None:
    m = manager(("b",))
    m.add_peer("m1", 0.0, dial=False)
    assert m.set_peers(["b"], 1.0, keep=["m1"]) == []
    assert set(m.peers) == {"b", "m1"}
    m.set_peers(["b"], 2.0)
    assert m.peers == ("b",)


def test_redial_soon_cuts_a_backoff_short() -> None:
    m = manager(("b",))
    for conn_id, now in ((1, 0.0), (2, 1.0), (3, 5.0)):
        due = m.next_deadline()
        now = max(now, due)
        assert m.poll(now) == [Dial("b")]
        m.dial_started("b", conn_id, now)
        m.connection_lost(conn_id, "refused", now)
    waiting = m.next_deadline()
    assert waiting > now + 0.1  # backing off
    m.redial_soon("b", now + 0.1)
    assert m.poll(now + 0.1) == [Dial("b")]


def test_set_passive_closes_a_connection_we_dialed_by_address_but_not_an_inbound_one() -> None:
    m = manager()
    m.add_peer("seed", 0.0, dial=False)  # a seed: dialed by address, known by name once verified
    m.inbound_started(4, 0.0)
    m.connection_ready("seed", 4, dialed_by_us=True, peer_epoch=1, now=0.1)
    assert m.set_passive("seed", 1.0, "joined") == [Close(4, ErrorCode.NO_ERROR, "joined"), PeerDown("seed", "joined")]
    m.add_peer("other", 0.0, dial=False)
    m.inbound_started(5, 0.0)
    m.connection_ready("other", 5, dialed_by_us=False, peer_epoch=1, now=0.1)
    assert m.set_passive("other", 1.0) == []  # the dialer's to close
    assert m.view("other", 1.0).state is PeerState.CONNECTED
