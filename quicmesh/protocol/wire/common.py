"""Shared by every part of the wire format: ALPN and version, limits, the code enums (errors, datagram kinds,
features, stream types, response statuses, frame types), QUIC varints, and the payload reader."""

from __future__ import annotations

from enum import IntEnum, IntFlag

from quicmesh.errors import ProtocolError
from quicmesh.protocol.names import is_valid_name

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
#: Pub/sub (quicmesh/pubsub): subjects and patterns are UTF-8 of 1..256 bytes, queue group names 0..64
#: (0: no group); an Interest frame holds as many entries as fit the control frame limit.
MAX_SUBJECT_BYTES = 256
MAX_QUEUE_GROUP_BYTES = 64


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
    REFUSED = 12  # a feature message the receiving node has no feature for, or its feature refused


class DatagramKind(IntEnum):
    """First byte of every QUIC DATAGRAM payload."""

    APP = 0x00
    FORWARD = 0x01  # forwarding node -> exposing node: to service ``service_id`` (the exposing node's id)
    FORWARD_REPLY = 0x02  # exposing node -> forwarding node: the service's reply on flow ``flow_id``
    BATCH = 0x03  # several of the above in one QUIC DATAGRAM frame, each behind its length
    PUBLISH = 0x04  # pub/sub: a subject's message for the receiver's subscribers (quicmesh/pubsub)
    RELAY_UP = 0x05  # relay: an end node -> its relay: an inner QUIC packet on a circuit (quicmesh/relay)
    RELAY_DOWN = 0x06  # relay: the relay -> an end node: the other end's inner QUIC packet on that circuit


class Feature(IntFlag):
    """Bits of ``Hello.features``: what the sender of the Hello accepts beyond the base protocol."""

    DATAGRAM_BATCH = 0x1  # BATCH datagrams
    FEATURE_STREAMS = 0x2  # FEATURE_MESSAGE and FEATURE_REQUEST streams


#: What this implementation accepts (sent in its Hello); unknown bits from a peer are ignored.
FEATURES = Feature.DATAGRAM_BATCH | Feature.FEATURE_STREAMS


class StreamType(IntEnum):
    """Leading varint of every stream."""

    CONTROL = 0x00  # unidirectional, one per direction, opened first
    MESSAGE = 0x01  # unidirectional, one per reliable message
    REQUEST = 0x02  # bidirectional, one per request; the response comes back on it
    FEATURE_MESSAGE = 0x03  # unidirectional: a reliable message for a feature (its tag says which)
    FEATURE_REQUEST = 0x04  # bidirectional: a request for a feature; the response as for REQUEST


class FeatureTag(IntEnum):
    """Which feature a FEATURE_MESSAGE or FEATURE_REQUEST is for (0 is never sent: plain MESSAGE/REQUEST)."""

    PUBSUB = 0x01
    DURABLE = 0x02
    MEMBERSHIP = 0x03
    RELAY = 0x04
    NAT = 0x05  # NAT traversal: observed addresses and hole-punch coordination (quicmesh/nat)


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
    INTEREST = 0x06  # pub/sub: which subject patterns the sender's subscribers want


class InterestOp(IntEnum):
    """What an Interest frame does with its entries."""

    ADD = 0
    REMOVE = 1
    RESET = 2  # replaces everything the sender told before (its entries are the first of the new set)
    RESYNC = 3  # no entries: "send me a RESET" (the receiver dropped a frame of ours)


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


def encode_node_name(name: str) -> bytes:
    """A node name as feature bodies carry it (its ASCII bytes); ValueError if it is no node name."""
    if not is_valid_name(name):
        raise ValueError(f"not a node name: {name!r}")
    return name.encode()


def decode_node_name(raw: bytes, what: str) -> str:
    """The node name in ``raw``; a ProtocolError naming ``what`` (e.g. "relay message") if it is none."""
    try:
        name = bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        name = ""
    if not is_valid_name(name):
        raise ProtocolError(f"{what} names no valid node", code=ErrorCode.PROTOCOL_VIOLATION)
    return name
