"""Durable messages: a feature on the seam (runtime/features.py) that keeps what it accepted in SQLite
until the receiving node has committed it (docs/DURABLE.md states the guarantee and its limits).

Sender: ``send`` commits the body to the outbox and returns; a pump per peer sends pending rows, at most
``limits.message_window`` at a time, as DURABLE feature messages ``(origin, seq, floor, body)`` while the
peer is connected; the peer's acknowledgement deletes the row. After a restart the pump starts again from
the oldest pending row. ``floor`` is the lowest seq still pending for that peer (every pending row up to
the pump's cursor is in flight, so it is the minimum of those in flight).

Receiver: a DURABLE message is committed to the inbox (with ``(peer, origin, seq)`` as the duplicate
filter) before the seam acknowledges it; a new one goes to the application as a :class:`DurableReceived`,
which the application acknowledges with ``ack()`` (or by a receive handler returning without raising).
Unacknowledged ones are delivered again after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quicmesh.durable.frame import decode_durable, encode_durable
from quicmesh.durable.store import OutboxRow, Settled, Store
from quicmesh.errors import (MessageTooLargeError, NodeClosedError, OutboxFullError, PeerError, RemoteError,
                             StorageError, UnknownPeerError)
from quicmesh.protocol import wire
from quicmesh.runtime.events import ReceiveHandler, Received
from quicmesh.runtime.features import FeatureBase

if TYPE_CHECKING:
    from quicmesh.config.model import StorageSection
    from quicmesh.runtime.features import FeatureHost

log = logging.getLogger("quicmesh.durable")

TAG = int(wire.FeatureTag.DURABLE)
SWEEP_INTERVAL = 1.0  # seconds between TTL sweeps (and refreshes of the oldest pending message's age)
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # backoff while the receiving node refuses a message (its storage failed)


@dataclass(slots=True)
class DurableReceived(Received):
    """A durable message: call ``ack()`` once it is handled (await it to know the ack is committed).
    Until then it is delivered again after a restart of this node."""

    inbox_id: int = field(default=0, repr=False)
    _owner: DurableMessages | None = field(default=None, repr=False, compare=False)
    _acked: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)

    def ack(self) -> asyncio.Future[None]:
        """Acknowledge it; the result completes once committed (StorageError if it could not be)."""
        if self._acked is None:
            assert self._owner is not None
            self._acked = self._owner.ack(self.inbox_id)
        return self._acked


class _PeerOutbox:
    """One peer's pending messages, as the feature accounts and pumps them."""

    def __init__(self) -> None:
        self.messages = 0  # committed (or being committed) rows
        self.bytes = 0
        self.oldest: float | None = None  # unix time of the oldest pending one (refreshed each sweep)
        self.cursor = 0  # highest seq handed to the pump
        self.in_flight: dict[int, OutboxRow] = {}
        self.wake = asyncio.Event()
        self.connected = False
        self.removed = False  # no longer a configured peer: kept until purged or expired
        self.pump: asyncio.Task[None] | None = None


class DurableMessages(FeatureBase):
    """The feature; the node creates it when the config has ``[storage] path``, opens it in ``start()``."""

    feature_tags = frozenset({TAG})

    def __init__(self, host: FeatureHost, storage: StorageSection, window: int,
                 receive_handler: Callable[[], ReceiveHandler | None]) -> None:
        assert storage.path is not None
        self._host = host
        self.storage = storage
        self.store = Store(storage.path, storage.sync)
        self._window = window
        self._receive_handler = receive_handler
        self._store_id = 0
        self._outboxes: dict[str, _PeerOutbox] = {}
        self._total_messages = 0
        self._total_bytes = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._open = False
        self.inbox_unacked = 0
        self.counters = {"accepted": 0, "acknowledged": 0, "expired": 0, "refused": 0, "purged": 0,
                         "received": 0, "duplicates": 0, "acked_by_application": 0}

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the database (StorageError naming the file if unusable) and start the pumps; unacknowledged
        received messages go to the application again."""
        opened = await self.store.open()
        self._open = True
        self._store_id = opened.store_id
        for peer, (messages, size) in opened.outbox.items():
            outbox = self._outbox(peer)
            outbox.messages, outbox.bytes = messages, size
            self._total_messages += messages
            self._total_bytes += size
        self.inbox_unacked = len(opened.unacked)
        self._sweeper = self._spawn(self._sweep())
        for row in opened.unacked:
            self._to_application(DurableReceived(row.peer, "message", row.body, row.id, self))
        if opened.outbox:
            log.info("durable outbox: %d messages (%d bytes) pending for %s", self._total_messages,
                     self._total_bytes, ", ".join(sorted(opened.outbox)))

    async def close(self) -> None:
        """Stop sending (what is pending stays in the outbox) and close the database."""
        self._open = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    # --- sending --------------------------------------------------------------------------------
    async def send(self, peer: str, data: bytes, ttl: float | None = None) -> None:
        """Commit ``data`` for ``peer`` to the outbox; returns once committed. OutboxFullError at once
        when it would go over a limit; StorageError if the database cannot take it."""
        if not self._open:
            raise NodeClosedError("durable messages are not open (the node is not running)")
        ttl = self.storage.ttl if ttl is None else ttl
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        outbox = self._outbox(peer)
        self._reserve(peer, outbox, len(data))
        now = time.time()
        future = self.store.add(peer, bytes(data), now, now + ttl if ttl is not None else None)
        future.add_done_callback(lambda f: self._added(outbox, len(data), now, f))
        # Shielded: a cancelled caller does not cancel the commit, whose outcome the callback accounts for.
        await asyncio.shield(future)

    def _reserve(self, peer: str, outbox: _PeerOutbox, size: int) -> None:
        storage = self.storage
        over = ((outbox.messages + 1 > storage.max_peer_messages and f"{storage.max_peer_messages} messages for {peer}")
                or (outbox.bytes + size > storage.max_peer_bytes and f"{storage.max_peer_bytes} bytes for {peer}")
                or (self._total_messages + 1 > storage.max_messages and f"{storage.max_messages} messages in total")
                or (self._total_bytes + size > storage.max_bytes and f"{storage.max_bytes} bytes in total"))
        if over:
            raise OutboxFullError(f"durable outbox full ({over}): message of {size} bytes not accepted")
        outbox.messages += 1
        outbox.bytes += size
        self._total_messages += 1
        self._total_bytes += size

    def _added(self, outbox: _PeerOutbox, size: int, created: float, future: asyncio.Future[int]) -> None:
        if future.cancelled() or future.exception() is not None:
            self._release(outbox, size)
            return
        self.counters["accepted"] += 1
        if outbox.oldest is None:
            outbox.oldest = created
        outbox.wake.set()

    def _release(self, outbox: _PeerOutbox, size: int) -> None:
        outbox.messages -= 1
        outbox.bytes -= size
        self._total_messages -= 1
        self._total_bytes -= size
        if not outbox.messages:
            outbox.oldest = None

    def _outbox(self, peer: str) -> _PeerOutbox:
        outbox = self._outboxes.get(peer)
        if outbox is None:
            outbox = self._outboxes[peer] = _PeerOutbox()
            outbox.connected = peer in self._host.connected_peers()
        if outbox.pump is None and self._open:
            outbox.pump = self._spawn(self._pump(peer, outbox))
        return outbox

    async def _pump(self, peer: str, outbox: _PeerOutbox) -> None:
        """Hand pending rows, oldest first, to senders: at most ``window`` in flight, only while connected."""
        while True:
            outbox.wake.clear()
            free = self._window - len(outbox.in_flight)
            if not outbox.connected or outbox.removed or free <= 0:
                await outbox.wake.wait()
                continue
            try:
                rows = await self.store.pending(peer, outbox.cursor, free)
            except StorageError as error:
                log.error("durable outbox for %s: %s", peer, error)
                await asyncio.sleep(RETRY_MAX)
                continue
            if not rows:
                await outbox.wake.wait()
                continue
            for row in rows:
                outbox.cursor = row.seq
                outbox.in_flight[row.seq] = row
                self._spawn(self._send_row(peer, outbox, row))

    async def _send_row(self, peer: str, outbox: _PeerOutbox, row: OutboxRow) -> None:
        delay = RETRY_MIN
        try:
            while True:
                if row.expires is not None and row.expires <= time.time():
                    return  # the sweeper deletes and counts it
                frame = encode_durable(self._store_id, row.seq, min(outbox.in_flight), row.body)
                try:
                    await self._host.send_message(peer, TAG, frame)
                except MessageTooLargeError as error:
                    log.warning("durable message %d to %s dropped: %s", row.seq, peer, error)
                    self.counters["refused"] += 1
                    await self._settle(row.seq)
                    return
                except UnknownPeerError:
                    if not outbox.removed:
                        log.warning("peer %s is no longer configured: its %d durable messages are kept until "
                                    "purged or expired", peer, outbox.messages)
                    outbox.removed = True
                    outbox.cursor = min(outbox.cursor, row.seq - 1)  # sent again if it comes back
                    return
                except (RemoteError, PeerError) as error:  # its storage failed, or it cannot take them yet
                    log.warning("durable message %d to %s not taken (retry in %.1fs): %s", row.seq, peer, delay, error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                self.counters["acknowledged"] += 1
                await self._settle(row.seq)
                return
        except NodeClosedError:
            return
        finally:
            outbox.in_flight.pop(row.seq, None)
            outbox.wake.set()

    async def _settle(self, seq: int) -> None:
        try:
            settled = await self.store.settle(seq)
        except StorageError as error:  # it stays; after a restart it goes again and the receiver dedupes it
            log.error("durable outbox: %s", error)
            return
        if settled is not None:
            self._settled([settled])

    def _settled(self, rows: list[Settled]) -> None:
        for row in rows:
            outbox = self._outboxes.get(row.peer)
            if outbox is not None:
                self._release(outbox, row.size)

    async def _sweep(self) -> None:
        """Delete expired rows (counted) and refresh each peer's oldest pending time, every second."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                expired = await self.store.expire(time.time())
                summary = await self.store.summary()
            except StorageError as error:
                log.error("durable outbox sweep: %s", error)
                continue
            if expired:
                self.counters["expired"] += len(expired)
                self._settled(expired)
                log.info("durable outbox: %d messages expired", len(expired))
            for peer, outbox in self._outboxes.items():
                found = summary.get(peer)
                outbox.oldest = found.oldest if found is not None else None

    async def purge(self, peer: str) -> tuple[int, int]:
        """Delete every pending message for ``peer``: (messages, bytes). Those already on the wire may
        still arrive."""
        rows = await self.store.purge(peer)
        self.counters["purged"] += len(rows)
        self._settled(rows)
        return len(rows), sum(row.size for row in rows)

    # --- the seam -------------------------------------------------------------------------------
    def peer_ready(self, peer: str, epoch: int) -> None:
        outbox = self._outbox(peer)
        outbox.connected = True
        outbox.removed = False
        outbox.wake.set()

    def peer_lost(self, peer: str, reason: str) -> None:
        outbox = self._outboxes.get(peer)
        if outbox is not None:
            outbox.connected = False  # what is in flight stays with the seam, resent on the next connection

    def message_received(self, peer: str, tag: int, data: bytes) -> Awaitable[object] | None:
        frame = decode_durable(data)
        if not self._open:
            raise StorageError("durable storage is closed")
        if self.inbox_unacked >= self.storage.max_messages:
            raise StorageError(f"durable inbox full ({self.inbox_unacked} messages not acknowledged by the "
                               f"application); retry later")
        return self._commit(peer, frame.origin, frame.seq, frame.floor, frame.body)

    async def _commit(self, peer: str, origin: int, seq: int, floor: int, body: bytes) -> None:
        inbox_id = await self.store.receive(peer, origin, seq, floor, body, time.time())
        if inbox_id is None:
            self.counters["duplicates"] += 1
            return
        self.counters["received"] += 1
        self.inbox_unacked += 1
        self._to_application(DurableReceived(peer, "message", body, inbox_id, self))

    def _to_application(self, item: DurableReceived) -> None:
        """To the receive handler (acknowledged when it returns without raising), else to recv()."""
        handler = self._receive_handler()
        if handler is None:
            self._host.deliver(item)
            return
        try:
            handler(item)
        except Exception:  # noqa: BLE001 - the application's bug: not acknowledged, delivered again after a restart
            log.exception("receive handler failed on a durable message from %s", item.peer)
            return
        item.ack()

    def ack(self, inbox_id: int) -> asyncio.Future[None]:
        """Commit the application's acknowledgement (DurableReceived.ack)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        stored = self.store.ack(inbox_id)

        def committed(future: asyncio.Future[bool]) -> None:
            error = None if future.cancelled() else future.exception()
            if error is None and future.result():
                self.inbox_unacked -= 1
                self.counters["acked_by_application"] += 1
            if error is not None:
                log.warning("durable ack of inbox message %d not committed (delivered again after a restart): "
                            "%s", inbox_id, error)
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
                done.exception()  # logged above: awaiting it is optional
            else:
                done.set_result(None)

        stored.add_done_callback(committed)
        return done

    # --- operators --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Outbox depth, bytes and oldest age per peer, and the counters (status and metrics show them)."""
        now = time.time()
        peers = {peer: {"messages": outbox.messages, "bytes": outbox.bytes,
                        "oldest_age": round(now - outbox.oldest, 3) if outbox.oldest is not None else None,
                        "in_flight": len(outbox.in_flight), "connected": outbox.connected,
                        "configured": not outbox.removed}
                 for peer, outbox in sorted(self._outboxes.items()) if outbox.messages or outbox.in_flight}
        return {"path": str(self.storage.path), "sync": self.storage.sync, "outbox_messages": self._total_messages,
                "outbox_bytes": self._total_bytes, "outbox": peers, "inbox_unacked": self.inbox_unacked,
                "commits": self.store.commits, **self.counters}

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("durable messages: internal task failed", exc_info=task.exception())
