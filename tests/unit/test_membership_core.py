"""The membership core's decisions on a fake clock (quicmesh/membership/core.py): no network, fixed randomness.

Announcements are built directly with dummy chain and signature bytes: the core works on announcements the
runtime has already verified, so signatures are not this module's edge (test_membership_announcement.py).
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.config import MeshSection
from quicmesh.membership.announcement import Announcement
from quicmesh.membership.core import (Connect, Disconnect, MemberChanged, MemberGone, MembershipCore, MemberUp,
                                      Reannounce, SendAnnounce, StartSync, membership_digest)

OPEN = MeshSection(members="any-certified")


def ann(node: str, version: int, *, leaving: bool = False, addresses: tuple[str, ...] = ("10.0.0.1:4433",),
        epoch: int = 1) -> Announcement:
    return Announcement(mesh="m", node=node, version=version, epoch=epoch, issued_at=0, addresses=addresses,
                        services=(), relay=False, leaving=leaving, chain=(b"dummy certificate",),
                        signature=b"dummy signature", raw=b"r" * 100)


def core(local: str = "a", settings: MeshSection = OPEN, **changes: object) -> MembershipCore:
    c = MembershipCore(local, replace(settings, **changes), random.Random(0))
    c.set_local(ann(local, 1), 0.0)
    return c


def sends(actions: list) -> dict[str, list[str]]:
    """peer -> the nodes whose announcements were sent to it."""
    out: dict[str, list[str]] = {}
    for action in actions:
        if isinstance(action, SendAnnounce):
            out.setdefault(action.peer, []).extend(a.node for a in action.announcements)
    return out


def test_newer_version_replaces_older_and_replays_are_counted() -> None:
    c = core()
    assert MemberUp(ann("b", 5)) in c.announcement_received(ann("b", 5), "b", 1.0)
    assert c.is_newer("b", 6) and not c.is_newer("b", 5) and not c.is_newer("a", 99)
    assert c.announcement_received(ann("b", 5), "x", 2.0) == []
    assert c.announcement_received(ann("b", 4), "x", 2.0) == []
    # Same content, newer version: no event; changed addresses or a restart (epoch): MemberChanged.
    assert not [a for a in c.announcement_received(ann("b", 6), "b", 3.0) if isinstance(a, (MemberUp, MemberChanged))]
    moved = ann("b", 7, addresses=("10.0.0.2:4433",))
    assert MemberChanged(moved) in c.announcement_received(moved, "b", 4.0)
    restarted = ann("b", 8, addresses=("10.0.0.2:4433",), epoch=2)
    assert MemberChanged(restarted) in c.announcement_received(restarted, "b", 5.0)
    counters = c.counters()
    assert counters["accepted"] == 4 and counters["replayed"] == 2 and counters["members"] == 2
    (row,) = c.members()
    assert (row.node, row.version, row.addresses, row.source, row.gone_reason) == ("b", 8, ("10.0.0.2:4433",), "b", None)


def test_our_own_name_from_someone_else_is_rejected_not_adopted() -> None:
    c = core()
    assert c.announcement_received(ann("a", 1000), "b", 1.0) == []
    assert c.counters()["rejected"] == {"own name": 1}
    assert c.member_count() == 1


def test_leaving_makes_a_tombstone_that_refuses_older_versions_until_a_restart() -> None:
    c = core(member_timeout=100.0)
    c.announcement_received(ann("b", 5), "b", 0.0)
    assert MemberGone("b", "left") in c.announcement_received(ann("b", 6, leaving=True), "b", 1.0)
    assert c.member_count() == 1
    assert c.announcement_received(ann("b", 5), "x", 2.0) == []  # a replay of the old version
    assert [(m.node, m.gone_reason) for m in c.members()] == [("b", "left")]
    assert MemberUp(ann("b", 7)) in c.announcement_received(ann("b", 7), "b", 3.0)  # it came back
    # The tombstone of a second departure goes after 2 x member_timeout: then old versions are news again.
    c.announcement_received(ann("b", 8, leaving=True), "b", 10.0)
    c.poll(209.0)
    assert not c.is_newer("b", 5)
    c.poll(210.0)
    assert c.is_newer("b", 5) and c.members() == []


def test_a_silent_member_goes_after_member_timeout_unless_connected() -> None:
    c = core(member_timeout=100.0, announce_interval=30.0)
    c.announcement_received(ann("b", 5), "x", 0.0)
    c.announcement_received(ann("c", 5), "x", 0.0)
    c.peer_connected("c", 0.0)
    assert c.next_deadline() is not None and c.next_deadline() <= 30.0
    assert not [a for a in c.poll(99.0) if isinstance(a, MemberGone)]
    c.announcement_received(ann("b", 6), "x", 50.0)  # a newer version is news of it
    assert not [a for a in c.poll(149.0) if isinstance(a, MemberGone)]
    assert MemberGone("b", "silent for 100s") in c.poll(149.0 + 100 / 16)  # checked every 16th of the timeout
    assert not [a for a in c.poll(400.0) if isinstance(a, MemberGone)]  # c is connected: alive however long
    c.peer_disconnected("c", 400.0)
    assert not [a for a in c.poll(499.0) if isinstance(a, MemberGone)]
    assert MemberGone("c", "silent for 100s") in c.poll(499.0 + 100 / 16)
    assert c.counters()["gone"] == {"silent": 2}


def test_revoked_member_goes_and_its_announcements_are_replays() -> None:
    c = core()
    c.announcement_received(ann("b", 5), "b", 0.0)
    assert c.member_revoked("b", 1.0) == [MemberGone("b", "revoked")]
    assert not c.is_newer("b", 5) and c.counters()["gone"] == {"revoked": 1}


def test_member_limit_bounds_the_table() -> None:
    c = core(max_members=3)
    for i, node in enumerate("bcd"):
        c.announcement_received(ann(node, 1), "x", float(i))
    assert c.announcement_received(ann("e", 1), "x", 5.0) == []
    assert c.member_count() == 4 and c.counters()["rejected"] == {"member limit": 1}
    c.announcement_received(ann("b", 2), "x", 6.0)  # known members still update
    assert not c.is_newer("b", 2) and c.counters()["accepted"] == 4


def test_rumor_goes_to_three_random_peers_other_than_source_and_announcer() -> None:
    c = core()
    peers = [f"p{i}" for i in range(10)]
    for peer in peers:
        c.peer_connected(peer, 0.0)
    targets = set()
    for version in range(1, 30):  # news each time: the member moves to another address
        got = sends(c.announcement_received(ann("p1", version, addresses=(f"10.0.0.{version}:4433",)), "p0",
                                            float(version)))
        assert len(got) == 3 and not {"p0", "p1"} & set(got)
        targets |= set(got)
    assert len(targets) >= 6  # random, not always the same three
    # A plain re-announcement (nothing but the version changed) is left to anti-entropy.
    assert not sends(c.announcement_received(ann("p1", 31, addresses=("10.0.0.29:4433",)), "p0", 31.0))
    assert not c.is_newer("p1", 31)
    # Our own announcement goes to every connected peer.
    assert set(sends(c.set_local(ann("a", 2), 40.0))) == set(peers)


def test_first_connection_syncs_at_once_then_every_gossip_interval() -> None:
    c = core(gossip_interval=1.0)
    assert c.peer_connected("b", 0.0, seed=True) == [StartSync("b")]
    assert c.peer_connected("c", 0.0) == []
    syncs = []
    now = 0.0
    for _ in range(100):
        now = c.next_deadline()
        assert now is not None
        syncs += [a.peer for a in c.poll(now) if isinstance(a, StartSync)]
        if now > 20.0:
            break
    assert 15 <= len(syncs) <= 30 and set(syncs) == {"b", "c"}
    c.peer_disconnected("b", now)
    c.peer_disconnected("c", now)
    assert not [a for a in c.poll(now + 10.0) if isinstance(a, StartSync)]


def test_reannounce_is_asked_every_interval_but_not_after_leaving() -> None:
    c = core(announce_interval=40.0)  # jittered: due within [0.75, 1] x 40 s
    assert Reannounce() not in c.poll(29.9)
    assert Reannounce() in c.poll(40.0)
    c.set_local(ann("a", 2), 40.5)
    assert Reannounce() not in c.poll(70.4) and Reannounce() in c.poll(80.5)
    c.set_local(ann("a", 3, leaving=True), 61.0)
    assert Reannounce() not in c.poll(200.0)


def test_digests_agree_and_digest_exchange_finds_what_each_side_lacks() -> None:
    left, right = core("a"), core("z")
    for c in (left, right):
        c.announcement_received(ann("b", 5), "x", 0.0)
    left.announcement_received(ann("z", 1), "x", 0.0)
    right.announcement_received(ann("a", 1), "x", 0.0)
    assert left.sync_received(right.digest(), 1.0) and left.digest() == membership_digest(right.digest_entries())
    left.announcement_received(ann("c", 3), "x", 1.0)  # only left knows c
    right.announcement_received(ann("b", 6), "x", 1.0)  # right has b newer
    right.announcement_received(ann("d", 2, leaving=True), "x", 1.0)  # right knows d left
    left.announcement_received(ann("d", 1), "x", 0.0)
    assert not right.sync_received(left.digest(), 2.0)
    newer, want = right.digest_received(left.digest_entries(), 2.0)
    assert sorted((a.node, a.version, a.leaving) for a in newer) == [("b", 6, False), ("d", 2, True)]
    assert want == ["c"]
    for a in newer:
        left.announcement_received(a, "z", 3.0)
    for action in left.wanted("z", want, 3.0):
        for a in action.announcements:
            right.announcement_received(a, "a", 3.0)
    assert left.digest() == right.digest()


def test_wanted_sends_at_most_64_per_message() -> None:
    c = core()
    names = [f"m{i}" for i in range(150)]
    for name in names:
        c.announcement_received(ann(name, 1), "x", 0.0)
    actions = c.wanted("b", names + ["unknown"], 1.0)
    assert [len(a.announcements) for a in actions] == [64, 64, 22] and {a.peer for a in actions} == {"b"}


def test_full_mesh_connects_every_member_and_switches_to_on_demand_above_the_limit() -> None:
    c = core(full_mesh_max=5, neighbors=2, idle_close=60.0)
    assert not c.full_mode  # "auto" waits for a first sync to know the mesh's size
    assert c.sync_done(0.0) == [] and c.full_mode and c.sync_done(0.0) == []
    connects = []
    for i in range(4):
        connects += [a.node for a in c.announcement_received(ann(f"m{i}", 1), "x", 0.0) if isinstance(a, Connect)]
    assert connects == ["m0", "m1", "m2", "m3"] and c.full_mode
    c.announcement_received(ann("m4", 1), "x", 1.0)  # 6 members with us: on demand now
    assert not c.full_mode
    assert not [a for a in c.poll(60.0) if isinstance(a, Disconnect)]
    released = {a.node for a in c.poll(61.0) if isinstance(a, Disconnect)}
    assert len(c.held()) == 2 and released == {"m0", "m1", "m2", "m3", "m4"} - set(c.held())


def test_on_demand_neighbors_are_stable_whatever_the_arrival_order() -> None:
    names = [f"m{i:02d}" for i in range(40)]
    chosen = []
    for seed in range(3):
        order = names[:]
        random.Random(seed).shuffle(order)
        c = MembershipCore("a", replace(OPEN, connect="on-demand", neighbors=4), random.Random(seed))
        for name in order:
            c.announcement_received(ann(name, 1), "x", 0.0)
        c.poll(100.0)  # neighbors replaced while members arrived were released (idle_close 60 s)
        chosen.append(sorted(c.held()))
    assert len(chosen[0]) == 4 and chosen[0] == chosen[1] == chosen[2]


def test_on_demand_traffic_holds_a_connection_until_idle_and_seeds_are_kept() -> None:
    c = core(connect="on-demand", neighbors=1, idle_close=60.0)
    for node in ("s", "b"):
        c.announcement_received(ann(node, 1), "x", 0.0)
    c.peer_connected("s", 0.0, seed=True)
    assert c.want_connection("unknown", 0.0) == []
    assert c.want_connection("s", 0.0) == []  # the runtime holds its seeds itself
    assert c.held() == ["s"]  # the one neighbor: s ranks before b for a (the stable hash)
    assert c.want_connection("b", 0.0) == [Connect("b")]
    assert c.want_connection("b", 1.0) == []
    c.peer_connected("b", 2.0)
    c.traffic("b", 50.0)
    assert not [a for a in c.poll(109.0) if isinstance(a, Disconnect)]
    assert [a for a in c.poll(110.0) if isinstance(a, Disconnect)] == [Disconnect("b", "idle for 60s")]
    assert c.held() == ["s"] and not [a for a in c.poll(119.0) if isinstance(a, Disconnect)]


def test_on_demand_a_seed_that_is_no_neighbor_is_let_go_once_the_neighbors_are_connected() -> None:
    c = core(connect="on-demand", neighbors=1, idle_close=10.0)
    for node in ("s", "b", "c2", "d"):
        c.announcement_received(ann(node, 1), "x", 0.0)
    c.poll(20.0)  # members that were neighbors for a moment are let go after idle_close
    (neighbor,) = c.held()
    seed = next(node for node in ("s", "b", "c2", "d") if node != neighbor)
    c.peer_connected(seed, 21.0, seed=True)
    assert not [a for a in c.poll(22.0) if isinstance(a, Disconnect)]  # the neighbor is not connected yet
    c.peer_connected(neighbor, 23.0)
    assert [a for a in c.poll(24.0) if isinstance(a, Disconnect)] == [
        Disconnect(seed, "joined: the seed is not needed any more")]
    assert not [a for a in c.poll(25.0) if isinstance(a, Disconnect)]  # once
    full = core(connect="full")
    full.announcement_received(ann("s", 1), "x", 0.0)
    full.peer_connected("s", 0.0, seed=True)
    assert not [a for a in full.poll(5.0) if isinstance(a, Disconnect)]  # a full mesh holds everyone


def test_a_member_that_is_gone_is_no_longer_held() -> None:
    c = core(connect="on-demand", neighbors=1)
    assert Connect("b") in c.announcement_received(ann("b", 1), "x", 0.0)
    c.announcement_received(ann("b", 2, leaving=True), "x", 1.0)
    assert c.held() == []


def test_push_rate_limit_is_a_token_bucket_per_peer() -> None:
    c = core(announce_rate=10.0, announce_burst=5)
    assert [c.admit_announcement("b", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert c.admit_announcement("c", 0.0)  # another peer has its own bucket
    assert c.admit_announcement("b", 0.1) and not c.admit_announcement("b", 0.1)
    assert c.counters()["rejected"] == {"rate limit": 2}


_events = st.lists(st.tuples(st.sampled_from(["ann", "leave", "conn", "disc", "want", "traffic", "poll"]),
                             st.integers(0, 7), st.floats(0.0, 50.0)), max_size=80)


@settings(max_examples=60, deadline=None)
@given(_events)
def test_any_event_sequence_keeps_the_core_consistent(events: list[tuple[str, int, float]]) -> None:
    """Bounds hold and poll always moves the next deadline past now (no busy loop) whatever happens."""
    c = core(connect="on-demand", neighbors=2, max_members=5, member_timeout=40.0, announce_interval=20.0,
             idle_close=15.0)
    now, version = 0.0, 1
    for kind, i, step in events:
        now += step
        version += 1
        node = f"n{i}"
        if kind == "ann":
            c.announcement_received(ann(node, version), "x", now)
        elif kind == "leave":
            c.announcement_received(ann(node, version, leaving=True), "x", now)
        elif kind == "conn":
            c.peer_connected(node, now, seed=i == 0)
        elif kind == "disc":
            c.peer_disconnected(node, now)
        elif kind == "want":
            c.want_connection(node, now)
        elif kind == "traffic":
            c.traffic(node, now)
        else:
            c.poll(now)
            deadline = c.next_deadline()
            assert deadline is None or deadline > now
        assert c.member_count() <= 6 and len(c.held()) <= 5
        assert set(c.held()) <= {m.node for m in c.members() if m.gone_reason is None}


def test_auto_holds_only_neighbors_until_the_first_sync_then_everyone_of_a_small_mesh() -> None:
    c = core(full_mesh_max=10, neighbors=1)
    names = {f"m{i}" for i in range(8)}
    held = [a.node for name in sorted(names) for a in c.announcement_received(ann(name, 1), "x", 0.0)
            if isinstance(a, Connect)]
    assert len(held) < len(names) and not c.full_mode  # a joining node does not dial all it hears of yet
    connects = {a.node for a in c.sync_done(1.0) if isinstance(a, Connect)}
    assert c.full_mode and connects | set(held) == names
