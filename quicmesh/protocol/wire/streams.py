"""Streams: the stream type prefix, and the MESSAGE, REQUEST and response encoders and body decoders."""

from __future__ import annotations

from typing import ClassVar

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire.common import ErrorCode, ResponseStatus, StreamType, decode_varint, encode_varint

# --- stream type ------------------------------------------------------------------------------
_BIDIRECTIONAL = frozenset({StreamType.REQUEST, StreamType.FEATURE_REQUEST})
_STREAM_PREFIX = {t: encode_varint(t) for t in StreamType}


def encode_stream_type(stream_type: StreamType) -> bytes:
    return _STREAM_PREFIX[StreamType(stream_type)]


def read_stream_type(
    buf: bytes | bytearray | memoryview, *, bidirectional: bool | None = None
) -> tuple[StreamType, int] | None:
    """``(stream type, bytes consumed)`` from the start of a peer-opened stream, None if incomplete.

    Pass ``bidirectional`` (what QUIC says the stream is) to also reject a type on the wrong kind of
    stream, e.g. a MESSAGE on a bidirectional stream.
    """
    parsed = decode_varint(buf)
    if parsed is None:
        return None
    value, consumed = parsed
    try:
        stream_type = StreamType(value)
    except ValueError:
        raise ProtocolError(f"unknown stream type 0x{value:x}", code=ErrorCode.PROTOCOL_VIOLATION) from None
    if bidirectional is not None and bidirectional != (stream_type in _BIDIRECTIONAL):
        direction = "bidirectional" if bidirectional else "unidirectional"
        raise ProtocolError(f"{stream_type.name} stream opened as {direction}", code=ErrorCode.PROTOCOL_VIOLATION)
    return stream_type, consumed


# --- message, request and response streams ----------------------------------------------------
def encode_message(message_id: int, body: bytes) -> bytes:
    """A whole MESSAGE stream (the sender then ends it with FIN)."""
    return b"".join((_STREAM_PREFIX[StreamType.MESSAGE], encode_varint(message_id), encode_varint(len(body)), body))


def encode_feature_message(tag: int, message_id: int, body: bytes) -> bytes:
    """A whole FEATURE_MESSAGE stream: a reliable message for the feature ``tag`` (then FIN)."""
    return b"".join((_STREAM_PREFIX[StreamType.FEATURE_MESSAGE], encode_varint(tag), encode_varint(message_id),
                     encode_varint(len(body)), body))


def encode_feature_request(tag: int, body: bytes) -> bytes:
    """The request direction of a whole FEATURE_REQUEST stream (then FIN); the response is as for REQUEST."""
    return b"".join((_STREAM_PREFIX[StreamType.FEATURE_REQUEST], encode_varint(tag), encode_varint(len(body)), body))


def encode_request(body: bytes) -> bytes:
    """The request direction of a whole REQUEST stream (then FIN)."""
    return b"".join((_STREAM_PREFIX[StreamType.REQUEST], encode_varint(len(body)), body))


def encode_response(status: ResponseStatus, body: bytes) -> bytes:
    """The response direction of a REQUEST stream (no stream type; then FIN)."""
    return b"".join((encode_varint(ResponseStatus(status)), encode_varint(len(body)), body))


class _BodyDecoder:
    """Shared engine: ``_FIELDS`` header varints (the last one is the body length), body, FIN.

    Body chunks are kept as given and joined once at FIN; a stream that arrives in one chunk costs a
    single slice.
    """

    _FIELDS: ClassVar[int]
    _WHAT: ClassVar[str]
    __slots__ = ("max_body", "_head", "_header", "_length", "_chunks", "_received", "_done")

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._head = b""  # bytes of a header that is still incomplete
        self._header: tuple[int, ...] | None = None
        self._length = 0
        self._chunks: list[bytes] = []
        self._received = 0
        self._done = False

    def _check_header(self, fields: tuple[int, ...]) -> None:
        """Validate header fields other than the length (a hook for ResponseDecoder)."""

    def _feed(self, data: bytes, end_stream: bool) -> tuple[tuple[int, ...], bytes] | None:
        if self._done:
            if data:
                raise ProtocolError(f"data after the end of the {self._WHAT}", code=ErrorCode.PROTOCOL_VIOLATION)
            return None
        if self._header is None:
            data = self._parse_header(data)
            if self._header is None:
                if end_stream:
                    raise ProtocolError(f"{self._WHAT} ended inside its header", code=ErrorCode.PROTOCOL_VIOLATION)
                return None
        if data:
            self._received += len(data)
            if self._received > self._length:
                raise ProtocolError(
                    f"{self._received - self._length} bytes after the {self._length}-byte {self._WHAT} body",
                    code=ErrorCode.PROTOCOL_VIOLATION,
                )
            self._chunks.append(bytes(data))
        if not end_stream:
            return None
        if self._received < self._length:
            raise ProtocolError(
                f"{self._WHAT} ended after {self._received} of {self._length} body bytes",
                code=ErrorCode.PROTOCOL_VIOLATION,
            )
        self._done = True
        chunks, self._chunks = self._chunks, []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._header, body

    def _parse_header(self, data: bytes) -> bytes:
        """Parse the header if ``data`` completes it; return the body bytes that follow it."""
        held = len(self._head)
        # A header is at most 8 bytes per field, so only that much of a big chunk is ever copied.
        src = self._head + bytes(data[: 8 * self._FIELDS]) if held else data
        fields = []
        pos = 0
        for _ in range(self._FIELDS):
            parsed = decode_varint(src, pos)
            if parsed is None:
                self._head += bytes(data)  # all of it is header: small, see above
                return b""
            value, pos = parsed
            fields.append(value)
        header = tuple(fields)
        self._check_header(header)
        self._head = b""
        self._header = header  # before the length check: a refused message still has its id
        self._length = header[-1]
        if self._length > self.max_body:
            raise ProtocolError(
                f"{self._WHAT} body of {self._length} bytes exceeds the limit of {self.max_body}",
                code=ErrorCode.MESSAGE_TOO_LARGE,
            )
        return data[pos - held :]


class MessageDecoder(_BodyDecoder):
    """Decodes a MESSAGE stream after its stream type: message_id, body_length, body, FIN."""

    _FIELDS = 2
    _WHAT = "message"
    __slots__ = ()

    @property
    def message_id(self) -> int | None:
        """Known as soon as the header is parsed, so even a refused message can be rejected by id."""
        return None if self._header is None else self._header[0]

    def feed(self, data: bytes, end_stream: bool) -> tuple[int, bytes] | None:
        """``(message_id, body)`` once the whole body and FIN have arrived, else None."""
        done = self._feed(data, end_stream)
        return None if done is None else (done[0][0], done[1])


class FeatureMessageDecoder(_BodyDecoder):
    """Decodes a FEATURE_MESSAGE stream after its stream type: tag, message_id, body_length, body, FIN."""

    _FIELDS = 3
    _WHAT = "message"
    __slots__ = ()

    def _check_header(self, fields: tuple[int, ...]) -> None:
        if fields[0] == 0:
            raise ProtocolError("feature message with tag 0", code=ErrorCode.PROTOCOL_VIOLATION)

    @property
    def message_id(self) -> int | None:
        return None if self._header is None else self._header[1]

    def feed(self, data: bytes, end_stream: bool) -> tuple[int, int, bytes] | None:
        """``(tag, message_id, body)`` once the whole body and FIN have arrived, else None."""
        done = self._feed(data, end_stream)
        return None if done is None else (done[0][0], done[0][1], done[1])


class FeatureRequestDecoder(_BodyDecoder):
    """Decodes the request direction of a FEATURE_REQUEST stream after its type: tag, body_length, body, FIN."""

    _FIELDS = 2
    _WHAT = "request"
    __slots__ = ()

    def _check_header(self, fields: tuple[int, ...]) -> None:
        if fields[0] == 0:
            raise ProtocolError("feature request with tag 0", code=ErrorCode.PROTOCOL_VIOLATION)

    def feed(self, data: bytes, end_stream: bool) -> tuple[int, bytes] | None:
        """``(tag, body)`` once it and FIN have arrived, else None."""
        done = self._feed(data, end_stream)
        return None if done is None else (done[0][0], done[1])


class RequestDecoder(_BodyDecoder):
    """Decodes the request direction of a REQUEST stream after its stream type: body_length, body, FIN."""

    _FIELDS = 1
    _WHAT = "request"
    __slots__ = ()

    def feed(self, data: bytes, end_stream: bool) -> bytes | None:
        """The request body once it and FIN have arrived, else None."""
        done = self._feed(data, end_stream)
        return None if done is None else done[1]


class ResponseDecoder(_BodyDecoder):
    """Decodes the response direction of a REQUEST stream: status, body_length, body, FIN."""

    _FIELDS = 2
    _WHAT = "response"
    __slots__ = ()

    def _check_header(self, fields: tuple[int, ...]) -> None:
        if fields[0] not in _RESPONSE_STATUSES:
            raise ProtocolError(f"unknown response status {fields[0]}", code=ErrorCode.PROTOCOL_VIOLATION)

    def feed(self, data: bytes, end_stream: bool) -> tuple[ResponseStatus, bytes] | None:
        """``(status, body)`` once the whole body and FIN have arrived, else None."""
        done = self._feed(data, end_stream)
        return None if done is None else (ResponseStatus(done[0][0]), done[1])


_RESPONSE_STATUSES = frozenset(ResponseStatus)
