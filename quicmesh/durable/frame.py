"""The DURABLE feature message (docs/PROTOCOL.md, "Durable messages"): pure, no I/O.

A FEATURE_MESSAGE with tag DURABLE carries ``origin`` (the sender's store id: random, fixed for the life of
its database), ``seq`` (the outbox row, unique and increasing within that store), ``floor`` (every seq of
this origin for this receiver below it is settled at the sender: it will never be sent again) and the
application's body. ``(origin, seq)`` survives restarts of either node; ``floor`` lets the receiver prune
its duplicate filter.
"""

from __future__ import annotations

from typing import NamedTuple

from quicmesh.errors import ProtocolError
from quicmesh.protocol import wire


class DurableFrame(NamedTuple):
    origin: int
    seq: int
    floor: int
    body: bytes


def encode_durable(origin: int, seq: int, floor: int, body: bytes) -> bytes:
    """The feature message body; ValueError if ``floor > seq`` (a local bug: a row is never below its floor)."""
    if floor > seq:
        raise ValueError(f"durable floor {floor} above seq {seq}")
    return wire.encode_varint(origin) + wire.encode_varint(seq) + wire.encode_varint(floor) + body


def decode_durable(data: bytes) -> DurableFrame:
    """Parse a DURABLE message; ProtocolError on any malformed input."""
    fields = []
    pos = 0
    for name in ("origin", "seq", "floor"):
        parsed = wire.decode_varint(data, pos)
        if parsed is None:
            raise ProtocolError(f"truncated durable message ({name})", code=wire.ErrorCode.PROTOCOL_VIOLATION)
        value, pos = parsed
        fields.append(value)
    origin, seq, floor = fields
    if floor > seq:
        raise ProtocolError(f"durable message floor {floor} above its seq {seq}",
                            code=wire.ErrorCode.PROTOCOL_VIOLATION)
    return DurableFrame(origin, seq, floor, bytes(data[pos:]))
