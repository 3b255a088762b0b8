"""Membership decisions: who the members are, what to gossip to whom, which connections to hold.

Sans-I/O, like :mod:`quicmesh.runtime.peer_manager`: no sockets, no asyncio, no cryptography, the time is
passed in. The runtime (membership/feature.py) decodes an announcement, asks :meth:`MembershipCore.is_newer`
(cheap), verifies the signature, then calls :meth:`MembershipCore.announcement_received`: this module never
sees an unverified announcement. Every input returns a list of actions, carried out in order; the runtime
sleeps until :meth:`MembershipCore.next_deadline` and then calls :meth:`MembershipCore.poll`.

A member's state (the local node is never a member of its own table):

========  ===============================================  ========  =====================================
from      event                                            to        actions
========  ===============================================  ========  =====================================
unknown   announcement, members < max_members              ALIVE     MemberUp, rumor [, Connect]
unknown   announcement, max_members reached                unknown   - (rejected "member limit")
unknown   leaving announcement                             GONE      rumor (others may know it)
ALIVE     newer version, same addresses/services/relay/    ALIVE     rumor
          epoch
ALIVE     newer version, any of those changed              ALIVE     MemberChanged, rumor
ALIVE     version <= the known one                         ALIVE     - (counted "replayed")
ALIVE     leaving announcement                             GONE      MemberGone("left"), rumor
ALIVE     poll: not connected, no newer version for        GONE      MemberGone("silent for Ns")
          member_timeout (connected counts as heard;
          checked at most every member_timeout / 16)
ALIVE     member_revoked                                   GONE      MemberGone("revoked")
GONE      version <= the tombstone's                       GONE      - (counted "replayed")
GONE      newer version (the node restarted)               ALIVE     MemberUp, rumor [, Connect]
GONE      poll: 2 x member_timeout after it went           unknown   - (tombstones also capped at
                                                                       max_members, oldest dropped)
========  ===============================================  ========  =====================================

We ask to re-announce (:class:`Reannounce`) every announce_interval x U[0.75, 1] (jittered, so that a mesh
started together does not re-announce in waves). Rumor: an announcement new to us goes to up to :data:`RUMOR_FANOUT` random connected peers other than
the one it came from and its announcer; our own new announcement goes to every connected peer.
Anti-entropy: every gossip_interval, a :class:`StartSync` with one random connected peer (the runtime runs
Sync -> SyncReply, and Digest -> DigestReply when the digests differ, calling :meth:`sync_received`,
:meth:`digest_received` and :meth:`wanted`); the first connection of a node with none (joining, or
isolated) is synced at once.

Connections. :class:`Connect` means "hold a connection to this member" (the runtime dials and redials it)
until :class:`Disconnect` or :class:`MemberGone`; the core only closes connections it asked for, so an
inbound connection is the dialer's to close (two nodes never fight over one). Mode "full" (connect="full",
or "auto" with at most full_mesh_max members counting ourselves): hold every member. Mode "on-demand": hold
the ``neighbors`` members with the lowest stable hash of (local, member) (a random but steady overlay) and
the members the application addresses (:meth:`want_connection`); a held member that is neither a
neighbor nor a seed is released with ``Disconnect`` once it had no application traffic for idle_close.
Seeds (named by :meth:`peer_connected` with ``seed=True``; the runtime dials them by address) are never
released. Switching full -> on-demand releases the surplus the same way: idle first, then closed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Protocol, Union

from quicmesh.config import MeshSection

#: Peers an announcement new to us is passed on to (rumor mongering), besides the anti-entropy syncs.
RUMOR_FANOUT = 3
#: Announcements per Announce message (docs/PROTOCOL.md).
MAX_ANNOUNCEMENTS_PER_MESSAGE = 64


class Announced(Protocol):
    """The fields of membership/announcement.py's ``Announcement`` the core reads (already verified)."""

    node: str
    version: int
    epoch: int
    addresses: tuple[str, ...]
    services: tuple[str, ...]
    relay: bool
    leaving: bool
    raw: bytes


# --- actions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendAnnounce:
    """Send these announcements (their ``raw`` bytes, at most 64) to ``peer`` in one Announce message."""

    peer: str
    announcements: tuple[Announced, ...]


@dataclass(frozen=True)
class StartSync:
    """Run the Sync (and, if the digests differ, Digest) exchange with ``peer``."""

    peer: str


@dataclass(frozen=True)
class Reannounce:
    """Sign a new version of our announcement and hand it to :meth:`MembershipCore.set_local`."""


@dataclass(frozen=True)
class MemberUp:
    announcement: Announced


@dataclass(frozen=True)
class MemberChanged:
    """A member's addresses, services, relay flag or epoch (a restart) changed."""

    announcement: Announced


@dataclass(frozen=True)
class MemberGone:
    node: str
    reason: str  # "left" | "silent for Ns" | "revoked"


@dataclass(frozen=True)
class Connect:
    """Hold a connection to ``node``: dial it, redial when lost, until Disconnect or MemberGone."""

    node: str


@dataclass(frozen=True)
class Disconnect:
    """Stop holding ``node``: close the connection (on-demand mode, idle)."""

    node: str
    reason: str


Action = Union[SendAnnounce, StartSync, Reannounce, MemberUp, MemberChanged, MemberGone, Connect, Disconnect]


@dataclass(frozen=True)
class MemberInfo:
    """One row of ``quicmesh members``; times on the core's clock (the runtime converts to Unix time)."""

    node: str
    addresses: tuple[str, ...]
    version: int
    source: str  # the peer we had the current version from
    last_heard: float
    connected: bool
    gone_reason: str | None  # None while alive


# --- state ----------------------------------------------------------------------------------------
@dataclass
class _Member:
    announcement: Announced
    source: str
    last_heard: float  # a newer version arrived, or the connection to it ended
    score: int  # stable hash of (local, node): the on-demand overlay


@dataclass
class _Tombstone:
    announcement: Announced  # the leaving one, passed on by anti-entropy; else the last known
    reason: str
    gone_at: float


@dataclass
class _Bucket:
    tokens: float
    updated: float


def membership_digest(pairs: Iterable[tuple[str, int]]) -> bytes:
    """SHA-256 over the sorted (node, version) pairs: ``name NUL version(8 bytes big-endian)`` each."""
    encoded = {node: _digest_entry(node, version) for node, version in pairs}
    return hashlib.sha256(b"".join(map(encoded.__getitem__, sorted(encoded)))).digest()


def _digest_entry(node: str, version: int) -> bytes:
    return node.encode() + b"\x00" + version.to_bytes(8, "big")


class MembershipCore:
    """The member table and the gossip and connection decisions; see the module docstring for the rules."""

    def __init__(self, local: str, settings: MeshSection, rng: random.Random) -> None:
        self.local = local
        self._settings = settings
        self._rng = rng
        self._local: Announced | None = None
        self._members: dict[str, _Member] = {}
        self._tombstones: dict[str, _Tombstone] = {}  # oldest first (re-inserted when renewed)
        self._connected: list[str] = []  # sampled at random: a list, with positions for O(1) removal
        self._connected_at: dict[str, int] = {}
        self._seeds: dict[str, None] = {}
        self._neighbors: dict[str, int] = {}  # the on-demand overlay: name -> score
        self._held: dict[str, float | None] = {}  # Connect emitted: None = needed, else last traffic
        self._buckets: dict[str, _Bucket] = {}
        self._synced = False  # a Sync exchange we started completed (see full_mode)
        self._full_mode: bool | None = None  # None until the first mode decision
        self._reannounce_at: float | None = None
        self._gossip_at: float | None = None
        self._silence_check_at: float | None = None  # a lower bound of every member's silence deadline
        self._idle_check_at: float | None = None  # a lower bound of every traffic-held member's idle deadline
        self._versions: dict[str, int] = {}  # alive members and ourselves: what Sync and Digest compare
        self._digest_entries: dict[str, bytes] = {}  # the same, encoded for the digest
        self._digest: bytes | None = None  # cached; None when the table changed
        self._counters: dict[str, int] = dict.fromkeys(
            ("accepted", "replayed", "announce_messages_sent", "announcements_sent", "announce_bytes_sent",
             "syncs_started"), 0)
        self._rejected: dict[str, int] = {}
        self._gone: dict[str, int] = {}

    # --- inputs ---------------------------------------------------------------------------------
    def set_local(self, announcement: Announced, now: float) -> list[Action]:
        """Our own announcement (at start, when Reannounce is due, on leaving): to every connected peer."""
        self._local = announcement
        self._set_version(self.local, announcement.version)
        # Jittered: a mesh started at once would otherwise re-announce in one wave every interval.
        interval = self._settings.announce_interval * self._rng.uniform(0.75, 1.0)
        self._reannounce_at = None if announcement.leaving else now + interval
        actions: list[Action] = []
        for peer in list(self._connected):
            self._send(peer, (announcement,), actions)
        self._update_mode(now, actions)
        return actions

    def is_newer(self, node: str, version: int) -> bool:
        """Whether an announcement would be news: check before verifying its signature (cheap first)."""
        if node == self.local:
            return False
        member = self._members.get(node)
        if member is not None:
            return version > member.announcement.version
        tomb = self._tombstones.get(node)
        return tomb is None or version > tomb.announcement.version

    def admit_announcement(self, source: str, now: float) -> bool:
        """Token bucket per peer (announce_rate/s, burst announce_burst) for announcements it pushes to us;
        call before verifying. Announcements we pulled (DigestReply) are bounded by our request instead."""
        s = self._settings
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(float(s.announce_burst), now)
        bucket.tokens = min(float(s.announce_burst), bucket.tokens + (now - bucket.updated) * s.announce_rate)
        bucket.updated = max(bucket.updated, now)
        if bucket.tokens < 1.0:
            self.count_rejected("rate limit")
            return False
        bucket.tokens -= 1.0
        return True

    def announcement_received(self, announcement: Announced, source: str, now: float) -> list[Action]:
        """A verified announcement from peer ``source`` (forwarded or the announcer's own)."""
        node = announcement.node
        if node == self.local:
            if self._local is None or announcement.version > self._local.version:
                self.count_rejected("own name")  # someone else signed our name, or a clock went back
            else:
                self._counters["replayed"] += 1
            return []
        if not self.is_newer(node, announcement.version):
            self._counters["replayed"] += 1
            return []
        member = self._members.get(node)
        if member is None and not announcement.leaving and len(self._members) >= self._settings.max_members:
            self.count_rejected("member limit")
            return []
        self._counters["accepted"] += 1
        actions: list[Action] = []
        if announcement.leaving:
            if member is not None:
                self._remove(node, "left", now, actions)
            self._bury(node, announcement, "left", now)
        elif member is None:
            self._tombstones.pop(node, None)
            self._members[node] = _Member(announcement, source, now, _score(self.local, node))
            self._set_version(node, announcement.version)
            self._watch_silence(now + self._settings.member_timeout)
            actions.append(MemberUp(announcement))
            self._neighbor_added(node, now, actions)
            if self.full_mode:
                self._hold(node, actions)
        else:
            previous = member.announcement
            member.announcement, member.source, member.last_heard = announcement, source, now
            self._set_version(node, announcement.version)
            if _content(previous) == _content(announcement):
                # A plain re-announcement: anti-entropy carries it. Rumored, it was ~95 % of the steady
                # gossip bytes (membership_sim, 200 members: 106.7 -> 22.6 msgs/node/s without it).
                self._update_mode(now, actions)
                return actions
            actions.append(MemberChanged(announcement))
        self._rumor(announcement, source, actions)
        self._update_mode(now, actions)
        return actions

    def member_revoked(self, node: str, now: float) -> list[Action]:
        """The runtime's CRL now revokes ``node``: gone, and its announcements are replays from now on."""
        member = self._members.get(node)
        if member is None:
            return []
        actions: list[Action] = []
        self._remove(node, "revoked", now, actions)
        self._bury(node, member.announcement, "revoked", now)
        self._update_mode(now, actions)
        return actions

    def peer_connected(self, name: str, now: float, *, seed: bool = False) -> list[Action]:
        """A verified direct connection to ``name`` is up; ``seed``: it came from dialing a seed address."""
        if seed:
            self._seeds[name] = None
        if name in self._connected_at:
            return []
        first = not self._connected
        self._connected_at[name] = len(self._connected)
        self._connected.append(name)
        if self._held.get(name) is not None:
            self._held[name] = now  # idle counts from the connection (only later: the bound still holds)
        if self._gossip_at is None:
            self._gossip_at = now + self._settings.gossip_interval * self._rng.uniform(0.5, 1.0)
        if first:
            self._counters["syncs_started"] += 1
            return [StartSync(name)]
        return []

    def peer_disconnected(self, name: str, now: float) -> list[Action]:
        """The direct connection to ``name`` ended: its silence starts now."""
        position = self._connected_at.pop(name, None)
        if position is None:
            return []
        last = self._connected.pop()
        if last != name:
            self._connected[position] = last
            self._connected_at[last] = position
        self._buckets.pop(name, None)
        member = self._members.get(name)
        if member is not None:
            member.last_heard = max(member.last_heard, now)
            self._watch_silence(member.last_heard + self._settings.member_timeout)
        if not self._connected:
            self._gossip_at = None
        return []

    def traffic(self, name: str, now: float) -> list[Action]:
        """The application sent to or received from ``name``: an on-demand connection stays open."""
        if self._held.get(name) is not None:
            self._held[name] = now
        return []

    def want_connection(self, name: str, now: float) -> list[Action]:
        """The application addressed member ``name``, not connected: hold a connection (on-demand)."""
        if name not in self._members or name in self._seeds:
            return []  # seeds: the runtime holds them by address
        if name in self._held:
            return self.traffic(name, now)
        self._held[name] = now
        self._watch_idle(now)
        return [Connect(name)]

    def sync_received(self, digest: bytes, now: float) -> bool:
        """A peer's Sync: whether its digest equals ours (SyncReply.same)."""
        return digest == self.digest()

    def digest_received(self, entries: list[tuple[str, int]] | tuple[tuple[str, int], ...],
                        now: float) -> tuple[list[Announced], list[str]]:
        """A peer's Digest: (our announcements newer than its entries or missing there, names it has newer).

        A departure it has not heard of goes back as the leaving announcement, so departures spread by
        anti-entropy too; a silent member we buried is neither sent nor wanted (each node times it out).
        """
        theirs = dict(itertools.islice(entries, self._settings.max_members + 1))
        versions, tombs, local = self._versions, self._tombstones, self.local
        # Comprehensions, not one loop: a 1,000-member digest is compared every gossip_interval.
        newer = [self._local if node == local else self._members[node].announcement
                 for node, version in versions.items() if theirs.get(node, -1) < version]
        want = [node for node, version in theirs.items()
                if version > versions.get(node, -1) and node != local
                and (node not in tombs or version > tombs[node].announcement.version)]
        newer.extend(t.announcement for node, t in tombs.items()
                     if t.announcement.leaving and -1 < theirs.get(node, -1) < t.announcement.version)
        return newer, want

    def wanted(self, peer: str, names: list[str] | tuple[str, ...], now: float) -> list[Action]:
        """A DigestReply's ``want``: send ``peer`` our current announcements of those names."""
        found: list[Announced] = []
        for node in dict.fromkeys(names):
            if node == self.local and self._local is not None:
                found.append(self._local)
            elif node in self._members:
                found.append(self._members[node].announcement)
        actions: list[Action] = []
        self._send(peer, tuple(found), actions)
        return actions

    def count_replayed(self) -> None:
        """Count an announcement the runtime dropped because :meth:`is_newer` said it was no news."""
        self._counters["replayed"] += 1

    def sync_done(self, now: float) -> list[Action]:
        """A Sync (and Digest) exchange we started completed: we know the mesh's size, "auto" may pick full."""
        if self._synced:
            return []
        self._synced = True
        actions: list[Action] = []
        self._update_mode(now, actions)
        return actions

    def count_rejected(self, reason: str) -> None:
        """Count an announcement refused (the runtime's reasons: "bad signature", "expired", ...)."""
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    # --- time -----------------------------------------------------------------------------------
    def poll(self, now: float) -> list[Action]:
        """Everything due at ``now``: re-announcement, anti-entropy, silent members, idle connections."""
        actions: list[Action] = []
        if self._reannounce_at is not None and now >= self._reannounce_at:
            self._reannounce_at = now + self._settings.announce_interval  # set_local moves it again
            actions.append(Reannounce())
        if self._gossip_at is not None and now >= self._gossip_at:
            self._gossip_at = now + self._settings.gossip_interval * self._rng.uniform(0.75, 1.25)
            self._counters["syncs_started"] += 1
            actions.append(StartSync(self._connected[self._rng.randrange(len(self._connected))]))
        if self._silence_check_at is not None and now >= self._silence_check_at:
            self._check_silence(now, actions)
        if self._idle_check_at is not None and now >= self._idle_check_at:
            self._close_idle(now, actions)
        self._expire_tombstones(now)
        self._update_mode(now, actions)
        self._release_seeds(actions)
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time poll() has something to do, None if nothing is scheduled."""
        times = [t for t in (self._reannounce_at, self._gossip_at, self._silence_check_at, self._idle_check_at)
                 if t is not None]
        if self._tombstones:
            times.append(next(iter(self._tombstones.values())).gone_at + 2 * self._settings.member_timeout)
        return min(times, default=None)

    # --- queries --------------------------------------------------------------------------------
    @property
    def full_mode(self) -> bool:
        """Whether every member is held (mode "full"), else connections are on demand."""
        s = self._settings
        # "auto" decides only after a first sync: until then a joining node knows a few members of what may
        # be a large mesh, and holding all of those made every cold-started node dial the first members the
        # seed knew (membership_sim, 200 members: 109 connections per node on average during convergence).
        return s.connect == "full" or (s.connect == "auto" and self._synced
                                       and len(self._members) + 1 <= s.full_mesh_max)

    def digest(self) -> bytes:
        """The digest of the current members and their versions, ourselves included (for Sync)."""
        if self._digest is None:
            encoded = self._digest_entries
            self._digest = hashlib.sha256(b"".join(map(encoded.__getitem__, sorted(encoded)))).digest()
        return self._digest

    def digest_entries(self) -> list[tuple[str, int]]:
        """Our (node, version) pairs, ourselves included (for Digest)."""
        return list(self._versions.items())

    def member_count(self) -> int:
        """Alive members, ourselves included."""
        return len(self._members) + 1

    def connected(self) -> list[str]:
        return list(self._connected)

    def held(self) -> list[str]:
        """Members we asked to be connected to (Connect without a Disconnect since)."""
        return list(self._held)

    def members(self) -> list[MemberInfo]:
        """Every other member, alive first, then the gone ones still remembered."""
        rows = [MemberInfo(node, m.announcement.addresses, m.announcement.version, m.source, m.last_heard,
                           node in self._connected_at, None) for node, m in self._members.items()]
        rows.extend(MemberInfo(node, t.announcement.addresses, t.announcement.version, "", t.gone_at,
                               node in self._connected_at, t.reason) for node, t in self._tombstones.items())
        return rows

    def counters(self) -> dict[str, object]:
        return {**self._counters, "members": self.member_count(), "rejected": dict(self._rejected),
                "gone": dict(self._gone)}

    # --- helpers --------------------------------------------------------------------------------
    def _send(self, peer: str, announcements: tuple[Announced, ...], actions: list[Action]) -> None:
        if len(announcements) == 1:  # the common case: a rumor
            self._counters["announce_messages_sent"] += 1
            self._counters["announcements_sent"] += 1
            self._counters["announce_bytes_sent"] += len(announcements[0].raw)
            actions.append(SendAnnounce(peer, announcements))
            return
        for start in range(0, len(announcements), MAX_ANNOUNCEMENTS_PER_MESSAGE):
            chunk = announcements[start:start + MAX_ANNOUNCEMENTS_PER_MESSAGE]
            self._counters["announce_messages_sent"] += 1
            self._counters["announcements_sent"] += len(chunk)
            self._counters["announce_bytes_sent"] += sum(len(a.raw) for a in chunk)
            actions.append(SendAnnounce(peer, chunk))

    def _set_version(self, node: str, version: int | None) -> None:
        """Keep what digests are made of in step with the table (None: no longer a member)."""
        self._digest = None
        if version is None:
            self._versions.pop(node, None)
            self._digest_entries.pop(node, None)
        else:
            self._versions[node] = version
            self._digest_entries[node] = _digest_entry(node, version)

    def _rumor(self, announcement: Announced, source: str, actions: list[Action]) -> None:
        """Pass a new announcement on to up to RUMOR_FANOUT random connected peers."""
        connected, skip = self._connected, (source, announcement.node)
        if len(connected) <= RUMOR_FANOUT + len(skip):
            picks = [peer for peer in connected if peer not in skip][:RUMOR_FANOUT]
        else:  # enough peers that a few random draws find RUMOR_FANOUT others (bounded: 4 draws per pick)
            picks = []
            for _ in range(4 * RUMOR_FANOUT):
                peer = connected[int(self._rng.random() * len(connected))]
                if peer not in skip and peer not in picks:
                    picks.append(peer)
                    if len(picks) == RUMOR_FANOUT:
                        break
        for peer in picks:
            self._send(peer, (announcement,), actions)

    def _remove(self, node: str, reason: str, now: float, actions: list[Action]) -> None:
        """An alive member is gone: forget it, stop holding it, pick another neighbor if it was one."""
        del self._members[node]
        self._set_version(node, None)
        self._held.pop(node, None)
        kind = reason.split()[0]
        self._gone[kind] = self._gone.get(kind, 0) + 1
        actions.append(MemberGone(node, reason))
        if self._neighbors.pop(node, None) is not None:
            self._refill_neighbors(now, actions)

    def _bury(self, node: str, announcement: Announced, reason: str, now: float) -> None:
        self._tombstones.pop(node, None)
        self._tombstones[node] = _Tombstone(announcement, reason, now)
        while len(self._tombstones) > self._settings.max_members:
            del self._tombstones[next(iter(self._tombstones))]

    def _expire_tombstones(self, now: float) -> None:
        keep = 2 * self._settings.member_timeout
        while self._tombstones:
            node, tomb = next(iter(self._tombstones.items()))
            if now < tomb.gone_at + keep:
                break
            del self._tombstones[node]

    def _watch_idle(self, last_traffic: float) -> None:
        deadline = last_traffic + self._settings.idle_close
        if self._idle_check_at is None or deadline < self._idle_check_at:
            self._idle_check_at = deadline

    def _close_idle(self, now: float, actions: list[Action]) -> None:
        """Release traffic-held members idle for idle_close; then find the next idle deadline."""
        limit = self._settings.idle_close
        for node, last_traffic in list(self._held.items()):
            if last_traffic is not None and now >= last_traffic + limit:
                del self._held[node]
                actions.append(Disconnect(node, f"idle for {limit:g}s"))
        pending = [t + limit for t in self._held.values() if t is not None]
        self._idle_check_at = min(pending, default=None)

    def _watch_silence(self, deadline: float) -> None:
        if self._silence_check_at is None or deadline < self._silence_check_at:
            self._silence_check_at = deadline

    def _check_silence(self, now: float, actions: list[Action]) -> None:
        """Members silent for member_timeout while not connected are gone; then find the next deadline."""
        timeout = self._settings.member_timeout
        silent = [node for node, m in self._members.items()
                  if node not in self._connected_at and now >= m.last_heard + timeout]
        for node in silent:
            member = self._members[node]
            self._remove(node, f"silent for {timeout:g}s", now, actions)
            self._bury(node, member.announcement, "silent", now)
        deadlines = [m.last_heard + timeout for node, m in self._members.items() if node not in self._connected_at]
        # Not sooner than a 16th of member_timeout from now: one check per member would cost O(N) each.
        self._silence_check_at = None if not deadlines else max(min(deadlines), now + timeout / 16)

    def _neighbor_added(self, node: str, now: float, actions: list[Action]) -> None:
        """A new member may take the place of the neighbor with the highest score."""
        k = self._settings.neighbors
        score = self._members[node].score
        if k <= 0:
            return
        if len(self._neighbors) >= k:
            worst = max(self._neighbors, key=self._neighbors.__getitem__)
            if score >= self._neighbors[worst]:
                return
            del self._neighbors[worst]
            self._release(worst, now)
        self._neighbors[node] = score
        if not self.full_mode:
            self._hold(node, actions)

    def _refill_neighbors(self, now: float, actions: list[Action]) -> None:
        k = self._settings.neighbors
        best = heapq.nsmallest(k, ((m.score, node) for node, m in self._members.items()))
        self._neighbors = {node: score for score, node in best}
        if not self.full_mode:
            for node in self._neighbors:
                self._hold(node, actions)

    def _hold(self, node: str, actions: list[Action]) -> None:
        """Hold ``node`` for good (full mode, or a neighbor)."""
        if node not in self._held:
            actions.append(Connect(node))
        self._held[node] = None

    def _release(self, node: str, now: float) -> None:
        """No longer needed for good: closed after idle_close without traffic (on-demand; seeds are kept)."""
        if self._held.get(node, 0.0) is None and node not in self._seeds and not self.full_mode:
            self._held[node] = now
            self._watch_idle(now)

    def _release_seeds(self, actions: list[Action]) -> None:
        """On demand, once our neighbors are connected, let the seeds go (unless one is a neighbor or has
        traffic): otherwise every node of a 1,000-member mesh holds its seed (998 connections there, and a
        share of every rumor). The runtime dials the seeds again if this node ever has no connection."""
        if self.full_mode or not self._seeds or not self._neighbors:
            return
        if any(node not in self._connected_at for node in self._neighbors):
            return
        for seed in list(self._seeds):
            if seed in self._neighbors or self._held.get(seed) is not None or seed not in self._connected_at:
                continue  # (held with a time: traffic keeps it until idle_close)
            del self._seeds[seed]
            self._held.pop(seed, None)  # held for good while the mesh was small enough to be full
            actions.append(Disconnect(seed, "joined: the seed is not needed any more"))

    def _update_mode(self, now: float, actions: list[Action]) -> None:
        """Apply a switch between full and on-demand (members added later are held as they come)."""
        full = self.full_mode
        if full == self._full_mode:
            return
        self._full_mode = full
        if full:
            for node in self._members:
                self._hold(node, actions)
            return
        for node in list(self._held):
            if node not in self._neighbors:
                self._release(node, now)
        for node in self._neighbors:
            self._hold(node, actions)


def _score(local: str, node: str) -> int:
    """A stable pseudo-random rank of ``node`` for ``local`` (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(f"{local}\x00{node}".encode(), digest_size=8).digest(), "big")


def _content(a: Announced) -> tuple[object, ...]:
    return (a.addresses, a.services, a.relay, a.epoch)


__all__ = [
    "MAX_ANNOUNCEMENTS_PER_MESSAGE",
    "RUMOR_FANOUT",
    "Action",
    "Connect",
    "Disconnect",
    "MemberChanged",
    "MemberGone",
    "MemberInfo",
    "MemberUp",
    "MembershipCore",
    "Reannounce",
    "SendAnnounce",
    "StartSync",
    "membership_digest",
]
