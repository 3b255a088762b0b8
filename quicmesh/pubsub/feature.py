"""The PubSub feature: subjects across the mesh without a broker (docs/PUBSUB.md).

Every node keeps its peers told which ``(pattern, queue group)`` entries its subscribers want (Interest
control frames, quicmesh/pubsub/interest.py) and knows what each connected peer wants. A publish goes
only to the nodes with matching interest, each at most once:

- every node with a plain subscriber that matches gets the message (its node hands it to each of them);
- for each queue group with a matching member anywhere (this node included), one node with a member is
  picked (round robin over the candidates), and that node gives it to one of its members;
- this node's own matching subscribers get it too, in the same way.

``reliable=False`` sends PUBLISH datagrams (dropped when a queue or a subscription is full; too large
for a peer's datagram limit: DatagramTooLargeError before anything is sent). ``reliable=True`` sends
feature messages (tag PUBSUB): each target node accepts it exactly once under the message semantics,
and a queue-group message whose node is lost or refuses it before accepting goes to another member.
Requests by subject go to one node with a matching subscriber, which gives it to one of them.
Permissions ([pubsub] in the config) are enforced by the receiving side; refusals are logged and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NamedTuple

from quicmesh.errors import (
    DatagramTooLargeError,
    InvalidSubjectError,
    NoRespondersError,
    PeerError,
    PeerNotConnectedError,
    PublishError,
    QuicmeshError,
    RemoteError,
    RequestTimeoutError,
)
from quicmesh.protocol import wire
from quicmesh.pubsub import frames
from quicmesh.pubsub.interest import Entry, LocalInterest, RemoteInterest, TokenBucket
from quicmesh.pubsub.stats import DELIVERED, PUBLISHED, RECEIVED, Counters, SubjectCounts
from quicmesh.pubsub.subjects import SubjectTrie, covers, validate_group, validate_pattern, validate_subject
from quicmesh.pubsub.subscription import Handler, Msg, Subscription
from quicmesh.runtime.features import FeatureBase

if TYPE_CHECKING:
    from quicmesh.config import Config
    from quicmesh.config.model import PubSubSection
    from quicmesh.runtime.features import FeatureHost

log = logging.getLogger("quicmesh.pubsub")

_TAG = int(wire.FeatureTag.PUBSUB)
_PLANS_CACHED = 4096  # subjects whose routing is remembered until interest changes
_TURNS_KEPT = 4096  # round-robin positions (groups, request subjects) remembered
_WAITED_KEPT = 4096  # ids of messages delivered while their acknowledgement waited (resends are skipped)
_SUBSCRIPTIONS_SHOWN = 100
_RESYNC_TOKENS = 8  # Interest frames a peer's RESET may take: we ask for it once that many are available
_MAX_SERVE_SECONDS = 3600.0


class SubjectPermissionError(QuicmeshError):
    """A peer's publish or request on a subject this node's [pubsub] permissions do not allow it."""


class _Plan(NamedTuple):
    """Where a subject's messages go, worked out once per interest change."""

    plain_local: tuple[Subscription, ...]  # this node's plain subscribers
    members: dict[str, list[Subscription]]  # queue group -> this node's members
    plain_peers: tuple[str, ...]  # peers with a plain subscriber
    groups: dict[str, list[str]]  # queue group -> nodes with a member (sorted; this node's name too)
    responders: tuple[Subscription, ...]  # every matching subscription here, for requests


class PubSub(FeatureBase):
    """Subjects for one node: ``node.features.add(PubSub(node.features, lambda: node.config))``."""

    datagram_kinds = frozenset({int(wire.DatagramKind.PUBLISH)})
    control_frames = (wire.Interest,)
    feature_tags = frozenset({_TAG})

    def __init__(self, host: FeatureHost, config: Callable[[], Config]) -> None:
        self._host = host
        self._config = config
        self._seen_config: Config | None = None
        self._permissions: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._local: SubjectTrie[Subscription] = SubjectTrie()
        self._subscriptions: dict[Subscription, None] = {}
        self._interest = LocalInterest()
        self._remote = RemoteInterest(config().pubsub.max_interest_per_peer)
        self._buckets: dict[str, TokenBucket] = {}
        self._resyncs: set[str] = set()
        self._lost: dict[str, asyncio.Future[None]] = {}
        self._plans: dict[str, _Plan] = {}
        self._turns: dict[str, int] = {}
        self._ids = itertools.count(random.getrandbits(40))
        self._waited: deque[tuple[str, int]] = deque()
        self._waited_set: set[tuple[str, int]] = set()
        self._order = itertools.count()
        self._flush_pending = False
        self._subjects = SubjectCounts()
        self._warned: set[tuple[str, ...]] = set()
        self.counters = Counters()

    # --- the application's side ---------------------------------------------------------------
    def subscribe(self, pattern: str, *, queue: str | None = None, handler: Handler | None = None,
                  max_pending: int | None = None) -> Subscription:
        """A subscription to ``pattern`` (wildcards allowed), as a member of ``queue`` if given."""
        validate_pattern(pattern)
        if queue is not None:
            validate_group(queue)
        if max_pending is not None and (isinstance(max_pending, bool) or not isinstance(max_pending, int)
                                        or max_pending < 1):
            raise QuicmeshError(f"max_pending must be a whole number >= 1, got {max_pending!r}")
        settings = self._settings()
        subscription = Subscription(self, pattern, queue, handler, max_pending or settings.max_pending,
                                    next(self._order))
        self._local.add(pattern, subscription)
        self._subscriptions[subscription] = None
        self._interest.add((pattern, queue or ""))
        self._interest_changed()
        return subscription

    def node_stopping(self) -> None:
        """End every subscription: its iterator finishes once what is waiting has been read."""
        for subscription in list(self._subscriptions):
            subscription.close()

    def unsubscribe(self, subscription: Subscription) -> None:
        if self._subscriptions.pop(subscription, False) is False:
            return
        self._local.remove(subscription.pattern, subscription)
        self._interest.remove((subscription.pattern, subscription.queue or ""))
        self._interest_changed()

    async def publish(self, subject: str, data: bytes, *, reliable: bool = False) -> int:
        """Send ``data`` on ``subject``; returns how many nodes (this one included) it was handed to."""
        self._settings()  # a reloaded config re-checks what peers may receive before anything goes out
        plan = self._plan(subject)
        data = bytes(data)
        self.counters.published += 1
        self._subjects.count(subject, PUBLISHED)
        choices = {group: self._pick(group, nodes) for group, nodes in plan.groups.items()}
        if reliable:
            return await self._publish_reliable(subject, data, plan, choices)
        return self._publish_datagrams(subject, data, plan, choices)

    async def request(self, subject: str, data: bytes, timeout: float = 5.0) -> bytes:
        """Ask one subscriber of ``subject`` (anywhere in the mesh); its response.
        NoRespondersError if nobody subscribes, RequestTimeoutError if no answer comes in time."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise QuicmeshError(f"timeout must be a positive number of seconds, got {timeout!r}")
        data = bytes(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        own = self._host.node_name
        tried: set[str] = set()
        last_error: Exception | None = None
        while True:
            plan = self._plan(subject)
            nodes = {node for nodes in plan.groups.values() for node in nodes} | set(plan.plain_peers)
            if plan.responders:
                nodes.add(own)
            candidates = sorted(nodes - tried)
            if not candidates:
                self.counters.no_responders += 1
                why = f" (last: {last_error})" if last_error is not None else ""
                raise NoRespondersError(f"no subscriber of {subject!r} answers requests{why}")
            node = self._pick("\0request " + subject, candidates)
            left = deadline - loop.time()
            if left <= 0:
                raise RequestTimeoutError(f"no response on {subject!r} within {timeout:g}s")
            self.counters.requests_sent += 1
            if node == own:
                return await self._serve(self._responder(plan), subject, data, own, left)
            body = frames.encode_subject_request(int(left * 1000), subject, data)
            try:
                return await self._host.request(node, _TAG, body, left)
            except RemoteError as error:
                if f"{NoRespondersError.__name__}:" not in str(error):
                    raise
                last_error = error  # its subscriber went away meanwhile: ask another node
            except PeerNotConnectedError as error:
                last_error = error
            tried.add(node)

    # --- routing --------------------------------------------------------------------------------
    def _plan(self, subject: str) -> _Plan:
        plan = self._plans.get(subject)
        if plan is not None:
            return plan
        validate_subject(subject)
        local = sorted(self._local.match(subject), key=lambda s: s.order)
        members: dict[str, list[Subscription]] = {}
        for subscription in local:
            if subscription.queue is not None:
                members.setdefault(subscription.queue, []).append(subscription)
        groups: dict[str, list[str]] = {group: [self._host.node_name] for group in members}
        plain_peers = []
        for peer, group in self._remote.match(subject):
            if group:
                groups.setdefault(group, []).append(peer)
            else:
                plain_peers.append(peer)
        plan = _Plan(tuple(s for s in local if s.queue is None), members, tuple(sorted(plain_peers)),
                     {group: sorted(nodes) for group, nodes in groups.items()}, tuple(local))
        if len(self._plans) >= _PLANS_CACHED:
            self._plans.clear()
        self._plans[subject] = plan
        return plan

    def _pick(self, key: str, candidates: list[str]) -> str:
        """Round robin over ``candidates`` per ``key``: an even spread while they stay the same."""
        turn = self._turns.get(key, 0)
        if len(self._turns) >= _TURNS_KEPT and key not in self._turns:
            self._turns.clear()
        self._turns[key] = turn + 1
        return candidates[turn % len(candidates)]

    def _member(self, group: str, members: list[Subscription]) -> Subscription:
        """One of this node's members of ``group``: round robin, skipping full ones while any is not."""
        turn = self._turns.get("\0member " + group, 0)
        for step in range(len(members)):
            candidate = members[(turn + step) % len(members)]
            if not candidate.full():
                self._turns["\0member " + group] = turn + step + 1
                return candidate
        self._turns["\0member " + group] = turn + 1
        return members[turn % len(members)]

    def _responder(self, plan: _Plan) -> Subscription | None:
        return self._member("\0request", list(plan.responders)) if plan.responders else None

    def _targets(self, plan: _Plan, group: str) -> list[Subscription]:
        """The local subscriptions a message for ``group`` ("" for plain subscribers) goes to."""
        if not group:
            return list(plan.plain_local)
        members = plan.members.get(group)
        return [self._member(group, members)] if members else []

    def _deliver(self, subscription: Subscription, msg: Msg) -> None:
        if subscription.offer(msg):
            self.counters.delivered += 1
            self._subjects.count(msg.subject, DELIVERED)
        else:
            self.counters.dropped_full += 1

    # --- unreliable publish ---------------------------------------------------------------------
    def _publish_datagrams(self, subject: str, data: bytes, plan: _Plan, choices: dict[str, str]) -> int:
        own = self._host.node_name
        sends = [(peer, "") for peer in plan.plain_peers]
        sends += [(node, group) for group, node in choices.items() if node != own]
        plain = frames.encode_publish_datagram(subject, "", data)
        datagrams = [plain if not group else frames.encode_publish_datagram(subject, group, data)
                     for _, group in sends]
        for (peer, _), datagram in zip([(own, "")] + sends, [plain] + datagrams):
            limit = self._host.datagram_limit(peer)
            if len(datagram) > limit:
                raise DatagramTooLargeError(
                    f"a publish of {len(data)} bytes on {subject!r} does not fit one datagram to {peer} (at most "
                    f"{limit - len(datagram) + len(data)} bytes of payload): publish it with reliable=True")
        reached = 0
        local = [*plan.plain_local, *(self._member(g, plan.members[g]) for g, n in choices.items() if n == own)]
        if local:
            msg = Msg(subject, data, own)
            for subscription in local:
                self._deliver(subscription, msg)
            reached += 1
        for (peer, _), datagram in zip(sends, datagrams):
            if self._host.send_datagram(peer, datagram, len(data)) is None:
                self.counters.sent += 1
                reached += 1
            else:
                self.counters.dropped_send += 1
        return reached

    # --- reliable publish -----------------------------------------------------------------------
    async def _publish_reliable(self, subject: str, data: bytes, plan: _Plan, choices: dict[str, str]) -> int:
        own = self._host.node_name
        jobs: list[tuple[str, Awaitable[Any]]] = []
        local = [*plan.plain_local, *(self._member(g, plan.members[g]) for g, n in choices.items() if n == own)]
        if local:
            jobs.append((own, self._put(local, Msg(subject, data, own))))
        for peer in plan.plain_peers:
            body = frames.encode_publish_message(next(self._ids), subject, "", data)
            jobs.append((peer, self._host.send_message(peer, _TAG, body)))
        for group, node in choices.items():
            if node != own:
                jobs.append((f"{node} (queue {group})", self._send_to_group(subject, group, data, node)))
        self.counters.sent += len(jobs) - (1 if local else 0)
        results = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
        failures: dict[str, Exception] = {}
        for (target, _), result in zip(jobs, results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failures[target] = result
        if failures:
            listed = "; ".join(f"{target}: {error}" for target, error in failures.items())
            raise PublishError(f"publish on {subject!r} not accepted by {listed}", failures,
                               len(jobs) - len(failures))
        return len(jobs)

    async def _put(self, subscriptions: list[Subscription], msg: Msg) -> None:
        """Deliver once each has room (reliable: nothing is dropped, the publisher waits)."""
        for subscription in subscriptions:
            await subscription.wait_room()
        for subscription in subscriptions:
            self._deliver(subscription, msg)

    async def _send_to_group(self, subject: str, group: str, data: bytes, node: str) -> None:
        """To ``node``'s member of ``group``; if that node is lost or refuses before it accepted, to another."""
        own = self._host.node_name
        tried: set[str] = set()
        last_error: Exception | None = None
        while True:
            if node == own:
                members = self._plan(subject).members.get(group)
                if members:
                    await self._put([self._member(group, members)], Msg(subject, data, own))
                    return
            else:
                body = frames.encode_publish_message(next(self._ids), subject, group, data)
                try:
                    await self._send_until_lost(node, body)
                    return
                except (RemoteError, PeerError) as error:
                    last_error = error
            tried.add(node)
            candidates = [n for n in self._plan(subject).groups.get(group, ()) if n not in tried]
            if not candidates:
                why = f" (last: {last_error})" if last_error is not None else ""
                raise NoRespondersError(f"no member of queue group {group!r} for {subject!r} took the message{why}")
            self.counters.rerouted += 1
            node = self._pick(group, candidates)

    async def _send_until_lost(self, peer: str, body: bytes) -> None:
        """A feature message to ``peer``, given up (PeerNotConnectedError) if the peer is lost before it
        accepted it. Giving up ends only our wait: the message stays queued for that peer (resent if it
        comes back as the same process), which is why a queue group is at-least-once across a failure."""
        if peer not in self._host.connected_peers():
            raise PeerNotConnectedError(f"peer {peer} is not connected")
        lost = self._lost.get(peer)
        if lost is None:
            lost = self._lost[peer] = asyncio.get_running_loop().create_future()
        sending = asyncio.ensure_future(self._host.send_message(peer, _TAG, body))
        try:
            await asyncio.wait((sending, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sending.done():
                sending.cancel()
        if sending.done() and not sending.cancelled():
            sending.result()
            return
        raise PeerNotConnectedError(f"peer {peer} was lost before it accepted the message")

    # --- requests ---------------------------------------------------------------------------------
    async def _serve(self, subscription: Subscription | None, subject: str, data: bytes, peer: str,
                     timeout: float) -> bytes:
        if subscription is None:
            self.counters.no_responders += 1
            raise NoRespondersError(f"no subscriber of {subject!r} on {self._host.node_name}")
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        msg = Msg(subject, data, peer, reply)
        if not subscription.offer(msg):
            raise QuicmeshError(f"the subscriber of {subject!r} on {self._host.node_name} is overloaded")
        self.counters.delivered += 1
        self._subjects.count(subject, DELIVERED)
        try:
            async with asyncio.timeout(timeout):
                return await reply
        except TimeoutError:
            raise RequestTimeoutError(f"no response on {subject!r} within {timeout:g}s") from None

    # --- the seam: runtime/features.py's Feature ----------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        """A new connection: tell the peer everything our subscribers want (it forgot on the last loss)."""
        self._plans.clear()
        for frame in self._interest.reset():
            self._host.send_control(peer, frame)

    def peer_lost(self, peer: str, reason: str) -> None:
        self._remote.drop(peer)
        self._plans.clear()
        lost = self._lost.pop(peer, None)
        if lost is not None and not lost.done():
            lost.set_result(None)

    def control_received(self, peer: str, epoch: int, frame: object) -> None:
        if not isinstance(frame, wire.Interest):
            return
        settings = self._settings()
        if settings.interest_rate > 0:
            now = time.monotonic()
            bucket = self._buckets.get(peer)
            if bucket is None:
                bucket = self._buckets[peer] = TokenBucket(settings.interest_rate, settings.interest_burst, now)
            if not bucket.take(now):
                self.counters.interest_frames_refused += 1
                self._warn((peer, "rate"), "peer %s sends Interest frames faster than pubsub.interest_rate "
                           "(%g/s): refused, and it is asked to resync later", peer, settings.interest_rate)
                self._ask_resync(peer, bucket.wait(min(_RESYNC_TOKENS, settings.interest_burst)))
                return
        applied = self._remote.apply(peer, epoch, frame, self._admit)
        if applied.added or applied.removed:
            self._plans.clear()
        for (pattern, group), reason in applied.refused:
            if "max_interest_per_peer" in reason:
                self.counters.refused_interest_limit += 1
            else:
                self.counters.refused_interest += 1
            self._warn((peer, "interest", pattern), "refused peer %s's subscription to %r%s: %s", peer, pattern,
                       f" (queue {group})" if group else "", reason)
        if applied.resync_requested:
            self.peer_ready(peer, epoch)

    def datagram_received(self, peer: str, datagram: bytes) -> None:
        publication = frames.decode_publish_datagram(datagram)
        self.counters.received += 1
        plan = self._inbound(peer, publication.subject)
        if plan is None:
            return
        targets = self._targets(plan, publication.group)
        if not targets:
            self.counters.no_subscriber += 1
            return
        msg = Msg(publication.subject, publication.payload, peer)
        for subscription in targets:
            self._deliver(subscription, msg)

    def message_received(self, peer: str, tag: int, data: bytes) -> Awaitable[object] | None:
        publish_id, publication = frames.decode_publish_message(data)
        self.counters.received += 1
        subject, group = publication.subject, publication.group
        plan = self._inbound(peer, subject)
        if plan is None:
            raise SubjectPermissionError(f"{self._host.node_name} does not take publishes on {subject!r} from {peer}")
        key = (peer, publish_id)
        if key in self._waited_set:
            return None  # delivered while its acknowledgement waited, then resent on a new connection
        targets = self._targets(plan, group)
        if not targets:
            if group:  # the publisher gives it to another member
                raise NoRespondersError(f"no member of queue group {group!r} for {subject!r} on {self._host.node_name}")
            self.counters.no_subscriber += 1
            return None
        msg = Msg(subject, publication.payload, peer)
        if not any(subscription.full() for subscription in targets):
            for subscription in targets:
                self._deliver(subscription, msg)
            return None
        return self._put_remembered(key, targets, msg)

    async def _put_remembered(self, key: tuple[str, int], targets: list[Subscription], msg: Msg) -> None:
        await self._put(targets, msg)
        self._waited.append(key)
        self._waited_set.add(key)
        if len(self._waited) > _WAITED_KEPT:
            self._waited_set.discard(self._waited.popleft())

    def request_received(self, peer: str, tag: int, data: bytes) -> Awaitable[bytes] | bytes:
        timeout_ms, publication = frames.decode_subject_request(data)
        self.counters.received += 1
        plan = self._inbound(peer, publication.subject)
        if plan is None:
            raise SubjectPermissionError(f"{self._host.node_name} does not take requests on "
                                         f"{publication.subject!r} from {peer}")
        self.counters.requests_served += 1
        return self._serve(self._responder(plan), publication.subject, publication.payload, peer,
                           min(timeout_ms / 1000, _MAX_SERVE_SECONDS))

    # --- permissions and interest ---------------------------------------------------------------------
    def _settings(self) -> PubSubSection:
        """The current [pubsub] section; a reloaded config re-checks every peer's interest against it."""
        config = self._config()
        if config is not self._seen_config:
            first = self._seen_config is None
            self._seen_config = config
            self._permissions.clear()
            self._remote.max_entries = config.pubsub.max_interest_per_peer
            if not first:
                self._recheck_interest()
        return config.pubsub

    def _permitted(self, peer: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        permissions = self._permissions.get(peer)
        if permissions is None:
            permissions = self._permissions[peer] = self._settings().permissions(peer)
        return permissions

    def _inbound(self, peer: str, subject: str) -> _Plan | None:
        """The plan for a peer's publish or request, or None (logged, counted) if it is not allowed."""
        self._settings()
        try:
            plan = self._plan(subject)
        except InvalidSubjectError as error:
            reason = str(error)
        else:
            allowed = self._permitted(peer)[0]
            if any(covers(pattern, subject) for pattern in allowed):
                self._subjects.count(subject, RECEIVED)
                return plan
            reason = f"not in its publish permission ({', '.join(allowed) or 'nothing'})"
        self.counters.refused_publish += 1
        self._warn((peer, "publish", subject[:64]), "refused a publish on %r from peer %s: %s", subject, peer, reason)
        return None

    def _admit(self, peer: str, entry: Entry) -> str | None:
        pattern, group = entry
        try:
            validate_pattern(pattern)
            if group:
                validate_group(group)
        except InvalidSubjectError as error:
            return str(error)
        allowed = self._permitted(peer)[1]
        if not any(covers(granted, pattern) for granted in allowed):
            return f"not within its subscribe permission ({', '.join(allowed) or 'nothing'})"
        return None

    def _recheck_interest(self) -> None:
        for peer in self._remote.peers():
            for entry in self._remote.entries(peer):
                reason = self._admit(peer, entry)
                if reason is not None:
                    self._remote.revoke(peer, entry)
                    self.counters.refused_interest += 1
                    log.warning("peer %s's subscription to %r is no longer allowed after a reload: %s",
                                peer, entry[0], reason)
        self._plans.clear()

    def _interest_changed(self) -> None:
        self._plans.clear()
        if self._flush_pending or not self._interest.dirty:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not started yet: peers get everything in their RESET when they connect
            return
        self._flush_pending = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Our subscribers' changes since the last flush, coalesced, to every connected peer."""
        self._flush_pending = False
        changes = self._interest.changes()
        for peer in self._host.connected_peers():
            for frame in changes:
                self._host.send_control(peer, frame)

    def _ask_resync(self, peer: str, delay: float) -> None:
        """After refusing a peer's Interest frame, ask it for a RESET once it may send one again."""
        if peer in self._resyncs:
            return
        self._resyncs.add(peer)

        def ask() -> None:
            self._resyncs.discard(peer)
            self._host.send_control(peer, self._interest.resync_request())

        asyncio.get_running_loop().call_later(delay, ask)

    # --- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """JSON-ready: subscriptions, interest sizes, counters and the busiest subjects (bounded)."""
        subscriptions = sorted(self._subscriptions, key=lambda s: -s.delivered)[:_SUBSCRIPTIONS_SHOWN]
        return {
            "subscriptions": [{"subject": s.pattern, "queue": s.queue, "pending": s.pending,
                               "delivered": s.delivered, "dropped": s.dropped} for s in subscriptions],
            "subscriptions_total": len(self._subscriptions),
            "interest": {"local": len(self._interest.entries()),
                         "peers": {peer: len(self._remote.entries(peer)) for peer in self._remote.peers()}},
            "counters": asdict(self.counters),
            "subjects": self._subjects.top(),
        }

    def _warn(self, key: tuple[str, ...], message: str, *args: Any) -> None:
        if key not in self._warned:
            if len(self._warned) > 1024:
                self._warned.clear()
            self._warned.add(key)
            log.warning(message, *args)
