"""DATAGRAM payloads: APP, FORWARD and FORWARD_REPLY datagrams, and BATCH datagrams of several of them."""

from __future__ import annotations

from quicmesh.errors import ProtocolError
from quicmesh.protocol.wire.common import DatagramKind, ErrorCode, _Reader, decode_varint, encode_varint

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
