"""The membership protocol (issue 16) on N sans-I/O cores in one process: ``python -m quicmesh.bench.membership_sim``.

Each node is a :class:`quicmesh.membership.core.MembershipCore`; a simulated network plays the runtime's
part on a simulated clock: it delivers SendAnnounce messages and runs StartSync's Sync -> Digest exchange
as method calls, each hop ``latency`` late; a connection exists when one side asked (a Connect, or the
seed dial every node starts with) and the other accepts, after ``handshake`` seconds; it is redialed
while the dialer still holds it. Announcements are built directly with dummy chain and signature bytes
(``raw`` of a real one's size): verifying them is the runtime's job, not the core's. Sizes count each
message's fields plus :data:`MESSAGE_OVERHEAD` for its QUIC stream and acknowledgement.

The scenario (:func:`run_scenario`): every node starts within ``start_spread`` seconds knowing only the
seed ``n0000``; time until every node knows every member; messages and bytes per node per second during
convergence and in steady state (re-announcements every announce_interval); connections per node (on
demand when N > full_mesh_max) before, during and after a traffic pattern (each node talks to ``talkers``
random others, then stops: back after idle_close); a late joiner; a graceful departure; a silent kill.
Every loop is bounded: the event count by ``max_events``, the clock by each phase's limit.
"""

from __future__ import annotations

import heapq
import json
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from quicmesh.config import MeshSection
from quicmesh.membership.announcement import Announcement
from quicmesh.membership.core import (Action, Connect, Disconnect, MemberChanged, MemberGone, MembershipCore,
                                      MemberUp, Reannounce, SendAnnounce, StartSync)

SEED = "n0000"
ANNOUNCEMENT_SIZE = 1100  # a real one: ~100 bytes of fields, a P-256 leaf (~600) + intermediate-less chain, signature
MESSAGE_OVERHEAD = 40  # STREAM frame and feature framing of a message, its acknowledgement
_DUMMY_RAW = bytes(ANNOUNCEMENT_SIZE)
_VERSION_BASE = 1_800_000_000_000_000  # microseconds since the epoch at simulated time 0
_UP, _NEW, _GONE = "up", "new", "gone"


def node_name(index: int) -> str:
    return f"n{index:04d}"


@dataclass
class _Node:
    name: str
    core: MembershipCore
    state: str = _NEW
    started_at: float | None = None
    version: int = 0
    held: set[str] = field(default_factory=set)  # Connect received, no Disconnect / MemberGone since
    seed: str | None = None  # dialed by address at start and redialed until connected
    poll_at: float | None = None
    poll_token: int = 0
    messages: int = 0
    bytes: int = 0
    announce_bytes: int = 0  # of ``bytes``: Announce messages (the rest: Sync and Digest exchanges)


@dataclass(frozen=True)
class Sample:
    """Totals at one moment, for rates between two moments."""

    time: float
    messages: int
    bytes: int
    announce_bytes: int
    nodes: int


class MeshSimulation:
    """N membership cores and the network between them, on a simulated clock (see the module docstring)."""

    def __init__(self, members: int, settings: MeshSection, *, latency: float = 0.025, handshake: float = 0.075,
                 dead_after: float = 3.0, redial: float = 2.0, seed: int = 1, max_events: int = 50_000_000) -> None:
        self.settings = settings
        self.latency, self.handshake, self.dead_after, self.redial = latency, handshake, dead_after, redial
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: dict[str, _Node] = {}
        self.links: dict[str, set[str]] = {}
        self.connections_opened = 0
        self.seen_up: dict[str, dict[str, float]] = {}  # member -> observer -> time MemberUp (tracked ones)
        self.seen_gone: dict[str, dict[str, float]] = {}  # member -> observer -> time MemberGone
        self.gone_reasons: dict[str, set[str]] = {}
        self._dialing: set[tuple[str, str]] = set()
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._events_left = max_events
        self._talking: list[tuple[str, str]] = []
        for index in range(members):
            self.add_node(node_name(index))

    # --- driving ----------------------------------------------------------------------------------
    def add_node(self, name: str) -> None:
        core = MembershipCore(name, self.settings, random.Random(self.rng.random()))
        self.nodes[name] = _Node(name, core)
        self.links[name] = set()

    def start(self, name: str, at: float) -> None:
        self._at(at, self._start, name)

    def run_until(self, limit: float, done: Callable[[], bool] | None = None, check_every: float = 0.05) -> float | None:
        """Run events up to ``limit``; with ``done``, stop at the first check where it holds: return that time."""
        next_check = self.now
        while self._events and self._events[0][0] <= limit:
            if done is not None and self._events[0][0] >= next_check:
                self.now = max(self.now, next_check)
                if done():
                    return self.now
                next_check = self.now + check_every
                continue
            self._events_left -= 1
            if self._events_left < 0:
                raise RuntimeError("simulation exceeded its event budget")
            at, _, handler, args = heapq.heappop(self._events)
            self.now = max(self.now, at)
            handler(*args)
        self.now = max(self.now, limit)
        return self.now if done is not None and done() else None

    def up(self) -> list[_Node]:
        return [n for n in self.nodes.values() if n.state == _UP]

    def converged(self) -> bool:
        """Every node has started, and every running one knows exactly the running ones."""
        up = self.up()
        if any(n.state == _NEW for n in self.nodes.values()):
            return False
        return all(n.core.member_count() == len(up) for n in up)

    def sample(self) -> Sample:
        up = self.up()
        return Sample(self.now, sum(n.messages for n in up), sum(n.bytes for n in up),
                      sum(n.announce_bytes for n in up), len(up))

    def connection_counts(self) -> dict[str, int]:
        return {n.name: len(self.links[n.name]) for n in self.up()}

    def leave(self, name: str) -> None:
        """Graceful stop: sign a leaving announcement, send it, close every connection a moment later."""
        node = self.nodes[name]
        self._feed(node, node.core.set_local(self._announcement(node, leaving=True), self.now))
        self._at(self.now + 4 * self.latency, self._stop, name)

    def kill(self, name: str) -> None:
        """kill -9: the peers notice after dead_after; nothing more comes from it."""
        node = self.nodes[name]
        node.state = _GONE
        for other in list(self.links[name]):
            self._unlink(name, other)
            self._at(self.now + self.dead_after, self._lost, other, name)

    def talk(self, pairs: list[tuple[str, str]], interval: float = 1.0) -> None:
        """From now on, each (a, b) exchanges application traffic every ``interval`` until :meth:`quiet`."""
        self._talking = pairs
        self._at(self.now, self._traffic_tick, interval)

    def quiet(self) -> None:
        self._talking = []

    # --- the network ------------------------------------------------------------------------------
    def _at(self, at: float, handler: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, handler, args))

    def _start(self, name: str) -> None:
        node = self.nodes[name]
        node.state = _UP
        node.started_at = self.now
        self._feed(node, node.core.set_local(self._announcement(node), self.now))
        if name != SEED:
            node.seed = SEED
            self._dial(name, SEED)

    def _stop(self, name: str) -> None:
        self.nodes[name].state = _GONE
        for other in list(self.links[name]):
            self._unlink(name, other)
            self._at(self.now + self.latency, self._lost, other, name)

    def _announcement(self, node: _Node, *, leaving: bool = False) -> Announcement:
        node.version = max(node.version + 1, _VERSION_BASE + int(self.now * 1e6))
        return Announcement(mesh="sim", node=node.name, version=node.version, epoch=1, issued_at=int(self.now),
                            addresses=(f"{node.name}.sim:4433",), services=(), relay=False, leaving=leaving,
                            chain=(b"dummy certificate",), signature=b"dummy signature", raw=_DUMMY_RAW)

    def _wants(self, node: _Node, other: str) -> bool:
        return node.state == _UP and (other in node.held or other == node.seed)

    def _dial(self, name: str, other: str) -> None:
        if (name, other) in self._dialing or other in self.links[name]:
            return
        self._dialing.add((name, other))
        self._at(self.now + self.handshake, self._dial_done, name, other)

    def _dial_done(self, name: str, other: str) -> None:
        self._dialing.discard((name, other))
        node, peer = self.nodes[name], self.nodes[other]
        if node.state != _UP or other in self.links[name]:
            return
        if peer.state != _UP:
            if self._wants(node, other):
                self._at(self.now + self.redial, self._redial, name, other)
            return
        self.links[name].add(other)
        self.links[other].add(name)
        self.connections_opened += 1
        self._feed(node, node.core.peer_connected(other, self.now, seed=other == node.seed))
        self._feed(peer, peer.core.peer_connected(name, self.now))

    def _redial(self, name: str, other: str) -> None:
        if self._wants(self.nodes[name], other):
            self._dial(name, other)

    def _unlink(self, a: str, b: str) -> None:
        self.links[a].discard(b)
        self.links[b].discard(a)

    def _close(self, node: _Node, other: str) -> None:
        """``node`` closes its connection to ``other``; the other side hears of it one hop later."""
        self._unlink(node.name, other)
        self._feed(node, node.core.peer_disconnected(other, self.now))
        self._at(self.now + self.latency, self._lost, other, node.name)

    def _lost(self, name: str, other: str) -> None:
        node = self.nodes[name]
        if node.state != _UP:
            return
        self._feed(node, node.core.peer_disconnected(other, self.now))
        if self._wants(node, other):
            self._at(self.now + self.redial, self._redial, name, other)

    def _send(self, node: _Node, size: int, handler: Callable[..., None], *args: Any) -> None:
        node.messages += 1
        node.bytes += size + MESSAGE_OVERHEAD
        self._at(self.now + self.latency, handler, *args)

    def _feed(self, node: _Node, actions: list[Action]) -> None:
        """Carry out a core's actions, as the runtime would, then reschedule its poll."""
        for action in actions:
            if isinstance(action, SendAnnounce):
                if action.peer in self.links[node.name]:
                    size = 2 + sum(len(a.raw) + 3 for a in action.announcements)
                    node.announce_bytes += size + MESSAGE_OVERHEAD
                    self._send(node, size, self._announce_arrives, action.peer, node.name, action.announcements)
            elif isinstance(action, StartSync):
                if action.peer in self.links[node.name]:
                    self._send(node, 1 + 33 + 4 + 4, self._sync_arrives, action.peer, node.name,
                               node.core.digest())
            elif isinstance(action, Reannounce):
                self._feed(node, node.core.set_local(self._announcement(node), self.now))
            elif isinstance(action, (MemberUp, MemberChanged)):
                seen = self.seen_up.get(action.announcement.node)
                if seen is not None:
                    seen.setdefault(node.name, self.now)
            elif isinstance(action, MemberGone):
                self.seen_gone.setdefault(action.node, {}).setdefault(node.name, self.now)
                self.gone_reasons.setdefault(action.node, set()).add(action.reason)
                node.held.discard(action.node)
                if action.node in self.links[node.name]:
                    self._close(node, action.node)
            elif isinstance(action, Connect):
                node.held.add(action.node)
                self._dial(node.name, action.node)
            elif isinstance(action, Disconnect):
                node.held.discard(action.node)
                if action.node in self.links[node.name]:
                    self._close(node, action.node)
        self._schedule_poll(node)

    def _schedule_poll(self, node: _Node) -> None:
        deadline = node.core.next_deadline()
        if deadline is None or node.state != _UP:
            return
        deadline = max(deadline, self.now)
        if node.poll_at is not None and node.poll_at <= deadline:
            return
        node.poll_at = deadline
        node.poll_token += 1
        self._at(deadline, self._poll, node.name, node.poll_token)

    def _poll(self, name: str, token: int) -> None:
        node = self.nodes[name]
        if token != node.poll_token or node.state != _UP:
            return
        node.poll_at = None
        self._feed(node, node.core.poll(self.now))

    def _receive(self, node: _Node, announcements: tuple[Announcement, ...], source: str, pushed: bool) -> None:
        """The runtime's path: is_newer (cheap), the push rate limit, (signature check: not simulated), in."""
        core = node.core
        for announcement in announcements:
            if not core.is_newer(announcement.node, announcement.version):
                core.count_replayed()
            elif not pushed or core.admit_announcement(source, self.now):
                self._feed(node, core.announcement_received(announcement, source, self.now))

    def _announce_arrives(self, name: str, source: str, announcements: tuple[Announcement, ...]) -> None:
        node = self.nodes[name]
        if node.state == _UP:
            self._receive(node, announcements, source, pushed=True)

    def _sync_arrives(self, name: str, source: str, digest: bytes) -> None:
        node = self.nodes[name]
        if node.state == _UP and source in self.links[name]:
            same = node.core.sync_received(digest, self.now)
            self._send(node, 1 + 1 + 4, self._sync_reply_arrives, source, name, same)

    def _sync_reply_arrives(self, name: str, responder: str, same: bool) -> None:
        node = self.nodes[name]
        if node.state == _UP and same:
            self._feed(node, node.core.sync_done(self.now))
        if node.state == _UP and not same and responder in self.links[name]:
            entries = node.core.digest_entries()
            size = 1 + 4 + 4 + sum(len(n) + 1 + 8 for n, _ in entries)
            self._send(node, size, self._digest_arrives, responder, name, entries)

    def _digest_arrives(self, name: str, source: str, entries: list[tuple[str, int]]) -> None:
        node = self.nodes[name]
        if node.state == _UP and source in self.links[name]:
            newer, want = node.core.digest_received(entries, self.now)
            size = 1 + 4 + 4 + sum(len(a.raw) + 3 for a in newer) + sum(len(n) + 1 for n in want)
            self._send(node, size, self._digest_reply_arrives, source, name, tuple(newer), tuple(want))

    def _digest_reply_arrives(self, name: str, responder: str, newer: tuple[Announcement, ...],
                              want: tuple[str, ...]) -> None:
        node = self.nodes[name]
        if node.state == _UP:
            self._receive(node, newer, responder, pushed=False)
            self._feed(node, node.core.wanted(responder, want, self.now))
            self._feed(node, node.core.sync_done(self.now))

    def _traffic_tick(self, interval: float) -> None:
        if not self._talking:
            return
        for a, b in self._talking:
            node, peer = self.nodes[a], self.nodes[b]
            if node.state != _UP or peer.state != _UP:
                continue
            if b in self.links[a]:
                node.core.traffic(b, self.now)
                peer.core.traffic(a, self.now)
            else:
                self._feed(node, node.core.want_connection(b, self.now))
        self._at(self.now + interval, self._traffic_tick, interval)


# --- the scenario ---------------------------------------------------------------------------------
def _rates(before: Sample, after: Sample) -> dict[str, float]:
    span = max(after.time - before.time, 1e-9) * max(after.nodes, 1)
    return {"messages_per_node_s": (after.messages - before.messages) / span,
            "bytes_per_node_s": (after.bytes - before.bytes) / span,
            "announce_share_of_bytes": (after.announce_bytes - before.announce_bytes)
            / max(after.bytes - before.bytes, 1)}


def _connections(sim: MeshSimulation) -> dict[str, float]:
    counts = sim.connection_counts()
    others = [c for name, c in counts.items() if name != SEED]
    return {"mean": statistics.fmean(counts.values()), "max_non_seed": max(others, default=0),
            "p99_non_seed": sorted(others)[int(0.99 * (len(others) - 1))] if others else 0,
            "seed": counts.get(SEED, 0)}


def _reached(sim: MeshSimulation, table: dict[str, dict[str, float]], member: str, since: float) -> float | None:
    """When the last node running since ``since`` (other than ``member``) saw it, relative to ``since``;
    None while one has not."""
    seen = table.get(member, {})
    observers = [n.name for n in sim.up() if n.name != member and n.started_at is not None and n.started_at <= since]
    if any(name not in seen for name in observers):
        return None
    return max((seen[name] for name in observers), default=since) - since


def run_scenario(members: int, settings: MeshSection | None = None, *, start_spread: float = 1.0,
                 talkers: int = 5, talk_for: float = 30.0, seed: int = 1,
                 log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every phase of the module docstring on one simulated mesh; returns the numbers (all simulated time).

    After convergence the phases overlap to save simulated (and so wall) time: a node is killed at once,
    another leaves 1 s later, a new one joins 5 s later; the steady-state window starts once the connections
    held while few members were known have had idle_close to go, then the traffic pattern runs, then its
    connections get idle_close to go; the kill is timed by then (member_timeout plus up to one announce_interval).
    """
    s = settings or MeshSection(members="any-certified")
    sim = MeshSimulation(members, s, seed=seed)
    rng = random.Random(seed)
    report: dict[str, Any] = {"members": members, "mode": "full" if _full(s, members) else "on-demand",
                              "settings": {k: getattr(s, k) for k in ("connect", "full_mesh_max", "neighbors",
                                           "idle_close", "announce_interval", "member_timeout", "gossip_interval")}}
    for index in range(members):
        sim.start(node_name(index), 0.0 if index == 0 else rng.uniform(0.0, start_spread))
    begin = sim.sample()
    converged = sim.run_until(start_spread + 300.0, sim.converged)
    report["converge_s"] = None if converged is None else converged - start_spread
    report["convergence"] = {**_rates(begin, sim.sample()), "connections": _connections(sim)}
    log(f"converged after {report['converge_s']} s")

    names = [n.name for n in sim.up()]
    victim, leaver, joiner = names[len(names) // 3], names[len(names) // 2], node_name(members)
    killed_at = sim.now
    sim.kill(victim)
    sim.run_until(killed_at + 1.0)
    left_at = sim.now
    sim.leave(leaver)
    sim.run_until(killed_at + 5.0)
    sim.add_node(joiner)
    sim.seen_up[joiner] = {}
    joined_at = sim.now
    sim.start(joiner, joined_at)

    def joiner_knows_all() -> bool:
        known = {m.node for m in sim.nodes[joiner].core.members() if m.gone_reason is None}
        return all(n.name in known for n in sim.up() if n.name != joiner)

    knows_all = sim.run_until(joined_at + 30.0, joiner_knows_all)
    sim.run_until(joined_at + 30.0, lambda: _reached(sim, sim.seen_up, joiner, joined_at) is not None)
    report["join"] = {"knows_everyone_s": None if knows_all is None else knows_all - joined_at,
                      "known_by_everyone_s": _reached(sim, sim.seen_up, joiner, joined_at)}
    report["leave"] = {"everyone_knows_s": _reached(sim, sim.seen_gone, leaver, left_at),
                       "reasons": sorted(sim.gone_reasons.get(leaver, ()))}
    log(f"join and leave done: {report['join']}, {report['leave']}")

    sim.run_until(killed_at + s.idle_close + 2 * s.gossip_interval)
    steady_from = sim.sample()
    sim.run_until(sim.now + s.announce_interval)
    report["steady"] = {**_rates(steady_from, sim.sample()), "connections": _connections(sim)}
    log("steady state measured")

    up = [n.name for n in sim.up()]
    pairs = [(a, b) for a in up for b in rng.sample([n for n in up if n != a], min(talkers, len(up) - 1))]
    sim.talk(pairs)
    traffic_from = sim.sample()
    sim.run_until(sim.now + talk_for)
    report["traffic"] = {"talkers_per_node": talkers, **_rates(traffic_from, sim.sample()),
                         "connections": _connections(sim)}
    sim.quiet()
    sim.run_until(sim.now + s.idle_close + 2 * s.gossip_interval + 1.0)
    report["after_traffic"] = {"connections": _connections(sim)}
    log("traffic pattern done")

    limit = killed_at + s.announce_interval + s.member_timeout + 60.0
    sim.run_until(limit, lambda: _reached(sim, sim.seen_gone, victim, killed_at) is not None)
    gone_times = sorted(t - killed_at for t in sim.seen_gone.get(victim, {}).values())
    report["kill"] = {"everyone_knows_s": _reached(sim, sim.seen_gone, victim, killed_at),
                      "first_knows_s": gone_times[0] if gone_times else None,
                      "reasons": sorted(sim.gone_reasons.get(victim, ()))}
    report["converged_at_end"] = sim.converged()
    report["connections_opened"] = sim.connections_opened
    report["simulated_s"] = sim.now
    report["counters_of_seed"] = sim.nodes[SEED].core.counters()
    return report


def _full(s: MeshSection, members: int) -> bool:
    return s.connect == "full" or (s.connect == "auto" and members <= s.full_mesh_max)


def render(report: dict[str, Any]) -> str:
    def rate(r: dict[str, Any]) -> str:
        return (f"{r['messages_per_node_s']:.1f} msgs/node/s, {r['bytes_per_node_s'] / 1024:.1f} KiB/node/s "
                f"({r['announce_share_of_bytes']:.0%} announcements, the rest syncs)")

    def conns(r: dict[str, Any]) -> str:
        c = r["connections"]
        return f"connections/node mean {c['mean']:.1f}, p99 {c['p99_non_seed']}, max {c['max_non_seed']} (seed {c['seed']})"

    def secs(value: float | None) -> str:
        return "NOT REACHED" if value is None else f"{value:.2f} s"

    return "\n".join([
        f"{report['members']} members, mode {report['mode']}, settings {report['settings']}",
        f"converged: {secs(report['converge_s'])} after the last start; during it {rate(report['convergence'])}; "
        f"{conns(report['convergence'])}",
        f"steady state (re-announcements): {rate(report['steady'])}; {conns(report['steady'])}",
        f"traffic to {report['traffic']['talkers_per_node']} random others: {conns(report['traffic'])}; "
        f"membership {rate(report['traffic'])}",
        f"after idle_close without traffic: {conns(report['after_traffic'])}",
        f"every node knows exactly the running ones at the end: {'yes' if report['converged_at_end'] else 'NO'}",
        f"a late joiner knows everyone in {secs(report['join']['knows_everyone_s'])}, "
        f"everyone knows it in {secs(report['join']['known_by_everyone_s'])}",
        f"a departure reaches everyone in {secs(report['leave']['everyone_knows_s'])} {report['leave']['reasons']}",
        f"a silent kill: first marked gone after {secs(report['kill']['first_knows_s'])}, everyone after "
        f"{secs(report['kill']['everyone_knows_s'])} {report['kill']['reasons']}",
        f"{report['connections_opened']} connections opened in {report['simulated_s']:.0f} simulated s",
    ])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m quicmesh.bench.membership_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--connect", choices=("auto", "full", "on-demand"), default="auto")
    parser.add_argument("--talkers", type=int, default=5, help="random others each node talks to in the traffic phase")
    parser.add_argument("--start-spread", type=float, default=1.0, help="nodes start uniformly within this many s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error("--members must be at least 2")
    settings = replace(MeshSection(members="any-certified"), connect=args.connect)
    started = time.perf_counter()
    report = run_scenario(args.members, settings, start_spread=args.start_spread, talkers=args.talkers,
                          seed=args.seed, log=lambda line: print(line, file=sys.stderr, flush=True))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2) if args.json else render(report) + f"\n(wall time {report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
