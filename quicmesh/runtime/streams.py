"""Peer-opened streams: read each one's type, bound what a peer makes us buffer, and hand the whole
message or request to its channel.

Bounds (limits.max_peer_buffer, per connection): partly received and held messages over it close the
connection (RESOURCE_LIMIT: our own senders never get there, so the peer ignored its window); partly
received requests over it refuse that request (OVERLOADED). An oversized message or request refuses that
stream only (MESSAGE_TOO_LARGE), with the reason sent back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from quicmesh.errors import ProtocolError
from quicmesh.protocol import wire
from quicmesh.runtime.connection import Connection, InStream
from quicmesh.runtime.context import Context
from quicmesh.runtime.messages import MessageChannel
from quicmesh.runtime.requests import RequestChannel

log = logging.getLogger("quicmesh.node")

_MESSAGES = frozenset({wire.StreamType.MESSAGE, wire.StreamType.FEATURE_MESSAGE})

#: (connection, frames): the control frames decoded from a chunk of the control stream
ControlHandler = Callable[[Connection, list[Any]], None]
#: close a connection: (connection, code, reason, quiet)
CloseConnection = Callable[[Connection, int, str, bool], None]


class StreamReader:
    def __init__(self, ctx: Context, messages: MessageChannel, requests: RequestChannel,
                 control: ControlHandler, close: CloseConnection) -> None:
        self._ctx = ctx
        self._messages = messages
        self._requests = requests
        self._control = control
        self._close = close

    def data(self, connection: Connection, stream_id: int, data: bytes, end: bool) -> None:
        pending = connection.requests.get(stream_id)
        if pending is not None:
            self._requests.response_data(connection, stream_id, pending, data, end)
            return
        if connection.peer is None:
            raise ProtocolError("stream data before the peer was verified")
        stream = connection.streams.get(stream_id)
        if stream is None:
            if _locally_initiated(stream_id, connection.link.dialed):
                return  # late data on a request we gave up on
            stream = connection.streams[stream_id] = InStream()
        if stream.stream_type is None:
            head = stream.head + data
            parsed = wire.read_stream_type(head, bidirectional=not stream_id & 0x2)
            if parsed is None:
                stream.head = head
                if end:
                    raise ProtocolError("stream ended inside its type")
                return
            stream.stream_type, used = parsed
            stream.head = b""
            data = head[used:]
            stream.decoder = self._decoder_for(connection, stream.stream_type)
        kind = stream.stream_type
        if kind == wire.StreamType.CONTROL:
            self._control(connection, stream.decoder.feed(data))
            if end:
                raise ProtocolError("control stream closed by peer")
            return
        if stream.refused or connection.closing:
            if end:
                connection.streams.pop(stream_id, None)
            return
        if not self._within_buffer(connection, stream_id, stream, len(data)):
            return
        try:
            result = stream.decoder.feed(data, end)
        except ProtocolError as error:
            if error.code != wire.ErrorCode.MESSAGE_TOO_LARGE:
                raise
            self._refuse(connection, stream_id, stream, str(error))
            return
        if result is None:
            return
        self._unbuffer(connection, stream)
        del connection.streams[stream_id]
        if kind == wire.StreamType.MESSAGE:
            self._messages.stream_complete(connection, *result)
        elif kind == wire.StreamType.FEATURE_MESSAGE:
            tag, message_id, body = result
            self._messages.stream_complete(connection, message_id, body, tag)
        elif kind == wire.StreamType.FEATURE_REQUEST:
            tag, body = result
            self._requests.serve(connection, stream_id, body, tag)
        else:
            self._requests.serve(connection, stream_id, result)

    def reset(self, connection: Connection, stream_id: int) -> None:
        stream = connection.streams.pop(stream_id, None)
        if stream is not None:
            self._unbuffer(connection, stream)
        self._requests.stream_reset(connection, stream_id)

    def _within_buffer(self, connection: Connection, stream_id: int, stream: InStream, size: int) -> bool:
        limit = self._ctx.config.limits.max_peer_buffer
        stream.buffered += size
        if stream.stream_type in _MESSAGES:
            connection.message_bytes += size
            if connection.message_bytes > limit:
                # Our own senders never get here (they keep half of it unacknowledged): a peer that
                # does ignores its window, so it loses the connection, not just this message.
                self._ctx.peers[connection.peer or ""].counters.limit_closes += 1
                reason = f"peer made us buffer over {limit} bytes of messages (limits.max_peer_buffer)"
                log.warning("closing connection %s: %s", connection.peer, reason)
                self._close(connection, wire.ErrorCode.RESOURCE_LIMIT, reason, True)
                return False
        else:
            connection.request_bytes += size
            if connection.request_bytes > limit:
                reason = f"over {limit} bytes of requests in progress (limits.max_peer_buffer)"
                self._refuse(connection, stream_id, stream, reason, overloaded=True)
                return False
        return True

    @staticmethod
    def _unbuffer(connection: Connection, stream: InStream) -> None:
        """The stream's bytes no longer count against its peer's max_peer_buffer."""
        if stream.stream_type in _MESSAGES:
            connection.message_bytes -= stream.buffered
        else:
            connection.request_bytes -= stream.buffered
        stream.buffered = 0

    def _refuse(self, connection: Connection, stream_id: int, stream: InStream, reason: str, *,
                overloaded: bool = False) -> None:
        """An oversized message or request, or a request over the buffer: refuse that stream only, say why."""
        stream.refused = True
        self._unbuffer(connection, stream)
        code = wire.ErrorCode.RESOURCE_LIMIT if overloaded else wire.ErrorCode.MESSAGE_TOO_LARGE
        connection.quic.stop_stream(stream_id, code)
        if stream.stream_type in _MESSAGES:
            connection.send_control(wire.Reject(stream.decoder.message_id, code, reason))
        else:
            if overloaded:
                self._ctx.peers[connection.peer or ""].counters.requests_refused += 1
            status = wire.ResponseStatus.OVERLOADED if overloaded else wire.ResponseStatus.TOO_LARGE
            self._requests.respond(connection, stream_id, status, reason.encode())
        self._ctx.touch(connection)

    def _decoder_for(self, connection: Connection, stream_type: int) -> Any:
        if stream_type == wire.StreamType.CONTROL:
            if connection.control_seen:
                raise ProtocolError("a second control stream", code=wire.ErrorCode.PROTOCOL_VIOLATION)
            connection.control_seen = True
            return connection.control
        limit = self._ctx.config.limits.max_message_size
        if stream_type == wire.StreamType.MESSAGE:
            return wire.MessageDecoder(limit)
        if stream_type == wire.StreamType.FEATURE_MESSAGE:
            return wire.FeatureMessageDecoder(limit)
        if stream_type == wire.StreamType.FEATURE_REQUEST:
            return wire.FeatureRequestDecoder(limit)
        return wire.RequestDecoder(limit)


def _locally_initiated(stream_id: int, we_are_client: bool) -> bool:
    return (stream_id & 0x1) == (0 if we_are_client else 1)
