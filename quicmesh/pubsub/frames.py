"""What pub/sub puts on the wire besides the Interest control frame (docs/PROTOCOL.md, "Subjects"). Pure.

- a PUBLISH datagram: the kind byte, then a *publication*;
- a FEATURE_MESSAGE with tag PUBSUB: ``publish_id`` (varint), then a publication;
- a FEATURE_REQUEST with tag PUBSUB: ``timeout_ms`` (varint: how long the caller waits), then a publication
  (its group is empty); the response body is the responder's reply.

A publication is ``subject_length, subject, group_length, group, payload``: UTF-8 subject of
1..MAX_SUBJECT_BYTES bytes, queue group of 0..MAX_QUEUE_GROUP_BYTES ("" for plain subscribers), then the
payload to the end. Decoders check sizes and UTF-8 and raise only ProtocolError; subject syntax is the
feature's to check (a bad one is dropped and counted, not a reason to close the connection).
"""

from __future__ import annotations

from typing import NamedTuple

from quicmesh.errors import ProtocolError
from quicmesh.protocol import wire

_PUBLISH_PREFIX = bytes((wire.DatagramKind.PUBLISH,))
#: Bytes of a PUBLISH datagram around the payload, at most (kind, two 2-byte lengths, subject, group)
PUBLISH_OVERHEAD_MAX = 1 + 2 + wire.MAX_SUBJECT_BYTES + 2 + wire.MAX_QUEUE_GROUP_BYTES


class Publication(NamedTuple):
    subject: str
    group: str
    payload: bytes


def encode_publication(subject: str, group: str, payload: bytes) -> bytes:
    raw_subject, raw_group = subject.encode("utf-8"), group.encode("utf-8")
    if not 0 < len(raw_subject) <= wire.MAX_SUBJECT_BYTES or len(raw_group) > wire.MAX_QUEUE_GROUP_BYTES:
        raise ValueError(f"bad publication header {(subject, group)!r}")
    return b"".join((wire.encode_varint(len(raw_subject)), raw_subject, wire.encode_varint(len(raw_group)),
                     raw_group, payload))


def decode_publication(data: bytes, pos: int = 0) -> Publication:
    subject, pos = _text(data, pos, 1, wire.MAX_SUBJECT_BYTES, "subject")
    group, pos = _text(data, pos, 0, wire.MAX_QUEUE_GROUP_BYTES, "queue group")
    return Publication(subject, group, bytes(data[pos:]))


def _text(data: bytes, pos: int, low: int, high: int, what: str) -> tuple[str, int]:
    parsed = wire.decode_varint(data, pos)
    if parsed is None:
        raise ProtocolError(f"truncated pub/sub {what}", code=wire.ErrorCode.PROTOCOL_VIOLATION)
    length, pos = parsed
    end = pos + length
    if not low <= length <= high or end > len(data):
        raise ProtocolError(f"pub/sub {what} of {length} bytes", code=wire.ErrorCode.PROTOCOL_VIOLATION)
    try:
        return bytes(data[pos:end]).decode("utf-8"), end
    except UnicodeDecodeError:
        raise ProtocolError(f"pub/sub {what} is not UTF-8", code=wire.ErrorCode.PROTOCOL_VIOLATION) from None


def _leading_varint(data: bytes, what: str) -> tuple[int, int]:
    parsed = wire.decode_varint(data, 0)
    if parsed is None:
        raise ProtocolError(f"truncated pub/sub {what}", code=wire.ErrorCode.PROTOCOL_VIOLATION)
    return parsed


def encode_publish_datagram(subject: str, group: str, payload: bytes) -> bytes:
    return _PUBLISH_PREFIX + encode_publication(subject, group, payload)


def decode_publish_datagram(datagram: bytes) -> Publication:
    if datagram[:1] != _PUBLISH_PREFIX:
        raise ProtocolError("not a PUBLISH datagram", code=wire.ErrorCode.PROTOCOL_VIOLATION)
    return decode_publication(datagram, 1)


def encode_publish_message(publish_id: int, subject: str, group: str, payload: bytes) -> bytes:
    return wire.encode_varint(publish_id) + encode_publication(subject, group, payload)


def decode_publish_message(body: bytes) -> tuple[int, Publication]:
    publish_id, pos = _leading_varint(body, "message")
    return publish_id, decode_publication(body, pos)


def encode_subject_request(timeout_ms: int, subject: str, payload: bytes) -> bytes:
    return wire.encode_varint(min(timeout_ms, wire.MAX_VARINT)) + encode_publication(subject, "", payload)


def decode_subject_request(body: bytes) -> tuple[int, Publication]:
    timeout_ms, pos = _leading_varint(body, "request")
    return timeout_ms, decode_publication(body, pos)
