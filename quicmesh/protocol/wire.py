"""The quicmesh wire format: encoders and incremental decoders. docs/PROTOCOL.md is the spec.

Pure: no I/O, no aioquic. Decoders take whatever chunks QUIC delivers and raise only
:class:`~quicmesh.errors.ProtocolError` (carrying the :class:`ErrorCode` to close or reset with) on bad
input, so a hostile peer can never crash a node. Encoders take values this node produced; an out-of-range
value there is a local bug and raises ``ValueError``.

Stream rule: every stream starts with a varint :class:`StreamType`. The receiver buffers a new stream's
first bytes until :func:`read_stream_type` returns ``(type, consumed)``, then feeds the REST (from
``consumed`` on) to the decoder for that type. Decoders never see the stream type; encoders of a whole
stream (:func:`encode_message`, :func:`encode_request`) include it. A response has no type prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Union

from quicmesh.errors import ProtocolError

ALPN = "quicmesh/1"
PROTOCOL_VERSION = 1
DATAGRAM_OVERHEAD = 1  # the kind byte in front of an application datagram payload

MAX_VARINT = 2**62 - 1
MAX_CONTROL_FRAME_PAYLOAD = 64 * 1024  # bounds what a peer can make us buffer on the control stream
MAX_REASON_BYTES = 1024  # reasons are for humans; encoders truncate longer ones (at a character boundary)
MAX_ACK_IDS = 4096  # an Ack of this many ids always fits one control frame (4096 * 8 B < 64 KiB)
#: Forwarded UDP services: ids and flow ids stay below 2**14, so each takes at most 2 varint bytes and the
#: FORWARD header after the kind byte is at most 4 bytes: the effective UDP MTU is max_datagram_payload - 4.
MAX_SERVICE_ID = 0x3FFF
MAX_FLOW_ID = 0x3FFF
FORWARD_HEADER_MAX = 4
MAX_SERVICE_NAME_BYTES = 63  # a service name is a DNS label
MAX_SERVICES = 512  # entries in one Services frame (always under the frame limit: 512 * 66 B < 64 KiB)


class ErrorCode(IntEnum):
    """QUIC application error codes (CONNECTION_CLOSE, stream resets) and codes in Reject/GoAway."""

    NO_ERROR = 0
    PROTOCOL_VIOLATION = 1
    MESSAGE_TOO_LARGE = 2
    INTERNAL = 3
    SHUTDOWN = 4
    DUPLICATE_CONNECTION = 5
    IDENTITY_REJECTED = 6
    PEER_UNRESPONSIVE = 7
    NOT_CONFIGURED = 8
    VERSION_MISMATCH = 9
    RESOURCE_LIMIT = 10
    RELOAD = 11


class DatagramKind(IntEnum):
    """First byte of every QUIC DATAGRAM payload."""

    APP = 0x00
    FORWARD = 0x01  # forwarding node -> exposing node: to service ``service_id`` (the exposing node's id)
    FORWARD_REPLY = 0x02  # exposing node -> forwarding node: the service's reply on flow ``flow_id``
    BATCH = 0x03  # several of the above in one QUIC DATAGRAM frame, each behind its length


class Feature(IntFlag):
    """Bits of ``Hello.features``: what the sender of the Hello accepts beyond the base protocol."""

    DATAGRAM_BATCH = 0x1  # BATCH datagrams


#: What this implementation accepts (sent in its Hello); unknown bits from a peer are ignored.
FEATURES = Feature.DATAGRAM_BATCH


class StreamType(IntEnum):
    """Leading varint of every stream."""

    CONTROL = 0x00  # unidirectional, one per direction, opened first
    MESSAGE = 0x01  # unidirectional, one per reliable message
    REQUEST = 0x02  # bidirectional, one per request; the response comes back on it


class ResponseStatus(IntEnum):
    OK = 0
    HANDLER_ERROR = 1  # body: UTF-8 reason
    NO_HANDLER = 2
    TOO_LARGE = 3
    OVERLOADED = 4


class FrameType(IntEnum):
    HELLO = 0x01
    ACK = 0x02
    REJECT = 0x03
    GOAWAY = 0x04
    SERVICES = 0x05


# --- varints (RFC 9000 §16) -------------------------------------------------------------------
_ONE_BYTE = [bytes((i,)) for i in range(0x40)]
_VARINT_MASK = {2: 0x3FFF, 4: 0x3FFF_FFFF, 8: MAX_VARINT}


def encode_varint(value: int) -> bytes:
    """Shortest encoding of ``value`` (0 .. 2**62-1)."""
    if 0 <= value < 0x40:
        return _ONE_BYTE[value]
    if 0x40 <= value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if 0x4000 <= value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if 0x4000_0000 <= value <= MAX_VARINT:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"varint out of range: {value!r}")


def decode_varint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """``(value, position after it)``, or None if ``buf`` ends inside the varint.

    Non-shortest encodings are accepted, as RFC 9000 allows.
    """
    if pos >= len(buf):
        return None
    first = buf[pos]
    size = 1 << (first >> 6)
    end = pos + size
    if end > len(buf):
        return None
    if size == 1:
        return first, end
    return int.from_bytes(buf[pos:end], "big") & _VARINT_MASK[size], end


class _Reader:
    """Parses one complete payload; running out of bytes is a ProtocolError naming ``what``."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.what = what

    def varint(self) -> int:
        parsed = decode_varint(self.buf, self.pos)
        if parsed is None:
            raise ProtocolError(f"truncated {self.what}", code=ErrorCode.PROTOCOL_VIOLATION)
        value, self.pos = parsed
        return value

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def rest(self) -> bytes:
        data = self.buf[self.pos :]
        self.pos = len(self.buf)
        return data

    def text(self) -> str:
        # Reasons are diagnostics: a peer's bad UTF-8 is not worth a connection.
        return self.rest().decode("utf-8", "replace")

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(
                f"{len(self.buf) - self.pos} trailing bytes in {self.what}", code=ErrorCode.PROTOCOL_VIOLATION
            )


# --- datagrams --------------------------------------------------------------------------------
_APP_PREFIX = bytes((DatagramKind.APP,))
_FORWARD_PREFIX = bytes((DatagramKind.FORWARD,))
_FORWARD_REPLY_PREFIX = bytes((DatagramKind.FORWARD_REPLY,))


def encode_app_datagram(payload: bytes) -> bytes:
    return _APP_PREFIX + payload


def encode_forward_datagram(service_id: int, flow_id: int, payload: bytes) -> bytes:
    """A datagram of forwarded UDP service ``service_id``; ``flow_id`` names the client's UDP flow."""
    return b"".join((_FORWARD_PREFIX, encode_varint(service_id), encode_varint(flow_id), payload))


def encode_forward_reply_datagram(service_id: int, flow_id: int, payload: bytes) -> bytes:
    """The exposing node's reply on flow ``flow_id`` of its service ``service_id``, back to the forwarder."""
    return b"".join((_FORWARD_REPLY_PREFIX, encode_varint(service_id), encode_varint(flow_id), payload))


def decode_datagram(data: bytes) -> tuple[int, bytes] | tuple[int, int, int, bytes]:
    """``(DatagramKind.APP, payload)`` or ``(DatagramKind.FORWARD | FORWARD_REPLY, service_id, flow_id, payload)``."""
    if not data:
        raise ProtocolError("empty datagram", code=ErrorCode.PROTOCOL_VIOLATION)
    kind = data[0]
    if kind == DatagramKind.APP:
        return DatagramKind.APP, bytes(data[1:])
    if kind == DatagramKind.FORWARD or kind == DatagramKind.FORWARD_REPLY:
        reader = _Reader(data, "forward datagram header", 1)
        service_id = reader.varint()
        flow_id = reader.varint()
        return DatagramKind(kind), service_id, flow_id, bytes(reader.rest())
    raise ProtocolError(f"unknown datagram kind 0x{kind:02x}", code=ErrorCode.PROTOCOL_VIOLATION)


_BATCH_PREFIX = bytes((DatagramKind.BATCH,))
_BATCH_KIND = int(DatagramKind.BATCH)


_APP_ENTRY_HEADERS: dict[int, bytes] = {}  # payload size -> length + kind byte (sizes are bounded by the limits)


def batch_entry(datagram: bytes) -> bytes:
    """``datagram`` (a complete APP/FORWARD/FORWARD_REPLY datagram) as it sits inside a BATCH: length, then it."""
    return encode_varint(len(datagram)) + datagram


def app_batch_entry(payload: bytes) -> bytes:
    """``batch_entry(encode_app_datagram(payload))`` in one concatenation: the send hot path queues these."""
    size = len(payload)
    header = _APP_ENTRY_HEADERS.get(size)
    if header is None:
        header = _APP_ENTRY_HEADERS[size] = encode_varint(size + 1) + _APP_PREFIX
    return header + payload


def unbatch_entry(entry: bytes) -> bytes:
    """The datagram inside a batch entry (to send it on its own)."""
    return entry[1 << (entry[0] >> 6) :]


def encode_datagram_batch(entries: list[bytes]) -> bytes:
    """One BATCH datagram of ``entries`` (from batch_entry / app_batch_entry).

    Datagrams in one QUIC packet are lost together anyway; one frame for all of them saves the per-frame
    work on both ends (the sender packs while it flushes; see quicmesh.runtime.node).
    """
    return _BATCH_PREFIX + b"".join(entries)


def decode_datagram_batch(data: bytes) -> list[bytes]:
    """The datagrams inside a BATCH datagram; each is non-empty and not itself a BATCH."""
    if data[:1] != _BATCH_PREFIX:
        raise ProtocolError("not a batch datagram", code=ErrorCode.PROTOCOL_VIOLATION)
    datagrams: list[bytes] = []
    append = datagrams.append
    pos = 1
    end = len(data)
    while pos < end:  # the receive hot path of a datagram flood: plain ints, no helper per entry
        size = data[pos]
        if size < 0x40:  # the common one- and two-byte lengths, inline
            pos += 1
        elif size < 0x80 and pos + 1 < end:
            size = (size & 0x3F) << 8 | data[pos + 1]
            pos += 2
        else:
            parsed = decode_varint(data, pos)
            if parsed is None:
                raise ProtocolError("truncated batch datagram", code=ErrorCode.PROTOCOL_VIOLATION)
            size, pos = parsed
        stop = pos + size
        if size == 0 or stop > end:
            raise ProtocolError(f"bad batch entry of {size} bytes", code=ErrorCode.PROTOCOL_VIOLATION)
        if data[pos] == _BATCH_KIND:
            raise ProtocolError("batch datagram inside a batch", code=ErrorCode.PROTOCOL_VIOLATION)
        append(data[pos:stop])
        pos = stop
    if not datagrams:
        raise ProtocolError("empty batch datagram", code=ErrorCode.PROTOCOL_VIOLATION)
    return datagrams


# --- stream type ------------------------------------------------------------------------------
_BIDIRECTIONAL = frozenset({StreamType.REQUEST})
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


# --- control stream frames --------------------------------------------------------------------
def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_REASON_BYTES:
        raw = raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return raw


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame on each control stream: who I am (this process) and what I accept."""

    version: int
    epoch: int  # random per node process: a new epoch means the peer restarted
    max_message_size: int  # largest message/request/response body I accept
    max_datagram_payload: int  # largest APP datagram payload I accept (kind byte excluded)
    features: int = 0  # Feature bits: what I accept beyond the base protocol

    frame_type: ClassVar[FrameType] = FrameType.HELLO

    def _payload(self) -> bytes:
        fields = (self.version, self.epoch, self.max_message_size, self.max_datagram_payload, self.features)
        return b"".join(map(encode_varint, fields))

    @classmethod
    def _parse(cls, reader: _Reader) -> Hello:
        version, epoch, max_message_size, max_datagram_payload = (reader.varint() for _ in range(4))
        features = reader.varint() if reader.remaining() else 0  # absent: a Hello from before features
        reader.rest()  # fields of later versions: ignored, like unknown feature bits
        return cls(version, epoch, max_message_size, max_datagram_payload, features)


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver accepted these messages (delivered, or already delivered before).

    ``message_ids`` is normalized to sorted unique ids, which the encoding relies on.
    """

    message_ids: tuple[int, ...]

    frame_type: ClassVar[FrameType] = FrameType.ACK

    def __post_init__(self) -> None:
        object.__setattr__(self, "message_ids", tuple(sorted(set(self.message_ids))))

    def _payload(self) -> bytes:
        # count, then each id as its gap to the previous id minus one (the first id as itself).
        parts = [encode_varint(len(self.message_ids))]
        previous = -1
        for message_id in self.message_ids:
            parts.append(encode_varint(message_id - previous - 1))
            previous = message_id
        return b"".join(parts)

    @classmethod
    def _parse(cls, reader: _Reader) -> Ack:
        count = reader.varint()
        if count > reader.remaining():  # every id takes at least one byte
            raise ProtocolError(
                f"Ack claims {count} ids in {reader.remaining()} bytes", code=ErrorCode.PROTOCOL_VIOLATION
            )
        ids = []
        previous = -1
        for _ in range(count):
            previous += reader.varint() + 1
            ids.append(previous)
        if ids and ids[-1] > MAX_VARINT:
            raise ProtocolError("Ack message id out of range", code=ErrorCode.PROTOCOL_VIOLATION)
        return cls(tuple(ids))


@dataclass(frozen=True, slots=True)
class Reject:
    """The receiver refused this message for good (e.g. MESSAGE_TOO_LARGE): the sender must not resend."""

    message_id: int
    code: int
    reason: str

    frame_type: ClassVar[FrameType] = FrameType.REJECT

    def _payload(self) -> bytes:
        return b"".join((encode_varint(self.message_id), encode_varint(self.code), _reason_bytes(self.reason)))

    @classmethod
    def _parse(cls, reader: _Reader) -> Reject:
        return cls(reader.varint(), reader.varint(), reader.text())


@dataclass(frozen=True, slots=True)
class GoAway:
    """The sender is closing this connection on purpose (shutdown, reload); sent before CONNECTION_CLOSE."""

    code: int
    reason: str

    frame_type: ClassVar[FrameType] = FrameType.GOAWAY

    def _payload(self) -> bytes:
        return encode_varint(self.code) + _reason_bytes(self.reason)

    @classmethod
    def _parse(cls, reader: _Reader) -> GoAway:
        return cls(reader.varint(), reader.text())


@dataclass(frozen=True, slots=True)
class Services:
    """The UDP services the sender exposes TO THIS PEER, as ``(service_id, name)`` pairs.

    Sent after Hello and again whenever the list changes; each one replaces the previous list whole.
    Ids are unique and at most MAX_SERVICE_ID, names unique DNS-label-sized UTF-8 (1..63 bytes).
    ``entries`` is normalized to ascending ids.
    """

    entries: tuple[tuple[int, str], ...]

    frame_type: ClassVar[FrameType] = FrameType.SERVICES

    def __post_init__(self) -> None:
        entries = tuple(sorted((int(i), str(n)) for i, n in self.entries))
        object.__setattr__(self, "entries", entries)

    def _payload(self) -> bytes:
        if len(self.entries) > MAX_SERVICES:
            raise ValueError(f"{len(self.entries)} services exceed {MAX_SERVICES}")
        parts = [encode_varint(len(self.entries))]
        for service_id, name in self.entries:
            raw = name.encode("utf-8")
            if not 0 <= service_id <= MAX_SERVICE_ID or not 0 < len(raw) <= MAX_SERVICE_NAME_BYTES:
                raise ValueError(f"bad service entry {(service_id, name)!r}")
            parts += [encode_varint(service_id), encode_varint(len(raw)), raw]
        return b"".join(parts)

    @classmethod
    def _parse(cls, reader: _Reader) -> Services:
        count = reader.varint()
        if count > MAX_SERVICES or count * 3 > reader.remaining():  # every entry takes at least 3 bytes
            raise ProtocolError(f"Services claims {count} entries", code=ErrorCode.PROTOCOL_VIOLATION)
        entries: list[tuple[int, str]] = []
        ids: set[int] = set()
        names: set[str] = set()
        for _ in range(count):
            service_id = reader.varint()
            length = reader.varint()
            if service_id > MAX_SERVICE_ID or not 0 < length <= MAX_SERVICE_NAME_BYTES:
                raise ProtocolError("bad Services entry", code=ErrorCode.PROTOCOL_VIOLATION)
            if length > reader.remaining():
                raise ProtocolError("truncated Services", code=ErrorCode.PROTOCOL_VIOLATION)
            raw = reader.buf[reader.pos : reader.pos + length]
            reader.pos += length
            try:
                name = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("Services name is not UTF-8", code=ErrorCode.PROTOCOL_VIOLATION) from None
            if service_id in ids or name in names:
                raise ProtocolError("duplicate Services entry", code=ErrorCode.PROTOCOL_VIOLATION)
            ids.add(service_id)
            names.add(name)
            entries.append((service_id, name))
        return cls(tuple(entries))


Frame = Union[Hello, Ack, Reject, GoAway, Services]
_FRAME_CLASSES: dict[int, type[Hello] | type[Ack] | type[Reject] | type[GoAway] | type[Services]] = {
    cls.frame_type: cls for cls in (Hello, Ack, Reject, GoAway, Services)
}


def encode_frame(frame: Frame) -> bytes:
    """One control frame: frame_type, payload_length, payload.

    The control stream itself starts with ``encode_stream_type(StreamType.CONTROL)`` then the Hello.
    """
    payload = frame._payload()
    if len(payload) > MAX_CONTROL_FRAME_PAYLOAD:
        raise ValueError(f"{type(frame).__name__} payload of {len(payload)} bytes exceeds {MAX_CONTROL_FRAME_PAYLOAD}")
    return b"".join((encode_varint(frame.frame_type), encode_varint(len(payload)), payload))


class ControlDecoder:
    """Decodes a peer's control stream after its stream type.

    Enforces that Hello comes first and only once (``.hello`` holds it); skips frame types it does not
    know, so later versions can add frames. After a ProtocolError the stream is unusable.
    """

    __slots__ = ("max_payload", "hello", "_buf")

    def __init__(self, max_payload: int = MAX_CONTROL_FRAME_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.hello: Hello | None = None
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame completed by ``data``, in order."""
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        while True:
            parsed = decode_varint(buf, pos)
            if parsed is None:
                break
            frame_type, start = parsed
            if self.hello is None and frame_type != FrameType.HELLO:
                raise ProtocolError(f"control frame 0x{frame_type:x} before Hello", code=ErrorCode.PROTOCOL_VIOLATION)
            parsed = decode_varint(buf, start)
            if parsed is None:
                break
            length, start = parsed
            if length > self.max_payload:
                raise ProtocolError(
                    f"control frame 0x{frame_type:x} of {length} bytes exceeds {self.max_payload}",
                    code=ErrorCode.PROTOCOL_VIOLATION,
                )
            end = start + length
            if end > len(buf):
                break
            pos = end
            cls = _FRAME_CLASSES.get(frame_type)
            if cls is None:
                continue
            reader = _Reader(bytes(buf[start:end]), cls.__name__)
            frame = cls._parse(reader)
            reader.end()
            if isinstance(frame, Hello):
                if self.hello is not None:
                    raise ProtocolError("second Hello on the control stream", code=ErrorCode.PROTOCOL_VIOLATION)
                self.hello = frame
            frames.append(frame)
        del buf[:pos]
        return frames


__all__ = [
    "ALPN",
    "PROTOCOL_VERSION",
    "DATAGRAM_OVERHEAD",
    "MAX_VARINT",
    "MAX_CONTROL_FRAME_PAYLOAD",
    "MAX_REASON_BYTES",
    "MAX_ACK_IDS",
    "ErrorCode",
    "DatagramKind",
    "FEATURES",
    "Feature",
    "StreamType",
    "ResponseStatus",
    "FrameType",
    "encode_varint",
    "decode_varint",
    "encode_app_datagram",
    "encode_forward_datagram",
    "encode_forward_reply_datagram",
    "app_batch_entry",
    "batch_entry",
    "unbatch_entry",
    "decode_datagram",
    "decode_datagram_batch",
    "encode_datagram_batch",
    "encode_stream_type",
    "read_stream_type",
    "encode_message",
    "encode_request",
    "encode_response",
    "MessageDecoder",
    "RequestDecoder",
    "ResponseDecoder",
    "Hello",
    "Ack",
    "Reject",
    "GoAway",
    "Services",
    "MAX_SERVICE_ID",
    "MAX_FLOW_ID",
    "FORWARD_HEADER_MAX",
    "MAX_SERVICE_NAME_BYTES",
    "MAX_SERVICES",
    "Frame",
    "encode_frame",
    "ControlDecoder",
]
