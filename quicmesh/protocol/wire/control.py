"""The control stream: Hello, Ack, Reject, GoAway, Services and Interest frames, their encoder and the decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire.common import (
    MAX_CONTROL_FRAME_PAYLOAD,
    MAX_QUEUE_GROUP_BYTES,
    MAX_REASON_BYTES,
    MAX_SERVICE_ID,
    MAX_SERVICE_NAME_BYTES,
    MAX_SERVICES,
    MAX_SUBJECT_BYTES,
    MAX_VARINT,
    ErrorCode,
    FrameType,
    InterestOp,
    _Reader,
    decode_varint,
    encode_varint,
)

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


@dataclass(frozen=True, slots=True)
class Interest:
    """Pub/sub interest (quicmesh/pubsub): the subject patterns the sender's subscribers want, as
    ``(pattern, queue_group)`` entries (group "" for plain subscribers). ``op`` is an InterestOp; ``seq``
    grows with every Interest frame of the sender's process, so the receiver can ignore a stale one.

    The decoder checks only sizes and UTF-8 (pattern 1..MAX_SUBJECT_BYTES, group 0..MAX_QUEUE_GROUP_BYTES):
    pattern syntax and permissions are the receiving feature's to refuse, entry by entry.
    """

    op: int
    seq: int
    entries: tuple[tuple[str, str], ...] = ()

    frame_type: ClassVar[FrameType] = FrameType.INTEREST

    def _payload(self) -> bytes:
        parts = [encode_varint(self.op), encode_varint(self.seq), encode_varint(len(self.entries))]
        for pattern, group in self.entries:
            raw_pattern, raw_group = pattern.encode("utf-8"), group.encode("utf-8")
            if not 0 < len(raw_pattern) <= MAX_SUBJECT_BYTES or len(raw_group) > MAX_QUEUE_GROUP_BYTES:
                raise ValueError(f"bad Interest entry {(pattern, group)!r}")
            parts += [encode_varint(len(raw_pattern)), raw_pattern, encode_varint(len(raw_group)), raw_group]
        return b"".join(parts)

    @classmethod
    def _parse(cls, reader: _Reader) -> Interest:
        op, seq, count = reader.varint(), reader.varint(), reader.varint()
        if op > max(InterestOp):
            raise ProtocolError(f"unknown Interest op {op}", code=ErrorCode.PROTOCOL_VIOLATION)
        if count * 3 > reader.remaining():  # every entry takes at least 3 bytes
            raise ProtocolError(f"Interest claims {count} entries", code=ErrorCode.PROTOCOL_VIOLATION)
        entries = []
        for _ in range(count):
            pattern = _utf8(reader, 1, MAX_SUBJECT_BYTES, "Interest pattern")
            entries.append((pattern, _utf8(reader, 0, MAX_QUEUE_GROUP_BYTES, "Interest queue group")))
        return cls(op, seq, tuple(entries))


def _utf8(reader: _Reader, low: int, high: int, what: str) -> str:
    """A length-prefixed UTF-8 string of ``low..high`` bytes."""
    length = reader.varint()
    if not low <= length <= high or length > reader.remaining():
        raise ProtocolError(f"{what} of {length} bytes", code=ErrorCode.PROTOCOL_VIOLATION)
    raw = reader.buf[reader.pos : reader.pos + length]
    reader.pos += length
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8", code=ErrorCode.PROTOCOL_VIOLATION) from None


Frame = Union[Hello, Ack, Reject, GoAway, Services, Interest]
_FRAME_CLASSES: dict[int, type[Hello] | type[Ack] | type[Reject] | type[GoAway] | type[Services] | type[Interest]] = {
    cls.frame_type: cls for cls in (Hello, Ack, Reject, GoAway, Services, Interest)
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
