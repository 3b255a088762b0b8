"""Interest: what this node's subscribers want (told to peers) and what each peer's want (told to us).
Sans-I/O: these classes turn subscriptions into Interest frames and frames into a matchable state; the
feature sends the frames and decides what to admit.

Each node announces ``(pattern, queue group)`` entries, not subscriptions: two local subscribers of the
same pattern and group are one entry. On every new connection it sends a RESET with all of them, then
ADD/REMOVE deltas, coalesced (a subscribe and unsubscribe before the next flush cancel out). Every frame
carries the sender process's next ``seq``; the receiver ignores one not newer than the last it applied
(a stale frame of a dying duplicate connection), and forgets a peer's interest when the peer is lost
or comes back as a new process (epoch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from quicmesh.pubsub.subjects import SubjectTrie
from quicmesh.protocol import wire

Entry = tuple[str, str]  # (pattern, queue group or "")
#: An entry's size in an Interest frame, at most: two 2-byte lengths and the strings.
_ENTRY_MAX = 4 + wire.MAX_SUBJECT_BYTES + wire.MAX_QUEUE_GROUP_BYTES
_FRAME_BUDGET = wire.MAX_CONTROL_FRAME_PAYLOAD - 32  # room for op, seq and count


class LocalInterest:
    """This node's entries (counted per local subscription) and the frames that tell peers about them."""

    def __init__(self) -> None:
        self._counts: Counter[Entry] = Counter()
        self._announced: set[Entry] = set()
        self._seq = 0

    def add(self, entry: Entry) -> None:
        self._counts[entry] += 1

    def remove(self, entry: Entry) -> None:
        self._counts[entry] -= 1
        if self._counts[entry] <= 0:
            del self._counts[entry]

    def entries(self) -> set[Entry]:
        return set(self._counts)

    @property
    def dirty(self) -> bool:
        """Whether entries changed since the last :meth:`changes`."""
        return self._announced != self._counts.keys()

    def changes(self) -> list[wire.Interest]:
        """ADD and REMOVE frames for the net change since the last call (for every connected peer)."""
        current = set(self._counts)
        added, removed = current - self._announced, self._announced - current
        self._announced = current
        return [*self._frames(wire.InterestOp.ADD, added), *self._frames(wire.InterestOp.REMOVE, removed)]

    def reset(self) -> list[wire.Interest]:
        """Everything, for a peer on a new connection: a RESET, then ADDs if it does not fit one frame."""
        frames = self._frames(wire.InterestOp.ADD, self._counts)
        if not frames:
            return [self._frame(wire.InterestOp.RESET, [])]
        first = frames[0]
        frames[0] = wire.Interest(wire.InterestOp.RESET, first.seq, first.entries)
        return frames

    def resync_request(self) -> wire.Interest:
        """A RESYNC frame: asks the peer for its RESET (after we refused one of its frames)."""
        return self._frame(wire.InterestOp.RESYNC, [])

    def _frames(self, op: int, entries: Iterable[Entry]) -> list[wire.Interest]:
        frames: list[wire.Interest] = []
        batch: list[Entry] = []
        size = 0
        for entry in sorted(entries):
            if size + _ENTRY_MAX > _FRAME_BUDGET:
                frames.append(self._frame(op, batch))
                batch, size = [], 0
            batch.append(entry)
            size += _ENTRY_MAX
        if batch:
            frames.append(self._frame(op, batch))
        return frames

    def _frame(self, op: int, entries: list[Entry]) -> wire.Interest:
        self._seq += 1
        return wire.Interest(op, self._seq, tuple(entries))


@dataclass
class Applied:
    """What one Interest frame from a peer changed, and what was refused (entry, reason)."""

    added: list[Entry] = field(default_factory=list)
    removed: list[Entry] = field(default_factory=list)
    refused: list[tuple[Entry, str]] = field(default_factory=list)
    stale: bool = False  # not newer than a frame already applied: ignored
    resync_requested: bool = False  # the peer asks for our RESET


class _PeerInterest:
    __slots__ = ("epoch", "seq", "entries")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0
        self.entries: set[Entry] = set()


#: Decides whether a peer may have an entry: None if it may, else why not.
Admit = Callable[[str, Entry], "str | None"]


class RemoteInterest:
    """Every peer's entries, in one trie of ``(peer, group)`` values, at most ``max_entries`` per peer."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._trie: SubjectTrie[tuple[str, str]] = SubjectTrie()
        self._peers: dict[str, _PeerInterest] = {}

    def match(self, subject: str) -> set[tuple[str, str]]:
        """``(peer, group)`` of every peer entry matching ``subject`` (group "" for plain subscribers)."""
        return self._trie.match(subject)

    def entries(self, peer: str) -> set[Entry]:
        state = self._peers.get(peer)
        return set(state.entries) if state is not None else set()

    def peers(self) -> list[str]:
        return list(self._peers)

    def apply(self, peer: str, epoch: int, frame: wire.Interest, admit: Admit) -> Applied:
        """Apply ``peer``'s frame (from its process ``epoch``); ``admit`` vets each new entry."""
        result = Applied()
        state = self._peers.get(peer)
        if state is None or state.epoch != epoch:
            self.drop(peer)
            state = self._peers[peer] = _PeerInterest(epoch)
        if frame.seq <= state.seq:
            result.stale = True
            return result
        state.seq = frame.seq
        if frame.op == wire.InterestOp.RESYNC:
            result.resync_requested = True
            return result
        if frame.op == wire.InterestOp.RESET:
            for entry in list(state.entries):
                self._remove(peer, state, entry)
                result.removed.append(entry)
        if frame.op == wire.InterestOp.REMOVE:
            for entry in frame.entries:
                if entry in state.entries:
                    self._remove(peer, state, entry)
                    result.removed.append(entry)
            return result
        for entry in frame.entries:  # ADD, or the first entries of a RESET
            if entry in state.entries:
                continue
            reason = admit(peer, entry)
            if reason is None and len(state.entries) >= self.max_entries:
                reason = f"over its limit of {self.max_entries} subscriptions here (pubsub.max_interest_per_peer)"
            if reason is not None:
                result.refused.append((entry, reason))
                continue
            state.entries.add(entry)
            self._trie.add(entry[0], (peer, entry[1]))
            result.added.append(entry)
        return result

    def revoke(self, peer: str, entry: Entry) -> None:
        """Take one entry of ``peer``'s away (a reload no longer allows it)."""
        state = self._peers.get(peer)
        if state is not None and entry in state.entries:
            self._remove(peer, state, entry)

    def _remove(self, peer: str, state: _PeerInterest, entry: Entry) -> None:
        state.entries.discard(entry)
        self._trie.remove(entry[0], (peer, entry[1]))

    def drop(self, peer: str) -> None:
        """Forget ``peer``'s entries (lost, restarted, or removed from the config)."""
        state = self._peers.pop(peer, None)
        if state is not None:
            for entry in list(state.entries):
                self._remove(peer, state, entry)


class TokenBucket:
    """At most ``rate`` events per second on average, ``burst`` at once (Interest frames from one peer)."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def wait(self, tokens: int = 1) -> float:
        """Seconds until ``tokens`` are available (0 if they are)."""
        return max(0.0, (tokens - self._tokens) / self.rate) if self.rate > 0 else 0.0
