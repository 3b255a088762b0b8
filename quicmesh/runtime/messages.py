"""The reliable-message channel: each message on its own unidirectional stream, acknowledged by the peer's
node once its application has it (an Ack on the control stream), resent on the next connection until then,
and delivered once: the receiver filters duplicates per sender epoch.

Features (pub/sub, durable storage, ...) send reliable messages the same way, on FEATURE_MESSAGE streams
whose tag names the feature: same ids, window, resends and duplicate filter. The receiving feature's
handler may return an awaitable: the message is acknowledged once it completes (durable storage commits
first), refused with a Reject if it raises.

Flow control: at most ``limits.message_window`` messages and half of ``limits.max_peer_buffer`` bytes
unacknowledged per peer. When the application's inbox is full, messages are held unacknowledged
("parked"), so the sender's window fills and it slows down instead of anything being dropped.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from quicmesh.errors import MessageTooLargeError, PeerError, RemoteError, UnknownPeerError
from quicmesh.protocol import wire
from quicmesh.runtime.connection import REASON_LIMIT, Connection
from quicmesh.runtime.context import Context
from quicmesh.runtime.events import Received
from quicmesh.runtime.inbox import Inbox, woken_from
from quicmesh.runtime.peer import Outgoing, Peer

log = logging.getLogger("quicmesh.node")

#: A feature's handler for its messages: (peer, body) -> None (accepted) or an awaitable (accepted once
#: it completes; an exception refuses the message and its text goes back to the sender).
FeatureMessageHandler = Callable[[str, bytes], Awaitable[object] | None]


class MessageChannel:
    def __init__(self, ctx: Context, inbox: Inbox) -> None:
        self._ctx = ctx
        self._inbox = inbox
        self._parked: deque[tuple[Connection, int, bytes]] = deque()
        #: wire.FeatureTag -> the feature handler that owns it
        self.feature_handlers: dict[int, FeatureMessageHandler] = {}

    # --- send ---------------------------------------------------------------------------------
    async def send(self, peer: str, data: bytes, tag: int = 0) -> None:
        """Send a reliable message; returns once the peer's node has accepted it for its application
        (``tag``: for that node's feature instead)."""
        ctx = self._ctx
        target = ctx.peer_or_raise(peer)
        ctx.check_running()
        self.check_size(target, data)
        size = len(data)
        await target.window.acquire()
        reserved = False
        try:
            if target.unacked_bytes and target.unacked_bytes + size > ctx.config.limits.max_peer_buffer // 2:
                await self._wait_for_unacked_bytes(target, size)
            target.unacked_bytes += size
            reserved = True
            ctx.check_running()
            if ctx.peers.get(peer) is not target:
                raise UnknownPeerError(f"peer {peer} was removed from the config")
            message_id = target.next_message_id
            target.next_message_id += 1
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            outgoing = target.unacked[message_id] = Outgoing(bytes(data), future, tag)
            connection = target.connection
            if connection is not None and connection.usable:
                self._transmit(connection, message_id, outgoing)
        except BaseException:
            target.window.release()
            if reserved:
                self._release_bytes(target, size)
            raise
        # Cancelling the caller cancels only this wait, not the message: it stays in ``unacked`` (and is
        # resent) until the peer acks it. A plain await: a shield would cost one more loop iteration.
        await future
        if not tag:  # the counters are the application's; a feature keeps its own
            target.counters.messages_out += 1
            target.counters.bytes_out += len(data)

    def check_size(self, peer: Peer, data: bytes) -> None:
        """MessageTooLargeError if ``data`` exceeds our max_message_size or the peer's (its Hello says)."""
        limit = self._ctx.config.limits.max_message_size
        where = "local"
        connection = peer.connection
        if connection is not None and connection.hello is not None and connection.hello.max_message_size < limit:
            limit, where = connection.hello.max_message_size, f"peer {peer.name}'s"
        if len(data) > limit:
            raise MessageTooLargeError(f"message of {len(data)} bytes exceeds the {where} max_message_size "
                                       f"({limit} bytes)")

    def resend(self, peer: Peer, connection: Connection) -> None:
        """A new active connection: everything still unacknowledged goes again (the receiver dedupes)."""
        for message_id, outgoing in list(peer.unacked.items()):
            self._transmit(connection, message_id, outgoing)

    def _transmit(self, connection: Connection, message_id: int, outgoing: Outgoing) -> None:
        if outgoing.tag:
            hello = connection.hello
            if hello is None or not hello.features & wire.Feature.FEATURE_STREAMS:
                self._settle(connection, message_id, PeerError(
                    f"peer {connection.peer} runs a quicmesh version without feature messages"))
                return
            stream = wire.encode_feature_message(outgoing.tag, message_id, outgoing.body)
        else:
            stream = wire.encode_message(message_id, outgoing.body)
        quic = connection.quic
        stream_id = quic.get_next_available_stream_id(is_unidirectional=True)
        quic.send_stream_data(stream_id, stream, end_stream=True)
        self._ctx.touch(connection)

    def acked(self, connection: Connection, message_ids: Iterable[int]) -> None:
        for message_id in message_ids:
            self._settle(connection, message_id, None)  # a repeated ack after a resend finds nothing

    def rejected(self, connection: Connection, frame: wire.Reject) -> None:
        error_type = MessageTooLargeError if frame.code == wire.ErrorCode.MESSAGE_TOO_LARGE else RemoteError
        self._settle(connection, frame.message_id,
                     error_type(f"peer {connection.peer} refused the message: {frame.reason}"))

    def _settle(self, connection: Connection, message_id: int, error: Exception | None) -> None:
        """The peer acknowledged (``error`` None) or refused a message: it leaves the outbox."""
        peer = self._ctx.peers.get(connection.peer or "")
        outgoing = peer.unacked.pop(message_id, None) if peer is not None else None
        if peer is None or outgoing is None:
            return
        peer.window.release()
        self._release_bytes(peer, len(outgoing.body))
        if outgoing.future.done():
            return
        if error is None:
            outgoing.future.set_result(None)
        else:
            outgoing.future.set_exception(error)

    def fail_unacked(self, peer: Peer, error: Exception) -> None:
        for outgoing in peer.unacked.values():
            if not outgoing.future.done():
                outgoing.future.set_exception(error)
        peer.unacked.clear()
        self._release_bytes(peer, peer.unacked_bytes)

    async def _wait_for_unacked_bytes(self, peer: Peer, size: int) -> None:
        """Keep at most half of max_peer_buffer unacknowledged (always allowing one message), so a
        receiver with the same limits never has to cut us off for holding too much of ours."""
        budget = self._ctx.config.limits.max_peer_buffer // 2
        while peer.unacked_bytes and peer.unacked_bytes + size > budget:
            await woken_from(peer.byte_waiters)
            self._ctx.check_running()

    @staticmethod
    def _release_bytes(peer: Peer, size: int) -> None:
        peer.unacked_bytes -= size
        while peer.byte_waiters:
            waiter = peer.byte_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- receive ------------------------------------------------------------------------------
    def stream_complete(self, connection: Connection, message_id: int, body: bytes, tag: int = 0) -> None:
        """A whole message stream arrived: deliver it, or hold it until the peer's Hello (its epoch)."""
        if connection.usable:
            self._received(connection, message_id, body, tag)
        else:
            connection.early_messages.append((message_id, body, tag))
            connection.message_bytes += len(body)

    def connection_ready(self, connection: Connection) -> None:
        """The peer's Hello came: messages that arrived before it can be delivered now."""
        early, connection.early_messages = connection.early_messages, []
        for message_id, body, tag in early:
            connection.message_bytes -= len(body)
            self._received(connection, message_id, body, tag)

    def _received(self, connection: Connection, message_id: int, body: bytes, tag: int) -> None:
        assert connection.peer is not None and connection.hello is not None
        peer = self._ctx.peers[connection.peer]
        if peer.incoming.seen(connection.hello.epoch, message_id) or message_id in peer.parked_ids:
            if message_id not in peer.parked_ids:
                connection.pending_acks.append(message_id)  # our earlier ack was lost: ack again
            return
        if tag:
            self._to_feature(connection, peer, message_id, body, tag)
            return
        if self._inbox.full():
            # The application is behind: hold the message unacknowledged, so the sender's window
            # fills and it slows down, instead of dropping it or growing without bound.
            peer.parked_ids.add(message_id)
            self._parked.append((connection, message_id, body))
            connection.message_bytes += len(body)
            return
        self._accept(connection, peer, message_id, body)

    def _accept(self, connection: Connection, peer: Peer, message_id: int, body: bytes) -> None:
        peer.incoming.record(message_id)
        peer.counters.messages_in += 1
        peer.counters.bytes_in += len(body)
        connection.pending_acks.append(message_id)
        self._ctx.touch(connection)
        self._inbox.deliver(Received(peer.name, "message", body))

    def _to_feature(self, connection: Connection, peer: Peer, message_id: int, body: bytes, tag: int) -> None:
        handler = self.feature_handlers.get(tag)
        if handler is None:
            self._refuse(connection, message_id, f"this node has no feature for tag {tag}")
            return
        try:
            pending = handler(peer.name, body)
        except Exception as error:  # noqa: BLE001 - the feature refused it: the sender hears why
            self._refuse(connection, message_id, f"{type(error).__name__}: {error}")
            return
        if not inspect.isawaitable(pending):
            self._accept_for_feature(connection, peer, message_id)
            return
        # Held like a parked message meanwhile: a resend of it is neither delivered again nor acked early.
        peer.parked_ids.add(message_id)
        epoch = connection.hello.epoch if connection.hello is not None else None
        self._ctx.spawn(self._feature_done(connection, peer, message_id, epoch, pending))

    async def _feature_done(self, connection: Connection, peer: Peer, message_id: int, epoch: int | None,
                            pending: Awaitable[object]) -> None:
        try:
            await pending
        except Exception as error:  # noqa: BLE001 - the feature refused it: the sender hears why
            peer.parked_ids.discard(message_id)
            if connection.usable:
                self._refuse(connection, message_id, f"{type(error).__name__}: {error}")
            return
        peer.parked_ids.discard(message_id)
        # The ack goes on the connection it came on, or on the one that replaced it to the same sender process;
        # a restarted sender (another epoch) resends, and the feature sees it again.
        current = connection if connection.usable else peer.usable_connection
        if current is not None and current.hello is not None and current.hello.epoch == epoch == peer.incoming.epoch:
            self._accept_for_feature(current, peer, message_id)

    def _accept_for_feature(self, connection: Connection, peer: Peer, message_id: int) -> None:
        peer.incoming.record(message_id)
        connection.pending_acks.append(message_id)
        self._ctx.touch(connection)

    def _refuse(self, connection: Connection, message_id: int, reason: str) -> None:
        log.info("feature message %d from %s refused: %s", message_id, connection.peer, reason)
        connection.send_control(wire.Reject(message_id, wire.ErrorCode.REFUSED, reason[:REASON_LIMIT]))
        self._ctx.touch(connection)

    def unpark(self) -> None:
        """The application made room in the inbox: accept held messages while it lasts."""
        while self._parked and not self._inbox.full():
            connection, message_id, body = self._parked.popleft()
            connection.message_bytes -= len(body)
            peer = self._ctx.peers.get(connection.peer or "")
            if peer is None:
                continue
            peer.parked_ids.discard(message_id)
            if connection.usable and connection.hello is not None and connection.hello.epoch == peer.incoming.epoch:
                self._accept(connection, peer, message_id, body)
            # else: the connection is gone; the sender resends it on the next one

    @property
    def parked(self) -> bool:
        return bool(self._parked)

    def drop_parked(self, connection: Connection) -> None:
        """Held messages of a lost connection: unacknowledged, so the sender resends them on its next one."""
        if not any(entry[0] is connection for entry in self._parked):
            return
        peer = self._ctx.peers.get(connection.peer or "")
        kept: deque[tuple[Connection, int, bytes]] = deque()
        for entry in self._parked:
            if entry[0] is not connection:
                kept.append(entry)
            elif peer is not None:
                peer.parked_ids.discard(entry[1])
        self._parked = kept

    def flush_acks(self, connection: Connection) -> bool:
        """Send the ids accepted since the last flush in Ack frames; True if there were any."""
        acks = connection.pending_acks
        if not acks:
            return False
        for start in range(0, len(acks), wire.MAX_ACK_IDS):
            connection.send_control(wire.Ack(tuple(acks[start : start + wire.MAX_ACK_IDS])))
        acks.clear()
        return True
