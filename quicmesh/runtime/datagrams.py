"""The datagram channel: unreliable QUIC DATAGRAM frames, bounded queues, BATCH framing, drop counters.

Datagrams wait in a bounded per-peer queue (quicmesh's, not aioquic's unbounded one) and are handed to
QUIC at each flush, at most ``_DATAGRAM_BURST_BYTES`` ahead of the wire, so a datagram backlog cannot
starve stream data (aioquic writes every queued datagram before any stream frame). Neighbours queued at
the same moment go in one BATCH frame when the peer accepts them. Kinds other than APP belong to a
feature (forwarding today) and are handed to it whole.
"""

from __future__ import annotations

from collections.abc import Callable

from quicmesh.errors import DatagramTooLargeError, PeerNotConnectedError, ProtocolError
from quicmesh.protocol import wire
from quicmesh.runtime.connection import Connection
from quicmesh.runtime.context import Context
from quicmesh.runtime.events import Received
from quicmesh.runtime.inbox import Inbox
from quicmesh.runtime.peer import Peer

#: Bytes a QUIC short-header packet spends around one DATAGRAM frame (flags, 8-byte CID, packet number,
#: AEAD tag, frame type and length) plus quicmesh's 1-byte datagram kind. Measured: 1169 at 1200.
DATAGRAM_PACKET_OVERHEAD = 30 + wire.DATAGRAM_OVERHEAD
#: Bytes of DATAGRAM frames (a BATCH counts once, at the packet size) handed to aioquic at once, as 32
#: frames of 1200-byte packets; the rest wait in the per-peer queue. In frames, so larger packets (path MTU
#: discovery) do not let more datagram bytes jump ahead of stream data: 2 frames of 16 KiB.
_DATAGRAM_BURST_BYTES = 32 * 1200
_APP = int(wire.DatagramKind.APP)
_BATCH = int(wire.DatagramKind.BATCH)

#: A feature's handler for the datagram kinds it registered: (peer, the whole datagram, kind byte first).
DatagramHandler = Callable[[str, bytes], None]


class DatagramChannel:
    def __init__(self, ctx: Context, inbox: Inbox) -> None:
        self._ctx = ctx
        self._inbox = inbox
        #: datagram kind -> the feature handler that owns it
        self.handlers: dict[int, DatagramHandler] = {}

    @property
    def max_payload(self) -> int:
        """The largest application payload this node sends or takes (peers may advertise a smaller one)."""
        return self._ctx.config.limits.max_datagram_size - DATAGRAM_PACKET_OVERHEAD

    def limit(self, connection: Connection) -> int:
        """The largest payload that goes on ``connection`` now: the smaller of what its packets carry (path
        MTU discovery raises their size after the handshake) and what the peer's Hello accepts."""
        own = connection.quic.packet_size - DATAGRAM_PACKET_OVERHEAD
        hello = connection.hello
        return min(own, hello.max_datagram_payload) if hello is not None else own

    def peer_limit(self, peer: Peer | None) -> int:
        """The largest payload that goes to ``peer`` now (see :meth:`limit`); this node's base one while it
        has no connection (or is unknown)."""
        connection = peer.connection if peer is not None else None
        return self.limit(connection) if connection is not None else self.max_payload

    @staticmethod
    def accepted_payload(connection: Connection) -> int:
        """The largest payload this node takes on ``connection`` (its Hello says so): what the largest packet
        it receives carries, since the peer's packets may grow after the handshake."""
        return connection.quic.max_packet_size - DATAGRAM_PACKET_OVERHEAD

    # --- send ---------------------------------------------------------------------------------
    def send(self, peer: str, data: bytes) -> None:
        """Queue an application datagram (dropped and counted if the peer's queue is full)."""
        # The hot path of a datagram flood: few calls, no helper per check (measured with quicmesh bench).
        ctx = self._ctx
        target = ctx.peers.get(peer) or ctx.peer_or_raise(peer)
        connection = target.connection
        if connection is None or not connection.usable:
            raise PeerNotConnectedError(f"peer {peer} is not connected")
        size = len(data)
        limit = connection.quic.packet_size - DATAGRAM_PACKET_OVERHEAD
        hello = connection.hello
        if hello is not None and hello.max_datagram_payload < limit:
            limit = hello.max_datagram_payload
        if size > limit:
            raise DatagramTooLargeError(f"datagram of {size} bytes exceeds max_datagram_payload ({limit} bytes)")
        queue = target.datagram_queue
        if len(queue) >= ctx.config.limits.datagram_queue:
            target.counters.datagrams_dropped_queue_full += 1
            return
        queue.append(wire.app_batch_entry(data))  # to QUIC at the flush, packed with its neighbours
        target.counters.bytes_out += size
        if len(queue) == 1:  # the flush takes the whole queue
            ctx.touch(connection)

    def send_frame(self, peer: str, datagram: bytes, payload_size: int) -> str | None:
        """Queue a feature's whole datagram (kind byte first): None if queued, else why it was dropped
        (``"not connected"``, ``"queue full"``). The caller keeps it within :meth:`limit`."""
        target = self._ctx.peers.get(peer)
        connection = target.usable_connection if target is not None else None
        if target is None or connection is None:
            return "not connected"
        queue = target.datagram_queue
        if len(queue) >= self._ctx.config.limits.datagram_queue:
            target.counters.datagrams_dropped_queue_full += 1
            return "queue full"
        queue.append(wire.batch_entry(datagram))
        target.counters.bytes_out += payload_size
        if len(queue) == 1:  # one touch while the queue waits: touches count towards an early flush (endpoint)
            self._ctx.touch(connection)
        return None

    def backlog(self, peer: str) -> int:
        """Datagrams for ``peer`` not yet on the wire (local queue + QUIC's)."""
        target = self._ctx.peer_or_raise(peer)
        connection = target.connection
        queued = len(target.datagram_queue)
        if connection is not None and not connection.link.terminated:
            queued += connection.quic.pending_datagrams()
        return queued

    def flush(self, peer: Peer, connection: Connection) -> None:
        """Queued datagrams into QUIC DATAGRAM frames: neighbours packed into BATCH frames when the peer
        accepts them (per-frame work is most of a small datagram's cost on both ends), a lone one as is."""
        quic = connection.quic
        queue = peer.datagram_queue
        budget = wire.DATAGRAM_OVERHEAD + self.limit(connection)  # the largest frame the peer takes
        batching = connection.batching
        burst = max(2, _DATAGRAM_BURST_BYTES // quic.packet_size)
        moved = 0
        while queue and quic.pending_datagrams() < burst:
            entry = queue.popleft()
            used = 1 + len(entry)  # the BATCH kind byte, then the entry
            if len(entry) - (1 << (entry[0] >> 6)) > budget:  # queued before packets shrank back (pmtud)
                peer.counters.datagrams_dropped_queue_full += 1
                continue
            if not batching or not queue or used + len(queue[0]) > budget:
                quic.send_datagram_frame(wire.unbatch_entry(entry))
                moved += 1
                continue
            batch = [entry]
            while queue and used + len(queue[0]) <= budget:
                entry = queue.popleft()
                used += len(entry)
                batch.append(entry)
            quic.send_datagram_frame(wire.encode_datagram_batch(batch))
            moved += len(batch)
        peer.counters.datagrams_out += moved
        if moved and queue:
            self._ctx.touch(connection)  # QUIC's own queue is full: the rest once it has sent (or an ACK comes)

    def drop_queued(self, peer: Peer) -> None:
        """The connection was lost: what is still queued will never be sent."""
        peer.counters.datagrams_dropped_disconnected += len(peer.datagram_queue)
        peer.datagram_queue.clear()

    # --- receive ------------------------------------------------------------------------------
    def received(self, connection: Connection, data: bytes) -> None:
        name = connection.peer
        if not connection.usable or name is None:
            return  # nothing is accepted before the peer's Hello
        if not data:
            raise ProtocolError("empty datagram", code=wire.ErrorCode.PROTOCOL_VIOLATION)
        datagrams = wire.decode_datagram_batch(data) if data[0] == _BATCH else (data,)
        # The hot path of a datagram flood: locals, no helper per datagram (measured with quicmesh bench).
        inbox = self._inbox
        deliver_now = inbox.handler is not None  # else to the inbox, if it has room
        counters = self._ctx.peers[name].counters
        count = nbytes = 0
        for datagram in datagrams:
            if datagram[0] != _APP:
                self._to_feature(name, datagram)
                continue
            payload = datagram[1:]
            count += 1
            nbytes += len(payload)
            if deliver_now or not inbox.full():
                inbox.deliver(Received(name, "datagram", payload))
            else:
                inbox.dropped += 1
                counters.datagrams_dropped_inbox_full += 1
        counters.datagrams_in += count
        counters.bytes_in += nbytes

    def _to_feature(self, peer: str, datagram: bytes) -> None:
        handler = self.handlers.get(datagram[0])
        if handler is not None:
            handler(peer, datagram)  # the feature decodes its own kinds (a malformed one: ProtocolError)
        else:
            wire.decode_datagram(datagram)  # checked even when unwanted: an unknown kind is a ProtocolError
